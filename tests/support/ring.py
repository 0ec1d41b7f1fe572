"""The driver side of a split virtqueue (virtio 1.2, 2.7): the one test-side ring.

A :class:`DriverRing` does with a ring what a guest driver does: it lays out the
descriptor table, the available ring and the used ring in memory it shares with the
device, makes chains available, kicks, and takes back what the device used. It reads and
writes that memory through a :class:`RingMemory` (a memfd with ``pread``/``pwrite``, a
test's own mapping, the front-end's guest RAM), never through the code under test.

It is also a hostile driver. Every field takes any value (:meth:`DriverRing.write_desc`,
:meth:`~DriverRing.put_avail`, :meth:`~DriverRing.publish` with any index, indirect tables
anywhere), and a whole ring can be given as data, a :class:`RingImage` of descriptors,
indirect tables, available entries and indexes, and laid out in one call
(:meth:`DriverRing.lay_out`). :func:`ring_images` draws such images for hypothesis, so that
two implementations of the device side can be run on the same random and hostile rings.

Addresses in a layout, an image or an indirect table are addresses of the ring's memory:
GPAs where that memory is addressed by GPA (:class:`~support.memfd.SharedRam`), offsets
where it is one region addressed from its start (:class:`~support.memfd.MemfdRegion`).
Buffer addresses inside descriptors are whatever the test says (GPAs, or hostile values).
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from hypothesis import strategies as st

from pyvhost.memory import GuestMemory
from pyvhost.protocol import messages as m
from pyvhost.virtq import SplitQueue

from .poll import TIMEOUT, wait_until

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

#: "struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }"
DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
#: "struct virtq_used_elem { le32 id; le32 len; }"
USED_ELEM = struct.Struct("<II")


class GuestWriter(Protocol):
    """Memory a driver writes (an indirect table, a buffer)."""

    def write(self, addr: int, data: bytes) -> None: ...


class RingMemory(GuestWriter, Protocol):
    """The memory a ring lives in: read and written by address, and the front-end virtual
    address of each address (what SET_VRING_ADDR carries)."""

    def read(self, addr: int, length: int) -> bytes: ...

    def va(self, addr: int) -> int: ...


@dataclass(frozen=True, slots=True)
class Desc:
    """One descriptor, any values (a hostile driver's included)."""

    addr: int
    length: int
    flags: int = 0
    next: int = 0

    def pack(self) -> bytes:
        return DESC.pack(self.addr, self.length, self.flags, self.next)


@dataclass(frozen=True, slots=True)
class Buffer:
    """One descriptor's buffer: guest-physical address, length, device-writable or not."""

    gpa: int
    length: int
    writable: bool = False


def linked(buffers: Sequence[Buffer], indices: Sequence[int]) -> dict[int, Desc]:
    """Descriptors linking ``buffers`` through the descriptors ``indices``: NEXT on all but
    the last, WRITE on device-writable buffers."""
    assert len(buffers) == len(indices), "one index per buffer (test bug)"
    out: dict[int, Desc] = {}
    for k, (index, b) in enumerate(zip(indices, buffers, strict=True)):
        last = k == len(buffers) - 1
        flags = (VIRTQ_DESC_F_WRITE if b.writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
        out[index] = Desc(b.gpa, b.length, flags, 0 if last else indices[k + 1])
    return out


def indirect_table(buffers: Sequence[Buffer]) -> list[Desc]:
    """An indirect table of ``buffers``, entry k linked to k + 1."""
    descs = linked(buffers, range(len(buffers)))
    return [descs[k] for k in range(len(buffers))]


def pack_table(descs: Sequence[Desc]) -> bytes:
    return b"".join(d.pack() for d in descs)


@dataclass(frozen=True, slots=True)
class RingLayout:
    """Where a ring of ``size`` entries has its three parts (addresses of its memory).

    Descriptor table ``16 * size`` bytes; available ring: flags, idx, ring[size],
    used_event; used ring: flags, idx, ring[size] of (id, len), avail_event.
    """

    size: int
    desc: int
    avail: int
    used: int

    @classmethod
    def contiguous(cls, size: int, base: int = 0, used_align: int = 4) -> RingLayout:
        """The three parts one after the other from ``base``, the used ring aligned."""
        avail = base + 16 * size
        used = (avail + 6 + 2 * size + used_align - 1) & ~(used_align - 1)
        return cls(size, base, avail, used)

    @property
    def end(self) -> int:
        """The first address past the used ring."""
        return self.used + 6 + 8 * self.size

    def avail_slot(self, slot: int) -> int:
        return self.avail + 4 + 2 * slot

    @property
    def used_event(self) -> int:
        return self.avail + 4 + 2 * self.size

    def used_slot(self, slot: int) -> int:
        return self.used + 4 + 8 * slot

    @property
    def avail_event(self) -> int:
        return self.used + 4 + 8 * self.size


@dataclass(frozen=True)
class RingImage:
    """What a driver wrote into a ring, as data; any value may be hostile.

    ``descs``: descriptors of the ring's table by index (the others stay as they are);
    ``tables``: indirect tables by address; ``avail``: the available ring's entries from
    slot 0; ``data``: buffer contents by address.
    """

    descs: Mapping[int, Desc] = field(default_factory=dict)
    tables: Mapping[int, Sequence[Desc]] = field(default_factory=dict)
    avail: Sequence[int] = ()
    avail_idx: int = 0
    avail_flags: int = 0
    used_event: int = 0
    data: Mapping[int, bytes] = field(default_factory=dict)


def ring_images(size: int, addrs: st.SearchStrategy[int], lens: st.SearchStrategy[int], *,
                tables: Sequence[int] = (),
                avail_idx: st.SearchStrategy[int] | None = None,
                ) -> st.SearchStrategy[RingImage]:
    """Random rings of ``size`` entries: a full descriptor table and an indirect table at
    each address of ``tables`` (buffer addresses from ``addrs``, lengths from ``lens``, any
    of the three flags, next up to ``size + 1``), ``size`` available heads up to ``size``,
    and an available index (default: up to ``size``, or any 16-bit value)."""
    desc = st.builds(Desc, addrs, lens, st.integers(0, 7), st.integers(0, size + 1))
    full = st.lists(desc, min_size=size, max_size=size)
    return st.builds(
        RingImage,
        descs=full.map(lambda ds: dict(enumerate(ds))),
        tables=st.fixed_dictionaries({addr: full for addr in tables}),
        avail=st.lists(st.integers(0, size), min_size=size, max_size=size),
        avail_idx=avail_idx if avail_idx is not None else st.one_of(
            st.integers(0, size), st.integers(0, 0xFFFF)))


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class DriverRing:
    """The driver side of one split virtqueue laid out at ``layout`` in ``memory``.

    ``index`` is the queue's index; ``kick_fd`` / ``call_fd`` / ``err_fd`` its eventfds
    where the test has them (:meth:`with_eventfds` makes three the ring owns). With
    ``event_idx`` the driver asks for an interrupt at the next used entry each time it
    takes the used ones back (used_event, as Linux's virtio_ring does). The three parts
    are zeroed unless ``zero`` is False.
    """

    def __init__(self, memory: RingMemory, layout: RingLayout, *, index: int = 0,
                 kick_fd: int | None = None, call_fd: int | None = None,
                 err_fd: int | None = None, event_idx: bool = False,
                 zero: bool = True) -> None:
        self.memory = memory
        self.layout = layout
        self.index = index
        self.kick_fd, self.call_fd, self.err_fd = kick_fd, call_fd, err_fd
        self.event_idx = event_idx
        #: The driver's next available index (written by :meth:`publish`).
        self.avail_idx = 0
        #: The used index up to which chains were taken back.
        self.last_used = 0
        self.free = list(range(layout.size))
        #: head -> the descriptor indices of its chain, for every chain the device holds.
        self.chains: dict[int, list[int]] = {}
        self._owned_fds: list[int] = []
        if zero:
            self.clear()

    @classmethod
    def with_eventfds(cls, memory: RingMemory, layout: RingLayout, *, index: int = 0,
                      event_idx: bool = False) -> DriverRing:
        """A ring with kick, call and err eventfds of its own (closed by :meth:`close`)."""
        fds = [_eventfd(), _eventfd(), _eventfd()]
        ring = cls(memory, layout, index=index, kick_fd=fds[0], call_fd=fds[1],
                   err_fd=fds[2], event_idx=event_idx)
        ring._owned_fds = fds
        return ring

    def close(self) -> None:
        """Close the eventfds the ring made. Idempotent."""
        fds, self._owned_fds = self._owned_fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    @property
    def size(self) -> int:
        return self.layout.size

    @property
    def vas(self) -> tuple[int, int, int]:
        """Descriptor table, available and used ring as front-end VAs."""
        mem, lay = self.memory, self.layout
        return mem.va(lay.desc), mem.va(lay.avail), mem.va(lay.used)

    def addr(self) -> m.VringAddr:
        """SET_VRING_ADDR's payload for this ring (no logging)."""
        desc, avail, used = self.vas
        return m.VringAddr(self.index, 0, desc, used, avail, 0)

    # -- fields, any value ----------------------------------------------------------------
    def clear(self) -> None:
        """Zero the three parts: an empty ring, avail idx 0, no flags."""
        lay = self.layout
        self.memory.write(lay.desc, bytes(16 * lay.size))
        self.memory.write(lay.avail, bytes(6 + 2 * lay.size))
        self.memory.write(lay.used, bytes(6 + 8 * lay.size))

    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next_: int = 0,
                   *, table: int | None = None) -> None:
        """Write descriptor ``index`` of the ring's table (or of the table at ``table``)."""
        base = self.layout.desc if table is None else table
        self.memory.write(base + 16 * index, DESC.pack(addr, length, flags, next_))

    def write_descs(self, descs: Mapping[int, Desc], *, table: int | None = None) -> None:
        for index, d in descs.items():
            self.write_desc(index, d.addr, d.length, d.flags, d.next, table=table)

    def write_chain(self, indices: Sequence[int], buffers: Sequence[Buffer], *,
                    table: int | None = None) -> int:
        """Link ``buffers`` through descriptors ``indices`` (chosen by the test, which
        keeps track of them); returns the head index."""
        self.write_descs(linked(buffers, indices), table=table)
        return indices[0]

    def write_indirect(self, index: int, table: int, entries: int, flags: int = 0) -> None:
        """Make descriptor ``index`` point at an indirect table of ``entries`` entries."""
        self.write_desc(index, table, 16 * entries, VIRTQ_DESC_F_INDIRECT | flags)

    def set_avail_entry(self, slot: int, head: int) -> None:
        self.memory.write(self.layout.avail_slot(slot), U16.pack(head))

    def put_avail(self, *heads: int) -> None:
        """Put ``heads`` in the next available slots (not yet published)."""
        for head in heads:
            self.set_avail_entry(self.avail_idx % self.size, head)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def publish(self, idx: int | None = None) -> None:
        """Write the available idx: ours, or any value to corrupt the ring. The device may
        then take what was put (x86 keeps the order of our stores: entries first)."""
        value = self.avail_idx if idx is None else idx
        self.memory.write(self.layout.avail + 2, U16.pack(value & 0xFFFF))

    def post(self, *heads: int) -> None:
        """Make chains available: ring entries first, then the index."""
        self.put_avail(*heads)
        self.publish()

    def set_avail_flags(self, flags: int) -> None:
        self.memory.write(self.layout.avail, U16.pack(flags))

    def set_used_event(self, idx: int) -> None:
        self.memory.write(self.layout.used_event, U16.pack(idx & 0xFFFF))

    def lay_out(self, image: RingImage) -> None:
        """Write ``image`` into the ring and guest memory; the driver's avail idx becomes
        the image's."""
        self.write_descs(image.descs)
        for addr, descs in image.tables.items():
            self.memory.write(addr, pack_table(descs))
        for addr, data in image.data.items():
            self.memory.write(addr, data)
        assert len(image.avail) <= self.size, "more avail entries than slots (test bug)"
        for slot, head in enumerate(image.avail):
            self.set_avail_entry(slot, head)
        self.set_avail_flags(image.avail_flags)
        self.set_used_event(image.used_event)
        self.avail_idx = image.avail_idx & 0xFFFF
        self.publish()

    # -- what the device wrote ------------------------------------------------------------
    def _u16(self, addr: int) -> int:
        return int(U16.unpack(self.memory.read(addr, 2))[0])

    def used_flags(self) -> int:
        return self._u16(self.layout.used)

    def used_idx(self) -> int:
        return self._u16(self.layout.used + 2)

    def used_elem(self, slot: int) -> tuple[int, int]:
        id_, length = USED_ELEM.unpack(self.memory.read(self.layout.used_slot(slot), 8))
        return int(id_), int(length)

    def avail_event(self) -> int:
        return self._u16(self.layout.avail_event)

    # -- a well-behaved driver --------------------------------------------------------------
    @property
    def room(self) -> int:
        """Free descriptors."""
        return len(self.free)

    @property
    def outstanding(self) -> int:
        """Chains made available and not yet taken back from the used ring."""
        return len(self.chains)

    def add(self, buffers: Sequence[Buffer], *, publish: bool = True) -> int:
        """Make one chain of ``buffers`` (readable ones first) available on free
        descriptors; returns its head. ``publish=False`` leaves it to :meth:`publish`."""
        assert buffers and len(buffers) <= len(self.free), "ring full (test bug)"
        indices = [self.free.pop() for _ in buffers]
        self.write_chain(indices, buffers)
        self.chains[indices[0]] = indices
        self.put_avail(indices[0])
        if publish:
            self.publish()
        return indices[0]

    def add_indirect(self, table: int, buffers: Sequence[Buffer], *,
                     memory: GuestWriter | None = None, publish: bool = True) -> int:
        """Make one chain available through an indirect table written at ``table`` of
        ``memory`` (default: the ring's own memory); returns its head."""
        data = pack_table(indirect_table(buffers))
        (memory or self.memory).write(table, data)
        head = self.free.pop()
        self.write_desc(head, table, len(data), VIRTQ_DESC_F_INDIRECT)
        self.chains[head] = [head]
        self.put_avail(head)
        if publish:
            self.publish()
        return head

    def kick(self) -> None:
        # Always kick: more kicks than EVENT_IDX asks for are harmless, fewer would not be.
        assert self.kick_fd is not None, "this ring has no kick eventfd (test bug)"
        os.eventfd_write(self.kick_fd, 1)

    def take_used(self) -> list[tuple[int, int]]:
        """(head, written length) of every chain the device returned since the last call.

        The device may only return chains it holds; with ``event_idx``, then asks for an
        interrupt at the next used entry.
        """
        out: list[tuple[int, int]] = []
        n = (self.used_idx() - self.last_used) & 0xFFFF
        assert n <= len(self.chains), (f"queue {self.index}: used idx moved {n}, but only "
                                       f"{len(self.chains)} chains are out")
        for _ in range(n):
            head, length = self.used_elem(self.last_used % self.size)
            chain = self.chains.pop(head, None)
            assert chain is not None, (f"queue {self.index}: the device returned head "
                                       f"{head}, which it does not hold")
            self.free.extend(chain)
            out.append((head, length))
            self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx:
            self.set_used_event(self.last_used)
        return out

    def wait_used(self, count: int, timeout: float = TIMEOUT) -> list[tuple[int, int]]:
        """Wait until ``count`` more chains were used; returns them in order."""
        got: list[tuple[int, int]] = []

        def done() -> bool:
            got.extend(self.take_used())
            return len(got) >= count

        wait_until(done, f"{count} used chains on queue {self.index} (got {len(got)})",
                   timeout)
        return got


def device_queue(ring: DriverRing, mem: GuestMemory, *, event_idx: bool = False,
                 base: int = 0) -> SplitQueue:
    """The device's side of ``ring``, set up as SET_VRING_NUM, SET_VRING_BASE and
    SET_VRING_ADDR would (the ring's index and size, ``base``, its VAs) and attached to
    ``mem``. Where the driver's own avail idx starts is left to the caller."""
    q = SplitQueue(ring.index)
    q.set_size(ring.size)
    q.event_idx = event_idx
    q.set_base(base)
    q.set_addresses(*ring.vas)
    q.attach(mem)
    return q
