"""The device side of a split virtqueue, against rings a test-side driver built by hand."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvhost.memory import DirtyLog, GuestAddressError
from pyvhost.protocol.fds import FdBag
from pyvhost.protocol.messages import LogDescription
from pyvhost.virtq.split import SplitQueue, VirtqueueError
from support.memfd import SharedRam, memfd
from support.ring import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    Buffer,
    Desc,
    DriverRing,
    RingImage,
    RingLayout,
    device_queue,
    indirect_table,
    ring_images,
)

SIZE = 8
END = SharedRam.END


def new_ring(ram: SharedRam, size: int = SIZE, desc: int = 0x1000, avail: int = 0x3000,
             used: int = 0x4000) -> DriverRing:
    """A driver's ring of ``size`` entries in ``ram`` (addresses are GPAs)."""
    return DriverRing(ram, RingLayout(size, desc, avail, used))


def make_queue(ram: SharedRam, size: int = SIZE, event_idx: bool = False,
               base: int = 0) -> tuple[SplitQueue, DriverRing]:
    ring = new_ring(ram, size)
    ring.avail_idx = base
    ring.publish()
    return device_queue(ring, ram.mem, event_idx=event_idx, base=base), ring


@pytest.fixture
def qr(ram: SharedRam) -> tuple[SplitQueue, DriverRing]:
    return make_queue(ram)


# ---------------------------------------------------------------------------------------
# Chains
# ---------------------------------------------------------------------------------------


def test_simple_chain(ram: SharedRam, qr: tuple[SplitQueue, DriverRing]) -> None:
    q, ring = qr
    bufs = [Buffer(0x8000, 16, False), Buffer(0x9000, 32, False), Buffer(0x1_2000, 5, False)]
    data = [os.urandom(b.length) for b in bufs]
    for b, d in zip(bufs, data, strict=True):
        ram.write(b.gpa, d)
    ring.post(ring.write_chain([0, 1, 2], bufs))
    assert q.pending() == 1
    chain = q.pop(ram.mem)
    assert chain is not None
    assert chain.head == 0
    assert chain.readable == [(0x8000, 16), (0x9000, 32), (0x1_2000, 5)]
    assert chain.writable == []
    assert chain.readable_len == 53
    assert chain.read(ram.mem) == b"".join(data)
    assert chain.read(ram.mem, limit=20) == (data[0] + data[1])[:20]
    assert q.pop(ram.mem) is None
    assert q.pending() == 0
    assert q.last_avail_idx == 1


def test_readable_then_writable(ram: SharedRam, qr: tuple[SplitQueue, DriverRing]) -> None:
    q, ring = qr
    ram.write(0x8000, b"request!")
    ring.post(ring.write_chain([3, 6, 1, 4], [Buffer(0x8000, 8, False), Buffer(0x8100, 4, False),
                                              Buffer(0xA000, 16, True),
                                              Buffer(0x1_0000, 32, True)]))
    chain = q.pop(ram.mem)
    assert chain is not None and chain.head == 3
    assert chain.readable == [(0x8000, 8), (0x8100, 4)]
    assert chain.writable == [(0xA000, 16), (0x1_0000, 32)]
    assert chain.writable_len == 48
    data = os.urandom(40)
    assert chain.write(ram.mem, data) == 40
    assert ram.read(0xA000, 16) == data[:16]
    assert ram.read(0x1_0000, 24) == data[16:]
    assert ram.read(0x1_0000 + 24, 8) == bytes(8)  # nothing past what was written
    # More than fits: the write is cut short at the chain's end.
    assert chain.write(ram.mem, bytes(100)) == 48


def test_chains_come_in_avail_order(ram: SharedRam, qr: tuple[SplitQueue, DriverRing]) -> None:
    q, ring = qr
    ring.write_chain([5, 1, 7], [Buffer(0x8000, 1, False), Buffer(0x8001, 1, False),
                                 Buffer(0x8002, 1, True)])
    ring.write_chain([2], [Buffer(0x9000, 64, True)])
    ring.post(2, 5)
    assert q.pending() == 2
    chains = q.pop_batch(ram.mem, 10)
    assert [c.head for c in chains] == [2, 5]
    assert chains[0].writable == [(0x9000, 64)]
    assert chains[1].readable == [(0x8000, 1), (0x8001, 1)]


