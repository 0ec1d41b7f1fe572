"""Count vhost-user memory regions the way QEMU 7.2 counts them (pure functions, no I/O).

QEMU refuses a memory device when "a used vhost backend has no free memory slots left":
``vhost_has_free_slot()`` compares each vhost device's limit with ``used_memslots``, the
number of sections its memory listener keeps from the flat view of the "memory" address
space. For vhost-user (hw/virtio/vhost.c, hw/virtio/vhost-user.c, 7.2) a section is kept
when it is RAM, not ROM, and its memory region has an fd (``vhost_user_mem_section_filter``:
``memory_region_get_fd(section->mr) >= 0``: memfd and file back-ends, not
memory-backend-ram). Each kept section is first rounded out to its RAMBlock's page size,
then merged into the previous one when they touch in guest-physical space, belong to the
same memory region and are contiguous in the host mapping (``vhost_region_add_section``).

So with 4 KiB pages q35's boot RAM is 2 regions (below 0xc0000 and from 1 MiB: the
option ROM and BIOS shadows sit between), on 2 MiB hugepages it is 1 (both round to the
same page), RAM above 4 GiB adds one, and every fd-backed DIMM adds one.

The flat view is read with HMP ``info mtree -f`` (no QMP command gives it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_RANGE = re.compile(
    r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ([a-z/]+)\): (\S+)(?: @([0-9a-f]+))?")
_AS = re.compile(r'^\s*AS "([^"]+)"')


@dataclass(frozen=True)
class FlatRange:
    """One line of a flat view: [start, start + size) of memory region ``name``."""

    start: int
    size: int
    kind: str  # "ram", "rom", "romd", "i/o", ...
    name: str
    offset: int  # offset_within_region

    def __post_init__(self) -> None:
        if self.size <= 0 or self.start < 0 or self.offset < 0:
            raise ValueError(f"bad flat range {self}")


@dataclass(frozen=True)
class VhostRegion:
    """A region as QEMU would send it to a vhost-user back-end (after rounding and merging)."""

    guest_phys_addr: int
    memory_size: int
    name: str
    offset: int


def parse_flat_view(mtree: str, address_space: str = "memory") -> tuple[FlatRange, ...]:
    """The ranges of the flat view that ``address_space`` uses, from ``info mtree -f``."""
    ranges: list[FlatRange] = []
    in_view = False
    found = False
    for line in mtree.splitlines():
        if line.startswith("FlatView #"):
            if found:
                break
            in_view = False
            continue
        m = _AS.match(line)
        if m is not None:
            if m.group(1) == address_space:
                in_view = found = True
            continue
        if not in_view:
            continue
        r = _RANGE.match(line)
        if r is not None:
            start, last = int(r.group(1), 16), int(r.group(2), 16)
            ranges.append(FlatRange(start, last - start + 1, r.group(3), r.group(4),
                                    int(r.group(5) or "0", 16)))
    if not found:
        raise ValueError(f"no flat view for address space {address_space!r} in mtree output")
    return tuple(ranges)


def vhost_user_regions(ranges: Iterable[FlatRange],
                       fd_page_sizes: Mapping[str, int]) -> tuple[VhostRegion, ...]:
    """The regions QEMU's vhost-user listener keeps.

    ``fd_page_sizes`` maps the name of every fd-backed memory region (a memfd or file
    memory backend's id) to its page size; ranges of any other region are not sent.
    """
    out: list[VhostRegion] = []
    for r in sorted(ranges, key=lambda r: r.start):
        if r.kind != "ram" or r.name not in fd_page_sizes:
            continue
        page = fd_page_sizes[r.name]
        # A RAMBlock's host mapping starts page-aligned, so host alignment = offset alignment.
        host, gpa, size = r.offset, r.start, r.size
        misalign = host % page
        host, gpa, size = host - misalign, gpa - misalign, size + misalign
        if size % page:
            size += page - size % page
        if out:
            prev = out[-1]
            if (gpa <= prev.guest_phys_addr + prev.memory_size and gpa >= prev.guest_phys_addr
                    and prev.name == r.name
                    and prev.offset + (gpa - prev.guest_phys_addr) == host):
                end = max(prev.offset + prev.memory_size, host + size)
                out[-1] = VhostRegion(prev.guest_phys_addr, end - prev.offset, prev.name,
                                      prev.offset)
                continue
        out.append(VhostRegion(gpa, size, r.name, host))
    return tuple(out)
