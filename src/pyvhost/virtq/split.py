"""The split virtqueue (virtio 1.2, 2.7), device side.

A :class:`SplitQueue` reads descriptor chains the driver made available and returns
them through the used ring. Everything in the rings is written by the guest and is
hostile: every index is reduced or bounded before use, every buffer address is checked
against guest memory by :class:`~pyvhost.memory.GuestMemory`, and a chain is bounded in
length (loops included). A queue that sees a broken invariant raises
:class:`VirtqueueError` and marks itself broken; the connection then signals the
front-end (SET_VRING_ERR, NEEDS_RESET) and stops serving that queue. No guest value can
make this module touch memory outside the mapped regions.

The ring addresses are front-end virtual addresses (SET_VRING_ADDR); :meth:`attach`
translates them against a memory snapshot and is called again after every table change.

State shared with :mod:`pyvhost.datapath`: a burst of the data path (pure or compiled)
reads ``size``, ``event_idx``, ``last_avail_idx``, ``used_idx``, ``_shadow_avail``,
``_signalled_used``, ``notify_decided`` and ``ring_gpas`` at entry and writes the
indexes and the notification state back at exit; this object stays the one source of
truth, so the control plane (GET_VRING_BASE, status) sees what the burst did.

Live migration: while the front-end has logging on, ``log`` is the connection's
:class:`~pyvhost.memory.DirtyLog`, and every write this module makes to guest memory is
marked in it after it is made: the buffers :meth:`DescriptorChain.write` fills ("All the
modifications to memory pointed by vring 'descriptor' should be marked"), and the used
ring's elements, index, flags and avail_event, at ``log_guest_addr`` ("Modifications to
'used' vring should be marked if VHOST_VRING_F_LOG is part of ring's flags ...
log_guest_addr should be used to calculate the log offset"). The compiled data path makes
the same marks itself (``log_mark`` in :mod:`pyvhost.datapath._native`, docs/dirty-log.md).
"""

from __future__ import annotations

import mmap
import struct
import sys
from dataclasses import dataclass, field

from pyvhost.errors import PeerError
from pyvhost.memory import DirtyLog, GuestAddressError, GuestMemory

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_USED_F_NO_NOTIFY = 1
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
#: "Queue Size ... The maximum Queue Size value is 32768."
MAX_QUEUE_SIZE = 32768

_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")  # id, len
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"


def store_le16(mm: mmap.mmap, off: int, value: int) -> None:
    """Write a 16-bit little-endian field the driver reads while we write it, in one store.

    ``struct.pack_into`` must not be used for such a field: CPython's ``s_pack_internal``
    first zeroes the destination (``memset(buf, '\\0', soself->s_size)``) and then
    writes the value, so a driver polling the field from another CPU can read 0 in
    between. For the used ring's ``idx`` that 0 is fatal: DPDK 22.11's virtio_user reads
    ``used->idx - vq_used_cons_idx`` as a huge count of used entries, frees chains it
    never gave us, and its descriptor free list breaks (it then crashes on
    ``vq_desc_head_idx == VQ_RING_DESC_CHAIN_END``). An item assignment through a
    ``memoryview`` cast to ``H`` is one native ``unsigned short`` copy of constant size,
    a single 2-byte store, atomic when aligned (the fields written here are, for a driver
    that follows the spec: "Used Ring ... Alignment 4"). The view is a temporary, so no
    buffer export outlives the call and the region can still be unmapped.
    """
    if not _LITTLE_ENDIAN_HOST:
        value = ((value & 0xFF) << 8) | (value >> 8)
    memoryview(mm)[off:off + 2].cast("H")[0] = value


class VirtqueueError(PeerError):
    """The driver broke a virtqueue invariant; the queue is unusable until reset."""