def test_buffer_across_adjacent_regions(ram: SharedRam,
                                        qr: tuple[SplitQueue, DriverRing]) -> None:
    q, ring = qr
    data = os.urandom(32)
    ram.write(0xFFF0, data)
    ring.post(ring.write_chain([0], [Buffer(0xFFF0, 32, False)]))
    chain = q.pop(ram.mem)
    assert chain is not None and chain.read(ram.mem) == data


def test_buffer_ending_at_the_last_byte_of_memory(ram: SharedRam,
                                                  qr: tuple[SplitQueue, DriverRing]) -> None:
    q, ring = qr
    ring.post(ring.write_chain([0], [Buffer(END - 8, 8, True)]))
    chain = q.pop(ram.mem)
    assert chain is not None and chain.writable == [(END - 8, 8)]


def test_avail_index_wraps_at_16_bits(ram: SharedRam) -> None:
    q, ring = make_queue(ram, base=0xFFFE)
    for head in (3, 4, 5):
        ring.write_chain([head], [Buffer(0x8000 + head, 1, True)])
    ring.post(3, 4, 5)
    assert ring.avail_idx == 0x0001
    assert q.pending() == 3
    chains = q.pop_batch(ram.mem, 3)
    # Slots 0xFFFE % 8 = 6, then 7, then 0.
    assert [c.head for c in chains] == [3, 4, 5]
    assert q.last_avail_idx == 0x0001
    for c in chains:
        q.push_used(c.head, 1)
    assert ring.used_idx() == 0x0001
    assert [ring.used_elem(s) for s in (6, 7, 0)] == [(3, 1), (4, 1), (5, 1)]


# ---------------------------------------------------------------------------------------
# Indirect descriptors
# ---------------------------------------------------------------------------------------

TABLE = 0xC000


def test_indirect_chain(ram: SharedRam, qr: tuple[SplitQueue, DriverRing]) -> None:
    q, ring = qr
    ring.write_chain([0, 2, 1], [Buffer(0x8000, 10, False), Buffer(0x8100, 20, False),
                                 Buffer(0x1_4000, 30, True)], table=TABLE)
    ring.write_indirect(4, TABLE, 3)
    ring.post(4)
    chain = q.pop(ram.mem)
    assert chain is not None and chain.head == 4
    assert chain.readable == [(0x8000, 10), (0x8100, 20)]
    assert chain.writable == [(0x1_4000, 30)]


def test_direct_descriptors_then_an_indirect_one(ram: SharedRam,
                                                 qr: tuple[SplitQueue, DriverRing]) -> None:
    # "The device MUST handle the case of zero or more normal chained descriptors followed
    # by a single descriptor with flags&VIRTQ_DESC_F_INDIRECT."
    q, ring = qr
    ring.write_desc(0, 0x8000, 12, VIRTQ_DESC_F_NEXT, 1)
    ring.write_indirect(1, TABLE, 2)
    ring.write_chain([0, 1], [Buffer(0x9000, 100, True), Buffer(0x9100, 100, True)], table=TABLE)
    ring.post(0)
    chain = q.pop(ram.mem)
    assert chain is not None
    assert chain.readable == [(0x8000, 12)]
    assert chain.writable == [(0x9000, 100), (0x9100, 100)]


def test_indirect_table_of_queue_size_entries(ram: SharedRam,
                                              qr: tuple[SplitQueue, DriverRing]) -> None:
    # A table as long as the queue is accepted (its length is checked against the queue
    # size), so walking all of it must be too.
    q, ring = qr
    ring.write_chain(list(range(SIZE)), [Buffer(0x8000 + 16 * i, 16, False) for i in range(SIZE)],
                     table=TABLE)
    ring.write_indirect(0, TABLE, SIZE)
    ring.post(0)
    chain = q.pop(ram.mem)
    assert chain is not None
    assert chain.readable == [(0x8000 + 16 * i, 16) for i in range(SIZE)]


