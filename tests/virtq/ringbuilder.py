"""A test-side split-virtqueue driver (virtio 1.2, 2.7), written with ``struct`` alone.

:class:`GuestRam` is a memfd that backs guest memory; :class:`RingBuilder` lays out a
descriptor table, an available ring and a used ring in it, the way a guest driver does,
and reads back what the device wrote. It writes and reads the memfd with
``os.pwrite``/``os.pread``, never through the code under test.
"""

from __future__ import annotations

import os
import struct

from pyvhost.memory import GuestMemory, MemoryManager
from pyvhost.protocol.fds import FdBag
from pyvhost.protocol.messages import MemoryRegion

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

#: "struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }"
DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
#: "struct virtq_used_elem { le32 id; le32 len; }"
USED_ELEM = struct.Struct("<II")

REGION_SIZE = 0x10000


class GuestRam:
    """128 KiB of guest memory in two adjacent 64 KiB regions of one memfd.

    GPA equals the offset in the file. The regions are far apart in front-end VA space
    (and in the opposite order), so a VA-to-GPA slip shows.
    """

    LOW = MemoryRegion(0x0, REGION_SIZE, 0x7F00_0020_0000, 0x0)
    HIGH = MemoryRegion(REGION_SIZE, REGION_SIZE, 0x7F00_0010_0000, REGION_SIZE)
    END = 2 * REGION_SIZE  # first GPA past guest memory

    def __init__(self) -> None:
        self.fd = os.memfd_create("pyvhost-ring", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.END)
        self.manager = MemoryManager()
        with FdBag([os.dup(self.fd), os.dup(self.fd)]) as bag:
            self.manager.set_table([self.LOW, self.HIGH], bag)

    @property
    def mem(self) -> GuestMemory:
        return self.manager.current

    def va(self, gpa: int) -> int:
        """The front-end VA of a GPA (SET_VRING_ADDR carries VAs)."""
        for r in (self.LOW, self.HIGH):
            if r.guest_phys_addr <= gpa < r.guest_phys_addr + r.memory_size:
                return r.userspace_addr + gpa - r.guest_phys_addr
        raise ValueError(f"GPA {gpa:#x} is not guest memory")

    def write(self, gpa: int, data: bytes) -> None:
        assert os.pwrite(self.fd, data, gpa) == len(data)

    def read(self, gpa: int, length: int) -> bytes:
        return os.pread(self.fd, length, gpa)

    def close(self) -> None:
        self.manager.clear()
        os.close(self.fd)


class RingBuilder:
    """The driver side of one split ring of ``size`` entries in a :class:`GuestRam`."""

    def __init__(self, ram: GuestRam, size: int, desc: int = 0x1000, avail: int = 0x3000,
                 used: int = 0x4000) -> None:
        self.ram = ram
        self.size = size
        self.desc_gpa = desc
        self.avail_gpa = avail
        self.used_gpa = used
        self.avail_idx = 0
        ram.write(desc, bytes(16 * size))
        ram.write(avail, bytes(6 + 2 * size))
        ram.write(used, bytes(6 + 8 * size))

    @property
    def vas(self) -> tuple[int, int, int]:
        """Descriptor table, available and used ring as front-end VAs."""
        return (self.ram.va(self.desc_gpa), self.ram.va(self.avail_gpa),
                self.ram.va(self.used_gpa))

    # -- descriptors ---------------------------------------------------------------------
    def desc(self, index: int, addr: int, length: int, flags: int = 0, next_: int = 0,
             table: int | None = None) -> None:
        """Write descriptor ``index`` of the ring's table (or of the table at ``table``)."""
        base = self.desc_gpa if table is None else table
        self.ram.write(base + 16 * index, DESC.pack(addr, length, flags, next_))

    def chain(self, indices: list[int], bufs: list[tuple[int, int, bool]],
              table: int | None = None) -> int:
        """Link ``bufs`` (addr, len, device-writable) through descriptors ``indices``;
        returns the head index."""
        assert len(indices) == len(bufs)
        for k, (index, (addr, length, writable)) in enumerate(zip(indices, bufs, strict=True)):
            last = k == len(indices) - 1
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.desc(index, addr, length, flags, 0 if last else indices[k + 1], table)
        return indices[0]

    def indirect(self, index: int, table: int, entries: int, flags: int = 0) -> None:
        """Make descriptor ``index`` point at an indirect table of ``entries`` entries."""
        self.desc(index, table, 16 * entries, VIRTQ_DESC_F_INDIRECT | flags)

    # -- available ring: flags, idx, ring[size], used_event ------------------------------
    def publish(self, *heads: int) -> None:
        """Make chains available: ring entries first, then the index."""
        for head in heads:
            slot = self.avail_idx % self.size
            self.ram.write(self.avail_gpa + 4 + 2 * slot, U16.pack(head))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        self.ram.write(self.avail_gpa + 2, U16.pack(idx & 0xFFFF))

    def set_avail_flags(self, flags: int) -> None:
        self.ram.write(self.avail_gpa, U16.pack(flags))

    def set_used_event(self, idx: int) -> None:
        self.ram.write(self.avail_gpa + 4 + 2 * self.size, U16.pack(idx & 0xFFFF))

    # -- used ring: flags, idx, ring[size], avail_event ----------------------------------
    def used_flags(self) -> int:
        return int(U16.unpack(self.ram.read(self.used_gpa, 2))[0])

    def used_idx(self) -> int:
        return int(U16.unpack(self.ram.read(self.used_gpa + 2, 2))[0])

    def used_elem(self, slot: int) -> tuple[int, int]:
        id_, length = USED_ELEM.unpack(self.ram.read(self.used_gpa + 4 + 8 * slot, 8))
        return int(id_), int(length)

    def avail_event(self) -> int:
        return int(U16.unpack(self.ram.read(self.used_gpa + 4 + 8 * self.size, 2))[0])
