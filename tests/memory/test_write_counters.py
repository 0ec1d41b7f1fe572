"""Per-region write counters (``writes`` / ``bytes_written`` in status output): each write
through :meth:`GuestMemory.write` is counted in the region it lands in, a write across two
regions in both, and a refused write in none."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pyvhost.memory import GuestAddressError, GuestMemory
from pyvhost.memory.region import MappedRegion
from pyvhost.protocol.messages import MemoryRegion
from support.memfd import memfd

SIZE = 1 << 16


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    regions = []
    for i in range(2):
        fd = memfd(SIZE, name=f"counters{i}")
        try:
            desc = MemoryRegion(i * SIZE, SIZE, 0x7000_0000 + i * SIZE, 0)
            regions.append(MappedRegion.map(desc, fd))
        finally:
            os.close(fd)
    try:
        yield GuestMemory(tuple(regions))
    finally:
        for r in regions:
            r.unmap()


def counts(mem: GuestMemory) -> list[tuple[int, int]]:
    return [(r["writes"], r["bytes_written"]) for r in mem.describe()]


def test_writes_are_counted_in_the_region_they_land_in(memory: GuestMemory) -> None:
    assert counts(memory) == [(0, 0), (0, 0)]
    memory.write(16, b"x" * 100)
    memory.write(SIZE + 8, b"y" * 10)
    assert counts(memory) == [(1, 100), (1, 10)]
    memory.write(SIZE - 4, b"z" * 10)  # straddles: 4 bytes in the first, 6 in the second
    assert counts(memory) == [(2, 104), (2, 16)]
    assert memory.read(SIZE - 4, 10) == b"z" * 10


def test_a_refused_write_is_not_counted(memory: GuestMemory) -> None:
    with pytest.raises(GuestAddressError):
        memory.write(2 * SIZE - 4, b"w" * 10)  # runs past the end of guest memory
    assert counts(memory) == [(0, 0), (0, 0)]