def test_a_ring_given_as_data(ram: SharedRam, qr: tuple[SplitQueue, DriverRing]) -> None:
    """A ring described as data and laid out whole, as a differential test of two
    device-side implementations feeds both: a direct descriptor, then an indirect table."""
    q, ring = qr
    ring.lay_out(RingImage(
        descs={5: Desc(0x8000, 5, VIRTQ_DESC_F_NEXT, 2),
               2: Desc(TABLE, 32, VIRTQ_DESC_F_INDIRECT)},
        tables={TABLE: indirect_table([Buffer(0x9000, 3), Buffer(0xA000, 8, True)])},
        avail=[5], avail_idx=1, avail_flags=1,  # VIRTQ_AVAIL_F_NO_INTERRUPT
        data={0x8000: b"hello", 0x9000: b"abc"}))
    chain = q.pop(ram.mem)
    assert chain is not None and chain.head == 5
    assert chain.readable == [(0x8000, 5), (0x9000, 3)]
    assert chain.writable == [(0xA000, 8)]
    assert chain.read(ram.mem) == b"helloabc"
    assert q.pop(ram.mem) is None
    q.push_used(5, 8)
    assert ring.used_elem(0) == (5, 8) and not q.should_notify()


def test_direct_chain_of_queue_size_descriptors(ram: SharedRam,
                                                qr: tuple[SplitQueue, DriverRing]) -> None:
    q, ring = qr
    ring.post(ring.write_chain(list(range(SIZE)),
                               [Buffer(0x8000 + i, 1, i >= 4) for i in range(SIZE)]))
    chain = q.pop(ram.mem)
    assert chain is not None and len(chain.readable) == 4 and len(chain.writable) == 4


# ---------------------------------------------------------------------------------------
# Used ring and notifications
# ---------------------------------------------------------------------------------------


def test_push_used_writes_element_then_index(qr: tuple[SplitQueue, DriverRing]) -> None:
    q, ring = qr
    q.push_used(5, 1500)
    assert ring.used_elem(0) == (5, 1500)
    assert ring.used_idx() == 1
    q.push_used(2, 0)
    assert ring.used_elem(1) == (2, 0)
    assert ring.used_idx() == 2
    assert q.used_idx == 2


def test_push_used_batch(qr: tuple[SplitQueue, DriverRing]) -> None:
    q, ring = qr
    q.push_used(7, 7)
    q.push_used_batch([(1, 10), (3, 30), (0, 0xFFFF_FFFF)])
    assert [ring.used_elem(s) for s in range(4)] == [(7, 7), (1, 10), (3, 30), (0, 0xFFFF_FFFF)]
    assert ring.used_idx() == 4
    q.push_used_batch([])
    assert ring.used_idx() == 4 and q.used_idx == 4


def test_push_used_batch_wraps_ring_and_index(ram: SharedRam) -> None:
    q, ring = make_queue(ram, base=0xFFFF)
    q.push_used_batch([(i, i * 100) for i in range(3)])
    assert ring.used_idx() == 0x0002
    assert [ring.used_elem(s) for s in (7, 0, 1)] == [(0, 0), (1, 100), (2, 200)]


def test_no_interrupt_flag(qr: tuple[SplitQueue, DriverRing]) -> None:
    q, ring = qr
    q.push_used(0, 0)
    assert q.should_notify()
    ring.set_avail_flags(1)  # VIRTQ_AVAIL_F_NO_INTERRUPT
    assert not q.should_notify()
    ring.set_avail_flags(0)
    assert q.should_notify()


def test_event_idx_should_notify(ram: SharedRam) -> None:
    q, ring = make_queue(ram, event_idx=True)
    ring.set_avail_flags(1)  # ignored with EVENT_IDX
    ring.set_used_event(0)
    q.push_used(0, 0)
    assert q.should_notify()  # nothing signalled yet: always
    q.push_used(1, 0)  # used idx 1 -> 2; the driver asked for an event at index 0
    assert not q.should_notify()
    ring.set_used_event(2)
    q.push_used(2, 0)  # 2 -> 3 crosses used_event 2
    assert q.should_notify()
    ring.set_used_event(5)
    q.push_used_batch([(3, 0), (4, 0)])  # 3 -> 5: 5 not crossed yet
    assert not q.should_notify()
    q.push_used(5, 0)  # 5 -> 6
    assert q.should_notify()
    assert not q.should_notify()  # nothing new since


