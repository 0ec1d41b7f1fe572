"""The --json output holds the schema written in docs/mem-json.md (real QEMU, paused)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvhost.hotplug.plan import Code
from pyvhost.lab.qemu import QemuConfig
from support.procs import Procs, wait_for_socket

from .conftest import StartQemu, run_json
from .schema import schemas, validate


def test_the_doc_has_every_schema_and_every_code() -> None:
    assert set(schemas()) == {"error", "status", "plan"}
    text = Path(__file__).resolve().parents[2].joinpath("docs", "mem-json.md").read_text()
    for code in Code:
        assert f"`{code.value}`" in text


def test_the_validator_rejects_what_it_should() -> None:
    s = schemas()["error"]
    validate({"error": "x"}, s)
    for bad in ({}, {"error": 1}, {"error": "x", "more": 1}):
        with pytest.raises(AssertionError):
            validate(bad, s)


@pytest.mark.qemu
def test_status_add_remove_hold_the_schema(start_qemu: StartQemu, procs: Procs,
                                           tmp_path: Path) -> None:
    from pyvhost.lab.qemu import VhostUserNet

    sock = tmp_path / "vh.sock"
    p = procs.pyvhost("net", "--socket", str(sock), "--reflect", "--no-stats")
    wait_for_socket(sock, p.proc, timeout=60)
    q = start_qemu(QemuConfig(numa_nodes=2, vhost_user_net=(VhostUserNet(sock),)))
    qmp = str(q.qmp_path)
    s = schemas()
    docs = [
        run_json("add", "--qmp", qmp, "--size", "128M", "--id", "a", "--node", "1")[1],
        run_json("add", "--qmp", qmp, "--size", "128M", "--dry-run")[1],
        run_json("add", "--qmp", qmp, "--size", "128M", "--backend", "ram")[1],
        run_json("add", "--qmp", qmp, "--size", "384M", "--node", "5", "--force")[1],
        run_json("remove", "--qmp", qmp, "a", "--timeout", "2")[1],
        run_json("remove", "--qmp", qmp, "nope")[1],
    ]
    for doc in docs:
        validate(doc, s["plan"])
    status = run_json("status", "--qmp", qmp)[1]
    validate(status, s["status"])
    assert {b["role"] for b in status["backends"]} == {"boot", "device"}
    validate(run_json("status", "--qmp", str(tmp_path / "none.sock"))[1], s["error"])
