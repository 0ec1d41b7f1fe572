"""Proof that packets live in hot-added memory: the back-end itself writes received frames
into RX buffers whose guest-physical addresses lie in the DIMM hot-added to a running
guest, and traffic flows with no loss.

Two guests, A and B, on two ports of ``pyvhost net`` (the switch). A gets a 128 MiB DIMM
and its memory blocks are onlined ``online_kernel`` (ZONE_NORMAL): RX buffers are
unmovable kernel allocations and never go to ZONE_MOVABLE (what ``memhp_default_state=
online_movable`` gives). A's boot RAM (256 MiB) is all ZONE_DMA32, and the kernel serves
an allocation from the highest zone it may use first (Normal, then DMA32), so once the RX
buffers posted before the add are used up, every new one comes from the DIMM. No memory
hog is needed for that: the zone order already keeps the old memory out of use.

The evidence is the back-end's own count (``pyvhost status``: per region of each
connection's table, ``writes`` / ``bytes_written``, counted in
:meth:`pyvhost.memory.GuestMemory.write`, the one path by which frames enter guest
buffers): during the measured pings every frame written into A's RX buffers went into the
DIMM's region, and none into the boot RAM's.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from pyvhost.backend.control import fetch_status
from pyvhost.hotplug.execute import execute_add
from pyvhost.hotplug.host import read_host
from pyvhost.hotplug.plan import AddRequest, plan_add
from pyvhost.hotplug.qmp import Qmp
from pyvhost.hotplug.state import read_state
from pyvhost.lab.guest import GuestConsole
from pyvhost.units import MiB
from support.procs import Procs, wait_for_socket

from .conftest import BootGuest

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

DIMM = 128 * MiB
KB = 1024
# More frames than A's RX ring holds buffers (256) plus a page-frag's worth: afterwards
# none of the buffers posted before the DIMM was onlined is left in the ring.
WARMUP_PINGS = 400
SIZES = (56, 200, 512, 1000, 1400, 1472)  # 1472: a full 1500-byte IP packet
PINGS_PER_SIZE = 25
_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) packets received")



def regions_of(ctl: Path, peer_pid: int) -> dict[int, dict[str, Any]]:
    """A connection's memory table (by GPA), the connection found by its peer (QEMU's pid)."""
    conns = fetch_status(str(ctl))["connections"]
    assert isinstance(conns, list)
    (conn,) = [c for c in conns if c["peer_pid"] == peer_pid]
    return {int(r["guest_phys_addr"]): r for r in conn["memory"]}


def ping(c: GuestConsole, address: str, count: int, size: int = 56) -> tuple[int, int]:
    """``ping -A`` (adaptive: the next request as soon as the reply is in) from the guest;
    returns (transmitted, received)."""
    _code, out = c.run(f"ping -A -q -c {count} -s {size} -W 5 {address}", timeout=300)
    m = _SUMMARY.search(out)
    assert m is not None, out
    return int(m.group(1)), int(m.group(2))


def test_rx_buffers_in_the_hot_added_dimm(boot_guest: BootGuest, procs: Procs,
                                          short_dir: Path) -> None:
    sock_a, sock_b, ctl = (short_dir / n for n in ("a.sock", "b.sock", "ctl.sock"))
    sw = procs.pyvhost("net", "--socket", str(sock_a), "--socket", str(sock_b),
                       "--control", str(ctl), "--no-stats")
    wait_for_socket(ctl, sw.proc, timeout=60)
    a = boot_guest(ip="10.97.0.1/24", mac="52:54:00:00:97:01", net_socket=sock_a)
    b = boot_guest(ip="10.97.0.2/24", mac="52:54:00:00:97:02", net_socket=sock_b)
    ca, cb = a.console, b.console
    code, out = ca.ping("10.97.0.2", count=3)
    assert code == 0, out + sw.output()

    _, blocks_before = ca.memory_blocks()
    mem_before = ca.meminfo()["MemTotal"]
    a.qmp.close()  # the library takes over A's free QMP monitor
    with Qmp(str(a.qemu.qmp_path), timeout=120) as qmp:
        plan = plan_add(AddRequest(size=DIMM, id="d1"), read_state(qmp), read_host())
        assert not plan.refused, plan.refusals
        out_add = execute_add(qmp, plan, timeout=120, ost_timeout=10)
    assert out_add.ok and out_add.device is not None, out_add
    gpa = int(out_add.device["addr"])
    deadline = time.monotonic() + 120
    while ca.meminfo()["MemTotal"] != mem_before + DIMM // KB:
        assert time.monotonic() < deadline, "the DIMM never showed up in MemTotal"
        time.sleep(0.5)

    # Move the DIMM's blocks from ZONE_MOVABLE to ZONE_NORMAL.
    block_size, blocks = ca.memory_blocks()
    new = [blk for blk in blocks if blk.index not in {o.index for o in blocks_before}]
    assert len(new) == DIMM // block_size
    assert all(blk.index * block_size >= gpa for blk in new)
    for blk in new:
        ca.offline_block(blk.index)
        ca.online_block(blk.index, "online_kernel")
    _, blocks = ca.memory_blocks()
    assert [blk.zones for blk in blocks if blk.index in {n.index for n in new}] == [
        ("Normal",)] * len(new)

    table = regions_of(ctl, a.qemu.pid)
    assert gpa in table and int(table[gpa]["memory_size"]) == DIMM
    others = [g for g in table if g != gpa]

    # Use up the RX buffers A posted before the DIMM was onlined. Those are in boot RAM:
    # the counters tell the regions apart (a count that only ever grew in the DIMM would
    # prove nothing).
    start = regions_of(ctl, a.qemu.pid)
    sent, got = ping(ca, "10.97.0.2", WARMUP_PINGS)
    assert got == sent == WARMUP_PINGS
    warm = regions_of(ctl, a.qemu.pid)
    warm_boot = sum(int(warm[g]["writes"]) - int(start[g]["writes"]) for g in others)
    assert warm_boot > 0, "no frame went into the buffers posted before the add"

    before = regions_of(ctl, a.qemu.pid)
    replies = 0
    for size in SIZES:
        sent, got = ping(ca, "10.97.0.2", PINGS_PER_SIZE, size)
        assert (sent, got) == (PINGS_PER_SIZE, PINGS_PER_SIZE), f"loss at -s {size}"
        replies += got
    # And B pinging A: A's RX buffers get B's requests too.
    sent, got = ping(cb, "10.97.0.1", PINGS_PER_SIZE, 1000)
    assert (sent, got) == (PINGS_PER_SIZE, PINGS_PER_SIZE)
    replies += got
    after = regions_of(ctl, a.qemu.pid)

    def delta(g: int, key: str) -> int:
        return int(after[g][key]) - int(before[g][key])

    in_dimm = delta(gpa, "writes")
    elsewhere = {hex(g): delta(g, "writes") for g in others}
    print(f"\nframes written into A's RX buffers while measured: {in_dimm} in the DIMM at "
          f"{gpa:#x} ({delta(gpa, 'bytes_written')} bytes), {elsewhere} elsewhere; "
          f"{replies} pings answered; during the warm-up {warm_boot} went to boot RAM")
    # Every frame A received during the measurement (at least one per answered ping) was
    # written by the back-end into a buffer inside the hot-added DIMM's GPA range.
    assert in_dimm >= replies
    assert delta(gpa, "bytes_written") >= replies * 64
    assert all(n == 0 for n in elsewhere.values()), elsewhere
    assert sw.proc.poll() is None