def test_event_idx_should_notify_across_the_wrap(ram: SharedRam) -> None:
    q, ring = make_queue(ram, event_idx=True, base=0xFFFE)
    assert q.should_notify()  # first: signalled at 0xFFFE
    ring.set_used_event(0xFFFF)
    q.push_used_batch([(0, 0), (1, 0), (2, 0)])  # 0xFFFE -> 0x0001
    assert q.should_notify()
    ring.set_used_event(0x0001)
    q.push_used(3, 0)  # 0x0001 -> 0x0002
    assert q.should_notify()
    ring.set_used_event(0x0005)
    q.push_used(4, 0)
    assert not q.should_notify()


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.integers(0, 0xFFFF), steps=st.lists(
    st.tuples(st.integers(0, 8), st.integers(0, 0xFFFF)), min_size=1, max_size=10))
def test_event_idx_matches_the_spec_window(ram: SharedRam, start: int,
                                           steps: list[tuple[int, int]]) -> None:
    """vring_need_event: notify iff used_event lies in [old, new) modulo 2**16, where old is
    the used index at the previous check."""
    q, ring = make_queue(ram, event_idx=True, base=start)
    q.should_notify()
    old = start
    for count, used_event in steps:
        ring.set_used_event(used_event)
        q.push_used_batch([(0, 0)] * count)
        new = (old + count) & 0xFFFF
        want = (used_event - old) & 0xFFFF < (new - old) & 0xFFFF
        assert q.should_notify() == want, (old, new, used_event)
        old = new


def test_enable_kicks_without_event_idx(qr: tuple[SplitQueue, DriverRing]) -> None:
    q, ring = qr
    q.enable_kicks(False)
    assert ring.used_flags() == 1  # VIRTQ_USED_F_NO_NOTIFY
    q.enable_kicks(True)
    assert ring.used_flags() == 0
    assert ring.avail_event() == 0


def test_enable_kicks_with_event_idx_publishes_avail_event(
        ram: SharedRam) -> None:
    q, ring = make_queue(ram, event_idx=True)
    for head in (0, 1):
        ring.write_chain([head], [Buffer(0x8000, 1, False)])
    ring.post(0, 1)
    assert len(q.pop_batch(ram.mem, 2)) == 2
    q.enable_kicks(True)
    assert ring.avail_event() == 2
    assert ring.used_flags() == 0
    q.enable_kicks(False)
    assert ring.avail_event() == 2 and ring.used_flags() == 0


def test_unpop_gives_chains_back(ram: SharedRam, qr: tuple[SplitQueue, DriverRing]) -> None:
    q, ring = qr
    for head in (1, 2, 3):
        ring.write_chain([head], [Buffer(0x8000 + head, 1, True)])
    ring.post(1, 2, 3)
    assert [c.head for c in q.pop_batch(ram.mem, 2)] == [1, 2]
    q.unpop(1)
    assert q.pending() == 2
    assert [c.head for c in q.pop_batch(ram.mem, 5)] == [2, 3]
    q.unpop(3)
    assert q.last_avail_idx == 0
    assert [c.head for c in q.pop_batch(ram.mem, 5)] == [1, 2, 3]


def test_unpop_across_the_wrap(ram: SharedRam) -> None:
    q, ring = make_queue(ram, base=0xFFFF)
    ring.write_chain([6], [Buffer(0x8000, 1, True)])
    ring.write_chain([7], [Buffer(0x8000, 1, True)])
    ring.post(6, 7)
    assert [c.head for c in q.pop_batch(ram.mem, 2)] == [6, 7]
    q.unpop(2)
    assert q.last_avail_idx == 0xFFFF
    assert [c.head for c in q.pop_batch(ram.mem, 2)] == [6, 7]


# ---------------------------------------------------------------------------------------
# Hostile rings
# ---------------------------------------------------------------------------------------


def assert_broken(q: SplitQueue, ram: SharedRam, ring: DriverRing) -> None:
    """The last pop raised; the queue is now broken for good."""
    assert q.broken is not None
    # Even a well-formed chain is not served any more.
    ring.write_chain([0], [Buffer(0x8000, 1, False)])
    ring.post(0)
    with pytest.raises(VirtqueueError):
        q.pop(ram.mem)
    with pytest.raises(VirtqueueError):
        q.pending()
    with pytest.raises(VirtqueueError):
        q.push_used(0, 0)


def _head_too_big(ring: DriverRing) -> None:
    ring.post(SIZE)


def _head_ffff(ring: DriverRing) -> None:
    ring.post(0xFFFF)


