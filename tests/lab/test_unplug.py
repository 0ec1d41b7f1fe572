"""Unplug of a hot-added DIMM from a booted guest served by ``pyvhost net``: the back-end's
table shrinks, the region's fd and mapping are released in the back-end process, and the
guest's network keeps working.

The guest (``memhp_default_state=online_movable``, so its DIMMs can be offlined again) has
a vhost-user NIC on ``pyvhost net``, whose second port is a tap in a network namespace the
test creates. Between QEMU and the back-end sits the lab's relay
(:class:`pyvhost.tools.relay.Relay`): it records which files each memory message carried and,
for the ``set-mem-table`` case, hides CONFIGURE_MEM_SLOTS so that QEMU re-sends the whole
table (fresh fds every time) instead of ADD_MEM_REG / REM_MEM_REG. The back-end's holdings
are read from /proc (by inode: every QEMU memfd has the same name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pyvhost.backend.control import fetch_status
from pyvhost.hotplug.execute import execute_add, execute_remove
from pyvhost.hotplug.host import read_host
from pyvhost.hotplug.plan import AddRequest, plan_add, plan_remove
from pyvhost.hotplug.qmp import Qmp
from pyvhost.hotplug.state import read_state
from pyvhost.protocol.constants import ProtocolFeature, Request
from pyvhost.tools.relay import Relay
from pyvhost.units import MiB
from support.guestmem import wait_memtotal
from support.procs import Procs, need, wait_for_socket

from .conftest import BootGuest
from .memfds import NetNs, memfd_inodes, region_at, wait_holdings

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

DIMM = 128 * MiB
KB = 1024





def table(ctl: Path) -> list[dict[str, Any]]:
    """The back-end's memory table (its one vhost-user connection)."""
    conns = fetch_status(str(ctl))["connections"]
    assert isinstance(conns, list) and len(conns) == 1, conns
    memory: list[dict[str, Any]] = conns[0]["memory"]
    return memory


def layout(regions: list[dict[str, Any]]) -> list[tuple[int, int, int, int]]:
    return [(r["guest_phys_addr"], r["memory_size"], r["userspace_addr"], r["mmap_offset"])
            for r in regions]


