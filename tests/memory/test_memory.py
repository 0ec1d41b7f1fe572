"""Guest memory on memfd files: translation, table updates, snapshots and their lifetime.

Expected bytes are read and written through the memfd with ``os.pread``/``os.pwrite``,
never through the code under test, so a wrong offset in a mapping can not hide itself.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, closing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvhost.errors import PeerError
from pyvhost.memory import (
    GuestAddressError,
    GuestMemory,
    MappedRegion,
    MemoryManager,
    MemoryTableError,
    MemoryUpdate,
)
from pyvhost.memory.region import RegionMapError
from pyvhost.protocol.constants import VHOST_USER_MAX_MEM_SLOTS
from pyvhost.protocol.fds import FdBag
from pyvhost.protocol.messages import MemoryRegion, PayloadError
from support.memfd import memfd

PAGE = 4096
U64_END = 1 << 64


def reopen(fd: int) -> int:
    """A fresh fd, with its own open file description, for the same file (as a front-end
    re-sending a table gives)."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def set_table(mgr: MemoryManager, regions: Sequence[MemoryRegion],
              fds: Sequence[int]) -> MemoryUpdate:
    """SET_MEM_TABLE as the connection does it: fresh fds in a bag the caller closes."""
    with FdBag(reopen(fd) for fd in fds) as bag:
        return mgr.set_table(regions, bag)


# A file of 16 pages with known random content, and three regions on it:
#   A: GPA 0x100000, 4 pages, file pages 0-3
#   B: GPA 0x104000 (adjacent to A), 4 pages, file pages 8-11 (not adjacent in the file)
#   C: GPA 0x200000 (after a gap), 2 pages, file pages 4-5, lowest VA of the three
A = MemoryRegion(0x10_0000, 4 * PAGE, 0x7F00_0000_0000, 0)
B = MemoryRegion(0x10_4000, 4 * PAGE, 0x7F00_1000_0000, 8 * PAGE)
C = MemoryRegion(0x20_0000, 2 * PAGE, 0x7E00_0000_0000, 4 * PAGE)
LAYOUT = (A, B, C)


class Ram:
    """The memfd behind LAYOUT and a model of where each GPA lives in it."""

    def __init__(self) -> None:
        self.content = os.urandom(16 * PAGE)
        self.fd = memfd(16 * PAGE, data=self.content)

    def file_offset(self, gpa: int) -> int:
        for r in LAYOUT:
            if r.guest_phys_addr <= gpa < r.guest_phys_addr + r.memory_size:
                return r.mmap_offset + gpa - r.guest_phys_addr
        raise AssertionError(f"{gpa:#x} is not in the layout")

    def expected(self, gpa: int, length: int) -> bytes:
        return b"".join(os.pread(self.fd, 1, self.file_offset(gpa + i))
                        for i in range(length))

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def ram() -> Iterator[Ram]:
    with closing(Ram()) as r:
        yield r


@pytest.fixture
def mgr(ram: Ram) -> Iterator[MemoryManager]:
    m = MemoryManager()
    set_table(m, LAYOUT, [ram.fd] * 3)
    try:
        yield m
    finally:
        m.clear()


# ---------------------------------------------------------------------------------------
# Translation
# ---------------------------------------------------------------------------------------


def end(r: MemoryRegion) -> int:
    return r.guest_phys_addr + r.memory_size


def test_region_at_boundaries(mgr: MemoryManager) -> None:
    mem = mgr.current
    assert [r.desc for r in mem.regions] == [A, B, C]  # sorted by GPA
    for r in LAYOUT:
        assert mem.region_at(r.guest_phys_addr).desc == r  # type: ignore[union-attr]
        assert mem.region_at(end(r) - 1).desc == r  # type: ignore[union-attr]
    # A and B are adjacent: A's first byte out is B's first byte in.
    assert mem.region_at(end(A)).desc == B  # type: ignore[union-attr]
    assert mem.region_at(A.guest_phys_addr - 1) is None
    assert mem.region_at(end(B)) is None
    assert mem.region_at(C.guest_phys_addr - 1) is None
    assert mem.region_at(end(C)) is None
    for gpa in (0, -1, -(1 << 70), U64_END - 1, U64_END, 1 << 100):
        assert mem.region_at(gpa) is None


def test_locate_inside_one_region(mgr: MemoryManager, ram: Ram) -> None:
    mem = mgr.current
    for r in LAYOUT:
        for gpa, n in ((r.guest_phys_addr, r.memory_size), (end(r) - 1, 1),
                       (r.guest_phys_addr + 100, 300)):
            mm, off = mem.locate(gpa, n)
            assert mm[off:off + n] == ram.expected(gpa, n)
    mem.locate(C.guest_phys_addr, 0)  # an empty range at a mapped address