def _next_too_big(ring: DriverRing) -> None:
    ring.write_desc(0, 0x8000, 1, VIRTQ_DESC_F_NEXT, SIZE)
    ring.post(0)


def _loop(ring: DriverRing) -> None:
    ring.write_desc(1, 0x8000, 1, VIRTQ_DESC_F_NEXT, 2)
    ring.write_desc(2, 0x8000, 1, VIRTQ_DESC_F_NEXT, 1)
    ring.post(1)


def _self_loop(ring: DriverRing) -> None:
    ring.write_desc(3, 0x8000, 1, VIRTQ_DESC_F_NEXT, 3)
    ring.post(3)


def _longer_than_size(ring: DriverRing) -> None:
    # Every descriptor once, then back to the head: SIZE + 1 links.
    ring.write_chain(list(range(SIZE)), [Buffer(0x8000, 1, False)] * SIZE)
    ring.write_desc(SIZE - 1, 0x8000, 1, VIRTQ_DESC_F_NEXT, 0)
    ring.post(0)


def _indirect_in_indirect(ring: DriverRing) -> None:
    ring.write_indirect(0, TABLE, 2)
    ring.write_desc(0, 0x8000, 1, VIRTQ_DESC_F_NEXT, 1, table=TABLE)
    ring.write_desc(1, TABLE + 0x100, 16, VIRTQ_DESC_F_INDIRECT, table=TABLE)
    ring.write_desc(0, 0x8000, 1, table=TABLE + 0x100)
    ring.post(0)


def _indirect_and_next(ring: DriverRing) -> None:
    ring.write_indirect(0, TABLE, 1, flags=VIRTQ_DESC_F_NEXT)
    ring.write_desc(0, 0x8000, 1, table=TABLE)
    ring.post(0)


def _indirect_len(length: int) -> object:
    def build(ring: DriverRing) -> None:
        ring.write_desc(0, TABLE, length, VIRTQ_DESC_F_INDIRECT)
        ring.write_desc(0, 0x8000, 1, table=TABLE)
        ring.post(0)
    return build


def _indirect_at(addr: int, entries: int = 2) -> object:
    def build(ring: DriverRing) -> None:
        ring.write_indirect(0, addr, entries)
        ring.post(0)
    return build


def _indirect_loop(ring: DriverRing) -> None:
    ring.write_indirect(0, TABLE, 4)
    ring.write_desc(0, 0x8000, 1, VIRTQ_DESC_F_NEXT, 1, table=TABLE)
    ring.write_desc(1, 0x8000, 1, VIRTQ_DESC_F_NEXT, 0, table=TABLE)
    ring.post(0)


def _indirect_next_past_table(ring: DriverRing) -> None:
    ring.write_indirect(0, TABLE, 2)
    ring.write_desc(0, 0x8000, 1, VIRTQ_DESC_F_NEXT, 2, table=TABLE)  # only 0 and 1 exist
    ring.write_desc(2, 0x8000, 1, table=TABLE)
    ring.post(0)


def _buffer(addr: int, length: int, writable: bool = False) -> object:
    def build(ring: DriverRing) -> None:
        ring.post(ring.write_chain([0], [Buffer(addr, length, writable)]))
    return build


def _readable_after_writable(ring: DriverRing) -> None:
    ring.post(ring.write_chain([0, 1], [Buffer(0x8000, 1, True), Buffer(0x8001, 1, False)]))


def _readable_after_writable_indirect(ring: DriverRing) -> None:
    ring.write_chain([0, 1, 2], [Buffer(0x8000, 1, False), Buffer(0x8001, 1, True),
                                 Buffer(0x8002, 1, False)], table=TABLE)
    ring.write_indirect(0, TABLE, 3)
    ring.post(0)


def _avail_jump(ring: DriverRing) -> None:
    ring.publish(SIZE + 1)


def _avail_backwards(ring: DriverRing) -> None:
    ring.publish(0xFFFF)


