"""Counting vhost-user regions the way QEMU 7.2 does, from ``info mtree -f`` text."""

from __future__ import annotations

from pyvhost.hotplug.flatview import FlatRange, parse_flat_view, vhost_user_regions

# Trimmed from QEMU 7.2: q35, memory-backend-memfd ram0 256M, one DIMM m1 (paused).
MTREE = """FlatView #0
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-00000000000bffff (prio 0, ram): ram0
  00000000000c0000-00000000000dffff (prio 1, rom): pc.rom
  00000000000e0000-00000000000fffff (prio 0, rom): pc.bios @0000000000020000
  0000000000100000-000000000fffffff (prio 0, ram): ram0 @0000000000100000
  00000000fec00000-00000000fec00fff (prio 0, i/o): ioapic
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
  0000000100000000-0000000107ffffff (prio 0, ram): m1

FlatView #1
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan
"""
MiB = 1 << 20


def test_parse_the_memory_address_space() -> None:
    ranges = parse_flat_view(MTREE)
    assert len(ranges) == 7
    assert ranges[3] == FlatRange(0x100000, 0xFF00000, "ram", "ram0", 0x100000)
    assert ranges[-1].name == "m1"


def test_4k_boot_ram_is_two_regions_plus_one_per_dimm() -> None:
    regions = vhost_user_regions(parse_flat_view(MTREE), {"ram0": 4096, "m1": 4096})
    assert [(r.name, r.guest_phys_addr, r.memory_size) for r in regions] == [
        ("ram0", 0, 0xC0000), ("ram0", 0x100000, 0xFF00000), ("m1", 1 << 32, 128 * MiB)]


def test_hugepage_boot_ram_merges_into_one_region() -> None:
    regions = vhost_user_regions(parse_flat_view(MTREE), {"ram0": 2 * MiB, "m1": 2 * MiB})
    assert [(r.name, r.guest_phys_addr, r.memory_size) for r in regions] == [
        ("ram0", 0, 256 * MiB), ("m1", 1 << 32, 128 * MiB)]


def test_not_fd_backed_memory_is_not_sent() -> None:
    assert [r.name for r in vhost_user_regions(parse_flat_view(MTREE), {"m1": 4096})] == ["m1"]


def test_ram_above_4g_adds_a_region() -> None:
    ranges = [FlatRange(0, 0xC0000, "ram", "ram0", 0),
              FlatRange(0x100000, 0x7FF00000, "ram", "ram0", 0x100000),
              FlatRange(1 << 32, 1 << 30, "ram", "ram0", 0x80000000)]
    assert len(vhost_user_regions(ranges, {"ram0": 4096})) == 3
