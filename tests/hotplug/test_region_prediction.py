"""The prediction is exact: the DIMM QEMU refuses is the one the dry run refused, on
the QEMU under test (7.2, or $PYVHOST_QEMU's 10.0), against pyvhost net without and with
CONFIGURE_MEM_SLOTS (DPDK 22.11: test_qemu_refusals.py).

Guests are paused (-S): QEMU's vhost-user device is initialised at start (its back-end's
protocol features and GET_MAX_MEM_SLOTS answer are known to QEMU), and QEMU counts the
regions of its memory listener all the same. QMP does not show the back-end's answer, so
the planner is told pyvhost's (--region-limit 509) for the CONFIGURE_MEM_SLOTS case.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pyvhost.hotplug.qemu_rules import rules_for
from pyvhost.lab.qemu import Qemu, QemuConfig, VhostUserNet
from pyvhost.protocol.constants import VHOST_USER_MAX_MEM_SLOTS
from pyvhost.units import GiB, MiB
from support.procs import Procs, wait_for_socket

from .conftest import StartQemu, objects, run_json

pytestmark = pytest.mark.qemu
DIMM = 128 * MiB
MAX_DIMM_SLOTS = 256  # ACPI_MAX_RAM_SLOTS: -m ...,slots= takes at most this on x86


def _back_end(procs: Procs, short_dir: Path, mem_slots: bool) -> Path:
    sock = short_dir / "vh.sock"
    p = procs.pyvhost("net", "--socket", str(sock), "--reflect", "--no-stats",
                      "--mem-slots" if mem_slots else "--no-mem-slots")
    wait_for_socket(sock, p.proc, timeout=60)
    return sock


def _add_until_refused(q: Qemu, *extra: str, bound: int) -> tuple[int, dict[str, Any]]:
    accepted = 0
    while True:
        code, doc = run_json("add", "--qmp", str(q.qmp_path), "--size", "128M", *extra)
        if code != 0:
            assert code == 1, doc
            return accepted, doc
        assert doc["outcome"]["ok"], doc
        accepted += 1
        assert accepted <= bound, "the planner never refused"


def _qemu_refuses_the_same(q: Qemu, *extra: str) -> str:
    """Force the refused DIMM past the planner: QEMU refuses it too, and nothing is left."""
    code, forced = run_json("add", "--qmp", str(q.qmp_path), "--size", "128M", *extra,
                            "--force")
    out = forced["outcome"]
    assert code == 3 and out["ok"] is False and out["failed_step"] == "device_add", forced
    assert out["orphans"] == [] and forced["backend_id"] not in objects(q)
    return str(out["error"])


def test_exact_without_mem_slots(start_qemu: StartQemu, procs: Procs, short_dir: Path,
                                 qemu_under_test: tuple[int, int, int]) -> None:
    rules, _ = rules_for(qemu_under_test)
    sock = _back_end(procs, short_dir, mem_slots=False)
    q = start_qemu(QemuConfig(slots=16, maxmem=8 * GiB, vhost_user_net=(VhostUserNet(sock),)))
    accepted, doc = _add_until_refused(q, bound=16)
    # q35 boot RAM (4 KiB pages) is 2 regions: 6 DIMMs reach the 8.
    assert accepted == 6
    assert [r["code"] for r in doc["refusals"]] == ["VHOST_USER_REGION_LIMIT"]
    assert rules.region_refusal in _qemu_refuses_the_same(q)


def test_exact_with_mem_slots(start_qemu: StartQemu, procs: Procs, short_dir: Path,
                              qemu_under_test: tuple[int, int, int]) -> None:
    """pyvhost answers GET_MAX_MEM_SLOTS with 509: QEMU 7.2 caps it at 256 regions (254
    DIMMs past boot RAM's 2); QEMU 10.0 takes 509, so the 256 DIMM slots run out first."""
    rules, _ = rules_for(qemu_under_test)
    sock = _back_end(procs, short_dir, mem_slots=True)
    q = start_qemu(QemuConfig(slots=MAX_DIMM_SLOTS, maxmem=GiB + MAX_DIMM_SLOTS * DIMM,
                              vhost_user_net=(VhostUserNet(sock),)))
    limit = min(VHOST_USER_MAX_MEM_SLOTS, rules.max_ram_slots)
    expected = min(limit - 2, MAX_DIMM_SLOTS)
    # The bulk straight through QMP (fast), the last ones through pyvhost mem.
    for i in range(expected - 3):
        q.control.cmd("object-add", **{"qom-type": "memory-backend-memfd", "id": f"b{i}-mem",
                                       "size": DIMM, "share": True})
        q.control.cmd("device_add", driver="pc-dimm", id=f"b{i}", memdev=f"b{i}-mem")
    limit_arg = ("--region-limit", str(VHOST_USER_MAX_MEM_SLOTS))
    code, dry = run_json("add", "--qmp", str(q.qmp_path), "--size", "128M", "--dry-run",
                         *limit_arg)
    assert code == 0, dry
    assert dry["prediction"]["vhost_user_region_limit"] == limit
    assert dry["prediction"]["vhost_user_regions"] == expected
    accepted, doc = _add_until_refused(q, *limit_arg, bound=8)
    assert accepted == 3, doc
    error = _qemu_refuses_the_same(q, *limit_arg)
    if limit - 2 < MAX_DIMM_SLOTS:
        assert [r["code"] for r in doc["refusals"]] == ["VHOST_USER_REGION_LIMIT"]
        assert rules.region_refusal in error
    else:
        assert [r["code"] for r in doc["refusals"]] == ["NO_FREE_SLOT"]
        assert "no free slots available" in error
    _, status = run_json("status", "--qmp", str(q.qmp_path), *limit_arg)
    assert status["vhost_user"]["regions_used"] == expected + 2