HOSTILE = {
    "head-eq-size": _head_too_big,
    "head-ffff": _head_ffff,
    "next-eq-size": _next_too_big,
    "loop-1-2-1": _loop,
    "self-loop": _self_loop,
    "chain-longer-than-size": _longer_than_size,
    "indirect-in-indirect": _indirect_in_indirect,
    "indirect-and-next": _indirect_and_next,
    "indirect-len-0": _indirect_len(0),
    "indirect-len-8": _indirect_len(8),
    "indirect-len-24": _indirect_len(24),
    "indirect-table-outside-memory": _indirect_at(END + 0x1000),
    "indirect-table-straddles-end": _indirect_at(END - 16),
    "indirect-table-near-2-64": _indirect_at((1 << 64) - 16, 2),
    "indirect-loop": _indirect_loop,
    "indirect-next-past-table": _indirect_next_past_table,
    "buffer-outside-memory": _buffer(END + 0x100, 4),
    "buffer-at-end": _buffer(END, 1, True),
    "buffer-straddles-end": _buffer(END - 4, 8),
    "buffer-near-2-64": _buffer((1 << 64) - 4, 8, True),
    "buffer-4-GiB": _buffer(0, 0xFFFF_FFFF, True),
    "readable-after-writable": _readable_after_writable,
    "readable-after-writable-indirect": _readable_after_writable_indirect,
    "avail-idx-jump": _avail_jump,
    "avail-idx-backwards": _avail_backwards,
}