@dataclass(slots=True)
class DescriptorChain:
    """One available chain: its head index and its buffers as (GPA, length) pairs.

    "The driver MUST place any device-writable descriptor elements after any
    device-readable descriptor elements", so a chain is a readable part then a writable
    part. Buffer ranges were checked against the snapshot the chain was read with.
    """

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        r = self.readable
        return r[0][1] if len(r) == 1 else sum(n for _, n in r)

    @property
    def writable_len(self) -> int:
        w = self.writable
        return w[0][1] if len(w) == 1 else sum(n for _, n in w)

    def read(self, mem: GuestMemory, limit: int | None = None) -> bytes:
        """The readable buffers' bytes, concatenated (at most ``limit`` bytes)."""
        if len(self.readable) == 1:
            gpa, n = self.readable[0]
            return mem.read(gpa, n if limit is None else max(0, min(n, limit)))
        parts: list[bytes] = []
        left = self.readable_len if limit is None else limit
        for gpa, n in self.readable:
            if left <= 0:
                break
            take = min(n, left)
            parts.append(mem.read(gpa, take))
            left -= take
        return b"".join(parts)

    def write(self, mem: GuestMemory, data: bytes | bytearray | memoryview,
              log: DirtyLog | None = None) -> int:
        """Scatter ``data`` over the writable buffers; returns bytes written (may be short).
        With a ``log`` (the queue's, while the front-end logs), each buffer written is
        marked dirty once its bytes are in."""
        if len(self.writable) == 1 and self.writable[0][1] >= len(data):
            gpa = self.writable[0][0]
            mem.write(gpa, data)
            if log is not None:
                log.mark(gpa, len(data))
            return len(data)
        view = memoryview(data)
        pos = 0
        for gpa, n in self.writable:
            if pos >= len(view):
                break
            take = min(n, len(view) - pos)
            mem.write(gpa, view[pos:pos + take])
            if log is not None:
                log.mark(gpa, take)
            pos += take
        return pos