@pytest.mark.parametrize(("gpa", "length"), [
    (end(A) - 8, 16),               # straddles A|B: adjacent, but not one region
    (end(C) - 1, 2),                # last byte in, first byte out
    (end(C), 0),                    # empty range just past the end
    (end(B), 1),                    # in the gap
    (A.guest_phys_addr - 1, 1),
    (A.guest_phys_addr, -1),        # negative length
    (A.guest_phys_addr, U64_END),   # length up to 2**64
    (A.guest_phys_addr, 1 << 80),
    (-1, 1),
    (U64_END - 1, 1),
    (U64_END, 0),
])
def test_locate_refuses(mgr: MemoryManager, gpa: int, length: int) -> None:
    with pytest.raises(GuestAddressError):
        mgr.current.locate(gpa, length)


def test_segments_across_adjacent_regions(mgr: MemoryManager, ram: Ram) -> None:
    mem = mgr.current
    gpa = end(A) - 100
    pieces = list(mem.segments(gpa, 300))
    assert [n for _, _, n in pieces] == [100, 200]
    joined = b"".join(mm[off:off + n] for mm, off, n in pieces)
    assert joined == ram.expected(gpa, 300)
    # The two halves come from file pages 3 and 8: not contiguous in the file.
    assert joined == (ram.content[4 * PAGE - 100:4 * PAGE] + ram.content[8 * PAGE:8 * PAGE + 200])
    assert mem.read(gpa, 300) == joined
    # The whole of A and B in one go.
    assert mem.read(A.guest_phys_addr, 8 * PAGE) == ram.expected(A.guest_phys_addr, 8 * PAGE)


def test_write_read_round_trip_lands_in_the_file(mgr: MemoryManager, ram: Ram) -> None:
    mem = mgr.current
    data = os.urandom(1000)
    gpa = end(A) - 400  # 400 bytes in A, 600 in B
    mem.write(gpa, data)
    assert mem.read(gpa, 1000) == data
    assert os.pread(ram.fd, 400, 4 * PAGE - 400) == data[:400]
    assert os.pread(ram.fd, 600, 8 * PAGE) == data[400:]
    mem.write(end(C) - 3, memoryview(b"xyz"))
    assert os.pread(ram.fd, 3, 6 * PAGE - 3) == b"xyz"
    # And what the file says is what guest memory says.
    os.pwrite(ram.fd, b"from-file", 5 * PAGE)
    assert mem.read(C.guest_phys_addr + PAGE, 9) == b"from-file"


@pytest.mark.parametrize(("gpa", "length"), [
    (end(B) - 4, 8),       # runs off B into the gap
    (end(C) - 1, 2),       # runs off the last region
    (end(B), 1),
    (-1, 2),
    (U64_END - 1, 1),
    (U64_END, 1),
    (A.guest_phys_addr, 1 << 64),
])
def test_out_of_range_access_touches_nothing(mgr: MemoryManager, ram: Ram, gpa: int,
                                             length: int) -> None:
    mem = mgr.current
    before = os.pread(ram.fd, 16 * PAGE, 0)
    with pytest.raises(GuestAddressError):
        mem.read(gpa, length)
    with pytest.raises(GuestAddressError):
        list(mem.segments(gpa, length))
    if length < 1 << 20:
        # Every piece is checked before the first byte is written: no partial write.
        with pytest.raises(GuestAddressError):
            mem.write(gpa, b"\xee" * length)
    assert os.pread(ram.fd, 16 * PAGE, 0) == before


def test_length_zero_and_negative(mgr: MemoryManager) -> None:
    mem = mgr.current
    assert mem.read(A.guest_phys_addr, 0) == b""
    assert list(mem.segments(A.guest_phys_addr, 0)) == []
    with pytest.raises(GuestAddressError):
        mem.read(A.guest_phys_addr, -1)
    with pytest.raises(GuestAddressError):
        list(mem.segments(A.guest_phys_addr, -5))


