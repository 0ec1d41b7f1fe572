"""The front-end's driver side of a split ring (:mod:`pyvhost.frontend.driver`): what it
writes where the virtio spec says, and a used ring it must refuse (the device writes it)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest

from pyvhost.frontend import FrontendUsageError, GuestRam, Vring
from pyvhost.frontend.driver import DESC, VIRTQ_DESC_F_WRITE, DriverQueue
from pyvhost.frontend.errors import UsedRingError
from pyvhost.frontend.frontend import split_ring_layout
from pyvhost.units import MiB

SIZE = 8
U16 = struct.Struct("<H")


@pytest.fixture
def ring() -> Iterator[DriverQueue]:
    ram = GuestRam(0x10_0000, 1 * MiB)
    desc, avail, used, _ = split_ring_layout(SIZE)
    base = ram.userspace_addr + 0x1000
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        yield DriverQueue(ram, Vring(1, SIZE, base + desc, base + avail, base + used, kick,
                                     -1))
    finally:
        os.close(kick)
        ram.close()


def _device_uses(q: DriverQueue, entries: list[tuple[int, int]], idx: int) -> None:
    """What a device does: used elements from slot 0, then the used idx."""
    for slot, (head, length) in enumerate(entries):
        q.ram.write(q.used + 4 + 8 * slot, struct.pack("<II", head, length))
    q.ram.write(q.used + 2, U16.pack(idx))


def test_add_writes_the_descriptor_and_the_available_ring(ring: DriverQueue) -> None:
    head = ring.add(ring.gpa(0x8000), 1500, writable=True)
    assert DESC.unpack(ring.ram.read(ring.desc + 16 * head, 16)) == (
        0x10_0000 + 0x8000, 1500, VIRTQ_DESC_F_WRITE, 0)
    assert U16.unpack(ring.ram.read(ring.avail + 4, 2))[0] == head  # slot 0
    assert U16.unpack(ring.ram.read(ring.avail + 2, 2))[0] == 1  # published
    ring.kick()
    assert os.eventfd_read(ring.vring.kick_fd) == 1
    assert ring.held == {head} and len(ring.free) == SIZE - 1


def test_take_used_gives_the_chains_back(ring: DriverQueue) -> None:
    a, b = ring.add(ring.gpa(0), 64), ring.add(ring.gpa(64), 64)
    assert ring.take_used() == []
    _device_uses(ring, [(b, 0), (a, 60)], 2)
    assert ring.take_used() == [(b, 0), (a, 60)]
    assert not ring.held and len(ring.free) == SIZE
    assert ring.take_used() == []


def test_a_used_ring_no_driver_may_accept(ring: DriverQueue) -> None:
    head = ring.add(ring.gpa(0), 64)
    _device_uses(ring, [(head, 0)], 2)  # two new entries, one chain out
    with pytest.raises(UsedRingError, match="moved by 2"):
        ring.take_used()
    _device_uses(ring, [((head + 1) % SIZE, 0)], 1)  # a head it does not hold
    with pytest.raises(UsedRingError, match="does not hold"):
        ring.take_used()


def test_any_value_but_no_write_outside_the_table(ring: DriverQueue) -> None:
    ring.write_desc(SIZE - 1, 0xDEAD_0000_0000, 0xFFFF_FFFF, 0xFFFF, 0xFFF0)
    assert DESC.unpack(ring.ram.read(ring.desc + 16 * (SIZE - 1), 16)) == (
        0xDEAD_0000_0000, 0xFFFF_FFFF, 0xFFFF, 0xFFF0)
    ring.set_avail(SIZE + 1, 0xFFF3)  # the slot wraps, the head is any value
    assert U16.unpack(ring.ram.read(ring.avail + 4 + 2, 2))[0] == 0xFFF3
    ring.publish(769)
    assert U16.unpack(ring.ram.read(ring.avail + 2, 2))[0] == 769
    with pytest.raises(FrontendUsageError):
        ring.write_desc(SIZE, 0, 0)
    for _ in range(SIZE):
        ring.add(ring.gpa(0), 1)
    with pytest.raises(FrontendUsageError, match="no free descriptor"):
        ring.add(ring.gpa(0), 1)


def test_a_ring_outside_its_region_is_refused() -> None:
    with GuestRam(0, 1 * MiB) as ram:
        end = ram.userspace_addr + ram.memory_size
        with pytest.raises(FrontendUsageError, match="not inside"):
            DriverQueue(ram, Vring(0, SIZE, end - 16, end, end + 4096, -1, -1))
