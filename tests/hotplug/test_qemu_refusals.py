"""Every preflight refusal provoked on a real QEMU (7.2, or $PYVHOST_QEMU's) configured to
show it, then forced past the planner to see what QEMU itself does; and rollback leaves no
orphan backend.

Guests are paused (-S, no kernel): QEMU runs its hot-plug checks all the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pyvhost.hotplug.host import read_host
from pyvhost.hotplug.qemu_rules import rules_for
from pyvhost.lab.qemu import Qemu, QemuConfig, VhostUserNet
from pyvhost.units import GiB, MiB
from support.procs import Procs, wait_for_socket

from .conftest import StartQemu, objects, run_json, run_mem

pytestmark = pytest.mark.qemu


def codes(doc: dict[str, Any]) -> list[str]:
    return [r["code"] for r in doc["refusals"]]


def refused_then_forced(q: Qemu, *args: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ask (refused, nothing changed), then force the same request past the planner."""
    before = objects(q)
    code, doc = run_json("add", "--qmp", str(q.qmp_path), *args)
    assert code == 1, doc
    assert doc["outcome"] is None
    assert objects(q) == before
    _, forced = run_json("add", "--qmp", str(q.qmp_path), *args, "--force")
    return doc, forced


def assert_qemu_refused(q: Qemu, forced: dict[str, Any], step: str, message: str) -> None:
    out = forced["outcome"]
    assert out["ok"] is False, forced
    assert out["failed_step"] == step
    assert message in out["error"]
    assert out["orphans"] == []
    assert forced["backend_id"] not in objects(q)


def add_ok(q: Qemu, *args: str) -> dict[str, Any]:
    code, doc = run_json("add", "--qmp", str(q.qmp_path), *args)
    assert code == 0, doc
    assert doc["outcome"]["ok"], doc
    return doc


def test_no_slots_configured(start_qemu: StartQemu) -> None:
    q = start_qemu(QemuConfig(slots=0))
    doc, forced = refused_then_forced(q, "--size", "128M")
    assert codes(doc) == ["NO_SLOTS_CONFIGURED"]
    assert_qemu_refused(q, forced, "device_add", "no slots where allocated")


def test_no_free_slot(start_qemu: StartQemu) -> None:
    q = start_qemu(QemuConfig(slots=2))
    add_ok(q, "--size", "128M")
    add_ok(q, "--size", "128M")
    doc, forced = refused_then_forced(q, "--size", "128M")
    assert codes(doc) == ["NO_FREE_SLOT"]
    assert_qemu_refused(q, forced, "device_add", "no free slots available")


def test_maxmem_exceeded(start_qemu: StartQemu) -> None:
    q = start_qemu(QemuConfig(maxmem=512 * MiB))
    doc, forced = refused_then_forced(q, "--size", "384M")
    assert codes(doc) == ["MAXMEM_EXCEEDED"]
    assert_qemu_refused(q, forced, "device_add", "not enough space")
    add_ok(q, "--size", "256M")  # exactly what is left


def test_id_in_use(start_qemu: StartQemu) -> None:
    q = start_qemu(QemuConfig())
    add_ok(q, "--size", "128M", "--id", "d1")
    doc, forced = refused_then_forced(q, "--size", "128M", "--id", "d1")
    assert set(codes(doc)) == {"ID_IN_USE"}
    out = forced["outcome"]
    assert out["failed_step"] == "object-add" and out["rolled_back"] == []
    # The existing DIMM and its backend are untouched.
    assert "d1-mem" in objects(q)
    _, status = run_json("status", "--qmp", str(q.qmp_path))
    assert [d["id"] for d in status["memory_devices"]] == ["d1"]


def test_size_alignment(start_qemu: StartQemu) -> None:
    q = start_qemu(QemuConfig())
    doc, forced = refused_then_forced(q, "--size", "100M")
    assert codes(doc) == ["SIZE_ALIGNMENT"]
    # QEMU takes it: the guest would leave the last 100-128 MiB block unused.
    assert forced["outcome"]["ok"] is True


def test_numa_node_out_of_range(start_qemu: StartQemu) -> None:
    q = start_qemu(QemuConfig(numa_nodes=2))
    add_ok(q, "--size", "128M", "--node", "1")
    doc, forced = refused_then_forced(q, "--size", "128M", "--node", "2")
    assert codes(doc) == ["NUMA_NODE_OUT_OF_RANGE"]
    assert_qemu_refused(q, forced, "device_add", "exceeds the number of numa nodes")