def test_va_to_gpa(mgr: MemoryManager) -> None:
    mem = mgr.current
    for r in LAYOUT:
        va, gpa = r.userspace_addr, r.guest_phys_addr
        assert mem.va_to_gpa(va, r.memory_size) == gpa
        assert mem.va_to_gpa(va, 0) == gpa
        assert mem.va_to_gpa(va + r.memory_size - 1, 1) == gpa + r.memory_size - 1
        assert mem.va_to_gpa(va + 123, 456) == gpa + 123
        for bad_va, n in ((va - 1, 1), (va, r.memory_size + 1),
                          (va + r.memory_size - 1, 2), (va + r.memory_size, 1),
                          (va + r.memory_size, 0), (va, -1), (va, U64_END)):
            with pytest.raises(GuestAddressError):
                mem.va_to_gpa(bad_va, n)
    for va in (-1, 0, U64_END - 1, U64_END, 1 << 80):
        with pytest.raises(GuestAddressError):
            mem.va_to_gpa(va, 1)


def test_va_to_gpa_agrees_with_locate_at_every_boundary(mgr: MemoryManager) -> None:
    # A VA range that translates must be one that locate accepts, and vice versa.
    mem = mgr.current
    for r in LAYOUT:
        for delta in (-1, 0, 1, r.memory_size - 1, r.memory_size, r.memory_size + 1):
            for n in (0, 1, 2):
                va = r.userspace_addr + delta
                try:
                    gpa = mem.va_to_gpa(va, n)
                except GuestAddressError:
                    inside = 0 <= delta < r.memory_size and delta + n <= r.memory_size
                    assert not inside, f"{va:#x}+{n} refused"
                    continue
                mem.locate(gpa, n)


# ---------------------------------------------------------------------------------------
# Lookups against a brute-force model, on random layouts of up to 509 regions
# ---------------------------------------------------------------------------------------


@st.composite
def layouts(draw: st.DrawFn) -> list[MemoryRegion]:
    """Disjoint one-page regions: GPA order, VA order and file order all differ; gaps of
    zero (adjacent), one or two pages between neighbours."""
    n = draw(st.integers(1, VHOST_USER_MAX_MEM_SLOTS))
    gpa_gaps = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    va_gaps = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    va_order = draw(st.permutations(range(n)))
    file_order = draw(st.permutations(range(n)))
    gpa_base = draw(st.sampled_from([0, PAGE, 1 << 32, U64_END - (3 * n + 1) * PAGE]))
    gpas, gpa = [], gpa_base
    for gap in gpa_gaps:
        gpa += gap * PAGE
        gpas.append(gpa)
        gpa += PAGE
    vas: list[int] = [0] * n
    va = 0x7F00_0000_0000
    for i, gap in zip(va_order, va_gaps, strict=True):
        va += gap * PAGE
        vas[i] = va
        va += PAGE
    return [MemoryRegion(gpas[i], PAGE, vas[i], file_order[i] * PAGE) for i in range(n)]


def brute_gpa(descs: Sequence[MemoryRegion], gpa: int, length: int) -> MemoryRegion | None:
    for d in descs:
        if d.guest_phys_addr <= gpa and gpa + length <= d.guest_phys_addr + d.memory_size \
                and length >= 0 and gpa < d.guest_phys_addr + d.memory_size:
            return d
    return None


def brute_va(descs: Sequence[MemoryRegion], va: int, length: int) -> MemoryRegion | None:
    for d in descs:
        if d.userspace_addr <= va < d.userspace_addr + d.memory_size \
                and length >= 0 and va + length <= d.userspace_addr + d.memory_size:
            return d
    return None


@pytest.fixture(scope="module")
def big_memfd() -> Iterator[int]:
    # A page per slot, and one more for the region that replaces a removed one.
    pages = VHOST_USER_MAX_MEM_SLOTS + 1
    fd = memfd(pages * PAGE, data=os.urandom(pages * PAGE))  # every page different
    try:
        yield fd
    finally:
        os.close(fd)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(descs=layouts(), data=st.data())
def test_lookups_match_brute_force(big_memfd: int, descs: list[MemoryRegion],
                                   data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(descs))
    regions = tuple(MappedRegion.map(d, big_memfd) for d in shuffled)
    mem = GuestMemory(regions)
    try:
        picks = data.draw(st.lists(st.sampled_from(descs), max_size=40))
        gpas = [g for d in picks for g in (d.guest_phys_addr - 1, d.guest_phys_addr,
                                           end(d) - 1, end(d))]
        gpas += data.draw(st.lists(st.integers(-PAGE, descs[-1].guest_phys_addr + 4 * PAGE),
                                   max_size=20))
        for gpa in gpas:
            want = brute_gpa(descs, gpa, 0) if gpa >= 0 else None
            got = mem.region_at(gpa)
            assert (got.desc if got else None) == want, hex(gpa)
            for n in (1, 2, PAGE):
                want = brute_gpa(descs, gpa, n)
                if want is None:
                    with pytest.raises(GuestAddressError):
                        mem.locate(gpa, n)
                else:
                    mm, off = mem.locate(gpa, n)
                    file_off = want.mmap_offset + gpa - want.guest_phys_addr
                    assert mm[off:off + n] == os.pread(big_memfd, n, file_off)
        vas = [v for d in picks for v in (d.userspace_addr - 1, d.userspace_addr,
                                          d.userspace_addr + d.memory_size - 1,
                                          d.userspace_addr + d.memory_size)]
        for va in vas:
            for n in (0, 1, 2):
                want = brute_va(descs, va, n)
                if want is None:
                    with pytest.raises(GuestAddressError):
                        mem.va_to_gpa(va, n)
                else:
                    assert mem.va_to_gpa(va, n) == (want.guest_phys_addr + va
                                                    - want.userspace_addr)
    finally:
        # Made without a manager: nobody else owns these mappings.
        for r in regions:
            r.unmap()
    assert all(r.closed and r.mm.closed for r in regions)


