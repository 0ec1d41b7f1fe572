"""Real ``pyvhost mem --json`` output (real QEMU, paused) holds the schema files the
package ships (``pyvhost.schemas``), errors included."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvhost.lab.qemu import QemuConfig
from support.procs import Procs, wait_for_socket
from support.schemas import validate

from .conftest import StartQemu, run_json


@pytest.mark.qemu
def test_status_add_remove_hold_the_schema(start_qemu: StartQemu, procs: Procs,
                                           tmp_path: Path) -> None:
    from pyvhost.lab.qemu import VhostUserNet

    sock = tmp_path / "vh.sock"
    p = procs.pyvhost("net", "--socket", str(sock), "--reflect", "--no-stats")
    wait_for_socket(sock, p.proc, timeout=60)
    q = start_qemu(QemuConfig(numa_nodes=2, vhost_user_net=(VhostUserNet(sock),)))
    qmp = str(q.qmp_path)
    runs: list[tuple[int, tuple[str, ...]]] = [
        (0, ("add", "--qmp", qmp, "--size", "128M", "--id", "a", "--node", "1")),
        (0, ("add", "--qmp", qmp, "--size", "128M", "--dry-run")),
        (1, ("add", "--qmp", qmp, "--size", "128M", "--backend", "ram")),
        (3, ("add", "--qmp", qmp, "--size", "384M", "--node", "5", "--force")),
        (4, ("remove", "--qmp", qmp, "a", "--timeout", "2")),
        (1, ("remove", "--qmp", qmp, "nope")),
        (1, ("resize", "--qmp", qmp, "a", "--size", "0")),
    ]
    for expected, args in runs:
        code, doc = run_json(*args)
        assert code == expected, (args, doc)
        validate(doc, f"pyvhost.mem.{args[0]}/1")
    code, status = run_json("status", "--qmp", qmp)
    assert code == 0
    validate(status, "pyvhost.mem.status/1")
    assert {b["role"] for b in status["backends"]} == {"boot", "device"}
    code, error = run_json("status", "--qmp", str(tmp_path / "none.sock"))
    assert code == 2
    validate(error, "pyvhost.error/1")
    assert (error["command"], error["error"]["kind"]) == ("mem status", "connect")