def test_hugepages_short(start_qemu: StartQemu) -> None:
    host = read_host()
    page = host.default_hugepage_size
    if page is None:
        pytest.skip("this kernel has no hugepages")
    pool = host.pool(page)
    # More than the host has free, whatever hugepages other tests reserved meanwhile.
    size = ((pool.available if pool else 0) * page // (128 * MiB) + 1) * 128 * MiB
    q = start_qemu(QemuConfig(maxmem=256 * MiB + size))
    doc, forced = refused_then_forced(q, "--size", f"{size // MiB}M", "--hugepages")
    assert codes(doc) == ["HUGEPAGES_SHORT"]
    assert_qemu_refused(q, forced, "object-add", "Cannot allocate memory")


def test_mem_path_missing(start_qemu: StartQemu, tmp_path: Path) -> None:
    q = start_qemu(QemuConfig())
    missing = tmp_path / "no-such-dir" / "x"
    doc, forced = refused_then_forced(q, "--size", "128M", "--backend", "file",
                                      "--mem-path", str(missing))
    assert codes(doc) == ["MEM_PATH_MISSING"]
    assert_qemu_refused(q, forced, "object-add", "No such file or directory")


def test_mem_path_not_hugetlbfs(start_qemu: StartQemu, tmp_path: Path) -> None:
    q = start_qemu(QemuConfig())
    doc, forced = refused_then_forced(q, "--size", "128M", "--backend", "file",
                                      "--mem-path", str(tmp_path), "--hugepages")
    assert "MEM_PATH_NOT_HUGETLBFS" in codes(doc)
    # QEMU takes a plain directory: the memory is silently not on hugepages.
    assert forced["outcome"]["ok"] is True


def _pyvhost_backend(procs: Procs, tmp_path: Path) -> Path:
    sock = tmp_path / "vh.sock"
    p = procs.pyvhost("net", "--socket", str(sock), "--reflect", "--no-stats")
    wait_for_socket(sock, p.proc, timeout=60)
    return sock


@pytest.mark.parametrize("args", [("--backend", "ram"), ("--no-share",)])
def test_not_shared_with_vhost_user(start_qemu: StartQemu, procs: Procs, tmp_path: Path,
                                    args: tuple[str, ...]) -> None:
    sock = _pyvhost_backend(procs, tmp_path)
    q = start_qemu(QemuConfig(vhost_user_net=(VhostUserNet(sock),)))
    doc, forced = refused_then_forced(q, "--size", "128M", *args)
    assert codes(doc) == ["NOT_SHARED_WITH_VHOST_USER"]
    # QEMU accepts it: this is the silent breakage the planner is for.
    assert forced["outcome"]["ok"] is True


def test_boot_ram_not_shared(start_qemu: StartQemu, procs: Procs, tmp_path: Path) -> None:
    sock = _pyvhost_backend(procs, tmp_path)
    q = start_qemu(QemuConfig(ram_backend="ram", ram_share=False,
                              vhost_user_net=(VhostUserNet(sock),)))
    code, doc = run_json("add", "--qmp", str(q.qmp_path), "--size", "128M")
    assert code == 1
    assert codes(doc) == ["BOOT_RAM_NOT_SHARED"]


def _add_until_refused(q: Qemu, *extra: str) -> tuple[int, dict[str, Any]]:
    accepted = 0
    while True:
        code, doc = run_json("add", "--qmp", str(q.qmp_path), "--size", "128M", *extra)
        if code != 0:
            return accepted, doc
        assert doc["outcome"]["ok"], doc
        accepted += 1
        assert accepted <= 16, "the planner never refused"


@pytest.mark.dpdk
def test_region_limit_predicts_dpdk(start_qemu: StartQemu, procs: Procs, tmp_path: Path,
                                    qemu_under_test: tuple[int, int, int]) -> None:
    """DPDK 22.11 (no CONFIGURE_MEM_SLOTS): 8 regions; boot RAM takes 2 (q35, 4 KiB)."""
    sock = tmp_path / "dpdk.sock"
    t = procs.testpmd(f"net_vhost0,iface={sock},queues=1")
    wait_for_socket(sock, t.proc, timeout=120)
    q = start_qemu(QemuConfig(slots=16, maxmem=8 * GiB, vhost_user_net=(VhostUserNet(sock),)))
    _, status = run_json("status", "--qmp", str(q.qmp_path))
    assert status["vhost_user"]["regions_used"] == 2
    accepted, doc = _add_until_refused(q)
    assert accepted == 6
    assert codes(doc) == ["VHOST_USER_REGION_LIMIT"]
    assert doc["prediction"]["vhost_user_regions"] == 9
    _, forced = run_json("add", "--qmp", str(q.qmp_path), "--size", "128M", "--force")
    assert_qemu_refused(q, forced, "device_add",
                        rules_for(qemu_under_test)[0].region_refusal)
    assert f"QEMU {rules_for(qemu_under_test)[0].name} refuses" in doc["refusals"][0]["message"]


def test_region_limit_pyvhost_memslots(start_qemu: StartQemu, procs: Procs,
                                       tmp_path: Path) -> None:
    """pyvhost offers CONFIGURE_MEM_SLOTS: QEMU takes DIMMs past 8 regions."""
    sock = _pyvhost_backend(procs, tmp_path)
    q = start_qemu(QemuConfig(slots=10, maxmem=8 * GiB, vhost_user_net=(VhostUserNet(sock),)))
    # Not started by a guest: the planner cannot know, and assumes 8 unless told.
    accepted, doc = _add_until_refused(q)
    assert accepted == 6 and codes(doc) == ["VHOST_USER_REGION_LIMIT"]
    accepted, doc = _add_until_refused(q, "--region-limit", "256")
    assert accepted == 4 and codes(doc) == ["NO_FREE_SLOT"]
    _, status = run_json("status", "--qmp", str(q.qmp_path))
    assert status["vhost_user"]["regions_used"] == 12


def test_remove_paused_guest_times_out_and_unknown_id(start_qemu: StartQemu) -> None:
    q = start_qemu(QemuConfig())
    add_ok(q, "--size", "128M", "--id", "d1")
    code, doc = run_json("remove", "--qmp", str(q.qmp_path), "nope")
    assert code == 1 and codes(doc) == ["DEVICE_NOT_FOUND"]
    code, doc = run_json("remove", "--qmp", str(q.qmp_path), "d1", "--timeout", "3")
    assert code == 4
    assert doc["outcome"]["timed_out"] is True
    assert doc["outcome"]["done"] == []
    assert "d1-mem" in objects(q)  # still in use by the DIMM: not deleted


def test_status_table_and_dry_run(start_qemu: StartQemu, procs: Procs, tmp_path: Path) -> None:
    sock = _pyvhost_backend(procs, tmp_path)
    q = start_qemu(QemuConfig(numa_nodes=2, vhost_user_net=(VhostUserNet(sock),)))
    add_ok(q, "--size", "256M", "--id", "big", "--node", "1")
    code, text = run_mem("status", "--qmp", str(q.qmp_path))
    assert code == 0
    for word in ("ram0", "big-mem", "net0", "vhost-user devices: 3 regions used"):
        assert word in text, text
    before = objects(q)
    code, text = run_mem("add", "--qmp", str(q.qmp_path), "--size", "128M", "--dry-run")
    assert code == 0 and "object-add" in text and "device_add" in text
    assert objects(q) == before


def test_unreachable_qmp_is_a_usage_error(tmp_path: Path) -> None:
    code, doc = run_json("status", "--qmp", str(tmp_path / "nothing.sock"))
    assert code == 2 and "no QMP socket at" in doc["error"]["message"], doc


@pytest.mark.parametrize("qom_type", ["memory-backend-memfd", "memory-backend-ram"])
def test_unshared_dimm_added_on_hmp_is_flagged_by_status(
        start_qemu: StartQemu, procs: Procs, tmp_path: Path, qom_type: str) -> None:
    """What an operator types on HMP (or libvirt's access='private' does): QEMU takes the
    DIMM; ``mem status`` reports it as an error with its ids, and ``mem add`` notes it."""
    sock = _pyvhost_backend(procs, tmp_path)
    q = start_qemu(QemuConfig(vhost_user_net=(VhostUserNet(sock),)))
    share = ",share=off" if qom_type != "memory-backend-ram" else ""
    for line in (f"object_add {qom_type},id=priv-mem,size=128M{share}",
                 "device_add pc-dimm,id=priv,memdev=priv-mem"):
        out = q.control.cmd("human-monitor-command", **{"command-line": line})
        assert out == "", out
    code, status = run_json("status", "--qmp", str(q.qmp_path))
    assert code == 1, status  # an error on this VM: status exits 1
    (problem,) = status["problems"]
    assert (problem["code"], problem["id"], problem["device"]) == (
        "NOT_SHARED_WITH_VHOST_USER", "priv-mem", "priv"), problem
    assert "net0" in problem["message"] and "pyvhost mem remove priv" in problem["message"]
    code, text = run_mem("status", "--qmp", str(q.qmp_path))
    assert code == 1 and "priv-mem" in text and "NOT_SHARED_WITH_VHOST_USER" in text, text
    code, doc = run_json("add", "--qmp", str(q.qmp_path), "--size", "128M", "--dry-run")
    assert code == 0 and any("already wrong" in n and "priv" in n for n in doc["notes"]), doc