# ---------------------------------------------------------------------------------------
# Refused updates leave the table as it was
# ---------------------------------------------------------------------------------------

FREE = MemoryRegion(0x40_0000, PAGE, 0x7F00_2000_0000, 12 * PAGE)  # fits nowhere else


def _pipe_region(mgr: MemoryManager, fd: int) -> None:
    rd, wr = os.pipe()
    try:
        mgr.add_region(FREE, rd)
    finally:
        os.close(rd)
        os.close(wr)


def _set_with_second_unmappable(mgr: MemoryManager, fd: int) -> None:
    # The first region is new and maps fine; the second can not be mapped. The first
    # mapping must be undone.
    past_eof = MemoryRegion(0x50_0000, 2 * PAGE, 0x7F00_3000_0000, 15 * PAGE)
    set_table(mgr, [FREE, past_eof], [fd, fd])


def _add_c_from_another_file(mgr: MemoryManager, fd: int) -> None:
    """C again, same description, but another file: an overlap, not a repeat."""
    other = memfd(16 * PAGE)
    try:
        mgr.add_region(C, other)
    finally:
        os.close(other)


REFUSALS: dict[str, tuple[Callable[[MemoryManager, int], object], type[PeerError]]] = {
    "set-gpa-overlap": (lambda mg, fd: set_table(mg, [A, MemoryRegion(
        A.guest_phys_addr + PAGE, PAGE, 0x7F00_2000_0000, 0)], [fd, fd]), MemoryTableError),
    "set-va-overlap": (lambda mg, fd: set_table(mg, [A, MemoryRegion(
        0x40_0000, PAGE, A.userspace_addr + A.memory_size - 1, 0)], [fd, fd]),
        MemoryTableError),
    "set-fd-count": (lambda mg, fd: set_table(mg, [A, B], [fd]), MemoryTableError),
    "set-9-regions": (lambda mg, fd: set_table(mg, [MemoryRegion(
        i * PAGE, PAGE, 0x7F00_0000_0000 + i * PAGE, 0) for i in range(9)], [fd] * 9),
        MemoryTableError),
    "set-second-unmappable": (_set_with_second_unmappable, RegionMapError),
    "set-size-0": (lambda mg, fd: set_table(mg, [MemoryRegion(
        0x40_0000, 0, 0x7F00_2000_0000, 0)], [fd]), PayloadError),
    "add-gpa-overlap": (lambda mg, fd: mg.add_region(MemoryRegion(
        end(B) - 1, PAGE, 0x7F00_2000_0000, 0), fd), MemoryTableError),
    "add-va-overlap-from-below": (lambda mg, fd: mg.add_region(MemoryRegion(
        0x40_0000, PAGE, C.userspace_addr - PAGE + 1, 0), fd), MemoryTableError),
    "add-va-overlap-from-inside": (lambda mg, fd: mg.add_region(MemoryRegion(
        0x40_0000, PAGE, C.userspace_addr + C.memory_size - 1, 0), fd), MemoryTableError),
    "add-gpa-overlap-from-below": (lambda mg, fd: mg.add_region(MemoryRegion(
        A.guest_phys_addr - PAGE, PAGE + 1, 0x7F00_2000_0000, 0), fd), MemoryTableError),
    "add-gpa-covering-a-region": (lambda mg, fd: mg.add_region(MemoryRegion(
        C.guest_phys_addr - PAGE, 4 * PAGE, 0x7F00_2000_0000, 0), fd), MemoryTableError),
    "add-same-range-other-file": (_add_c_from_another_file, MemoryTableError),
    "add-gpa-overflow": (lambda mg, fd: mg.add_region(MemoryRegion(
        U64_END - PAGE, 2 * PAGE, 0x7F00_2000_0000, 0), fd), PayloadError),
    "add-va-overflow": (lambda mg, fd: mg.add_region(MemoryRegion(
        0x40_0000, 2 * PAGE, U64_END - PAGE, 0), fd), PayloadError),
    "add-offset-overflow": (lambda mg, fd: mg.add_region(MemoryRegion(
        0x40_0000, 2 * PAGE, 0x7F00_2000_0000, U64_END - PAGE), fd), PayloadError),
    "add-size-0": (lambda mg, fd: mg.add_region(MemoryRegion(
        0x40_0000, 0, 0x7F00_2000_0000, 0), fd), PayloadError),
    "add-pipe": (_pipe_region, RegionMapError),
    "add-past-eof": (lambda mg, fd: mg.add_region(MemoryRegion(
        0x40_0000, 2 * PAGE, 0x7F00_2000_0000, 15 * PAGE), fd), RegionMapError),
    "add-size-past-eof": (lambda mg, fd: mg.add_region(MemoryRegion(
        0x40_0000, 17 * PAGE, 0x7F00_2000_0000, 0), fd), RegionMapError),
    "rem-unknown": (lambda mg, fd: mg.remove_region(FREE), MemoryTableError),
    "rem-wrong-size": (lambda mg, fd: mg.remove_region(MemoryRegion(
        A.guest_phys_addr, PAGE, A.userspace_addr, A.mmap_offset)), MemoryTableError),
    "rem-wrong-va": (lambda mg, fd: mg.remove_region(MemoryRegion(
        A.guest_phys_addr, A.memory_size, B.userspace_addr, A.mmap_offset)),
        MemoryTableError),
}