@pytest.mark.parametrize("mode", ["mem-slots", "set-mem-table"])
def test_unplug_releases_the_region_in_the_back_end(boot_guest: BootGuest, procs: Procs,
                                                    short_dir: Path, netns: NetNs,
                                                    mode: str) -> None:
    need("ping", "iputils-ping")
    be_sock, relay_sock, ctl = (short_dir / n for n in ("be.sock", "relay.sock", "ctl.sock"))
    backend = procs.pyvhost("net", "--socket", str(be_sock), "--tap", netns.tap,
                            "--control", str(ctl), "--no-stats")
    wait_for_socket(ctl, backend.proc, timeout=60)
    netns.move_tap("10.98.0.2/24")
    hide = int(ProtocolFeature.CONFIGURE_MEM_SLOTS) if mode == "set-mem-table" else 0
    relay = Relay(relay_sock, be_sock, hide_protocol_features=hide).start()
    try:
        vm = boot_guest(ip="10.98.0.1/24", mac="52:54:00:00:98:01", net_socket=relay_sock)
        c = vm.console
        code, out = c.ping("10.98.0.2", count=3)
        assert code == 0, out + backend.output()

        # QEMU's memfds are the guest's files; before the add, the back-end holds some of
        # them (boot RAM), one fd and one mapping per region.
        before_table = table(ctl)
        before = wait_holdings(backend.pid, lambda h: sum(h.fds.values()) == len(before_table))
        guest_files = memfd_inodes(vm.qemu.pid)
        assert sum(before.fds.values()) == sum(before.maps.values()) == len(before_table)
        assert set(before.fds) <= guest_files
        updates_before = len(relay.memory_updates())
        mem_before = c.meminfo()["MemTotal"]

        # -- hot-add, through the hotplug library --------------------------------------
        vm.qmp.close()  # a QMP monitor serves one client: the library takes it over
        with Qmp(str(vm.qemu.qmp_path), timeout=120) as qmp:
            plan = plan_add(AddRequest(size=DIMM, id="d1"), read_state(qmp), read_host())
            assert not plan.refused, plan.refusals
            added = execute_add(qmp, plan, timeout=120, ost_timeout=10)
            assert added.ok, added
            assert added.device is not None
            gpa = int(added.device["addr"])
            assert wait_memtotal(c, mem_before + DIMM // KB) == mem_before + DIMM // KB

            after_add = table(ctl)
            assert [r["guest_phys_addr"] for r in after_add] == sorted(
                [r["guest_phys_addr"] for r in before_table] + [gpa])
            new_updates = relay.memory_updates()[updates_before:]
            want = Request.ADD_MEM_REG if mode == "mem-slots" else Request.SET_MEM_TABLE
            assert [u.request for u in new_updates] == [want], new_updates
            assert new_updates[0].ok
            dimm_file = region_at(new_updates[0], gpa).file
            assert dimm_file is not None
            dimm_inode = dimm_file[1]
            assert dimm_inode in memfd_inodes(vm.qemu.pid) - guest_files  # a new QEMU file
            added_h = wait_holdings(backend.pid, lambda h: h.of([dimm_inode]) == (1, 1))
            assert added_h.of([dimm_inode]) == (1, 1)
            # SET_MEM_TABLE re-sent every region with a fresh fd: the unchanged ones kept
            # their mapping and the fresh fds were closed (no growth beyond the new region).
            assert sum(added_h.fds.values()) == sum(added_h.maps.values()) == len(after_add)
            code, out = c.ping("10.98.0.2", count=3)
            assert code == 0, out

            # -- unplug: device_del, DEVICE_DELETED, object-del ----------------------------
            removed = execute_remove(qmp, plan_remove("d1", read_state(qmp)), timeout=180)
            assert removed.ok, removed
            assert removed.done == ["device_del", "object-del"]
            assert not removed.timed_out
        assert wait_memtotal(c, mem_before) == mem_before

        assert layout(table(ctl)) == layout(before_table)
        gone = relay.memory_updates()[updates_before + 1:]
        if mode == "mem-slots":
            assert [(u.request, [r.guest_phys_addr for r in u.regions]) for u in gone] == [
                (Request.REM_MEM_REG, [gpa])]
            assert gone[0].ok
        else:
            assert [u.request for u in gone] == [Request.SET_MEM_TABLE]
            assert gpa not in {r.guest_phys_addr for r in gone[0].regions}
        after = wait_holdings(backend.pid, lambda h: h.of([dimm_inode]) == (0, 0)
                              and h.total_fds == before.total_fds)
        assert after.of([dimm_inode]) == (0, 0), after
        assert after.fds == before.fds and after.maps == before.maps
        assert after.total_fds == before.total_fds
        # Not asserted, for the record: QEMU 7.2 itself was seen to keep the DIMM's memfd
        # open after object-del (30 s later still).
        qemu_keeps = dimm_inode in memfd_inodes(vm.qemu.pid)
        code, out = c.ping("10.98.0.2", count=3)
        assert code == 0, out + backend.output()
        assert backend.proc.poll() is None
    finally:
        relay.stop()
    assert relay.errors() == []
    # Report for the record (pytest -s): what the back-end held at each step.
    print(f"\n{mode}: back-end memfd fds/mappings before {sum(before.fds.values())}/"
          f"{sum(before.maps.values())}, after add {sum(added_h.fds.values())}/"
          f"{sum(added_h.maps.values())}, after unplug {sum(after.fds.values())}/"
          f"{sum(after.maps.values())}; QEMU still holds the DIMM's memfd: {qemu_keeps}")
