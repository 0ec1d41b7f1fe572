"""The compiled data path's region table: built once per memory snapshot, dropped with the
snapshot's mappings, and never in the way of unmapping (no buffer export kept)."""

from __future__ import annotations

import fcntl
import os

import pytest

from pyvhost.protocol.fds import FdBag
from pyvhost.protocol.messages import MemoryRegion
from support.memfd import memfd

from .rings import FAR, REGION, Ram

native = pytest.importorskip("pyvhost.datapath._native",
                             reason="the compiled data path is not built")


def test_one_table_per_snapshot(ram: Ram) -> None:
    with ram.manager.hold() as mem:
        table = native.region_table(mem)
        assert native.region_table(mem) is table  # not rebuilt per burst
        assert mem.native is table
    # A hot-add makes a new snapshot, and so a new table; the old snapshot keeps its own
    # while a reader holds it.
    with ram.manager.hold() as old:
        old_table = native.region_table(old)
        extra = MemoryRegion(FAR + 2 * REGION, REGION, 0x7F00_0080_0000, 0)
        fd = memfd(REGION, name="pyvhost-dp-extra")
        try:
            ram.manager.add_region(extra, fd)
        finally:
            os.close(fd)
        new = ram.manager.current
        assert new is not old and new.native is None
        assert native.region_table(new) is not old_table
        assert old.native is old_table
    # The old snapshot's last reader is gone: its table went with it.
    assert old.native is None


def test_a_table_does_not_keep_mappings_exported(ram: Ram) -> None:
    with ram.manager.hold() as mem:
        native.region_table(mem)
        regions = mem.regions
    # mmap.close() raises BufferError while a buffer export is alive; the table took
    # the addresses only.
    ram.manager.clear()
    assert all(r.closed for r in regions)


def test_an_unmapped_region_is_refused(ram: Ram) -> None:
    mem = ram.manager.current  # not held: the manager may unmap it
    ram.manager.clear()
    assert all(r.closed for r in mem.regions)
    with pytest.raises(ValueError, match="unmapped"):
        native.RegionTable(mem)


def test_shrink_seal_is_reported(ram: Ram) -> None:
    assert [r["shrink_sealed"] for r in ram.mem.describe()] == [False, False, False]
    fd = memfd(REGION, name="pyvhost-dp-sealed", sealing=True)
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        with FdBag([os.dup(fd)]) as bag:
            ram.manager.set_table([MemoryRegion(0, REGION, 0x7F00_0090_0000, 0)], bag)
    finally:
        os.close(fd)
    assert [r["shrink_sealed"] for r in ram.mem.describe()] == [True]