@pytest.mark.parametrize(("update", "error"), REFUSALS.values(), ids=REFUSALS.keys())
def test_refused_update_leaves_the_table_unchanged(
        mgr: MemoryManager, ram: Ram, update: Callable[[MemoryManager, int], object],
        error: type[PeerError]) -> None:
    snap = mgr.current
    gen = snap.generation
    regions = snap.regions
    fds_before = open_fd_count()
    with pytest.raises(error) as info:
        update(mgr, ram.fd)
    # Counted while the error (and the frames in its traceback) is still alive: a
    # mapping made before the refusal must have been undone, not left to the GC.
    assert open_fd_count() == fds_before
    del info
    assert mgr.current is snap
    assert snap.generation == gen
    assert snap.regions == regions
    assert all(not r.closed for r in regions)
    assert mgr.pending_unmap == 0
    assert snap.read(A.guest_phys_addr, 64) == ram.expected(A.guest_phys_addr, 64)
    assert open_fd_count() == fds_before  # no mapping (and its fd) left behind


def test_region_ending_exactly_at_2_64_and_at_end_of_file() -> None:
    fd = memfd(2 * PAGE, data=b"\x01" * PAGE + b"\x02" * PAGE)
    mgr = MemoryManager()
    try:
        top = MemoryRegion(U64_END - 2 * PAGE, 2 * PAGE, U64_END - 2 * PAGE, 0)
        mgr.add_region(top, fd)
        mem = mgr.current
        assert mem.region_at(U64_END - 1) is not None
        assert mem.read(U64_END - 1, 1) == b"\x02"
        assert mem.read(U64_END - PAGE - 1, 2) == b"\x01\x02"
        assert mem.va_to_gpa(U64_END - 1, 1) == U64_END - 1
        with pytest.raises(GuestAddressError):
            mem.read(U64_END - 1, 2)
        with pytest.raises(GuestAddressError):
            mem.locate(U64_END - 1, 2)
    finally:
        mgr.clear()
        os.close(fd)


def test_region_at_an_unaligned_file_offset() -> None:
    fd = memfd(3 * PAGE, data=bytes(range(256)) * 48)
    mgr = MemoryManager()
    try:
        mgr.add_region(MemoryRegion(0x1000, PAGE, 0x7000_0000, PAGE + 100), fd)
        assert mgr.current.read(0x1000, 4) == os.pread(fd, 4, PAGE + 100)
        assert mgr.current.read(0x1FFF, 1) == os.pread(fd, 1, 2 * PAGE + 99)
    finally:
        mgr.clear()
        os.close(fd)


# ---------------------------------------------------------------------------------------
# SET_MEM_TABLE re-sent: unchanged regions keep their mapping
# ---------------------------------------------------------------------------------------