@pytest.mark.parametrize("build", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_ring_breaks_the_queue(ram: SharedRam, qr: tuple[SplitQueue, DriverRing],
                                       build: object) -> None:
    q, ring = qr
    assert callable(build)
    before = q.last_avail_idx
    build(ring)
    with pytest.raises(VirtqueueError):
        q.pop(ram.mem)
    assert q.last_avail_idx == before
    assert_broken(q, ram, ring)


def test_loop_is_caught_by_the_queue_size_bound(ram: SharedRam,
                                                qr: tuple[SplitQueue, DriverRing]) -> None:
    q, ring = qr
    _loop(ring)
    with pytest.raises(VirtqueueError, match="a loop"):
        q.pop(ram.mem)


def test_pending_reports_an_avail_idx_jump(qr: tuple[SplitQueue, DriverRing]) -> None:
    q, ring = qr
    ring.publish(SIZE)
    assert q.pending() == SIZE  # a full ring is fine
    ring.publish(SIZE + 1)
    with pytest.raises(VirtqueueError):
        q.pending()
    assert q.broken is not None


def test_queue_not_attached_does_not_pop(ram: SharedRam) -> None:
    q = SplitQueue(1)
    q.set_size(SIZE)
    with pytest.raises(VirtqueueError):
        q.pop(ram.mem)
    q.set_addresses(*new_ring(ram).vas)
    assert not q.attached
    with pytest.raises(VirtqueueError):
        q.pop(ram.mem)


@pytest.mark.parametrize("where", ["desc", "avail", "used"])
@pytest.mark.parametrize("va", [
    0x1000,                                         # no region at all
    SharedRam.LOW.userspace_addr + 0x10000 - 0x10,   # straddles the end of a region
    SharedRam.HIGH.userspace_addr + 0x10000 - 0x10,  # straddles the end of memory
    SharedRam.LOW.userspace_addr + 0x10000,          # first byte past a region
    SharedRam.HIGH.userspace_addr - 0x10,            # starts before a region
    (1 << 64) - 0x10,
])
def test_ring_outside_memory_at_attach(ram: SharedRam, where: str, va: int) -> None:
    ring = new_ring(ram)
    vas = dict(zip(("desc", "avail", "used"), ring.vas, strict=True))
    vas[where] = va
    q = SplitQueue(0)
    q.set_size(SIZE)
    q.set_addresses(vas["desc"], vas["avail"], vas["used"])
    with pytest.raises(VirtqueueError):
        q.attach(ram.mem)
    assert not q.attached


def test_rings_given_as_gpa_instead_of_va_are_refused(ram: SharedRam) -> None:
    ring = new_ring(ram)
    q = SplitQueue(0)
    q.set_size(SIZE)
    q.set_addresses(ring.layout.desc, ring.layout.avail, ring.layout.used)
    with pytest.raises(VirtqueueError):
        q.attach(ram.mem)


def test_attach_translates_vas_to_the_right_gpas(ram: SharedRam) -> None:
    # Rings in the HIGH region, whose VA is below LOW's: a slip between spaces shows.
    ring = new_ring(ram, desc=0x1_1000, avail=0x1_3000, used=0x1_4000)
    q = SplitQueue(0)
    q.set_size(SIZE)
    q.set_addresses(*ring.vas)
    q.attach(ram.mem)
    ring.post(ring.write_chain([2], [Buffer(0x8000, 4, True)]))
    chain = q.pop(ram.mem)
    assert chain is not None and chain.head == 2
    q.push_used(2, 4)
    assert ring.used_idx() == 1 and ring.used_elem(0) == (2, 4)


def test_attach_after_the_ring_region_is_removed(ram: SharedRam,
                                                 qr: tuple[SplitQueue, DriverRing]) -> None:
    q, _ = qr
    ram.manager.remove_region(SharedRam.LOW)
    with pytest.raises(VirtqueueError):
        q.attach(ram.mem)
    assert not q.attached
    # Back again (as a front-end re-adding it would): the queue attaches.
    with FdBag([os.dup(ram.fd)]) as bag:
        ram.manager.add_region(SharedRam.LOW, bag.peek(0))
    q.attach(ram.mem)
    assert q.attached


@pytest.mark.parametrize("num", [0, 3, 6, 100, 32767, 32769, 65536, 1 << 20])
def test_set_size_refuses(num: int) -> None:
    q = SplitQueue(0)
    with pytest.raises(VirtqueueError):
        q.set_size(num)
    assert q.size == 0


@pytest.mark.parametrize("num", [1, 2, 256, 1024, 32768])
def test_set_size_accepts_powers_of_two(num: int) -> None:
    q = SplitQueue(0)
    q.set_size(num)
    assert q.size == num
    assert q.ring_sizes() == (16 * num, 6 + 2 * num, 6 + 8 * num)


# ---------------------------------------------------------------------------------------
# Random rings: only VirtqueueError, and every chain served lies in guest memory
# ---------------------------------------------------------------------------------------

ADDRS = st.one_of(st.integers(0, END + 0x100), st.sampled_from([END - 8, 0xFFF8, TABLE]),
                  st.integers(0, (1 << 64) - 1))
LENS = st.one_of(st.integers(0, 64), st.sampled_from([16, 32, 48, 0xFFFF_FFFF]),
                 st.integers(0, 0xFFFF_FFFF))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(image=ring_images(SIZE, ADDRS, LENS, tables=[TABLE]))
def test_random_rings(ram: SharedRam, image: RingImage) -> None:
    q, ring = make_queue(ram)
    ring.lay_out(image)
    avail_idx = image.avail_idx
    for served in range(SIZE + 1):  # chains served so far
        try:
            chain = q.pop(ram.mem)
        except VirtqueueError:
            assert q.broken is not None
            with pytest.raises(VirtqueueError):
                q.pop(ram.mem)
            break
        if chain is None:
            assert served == avail_idx
            break
        assert 0 <= chain.head < SIZE
        for gpa, n in chain.readable + chain.writable:
            assert gpa >= 0 and gpa + n <= END
            try:
                list(ram.mem.segments(gpa, n))
            except GuestAddressError:  # pragma: no cover - the assertion's message
                pytest.fail(f"chain buffer {gpa:#x}+{n:#x} outside guest memory")
        # At most the ring's table and one indirect table, each walked at most once.
        assert len(chain.readable) + len(chain.writable) <= 2 * SIZE
        chain.read(ram.mem, limit=256)


# ---------------------------------------------------------------------------------------
# The dirty log (live migration)
# ---------------------------------------------------------------------------------------


class RecordingLog(DirtyLog):
    """A dirty log that records the ranges it is asked to mark (exact, whatever a real
    log's granularity), for checking what the queue marks."""

    __slots__ = ("ranges",)

    def __init__(self) -> None:  # no mapping: nothing is stored
        self.ranges: list[tuple[int, int]] = []

    def mark(self, gpa: int, length: int) -> None:
        self.ranges.append((gpa, length))


LOG_AT = 0x7_0000_0000  # log_guest_addr: any GPA, even outside guest memory


def test_chain_write_marks_each_buffer_it_fills(
        ram: SharedRam, qr: tuple[SplitQueue, DriverRing]) -> None:
    q, ring = qr
    ring.post(ring.write_chain([0, 1, 2], [Buffer(0xA000, 16, True), Buffer(0x1_0000, 32, True),
                                           Buffer(0x1_8000, 64, True)]))
    chain = q.pop(ram.mem)
    assert chain is not None
    log = RecordingLog()
    assert chain.write(ram.mem, os.urandom(40), log) == 40
    # Only what was written, after it was written: nothing of the third buffer.
    assert log.ranges == [(0xA000, 16), (0x1_0000, 24)]
    one = RecordingLog()
    chain.write(ram.mem, b"x", one)
    assert one.ranges == [(0xA000, 1)]
    chain.write(ram.mem, b"y")  # no log: nothing to mark, nothing fails


def test_used_ring_writes_are_marked_at_log_guest_addr(
        ram: SharedRam, qr: tuple[SplitQueue, DriverRing]) -> None:
    q, _ring = qr
    log = RecordingLog()
    q.log = log
    q.push_used_batch([(0, 1), (1, 2)])
    assert log.ranges == [], "used writes are logged only with VHOST_VRING_F_LOG"
    q.log_guest_addr = LOG_AT
    q.push_used_batch([(2, 3), (3, 4), (4, 5)])        # slots 2..4
    assert log.ranges == [(LOG_AT + 4 + 8 * 2, 24), (LOG_AT + 2, 2)]
    log.ranges.clear()
    q.push_used_batch([(5, 0), (6, 0), (7, 0), (0, 0)])  # slots 5, 6, 7, then 0
    assert log.ranges == [(LOG_AT + 4 + 8 * 5, 24), (LOG_AT + 4, 8), (LOG_AT + 2, 2)]
    log.ranges.clear()
    q.push_used(1, 9)                                   # slot 1
    assert log.ranges == [(LOG_AT + 4 + 8 * 1, 8), (LOG_AT + 2, 2)]
    log.ranges.clear()
    q.enable_kicks(False)                               # used->flags
    assert log.ranges == [(LOG_AT, 2)]
    q.log = None
    q.push_used(2, 0)
    q.enable_kicks(True)
    assert log.ranges == [(LOG_AT, 2)]


def test_avail_event_write_is_marked(ram: SharedRam) -> None:
    q, _ring = make_queue(ram, event_idx=True)
    log = RecordingLog()
    q.log, q.log_guest_addr = log, LOG_AT
    q.enable_kicks(False)   # with EVENT_IDX: nothing is written
    q.enable_kicks(True)    # avail_event, after the ring's SIZE elements
    assert log.ranges == [(LOG_AT + 4 + 8 * SIZE, 2)]


def test_a_real_log_gets_the_pages_written(ram: SharedRam,
                                           qr: tuple[SplitQueue, DriverRing]) -> None:
    """The same through a mapped log: the bits of the buffer's page and of the used ring
    at log_guest_addr, none for the ring's own GPA."""
    q, ring = qr
    fd = memfd(1 << 16, name="pyvhost-test-log")
    log = DirtyLog.map(LogDescription(1 << 16, 0), fd)
    try:
        q.log, q.log_guest_addr = log, 0x80_0000           # page 2048
        ring.post(ring.write_chain([0], [Buffer(0x1_8000, 64, True)]))  # page 24
        chain = q.pop(ram.mem)
        assert chain is not None
        n = chain.write(ram.mem, os.urandom(64), q.log)
        q.push_used_batch([(chain.head, n)])
        bitmap = os.pread(fd, 1 << 16, 0)
        dirty = {8 * i + k for i, b in enumerate(bitmap) for k in range(8) if b >> k & 1}
        assert dirty == {0x1_8000 // 4096, 0x80_0000 // 4096}
    finally:
        log.close()
        os.close(fd)


def test_more_used_elements_than_the_ring_holds_mark_the_element_array_only(
        ram: SharedRam, qr: tuple[SplitQueue, DriverRing]) -> None:
    """A batch longer than the ring (a burst that outran a driver refilling it) wrote
    every slot: the whole element array is marked, never bytes past it."""
    q, _ring = qr
    log = RecordingLog()
    q.log, q.log_guest_addr = log, LOG_AT
    size = q.size
    q.push_used_batch([(i % size, 0) for i in range(size + 3)])      # from slot 0
    assert log.ranges == [(LOG_AT + 4, 8 * size), (LOG_AT + 2, 2)]
    log.ranges.clear()
    q.push_used_batch([(i % size, 0) for i in range(size + 1)])      # from slot 3
    assert log.ranges == [(LOG_AT + 4 + 8 * 3, 8 * (size - 3)), (LOG_AT + 4, 8 * 3),
                          (LOG_AT + 2, 2)]
