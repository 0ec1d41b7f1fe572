"""The guest driver's side of a split virtqueue, in the front-end's own guest RAM.

A :class:`DriverQueue` does with a ring that :meth:`~.frontend.Frontend.setup_vring` set up
what a guest driver does (virtio 1.2, 2.7): it writes descriptors and available entries,
publishes the available index, kicks, and takes back what the device put in the used
ring. The front-end uses it where it must see a back-end move data, not only answer
messages: the hostile suite's witness (:mod:`.hostile.witness`) and its descriptor cases
(:mod:`.hostile.rings`, which write any value they like through the same methods).

The used ring is written by the device, so everything read from it is checked before it
is used (:class:`~.errors.UsedRingError`): the number of new entries may not exceed the
chains the driver made available, and each entry's id must be a head the device holds.
"""

from __future__ import annotations

import os
import struct

from .errors import FrontendUsageError, UsedRingError
from .frontend import Vring
from .memory import GuestRam

#: "struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }"
DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
#: "struct virtq_used_elem { le32 id; le32 len; }"
USED_ELEM = struct.Struct("<II")
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4


class DriverQueue:
    """The driver side of ``vring``, whose three parts lie in ``ram`` (the front-end's
    mapping of it; buffer addresses in descriptors are guest-physical)."""

    def __init__(self, ram: GuestRam, vring: Vring) -> None:
        size = vring.size
        for addr, length in ((vring.desc_addr, 16 * size), (vring.avail_addr, 6 + 2 * size),
                             (vring.used_addr, 6 + 8 * size)):
            if not ram.contains_va(addr, length):
                raise FrontendUsageError(f"ring {vring.index} is not inside {ram!r}")
        self.ram = ram
        self.vring = vring
        self.desc = vring.desc_addr - ram.userspace_addr
        self.avail = vring.avail_addr - ram.userspace_addr
        self.used = vring.used_addr - ram.userspace_addr
        #: The driver's next available index, and the used index taken back up to.
        self.avail_idx = 0
        self.last_used = 0
        self.free = list(range(size))
        #: Heads the device holds (made available, not yet seen in the used ring).
        self.held: set[int] = set()

    @property
    def size(self) -> int:
        return self.vring.size

    def gpa(self, offset: int) -> int:
        """The guest-physical address of ``offset`` in the ring's region."""
        return self.ram.guest_phys_addr + offset

    # -- any value (a hostile driver) --------------------------------------------------------
    def write_desc(self, index: int, addr: int, length: int, flags: int = 0,
                   next_: int = 0) -> None:
        """Descriptor ``index`` of the table (``index`` below the ring size)."""
        if not 0 <= index < self.size:
            raise FrontendUsageError(f"descriptor {index} is outside a {self.size}-entry table")
        self.ram.write(self.desc + 16 * index, DESC.pack(
            addr & ((1 << 64) - 1), length & 0xFFFFFFFF, flags & 0xFFFF, next_ & 0xFFFF))

    def set_avail(self, slot: int, head: int) -> None:
        """Available ring entry ``slot`` (taken modulo the ring size) names ``head``."""
        self.ram.write(self.avail + 4 + 2 * (slot % self.size), U16.pack(head & 0xFFFF))

    def publish(self, idx: int | None = None) -> None:
        """Write the available index: the driver's own, or any value."""
        value = self.avail_idx if idx is None else idx
        self.ram.write(self.avail + 2, U16.pack(value & 0xFFFF))

    def kick(self) -> None:
        # Always kick: more kicks than the device asked for (VIRTQ_USED_F_NO_NOTIFY) are
        # harmless, a missing one would stall a device that sleeps until kicked.
        os.eventfd_write(self.vring.kick_fd, 1)

    # -- a well-behaved driver ---------------------------------------------------------------
    def add(self, gpa: int, length: int, *, writable: bool = False) -> int:
        """Make a one-descriptor chain available and publish it; returns its head."""
        if not self.free:
            raise FrontendUsageError(f"ring {self.vring.index}: no free descriptor")
        head = self.free.pop()
        self.write_desc(head, gpa, length, VIRTQ_DESC_F_WRITE if writable else 0)
        self.set_avail(self.avail_idx, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.held.add(head)
        self.publish()
        return head

    def used_idx(self) -> int:
        return int(U16.unpack(self.ram.read(self.used + 2, 2))[0])

    def take_used(self) -> list[tuple[int, int]]:
        """(head, written length) of each chain the device used since the last call."""
        # The used idx is the device's: it may claim any number of new entries. At most
        # the chains it holds can be new, so the loop below is bounded by len(held).
        new = (self.used_idx() - self.last_used) & 0xFFFF
        if new > len(self.held):
            raise UsedRingError(f"ring {self.vring.index}: the used index moved by {new}, "
                                f"but the device holds only {len(self.held)} chain(s)")
        out: list[tuple[int, int]] = []
        for _ in range(new):
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            head, length = USED_ELEM.unpack(self.ram.read(slot, 8))
            if head not in self.held:
                raise UsedRingError(f"ring {self.vring.index}: the device used head {head}, "
                                    "which it does not hold")
            self.held.discard(head)
            self.free.append(head)
            out.append((int(head), int(length)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


__all__ = ["DESC", "U16", "VIRTQ_DESC_F_INDIRECT", "VIRTQ_DESC_F_NEXT", "VIRTQ_DESC_F_WRITE",
           "DriverQueue"]