def test_resent_table_keeps_mappings_and_leaks_no_fd(mgr: MemoryManager, ram: Ram) -> None:
    first = mgr.current.regions
    gen = mgr.current.generation
    fds_before = open_fd_count()
    for i in range(100):
        update = set_table(mgr, list(reversed(LAYOUT)), [ram.fd] * 3)
        assert update == MemoryUpdate(added=0, kept=3, removed=0)
        assert all(new is old for new, old in zip(mgr.current.regions, first, strict=True))
        assert mgr.current.generation == gen + i + 1
    assert open_fd_count() == fds_before
    assert not any(r.closed for r in first)
    assert mgr.pending_unmap == 0
    assert mgr.current.read(B.guest_phys_addr, 32) == ram.expected(B.guest_phys_addr, 32)


def test_resent_table_with_one_region_changed(mgr: MemoryManager, ram: Ram) -> None:
    old_a, old_b, old_c = mgr.current.regions
    b2 = MemoryRegion(B.guest_phys_addr, 2 * PAGE, B.userspace_addr, B.mmap_offset)
    update = set_table(mgr, [A, b2], [ram.fd, ram.fd])
    assert update == MemoryUpdate(added=1, kept=1, removed=2)
    new_a, new_b = mgr.current.regions
    assert new_a is old_a and not old_a.closed
    assert new_b is not old_b and new_b.desc == b2
    assert old_b.closed and old_c.closed  # nobody held the old snapshot


def test_same_description_on_another_file_is_remapped(mgr: MemoryManager, ram: Ram) -> None:
    other = memfd(16 * PAGE, data=b"\x5a" * (16 * PAGE))
    try:
        old = mgr.current.regions
        update = set_table(mgr, LAYOUT, [ram.fd, other, ram.fd])
        assert update == MemoryUpdate(added=1, kept=2, removed=1)
        assert mgr.current.regions[0] is old[0] and mgr.current.regions[2] is old[2]
        assert mgr.current.regions[1] is not old[1] and old[1].closed
        assert mgr.current.read(B.guest_phys_addr, 4) == b"\x5a" * 4
    finally:
        os.close(other)


# ---------------------------------------------------------------------------------------
# Snapshots outlive updates while held
# ---------------------------------------------------------------------------------------


def test_held_snapshot_survives_hot_add_and_removal(ram: Ram) -> None:
    mgr = MemoryManager()
    set_table(mgr, [A], [ram.fd])
    with mgr.hold() as mem:
        gen = mem.generation
        (reg_a,) = mem.regions
        table = mem.describe()
        mgr.add_region(B, ram.fd)  # hot-add
        assert mgr.current is not mem and len(mgr.current) == 2
        assert len(mem) == 1 and mem.generation == gen and mem.describe() == table
        assert mem.region_at(B.guest_phys_addr) is None
        mgr.remove_region(A)  # and A goes away
        assert mgr.current.region_at(A.guest_phys_addr) is None
        assert not reg_a.closed
        # The old snapshot still reads and writes A's memory.
        assert mem.read(A.guest_phys_addr, 100) == ram.expected(A.guest_phys_addr, 100)
        mem.write(A.guest_phys_addr, b"still-here")
        assert os.pread(ram.fd, 10, 0) == b"still-here"
    assert reg_a.closed
    assert reg_a.mm.closed
    (reg_b,) = mgr.current.regions
    assert not reg_b.closed
    assert mgr.pending_unmap == 0
    mgr.clear()
    assert reg_b.closed


def test_nested_holds_keep_the_mapping_until_the_last_ends(ram: Ram) -> None:
    mgr = MemoryManager()
    set_table(mgr, [A], [ram.fd])
    with mgr.hold() as outer:
        (reg_a,) = outer.regions
        with mgr.hold() as inner:
            assert inner is outer
            mgr.clear()
        assert not reg_a.closed
        assert outer.read(A.guest_phys_addr, 8) == ram.expected(A.guest_phys_addr, 8)
    assert reg_a.closed


