"""Memory hot-add in a booted guest whose NIC is served by DPDK (C): testpmd's net_vhost.

Two guests, A and B, on two net_vhost ports of one testpmd (``io`` forwarding: port 0 to
port 1 and back), so pings between them cross DPDK. DIMMs are hot-added to A, through the
hotplug library, until QEMU refuses one: DPDK 22.11 has no CONFIGURE_MEM_SLOTS, so QEMU
re-sends SET_MEM_TABLE (every region, fresh fds) on each add and its limit is 8 regions.
After every step DPDK's fds and mappings of the guests' memory files are read from /proc
(by inode: every QEMU memfd is named alike) and must be exactly one fd and one mapping per
region of the last table (which the lab's relay between QEMU A and DPDK recorded, with the
file of each fd): a back-end that kept a superseded fd or mapping fails this check, as the
unit test at the end shows on a process that really holds one mapping too many.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time
from collections import Counter
from pathlib import Path

import pytest

from pyvhost.hotplug.execute import execute_add
from pyvhost.hotplug.host import read_host
from pyvhost.hotplug.plan import AddRequest, Code, plan_add
from pyvhost.hotplug.qmp import Qmp
from pyvhost.hotplug.state import read_state
from pyvhost.protocol.constants import VHOST_MEMORY_BASELINE_NREGIONS, Request
from pyvhost.tools.procfs import unix_listening
from pyvhost.tools.relay import MemoryUpdate, Relay
from pyvhost.units import MiB
from support.guestmem import wait_memtotal
from support.memfd import memfd
from support.procs import Procs, Started

from .conftest import BootGuest
from .memfds import Holdings, holding_errors, holdings, memfd_inodes, table_files

DIMM = 128 * MiB
KB = 1024



def _wait_listening(pmd: Started, *paths: Path) -> None:
    deadline = time.monotonic() + 120
    while not all(unix_listening(p) for p in paths):
        assert pmd.proc.poll() is None, f"testpmd exited:\n{pmd.output()[-3000:]}"
        assert time.monotonic() < deadline, f"testpmd not listening:\n{pmd.output()[-3000:]}"
        time.sleep(0.1)



def _last_table(relay: Relay) -> MemoryUpdate:
    tables = [u for u in relay.memory_updates() if u.request == Request.SET_MEM_TABLE]
    assert tables, "QEMU sent DPDK no SET_MEM_TABLE"
    return tables[-1]


@pytest.mark.qemu
@pytest.mark.dpdk
@pytest.mark.slow
def test_dpdk_holds_exactly_the_current_table_through_hot_adds(
        procs: Procs, boot_guest: BootGuest, short_dir: Path) -> None:
    sock_a, sock_b, relay_sock = (short_dir / n for n in ("a.sock", "b.sock", "relay.sock"))
    pmd = procs.testpmd(f"net_vhost0,iface={sock_a},queues=1", "--forward-mode=io",
                        name="testpmd-hotplug",
                        eal_args=("--vdev", f"net_vhost1,iface={sock_b},queues=1"))
    _wait_listening(pmd, sock_a, sock_b)
    relay = Relay(relay_sock, sock_a).start()
    try:
        a = boot_guest(ip="10.96.0.1/24", mac="52:54:00:00:96:01", net_socket=relay_sock)
        b = boot_guest(ip="10.96.0.2/24", mac="52:54:00:00:96:02", net_socket=sock_b)
        ca = a.console
        code, out = ca.ping("10.96.0.2", count=3)
        assert code == 0, out + pmd.output()[-3000:]

        files_b = memfd_inodes(b.qemu.pid)
        hold_b = Counter({i: n for i, n in holdings(pmd.pid).fds.items() if i in files_b})
        assert hold_b, "DPDK holds nothing of guest B's memory"
        guest_files = memfd_inodes(a.qemu.pid) | files_b
        steps: list[tuple[str, int, Holdings]] = []

        def check(step: str) -> int:
            """DPDK holds one fd and one mapping per region of A's last table, B's as at
            the start, nothing else of the guests' files. Returns A's region count."""
            guest_files.update(memfd_inodes(a.qemu.pid))
            table = _last_table(relay)
            assert table.ok, table
            expected = table_files(table) + hold_b
            seen = holdings(pmd.pid)
            errors = holding_errors(expected, guest_files, seen)
            assert errors == [], f"after {step}: {errors}"
            steps.append((step, len(table.regions), seen))
            return len(table.regions)

        boot_regions = check("boot")
        a.qmp.close()  # the library takes over A's free QMP monitor
        refused_at = None
        mem = ca.meminfo()["MemTotal"]
        with Qmp(str(a.qemu.qmp_path), timeout=120) as qmp:
            for i in range(1, VHOST_MEMORY_BASELINE_NREGIONS + 2):
                plan = plan_add(AddRequest(size=DIMM, id=f"d{i}"), read_state(qmp),
                                read_host())
                codes = [r.code for r in plan.refusals]
                # Forced past the planner: QEMU's own verdict is what this test is about.
                outcome = execute_add(qmp, plan, timeout=120, ost_timeout=5, force=True)
                if not outcome.ok:
                    refused_at = i
                    # QEMU 7.2 "has no free ...", 10.0 "has not enough free ..."
                    assert "free memory slots left" in (outcome.error or ""), outcome
                    assert outcome.orphans == [], outcome  # the backend was object-del'd
                    assert Code.VHOST_USER_REGION_LIMIT in codes  # the planner knew
                    check(f"refused d{i}")
                    break
                assert Code.VHOST_USER_REGION_LIMIT not in codes, (i, plan.refusals)
                mem += DIMM // KB
                assert wait_memtotal(ca, mem) == mem
                regions = check(f"d{i}")
                assert regions == boot_regions + i
        # QEMU's limit: 8 regions in all (VHOST_MEMORY_BASELINE_NREGIONS, DPDK's too).
        assert refused_at == VHOST_MEMORY_BASELINE_NREGIONS - boot_regions + 1, steps
        code, out = ca.ping("10.96.0.2", count=5)
        assert code == 0, out + pmd.output()[-3000:]
        assert pmd.proc.poll() is None
        tables = [u for u in relay.memory_updates() if u.request == Request.SET_MEM_TABLE]
        assert all(u.ok for u in tables)
    finally:
        relay.stop()
    print(f"\nDIMM {refused_at} refused; DPDK's guest-memory fds/mappings per step:")
    for step, regions, seen in steps:
        print(f"  {step:12} A regions {regions}: fds {sum(seen.fds[i] for i in guest_files)}"
              f" mappings {sum(seen.maps[i] for i in guest_files)}, total fds "
              f"{seen.total_fds}")


def _reopen(inode: int) -> int:
    """A new fd on the file ``inode`` this process has open (through /proc/self/fd)."""
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/self/fd/{name}").st_ino == inode:
                return os.open(f"/proc/self/fd/{name}", os.O_RDWR)
    raise AssertionError(f"inode {inode} is not open")


def test_the_check_tells_a_leaking_back_end() -> None:
    """The same check, on this process playing back-end: one fd and one mapping of a memfd
    per region is exact; one mapping more (a superseded table not unmapped), or an fd kept,
    is reported, with the file it concerns."""
    fd = memfd(1 << 20, name="memory-backend-memfd")  # the name QEMU gives its files
    inode = os.fstat(fd).st_ino
    region = mmap.mmap(fd, 1 << 20)  # CPython's mmap keeps a dup of the fd: 1 fd, 1 mapping
    os.close(fd)
    leaked: list[mmap.mmap] = []
    kept = -1
    try:
        expected = Counter({inode: 1})
        assert holding_errors(expected, {inode}, holdings(os.getpid())) == []
        again = _reopen(inode)
        leaked.append(mmap.mmap(again, 1 << 20))  # the same region mapped again
        os.close(again)
        assert holding_errors(expected, {inode}, holdings(os.getpid())) == [
            f"inode {inode}: 2 fds held, 1 expected", f"inode {inode}: 2 mappings, 1 expected"]
        leaked.pop().close()
        kept = _reopen(inode)  # an fd kept after its region was unmapped
        region.close()
        assert holding_errors(Counter(), {inode}, holdings(os.getpid())) == [
            f"inode {inode}: 1 fds held, 0 expected"]
    finally:
        region.close()
        for mm in leaked:
            mm.close()
        if kept >= 0:
            os.close(kept)