class SplitQueue:
    """Device side of one split virtqueue."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.size = 0
        self.event_idx = False
        self.last_avail_idx = 0
        self.used_idx = 0
        # Front-end VAs from SET_VRING_ADDR; None until set.
        self.desc_va: int | None = None
        self.avail_va: int | None = None
        self.used_va: int | None = None
        # Resolved against the current snapshot by attach().
        self._desc: tuple[mmap.mmap, int] | None = None
        self._avail: tuple[mmap.mmap, int] | None = None
        self._used: tuple[mmap.mmap, int] | None = None
        self._signalled_used: int | None = None
        #: The avail idx as last read: chains up to it are known available, so pop() reads
        #: the index again only when it has caught up (always a value the driver wrote,
        #: checked against the size when read).
        self._shadow_avail = 0
        self.broken: str | None = None
        #: GPAs of the descriptor table, available and used ring, set by attach(): the
        #: compiled data path locates them in the snapshot it holds for each burst.
        self.ring_gpas: tuple[int, int, int] | None = None
        #: A notification decision the data path took when it published used elements
        #: (decide_notify); should_notify() hands it out once instead of reading the ring.
        self.notify_decided: bool | None = None
        #: The connection's dirty log while the front-end logs (VHOST_F_LOG_ALL acked and
        #: SET_LOG_BASE given), else None; set by the connection on its loop thread.
        self.log: DirtyLog | None = None
        #: SET_VRING_ADDR's ``log_guest_addr`` when its flags had VHOST_VRING_F_LOG: where
        #: in the log the used ring's writes are marked (a GPA, maybe outside the memory
        #: table; the log's own bounds check covers it). None: used writes are not logged.
        self.log_guest_addr: int | None = None

    # -- configuration -------------------------------------------------------------------
    def set_size(self, num: int) -> None:
        # "Queue Size value is always a power of 2. The maximum Queue Size value is 32768."
        if num == 0 or num > MAX_QUEUE_SIZE or num & (num - 1):
            raise VirtqueueError(f"queue {self.index}: size {num} is not a power of 2 in "
                                 f"1..{MAX_QUEUE_SIZE}")
        self.size = num

    def set_base(self, base: int) -> None:
        self.last_avail_idx = base & 0xFFFF
        self.used_idx = base & 0xFFFF
        self._shadow_avail = self.last_avail_idx
        self._signalled_used = None
        self.notify_decided = None

    def resume_from_used_ring(self) -> int | None:
        """Take the used ring's idx as where the queue stands, if SET_VRING_BASE said
        otherwise; returns the base it replaced (None if they agreed). Call it once the
        ring is attached and before it starts.

        A front-end that reconnects to a new back-end may not know where the old one
        stopped: DPDK's virtio_user (server=1) sends SET_VRING_BASE 0 while its rings
        carry on from where they were. libvhost-user and DPDK's vhost library then trust
        the used ring: "used_idx = used->idx", and for a device that uses buffers in order
        "last_avail_idx = used_idx", so the chains made available but never used are
        served again. pyvhost's devices use chains in order.
        Guest-controlled: ``used->idx`` is any 16-bit value; pending() still bounds the
        distance to the avail idx by the queue size, and slots are taken modulo the size.
        """
        mm, off = self._ring(self._used)
        used = int(_U16.unpack_from(mm, off + 2)[0])
        if used == self.last_avail_idx == self.used_idx:
            return None
        replaced = self.last_avail_idx
        self.set_base(used)
        return replaced

    def set_addresses(self, desc_va: int, avail_va: int, used_va: int) -> None:
        self.desc_va, self.avail_va, self.used_va = desc_va, avail_va, used_va

    @property
    def configured(self) -> bool:
        return self.size > 0 and self.desc_va is not None

    @property
    def attached(self) -> bool:
        return self._desc is not None

    def ring_sizes(self) -> tuple[int, int, int]:
        """Bytes of the descriptor table, available ring and used ring (with event fields)."""
        return 16 * self.size, 6 + 2 * self.size, 6 + 8 * self.size

    def attach(self, mem: GuestMemory) -> None:
        """Translate the ring addresses against ``mem``; each ring must lie in one region.

        Called on SET_VRING_ADDR and after every memory table change (the mapping the
        rings live in may have moved or gone).
        """
        self._desc = self._avail = self._used = None
        self.ring_gpas = None
        if not self.configured:
            return
        assert self.desc_va is not None and self.avail_va is not None
        assert self.used_va is not None
        dsize, asize, usize = self.ring_sizes()
        try:
            gpas = (mem.va_to_gpa(self.desc_va, dsize), mem.va_to_gpa(self.avail_va, asize),
                    mem.va_to_gpa(self.used_va, usize))
            desc = mem.locate(gpas[0], dsize)
            avail = mem.locate(gpas[1], asize)
            used = mem.locate(gpas[2], usize)
        except GuestAddressError as e:
            raise VirtqueueError(f"queue {self.index}: ring outside guest memory: {e}") from e
        self._desc, self._avail, self._used = desc, avail, used
        self.ring_gpas = gpas

    def detach(self) -> None:
        self._desc = self._avail = self._used = None
        self.ring_gpas = None

    def break_(self, reason: str) -> VirtqueueError:
        """Mark the queue broken; returns the error to raise."""
        self.broken = reason
        return VirtqueueError(f"queue {self.index}: {reason}")

    # -- available ring ------------------------------------------------------------------
    def _ring(self, which: tuple[mmap.mmap, int] | None) -> tuple[mmap.mmap, int]:
        if which is None or self.broken is not None:
            raise VirtqueueError(f"queue {self.index} is not ready"
                                 + (f" (broken: {self.broken})" if self.broken else ""))
        return which

    def avail_idx(self) -> int:
        mm, off = self._ring(self._avail)
        return int(_U16.unpack_from(mm, off + 2)[0])

    def pending(self) -> int:
        """Chains available and not yet taken. Guest-controlled: checked against size."""
        n = (self.avail_idx() - self.last_avail_idx) & 0xFFFF
        # The driver can never have more than `size` chains outstanding; more means a
        # corrupt index, and trusting it would make us walk garbage.
        if n > self.size:
            raise self.break_(f"avail idx moved {n} past last seen, more than the queue "
                              f"size {self.size}")
        self._shadow_avail = (self.last_avail_idx + n) & 0xFFFF
        return n

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        """The next available chain, or None when the ring is empty."""
        if self.last_avail_idx == self._shadow_avail and self.pending() == 0:
            return None
        mm, off = self._ring(self._avail)
        slot = self.last_avail_idx % self.size
        head = int(_U16.unpack_from(mm, off + 4 + 2 * slot)[0])
        chain = self._walk(mem, head)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        return chain

    def unpop(self, count: int) -> None:
        """Give back the last ``count`` chains popped and not yet used."""
        self.last_avail_idx = (self.last_avail_idx - count) & 0xFFFF

    def pop_batch(self, mem: GuestMemory, limit: int) -> list[DescriptorChain]:
        chains: list[DescriptorChain] = []
        while len(chains) < limit:
            chain = self.pop(mem)
            if chain is None:
                break
            chains.append(chain)
        return chains

    def _walk(self, mem: GuestMemory, head: int) -> DescriptorChain:
        """Follow a chain from ``head``, through at most one indirect table.

        Memory-safety invariants: every descriptor index is checked ``< size`` (or
        ``< table length`` for an indirect table) before the descriptor is read; the
        number of descriptors read from each table is bounded by that table's length
        (the queue size for the ring's own table), which ends any loop, so a walk reads
        at most ``2 * size`` descriptors; every buffer range is checked against guest
        memory here, before use.
        """
        if head >= self.size:
            raise self.break_(f"head index {head} >= queue size {self.size}")
        dmm, doff = self._ring(self._desc)
        chain = DescriptorChain(head)
        table_mm, table_off, table_len = dmm, doff, self.size
        index = head
        seen = 0
        indirect = False
        while True:
            seen += 1
            # "The driver MUST NOT create a descriptor chain longer than the Queue Size".
            # An indirect table counts on its own, against its own length (as Linux's
            # vhost does): a table of up to `size` entries is accepted below.
            if seen > table_len:
                raise self.break_(f"chain at head {head} has more than {table_len} "
                                  "descriptors in one table (a loop?)")
            addr, length, flags, nxt = _DESC.unpack_from(table_mm, table_off + 16 * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    raise self.break_("indirect descriptor inside an indirect table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise self.break_("descriptor has both INDIRECT and NEXT")
                if length == 0 or length % 16:
                    raise self.break_(f"indirect table length {length} is not a non-zero "
                                      "multiple of 16")
                if length // 16 > self.size:
                    raise self.break_(f"indirect table of {length // 16} entries exceeds "
                                      f"the queue size {self.size}")
                try:
                    table_mm, table_off = mem.locate(addr, length)
                except GuestAddressError as e:
                    raise self.break_(f"indirect table outside guest memory: {e}") from e
                table_len = length // 16
                index = 0
                seen = 0
                indirect = True
                continue
            if length:
                try:
                    mem.segments(addr, length)
                except GuestAddressError as e:
                    raise self.break_(f"buffer outside guest memory: {e}") from e
            if flags & VIRTQ_DESC_F_WRITE:
                chain.writable.append((addr, length))
            elif chain.writable:
                raise self.break_("device-readable descriptor after a device-writable one")
            else:
                chain.readable.append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            if nxt >= table_len:
                raise self.break_(f"next index {nxt} >= table size {table_len}")
            index = nxt

    # -- used ring -----------------------------------------------------------------------
    def push_used(self, head: int, written: int) -> None:
        """Return a chain: "the device writes the used element, then the used idx"."""
        mm, off = self._ring(self._used)
        slot = self.used_idx % self.size
        # pack_into may write the element in several stores (zeroes first): harmless, the
        # driver reads no element at or past used->idx.
        _USED_ELEM.pack_into(mm, off + 4 + 8 * slot, head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        # x86 is TSO: the element's stores are visible before the index store below, and
        # the index is one store (store_le16), never a transient value.
        store_le16(mm, off + 2, self.used_idx)
        if self.log is not None:
            self._log_used_elems(slot, 1)

    def push_used_batch(self, elems: list[tuple[int, int]]) -> None:
        """Return several chains with one index update."""
        if not elems:
            return
        mm, off = self._ring(self._used)
        idx = first = self.used_idx
        for head, written in elems:
            _USED_ELEM.pack_into(mm, off + 4 + 8 * (idx % self.size), head, written)
            idx = (idx + 1) & 0xFFFF
        self.used_idx = idx
        store_le16(mm, off + 2, idx)
        if self.log is not None:
            self._log_used_elems(first % self.size, len(elems))

    def should_notify(self) -> bool:
        """Whether the driver wants an interrupt for what was just used.

        With EVENT_IDX: "the device ... MUST NOT send a notification unless
        vring_need_event(used_event, new_idx, old_idx)"; else honour NO_INTERRUPT.
        A decision the data path already took (:meth:`decide_notify`) is returned once,
        without reading the ring again.
        """
        decided = self.notify_decided
        if decided is not None:
            self.notify_decided = None
            return decided
        return self._need_notify()

    def decide_notify(self) -> None:
        """Take the notification decision now, right after publishing used elements (the
        data path does, inside its burst); a decision not yet handed out stays true."""
        need = self._need_notify()
        self.notify_decided = need or bool(self.notify_decided)

    def _need_notify(self) -> bool:
        mm, off = self._ring(self._avail)
        if self.event_idx:
            used_event = int(_U16.unpack_from(mm, off + 4 + 2 * self.size)[0])
            old = self._signalled_used
            new = self.used_idx
            self._signalled_used = new
            if old is None:
                return True
            return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        flags = int(_U16.unpack_from(mm, off)[0])
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT

    def enable_kicks(self, enabled: bool) -> None:
        """Ask the driver to kick (or not) for new buffers.

        With EVENT_IDX the device publishes avail_event = the next index it wants a kick
        for; without it, it sets or clears VIRTQ_USED_F_NO_NOTIFY.
        """
        mm, off = self._ring(self._used)
        if self.event_idx:
            if enabled:
                # One store: a transient 0 read by the driver could make it skip the
                # kick we are about to wait for.
                store_le16(mm, off + 4 + 8 * self.size, self.last_avail_idx)
                self._log_used(4 + 8 * self.size, 2)
        else:
            store_le16(mm, off, 0 if enabled else VIRTQ_USED_F_NO_NOTIFY)
            self._log_used(0, 2)

    # -- dirty log -----------------------------------------------------------------------
    def _log_used(self, offset: int, length: int) -> None:
        """Mark ``length`` bytes at ``offset`` of the used ring, at ``log_guest_addr``."""
        log, base = self.log, self.log_guest_addr
        if log is not None and base is not None:
            log.mark(base + offset, length)

    def _log_used_elems(self, slot: int, count: int) -> None:
        """Mark ``count`` used elements from ``slot`` (wrapping at the size) and the idx.
        More than ``size`` elements (a burst that outran a driver refilling the ring)
        wrote every slot: the whole element array, never past it."""
        n = min(count, self.size)
        end = slot + n
        if end <= self.size:
            self._log_used(4 + 8 * slot, 8 * n)
        else:
            self._log_used(4 + 8 * slot, 8 * (self.size - slot))
            self._log_used(4, 8 * (end - self.size))
        self._log_used(2, 2)