@pytest.mark.parametrize("release_first", ["older", "newer"])
def test_mappings_live_as_long_as_some_held_snapshot_contains_them(
        ram: Ram, release_first: str) -> None:
    mgr = MemoryManager()
    set_table(mgr, [A], [ram.fd])
    h1 = mgr.hold()
    s1 = h1.__enter__()  # {A}
    mgr.add_region(B, ram.fd)
    h2 = mgr.hold()
    s2 = h2.__enter__()  # {A, B}
    reg_a, reg_b = s2.regions
    mgr.remove_region(A)  # current {B}, not held
    mgr.remove_region(B)  # current {}
    assert len(mgr.current) == 0
    assert not reg_a.closed and not reg_b.closed
    assert mgr.pending_unmap == 2
    if release_first == "older":
        h1.__exit__(None, None, None)
        assert not reg_a.closed and not reg_b.closed  # both still in s2
        assert s2.read(end(A) - 4, 8) == ram.expected(end(A) - 4, 8)
        h2.__exit__(None, None, None)
    else:
        h2.__exit__(None, None, None)
        assert not reg_a.closed  # still in s1
        assert reg_b.closed  # in no held snapshot: s1 never had it
        assert s1.read(A.guest_phys_addr, 8) == ram.expected(A.guest_phys_addr, 8)
        h1.__exit__(None, None, None)
    assert reg_a.closed and reg_b.closed
    assert mgr.pending_unmap == 0


OPS = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, 7)),
    st.tuples(st.just("remove"), st.integers(0, 7)),
    st.tuples(st.just("set"), st.sets(st.integers(0, 7), max_size=8).map(sorted)),
    st.tuples(st.just("hold"), st.just(0)),
    st.tuples(st.just("release"), st.integers(0, 20)),
    st.tuples(st.just("clear"), st.just(0)),
), max_size=30)


def slot(k: int) -> MemoryRegion:
    return MemoryRegion(0x100_0000 + k * 2 * PAGE, PAGE, 0x7F00_0000_0000 + k * PAGE, k * PAGE)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_lifetime_model(ram: Ram, ops: list[tuple[str, object]]) -> None:
    """A region is mapped exactly while the current snapshot or a held one contains it,
    whatever the order of updates, holds and releases."""
    mgr = MemoryManager()
    holds: list[tuple[AbstractContextManager[GuestMemory], GuestMemory]] = []
    seen: list[MappedRegion] = []
    fds_before = open_fd_count()

    def check() -> None:
        for r in mgr.current.regions:
            if all(r is not s for s in seen):
                seen.append(r)
        live = [mgr.current] + [mem for _, mem in holds]
        for r in seen:
            wanted = any(r is x for mem in live for x in mem.regions)
            assert r.closed is not wanted, r
        for mem in live:
            for r in mem.regions:
                assert mem.read(r.gpa_start, 4) == os.pread(ram.fd, 4, r.desc.mmap_offset)

    try:
        for op, arg in ops:
            present = {r.desc for r in mgr.current.regions}
            if op == "add" and isinstance(arg, int) and slot(arg) not in present:
                mgr.add_region(slot(arg), ram.fd)
            elif op == "remove" and isinstance(arg, int) and slot(arg) in present:
                mgr.remove_region(slot(arg))
            elif op == "set" and isinstance(arg, list):
                set_table(mgr, [slot(k) for k in arg], [ram.fd] * len(arg))
            elif op == "hold":
                hold = mgr.hold()
                holds.append((hold, hold.__enter__()))
            elif op == "release" and isinstance(arg, int) and holds:
                done, _ = holds.pop(arg % len(holds))
                done.__exit__(None, None, None)
            elif op == "clear":
                mgr.clear()
            check()
    finally:
        for still_held, _ in holds:
            still_held.__exit__(None, None, None)
        holds.clear()
        mgr.clear()
    check()
    assert all(r.closed for r in seen)
    assert mgr.pending_unmap == 0
    assert open_fd_count() == fds_before


def test_unheld_snapshot_is_unmapped_at_once(ram: Ram) -> None:
    mgr = MemoryManager()
    set_table(mgr, [A, C], [ram.fd, ram.fd])
    reg_a, reg_c = mgr.current.regions
    mgr.remove_region(MemoryRegion(A.guest_phys_addr, A.memory_size, A.userspace_addr,
                                   0xDEAD_0000))  # "The mmap offset is ignored"
    assert reg_a.closed and not reg_c.closed
    assert [r.desc for r in mgr.current.regions] == [C]
    mgr.clear()


# ---------------------------------------------------------------------------------------
# ADD_MEM_REG / REM_MEM_REG / clear, and generations
# ---------------------------------------------------------------------------------------


def one_page_region(i: int) -> MemoryRegion:
    return MemoryRegion(i * 2 * PAGE, PAGE, 0x7F00_0000_0000 + i * 2 * PAGE, i * PAGE)


