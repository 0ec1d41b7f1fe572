"""Two vhost-user devices on one guest, on the QEMU under test (7.2, or $PYVHOST_QEMU's
10.0): the DIMM QEMU refuses is the one the dry run refused.

One NIC is served by ``pyvhost net`` with CONFIGURE_MEM_SLOTS (it answers
GET_MAX_MEM_SLOTS with 509), the other by a back-end without it (``pyvhost net
--no-mem-slots``, or DPDK 22.11 testpmd): QEMU's limit is the smaller one, 8 regions, on
both versions, although 7.2 keeps one global count of used memslots and 10.0 compares
each device's limit with it (:mod:`pyvhost.hotplug.qemu_rules`).

A paused guest (-S) has started neither device, so QMP cannot tell which back-end has
CONFIGURE_MEM_SLOTS and the planner assumes ``--region-limit`` (8) for both. A booted
guest's driver starts both: QMP then shows which one lacks it, and the planner takes that
device's exact 8 even when told to assume 509 for the others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pyvhost.hotplug.qemu_rules import rules_for
from pyvhost.lab.qemu import Qemu, QemuConfig, VhostUserNet
from pyvhost.units import GiB
from support.procs import Procs, wait_for_socket

from .conftest import BootVm, StartQemu, objects, run_json

pytestmark = pytest.mark.qemu


def _pyvhost(procs: Procs, short_dir: Path, name: str, mem_slots: bool) -> Path:
    sock = short_dir / f"{name}.sock"
    p = procs.pyvhost("net", "--socket", str(sock), "--reflect", "--no-stats",
                      "--mem-slots" if mem_slots else "--no-mem-slots", name=name)
    wait_for_socket(sock, p.proc, timeout=60)
    return sock


def _testpmd(procs: Procs, short_dir: Path) -> Path:
    sock = short_dir / "dpdk.sock"
    t = procs.testpmd(f"net_vhost0,iface={sock},queues=1")
    wait_for_socket(sock, t.proc, timeout=120)
    return sock


def _nets(first: Path, second: Path) -> tuple[VhostUserNet, VhostUserNet]:
    return (VhostUserNet(first, id="net0", mac="52:54:00:00:00:01"),
            VhostUserNet(second, id="net1", mac="52:54:00:00:00:02"))


def _add_until_refused(q: Qemu, *extra: str, bound: int) -> tuple[int, dict[str, Any]]:
    """``pyvhost mem add`` of 128M DIMMs until the planner refuses one (at most ``bound``
    accepted: a planner that never refuses fails the test)."""
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
    """The refused DIMM forced past the planner: QEMU's device_add fails, nothing left."""
    code, forced = run_json("add", "--qmp", str(q.qmp_path), "--size", "128M", *extra,
                            "--force")
    out = forced["outcome"]
    assert code == 3 and out["ok"] is False and out["failed_step"] == "device_add", forced
    assert out["orphans"] == [] and forced["backend_id"] not in objects(q)
    return str(out["error"])


@pytest.mark.parametrize("second", ["pyvhost-no-mem-slots",
                                    pytest.param("dpdk", marks=pytest.mark.dpdk)])
def test_paused_guest_two_devices_the_smaller_limit(
        start_qemu: StartQemu, procs: Procs, short_dir: Path,
        qemu_under_test: tuple[int, int, int], second: str) -> None:
    rules, _ = rules_for(qemu_under_test)
    first = _pyvhost(procs, short_dir, "vha", mem_slots=True)
    other = (_testpmd(procs, short_dir) if second == "dpdk"
             else _pyvhost(procs, short_dir, "vhb", mem_slots=False))
    q = start_qemu(QemuConfig(slots=16, maxmem=8 * GiB, vhost_user_net=_nets(first, other)))
    _, status = run_json("status", "--qmp", str(q.qmp_path))
    vu = status["vhost_user"]
    assert [(d["id"], d["started"], d["configure_mem_slots"]) for d in vu["devices"]] == [
        ("net0", False, None), ("net1", False, None)], vu
    # q35 boot RAM (memfd, 4 KiB pages) is 2 regions, the same for both devices.
    assert (vu["regions_used"], vu["region_limit"], vu["region_limit_assumed"]) == (
        2, 8, True), vu

    accepted, doc = _add_until_refused(q, bound=16)
    assert accepted == 6, doc
    assert [r["code"] for r in doc["refusals"]] == ["VHOST_USER_REGION_LIMIT"], doc
    message = doc["refusals"][0]["message"]
    assert "net0, net1" in message and f"QEMU {rules.name} refuses" in message, message
    assert doc["prediction"]["vhost_user_regions"] == 9
    assert rules.region_refusal in _qemu_refuses_the_same(q)
    _, status = run_json("status", "--qmp", str(q.qmp_path))
    assert status["vhost_user"]["regions_used"] == 8


@pytest.mark.slow
def test_booted_guest_two_devices_the_known_limit_wins(
        boot_vm: BootVm, procs: Procs, short_dir: Path,
        qemu_under_test: tuple[int, int, int]) -> None:
    """Both drivers started: QMP shows net0 negotiated CONFIGURE_MEM_SLOTS (limit unknown,
    told 509) and net1 did not (exactly 8): the planner refuses at net1's 8, as QEMU does,
    where one device alone with --region-limit 509 would be let through."""
    rules, _ = rules_for(qemu_under_test)
    first = _pyvhost(procs, short_dir, "vha", mem_slots=True)
    other = _pyvhost(procs, short_dir, "vhb", mem_slots=False)
    q = boot_vm(slots=16, maxmem=8 * GiB, vhost_user_net=_nets(first, other))
    qmp = str(q.qmp_path)
    told = ("--region-limit", "509")
    _, status = run_json("status", "--qmp", qmp, *told)
    vu = status["vhost_user"]
    assert [(d["id"], d["started"], d["configure_mem_slots"], d["region_limit"])
            for d in vu["devices"]] == [("net0", True, True, None),
                                        ("net1", True, False, 8)], vu
    assert vu["region_limit"] == 8
    # QEMU's own count (n-mem-sections of each started device) is the planner's.
    used = vu["regions_used"]
    print(f"\nbooted, two vhost-user devices: {used} regions at boot")
    assert [d["qemu_region_count"] for d in vu["devices"]] == [used, used], vu

    accepted, doc = _add_until_refused(q, *told, bound=16)
    assert accepted == 8 - used, doc
    assert [r["code"] for r in doc["refusals"]] == ["VHOST_USER_REGION_LIMIT"], doc
    assert doc["prediction"]["vhost_user_region_limit"] == 8
    assert rules.region_refusal in _qemu_refuses_the_same(q, *told)
    _, status = run_json("status", "--qmp", qmp, *told)
    assert [d["qemu_region_count"] for d in status["vhost_user"]["devices"]] == [8, 8]
