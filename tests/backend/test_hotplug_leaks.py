"""Memory hot-plug without leaks: the core promise, counted in /proc/self.

The server runs in a thread of this process, so /proc/self/fd and /proc/self/maps count
the back-end's fds and mappings as well as ours. Our own regions are mapped once, before
the baseline is taken; every later change in the counts is the back-end's.

A back-end keeps one fd and one mapping per region it holds (CPython's mmap keeps a dup
of the fd it maps); the fd that arrived with the message is closed once it is handled.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pyvhost.protocol import messages as m
from pyvhost.protocol.constants import Request
from support.memfd import MemfdRegion

from .conftest import Backend
from .harness import QEMU_PROTOCOL, RING_GPA, TABLE_PROTOCOL, NetPort, Pool
from .rawclient import fd_count, maps_count

CYCLES = 200
HOT_GPA = 0x1_0000_0000
HOT2_GPA = 0x2_0000_0000
#: The ring region moves between these GPAs: its file is mapped afresh each time, and
#: the rings (front-end VAs) must be translated into the new mapping.
RING_GPA_ALT = 0x5000_0000


class Counts:
    """Expected fds and mapping lines, relative to a baseline taken with all our regions
    mapped and only the initial table held by the back-end."""

    def __init__(self, port: NetPort, hot: list[MemfdRegion]) -> None:
        self.names = [port.ram.name, port.ring_mem.name, *(r.name for r in hot)]
        self.fds = fd_count()
        self.maps = {name: maps_count(name) for name in self.names}

    def check(self, held: list[MemfdRegion], when: str) -> None:
        """The back-end holds exactly the baseline plus one fd and one mapping per region
        of ``held``."""
        assert fd_count() == self.fds + len(held), f"fd count {when}"
        for name in self.names:
            extra = sum(1 for r in held if r.name == name)
            assert maps_count(name) == self.maps[name] + extra, f"mappings of {name} {when}"


@pytest.fixture
def port_factory(backend: Backend) -> Iterator[list[NetPort]]:
    ports: list[NetPort] = []
    yield ports
    for port in ports:
        port.close()


def test_set_mem_table_resends_do_not_leak(backend: Backend,
                                           port_factory: list[NetPort]) -> None:
    """QEMU without CONFIGURE_MEM_SLOTS: every plug and unplug re-sends the whole table,
    each region with a fresh fd."""
    port = NetPort(backend.path, tag="table", protocol=TABLE_PROTOCOL)
    port_factory.append(port)
    port.start()
    port.check_traffic(8)
    hot = port.extra_region("hot", HOT_GPA)
    hot_pool = Pool(hot, 64)
    counts = Counts(port, [hot])
    assert counts.maps == {port.ram.name: 2, port.ring_mem.name: 2, hot.name: 1}

    for i in range(CYCLES):
        plugged = i % 2 == 0
        port.ring_mem.gpa = RING_GPA_ALT if plugged else RING_GPA
        table = [port.ram, port.ring_mem, hot] if plugged else [port.ram, port.ring_mem]
        port.set_mem_table(table)
        counts.check([hot] if plugged else [], f"after re-send {i}")
        if i % 20 == 0:
            port.check_traffic(8, seed=i, pool=hot_pool)
        elif i % 20 == 1:
            port.check_traffic(8, seed=i)

    # Back to the first table: back to the baseline, and the rings still work.
    assert port.ring_mem.gpa == RING_GPA
    counts.check([], "at the end")
    port.check_traffic(64, seed=99)
    assert port.status() & 64 == 0


def test_add_rem_mem_reg_cycles_do_not_leak(backend: Backend,
                                            port_factory: list[NetPort]) -> None:
    """QEMU with CONFIGURE_MEM_SLOTS: one ADD_MEM_REG per plugged region, REM_MEM_REG on
    unplug (with no fd, and sometimes with one, which "the back-end MUST close")."""
    port = NetPort(backend.path, tag="slots", protocol=QEMU_PROTOCOL)
    port_factory.append(port)
    port.start()
    port.check_traffic(8)
    hot = port.extra_region("hot", HOT_GPA)
    hot2 = port.extra_region("hot2", HOT2_GPA)
    hot_pool, hot2_pool = Pool(hot, 64), Pool(hot2, 64)
    counts = Counts(port, [hot, hot2])

    for i in range(CYCLES):
        both = i % 3 == 0
        port.add_region(hot)
        if both:
            port.add_region(hot2)
        counts.check([hot, hot2] if both else [hot], f"after plug {i}")
        if i % 20 == 0:
            port.check_traffic(8, seed=i, pool=hot_pool)
            if both:
                port.check_traffic(8, seed=i + 1, pool=hot2_pool)
        port.remove_region(hot, with_fd=i % 2 == 1)
        counts.check([hot2] if both else [], f"after unplug {i}")
        if both:
            port.remove_region(hot2)
        counts.check([], f"after cycle {i}")

    port.check_traffic(64, seed=99)
    assert port.status() & 64 == 0
    # A repeat of a removal (QEMU 7.2 sends one per queue pair) is acknowledged and
    # changes nothing; removing a region that was never there is refused.
    assert port.client.ack(Request.REM_MEM_REG, m.SingleMemoryRegion(hot.region())) == 0
    counts.check([], "after a repeated REM_MEM_REG")
    never = m.MemoryRegion(0x20_0000_0000, 1 << 20, 0x7100_0000_0000, 0)
    assert port.client.ack(Request.REM_MEM_REG, m.SingleMemoryRegion(never)) != 0
    counts.check([], "after a refused REM_MEM_REG")