@pytest.mark.parametrize("max_slots", [1, 8, VHOST_USER_MAX_MEM_SLOTS])
def test_add_up_to_max_slots_then_refuse(big_memfd: int, max_slots: int) -> None:
    mgr = MemoryManager() if max_slots == VHOST_USER_MAX_MEM_SLOTS else MemoryManager(max_slots)
    fds_before = open_fd_count()
    try:
        for i in range(max_slots):
            assert mgr.add_region(one_page_region(i), big_memfd) == MemoryUpdate(1, i, 0)
        snap = mgr.current
        assert len(snap) == max_slots
        with pytest.raises(MemoryTableError):
            mgr.add_region(one_page_region(max_slots), big_memfd)
        assert mgr.current is snap and snap.generation == max_slots
        # A freed slot can be used again.
        mgr.remove_region(one_page_region(0))
        mgr.add_region(one_page_region(max_slots), big_memfd)
        assert len(mgr.current) == max_slots
        last = mgr.current.region_at(max_slots * 2 * PAGE)
        assert last is not None and last.desc == one_page_region(max_slots)
    finally:
        regions = mgr.current.regions
        mgr.clear()
    assert all(r.closed for r in regions)
    assert open_fd_count() == fds_before


def test_clear_unmaps_everything(mgr: MemoryManager) -> None:
    regions = mgr.current.regions
    gen = mgr.current.generation
    mgr.clear()
    assert len(mgr.current) == 0
    assert mgr.current.generation == gen + 1
    assert all(r.closed and r.mm.closed for r in regions)
    assert mgr.current.region_at(A.guest_phys_addr) is None


def test_generation_increases_by_one_per_update(ram: Ram) -> None:
    mgr = MemoryManager()
    gens = [mgr.current.generation]
    set_table(mgr, [A], [ram.fd])
    gens.append(mgr.current.generation)
    mgr.add_region(B, ram.fd)
    gens.append(mgr.current.generation)
    mgr.add_region(C, ram.fd)
    gens.append(mgr.current.generation)
    mgr.remove_region(B)
    gens.append(mgr.current.generation)
    set_table(mgr, [A, C], [ram.fd, ram.fd])
    gens.append(mgr.current.generation)
    mgr.clear()
    gens.append(mgr.current.generation)
    assert gens == list(range(gens[0], gens[0] + 7))


def test_repeated_add_and_rem_mem_reg_change_nothing(mgr: MemoryManager, ram: Ram) -> None:
    """QEMU 7.2 with several queue pairs sends each ADD_MEM_REG / REM_MEM_REG once per
    pair: an exact repeat (same description, same file under a new fd) is not an error
    and maps nothing; the repeat of a removal is acknowledged; a region that was never
    there is still refused."""
    snap = mgr.current
    fds_before = open_fd_count()
    again = reopen(ram.fd)  # the same file under another fd number, as SCM_RIGHTS gives
    try:
        assert mgr.add_region(C, again).added == 0
    finally:
        os.close(again)
    assert mgr.current is snap and open_fd_count() == fds_before
    assert mgr.remove_region(C).removed == 1
    after = mgr.current
    assert mgr.remove_region(C).removed == 0
    assert mgr.current is after
    with pytest.raises(MemoryTableError):
        mgr.remove_region(FREE)
    # Once C is back, its removal is a real one again.
    assert mgr.add_region(C, ram.fd).added == 1
    assert mgr.remove_region(C).removed == 1


def test_add_region_lets_readers_take_the_snapshot_while_it_maps(
        mgr: MemoryManager, ram: Ram, monkeypatch: pytest.MonkeyPatch) -> None:
    # With worker threads a burst takes the current snapshot (acquire) while the loop's
    # thread handles ADD_MEM_REG: the mmap and the new snapshot are made outside the
    # manager's lock, so the burst does not wait for them, and gets the old table until
    # the swap. (Before, acquire waited for the whole update.)
    mapping = threading.Event()
    go_on = threading.Event()
    real_map = MappedRegion.map

    def slow_map(desc: MemoryRegion, fd: int) -> MappedRegion:
        mapping.set()
        assert go_on.wait(30)
        return real_map(desc, fd)

    monkeypatch.setattr(MappedRegion, "map", staticmethod(slow_map))
    before = mgr.current.generation
    adder = threading.Thread(target=mgr.add_region, args=(FREE, ram.fd))
    adder.start()
    try:
        assert mapping.wait(30)
        seen: list[GuestMemory] = []
        reader = threading.Thread(target=lambda: seen.append(mgr.acquire()))
        reader.start()
        reader.join(30)
        assert not reader.is_alive(), "acquire waited for the mmap"
        assert [m.generation for m in seen] == [before]
        seen[0].release()
    finally:
        go_on.set()
        adder.join(30)
    assert mgr.current.generation == before + 1
    assert mgr.current.region_at(FREE.guest_phys_addr) is not None
