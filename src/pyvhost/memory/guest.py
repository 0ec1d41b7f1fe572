"""An immutable snapshot of guest memory, and address translation on it.

A :class:`GuestMemory` is a sorted, non-overlapping tuple of mapped regions. It never
changes: a new memory table builds a new snapshot (:mod:`.manager`). Readers hold the
snapshot they took while they use it (``with manager.hold() as mem``), so a region removed
meanwhile stays mapped until they are done.

Guest-physical addresses (GPA) and front-end virtual addresses (VA) are different spaces:
``gpa_*`` functions take the former, ``va_to_gpa`` the latter. Lookups are binary searches
(O(log n) in the number of regions, up to 509).

Memory-safety invariant of every accessor: an access ``[gpa, gpa + length)`` is served only
if it lies entirely inside mapped regions; otherwise :class:`GuestAddressError` is raised
before any byte is touched. ``gpa`` and ``length`` may be any guest-controlled integers.

A snapshot also carries the compiled data path's form of its region table (``native``,
built by :mod:`pyvhost.datapath` on first use, once per snapshot): host pointers into the
regions' mappings, valid while the snapshot is held. It is dropped when the snapshot's
last reader lets go of a retired snapshot, i.e. when its mappings may go.
"""

from __future__ import annotations

import bisect
import mmap
import threading
from collections.abc import Callable, Iterator

from pyvhost.errors import PeerError

from .region import MappedRegion


class GuestAddressError(PeerError):
    """A guest or front-end address that lies outside guest memory."""


class MemoryFaultError(PeerError):
    """Guest memory faulted under its mapping (SIGBUS): the front-end shrank a region's
    file after the back-end mapped it. Only the compiled data path can catch this; the
    connection that owns the memory is closed."""


class GuestMemory:
    """One immutable set of mapped regions, sorted by GPA.

    A snapshot does not own its mappings: the :class:`~.manager.MemoryManager` that made
    it does, and unmaps a removed region once no snapshot that contains it is still read.
    ``on_idle`` is how a retired snapshot tells the manager its last reader is gone.
    """

    __slots__ = ("_gpa_ends", "_gpa_starts", "_lock", "_on_idle", "_readers", "_retired",
                 "_va_order", "_va_starts", "generation", "native", "regions")

    def __init__(self, regions: tuple[MappedRegion, ...] = (), generation: int = 0, *,
                 on_idle: Callable[[GuestMemory], None] | None = None,
                 va_order: tuple[MappedRegion, ...] | None = None) -> None:
        # Callers that already have both orders (the manager, inserting or deleting one
        # region) pass them, so a hot-plug at 509 regions does no sorting.
        if va_order is None:
            regions = tuple(sorted(regions, key=lambda r: r.gpa_start))
            va_order = tuple(sorted(regions, key=lambda r: r.uva_start))
        self.regions = regions
        self._gpa_starts = [r.gpa_start for r in regions]
        self._gpa_ends = [r.gpa_end for r in regions]
        self._va_order = va_order
        self._va_starts = [r.uva_start for r in va_order]
        self.generation = generation
        self._readers = 0
        self._retired = False
        self._on_idle = on_idle
        self._lock = threading.Lock()
        #: The data path's native region table (pyvhost.datapath), built on first use.
        self.native: object | None = None

    # -- lifetime ------------------------------------------------------------------------
    def acquire(self) -> GuestMemory:
        with self._lock:
            self._readers += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._readers -= 1
            idle = self._retired and self._readers == 0
        if idle:
            self._idle()

    def _idle(self) -> None:
        # No reader and no longer current: the mappings may go, and the host pointers of
        # the native table with them.
        self.native = None
        if self._on_idle is not None:
            self._on_idle(self)

    def retire(self) -> None:
        """Called once, by the manager, when a newer snapshot replaced this one."""
        with self._lock:
            self._retired = True
            idle = self._readers == 0
        if idle:
            self._idle()

    @property
    def va_order(self) -> tuple[MappedRegion, ...]:
        """The regions sorted by front-end virtual address."""
        return self._va_order

    # -- derived snapshots (used by the manager) ----------------------------------------
    def va_index(self, region: MappedRegion) -> int:
        """Where ``region`` goes (or is) in VA order."""
        return bisect.bisect_left(self._va_starts, region.uva_start)

    def gpa_index(self, region: MappedRegion) -> int:
        """Where ``region`` goes (or is) in GPA order."""
        return bisect.bisect_left(self._gpa_starts, region.gpa_start)

    def neighbours_overlap(self, region: MappedRegion | None, gpa: int, va: int,
                           size: int) -> str | None:
        """If ``[gpa, gpa+size)`` or ``[va, va+size)`` overlaps a region of this snapshot,
        a description of the clash; O(log n)."""
        i = bisect.bisect_right(self._gpa_starts, gpa)
        if i > 0 and self._gpa_ends[i - 1] > gpa:
            return f"guest-physical space with [{self.regions[i - 1].desc.describe()}]"
        if i < len(self.regions) and self._gpa_starts[i] < gpa + size:
            return f"guest-physical space with [{self.regions[i].desc.describe()}]"
        j = bisect.bisect_right(self._va_starts, va)
        if j > 0 and self._va_order[j - 1].uva_end > va:
            return f"front-end virtual space with [{self._va_order[j - 1].desc.describe()}]"
        if j < len(self._va_order) and self._va_starts[j] < va + size:
            return f"front-end virtual space with [{self._va_order[j].desc.describe()}]"
        return None

    # -- lookups -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.regions)

    def __iter__(self) -> Iterator[MappedRegion]:
        return iter(self.regions)

    def region_at(self, gpa: int) -> MappedRegion | None:
        """The region containing ``gpa``, or None."""
        i = bisect.bisect_right(self._gpa_starts, gpa) - 1
        if i >= 0 and gpa < self._gpa_ends[i]:
            return self.regions[i]
        return None

    def locate(self, gpa: int, length: int) -> tuple[mmap.mmap, int]:
        """``(mapping, offset)`` of ``[gpa, gpa + length)``, which must lie in one region.

        Used for structures that must be contiguous (vrings, descriptor tables).
        """
        region = self.region_at(gpa)
        if region is None or length < 0 or gpa + length > region.gpa_end:
            raise GuestAddressError(f"GPA range {gpa:#x}+{length:#x} is not inside one "
                                    "region of guest memory")
        return region.mm, region.base + (gpa - region.gpa_start)

    def segments(self, gpa: int, length: int) -> Iterator[tuple[mmap.mmap, int, int]]:
        """``(mapping, offset, count)`` pieces covering ``[gpa, gpa + length)``.

        A buffer may straddle adjacent regions. Every piece is checked before the first is
        returned, so a caller never touches part of an invalid range.
        """
        # Fast path: the whole range in one region (almost every buffer).
        i = bisect.bisect_right(self._gpa_starts, gpa) - 1
        if i >= 0 and length > 0 and gpa + length <= self._gpa_ends[i]:
            hit = self.regions[i]
            return iter(((hit.mm, hit.base + (gpa - hit.gpa_start), length),))
        pieces: list[tuple[mmap.mmap, int, int]] = []
        if length < 0:
            raise GuestAddressError(f"negative length {length}")
        while length > 0:
            region = self.region_at(gpa)
            if region is None:
                raise GuestAddressError(f"GPA {gpa:#x} is outside guest memory")
            n = min(length, region.gpa_end - gpa)
            pieces.append((region.mm, region.base + (gpa - region.gpa_start), n))
            gpa += n
            length -= n
        return iter(pieces)

    def read(self, gpa: int, length: int) -> bytes:
        """Copy ``length`` bytes of guest memory starting at ``gpa``."""
        i = bisect.bisect_right(self._gpa_starts, gpa) - 1
        if i >= 0 and length >= 0 and gpa + length <= self._gpa_ends[i]:
            region = self.regions[i]
            off = region.base + (gpa - region.gpa_start)
            return region.mm[off:off + length]
        parts = [mm[off:off + n] for mm, off, n in self.segments(gpa, length)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest memory at ``gpa``."""
        n = len(data)
        i = bisect.bisect_right(self._gpa_starts, gpa) - 1
        if i >= 0 and gpa + n <= self._gpa_ends[i]:
            region = self.regions[i]
            off = region.base + (gpa - region.gpa_start)
            region.mm[off:off + n] = data
            region.writes += 1
            region.bytes_written += n
            return
        view = memoryview(data)
        pos = 0
        for mm, off, n in self.segments(gpa, len(view)):
            mm[off:off + n] = view[pos:pos + n]
            piece = self.region_at(gpa + pos)  # a piece lies in one region (segments)
            if piece is not None:
                piece.writes += 1
                piece.bytes_written += n
            pos += n

    def va_to_gpa(self, va: int, length: int) -> int:
        """The GPA of front-end virtual address ``va``; ``[va, va + length)`` must be in one
        region. Vring addresses arrive as front-end VAs (SET_VRING_ADDR)."""
        i = bisect.bisect_right(self._va_starts, va) - 1
        if i >= 0:
            region = self._va_order[i]
            # ``va`` itself must be inside the region, as in ``locate``: an empty range
            # just past a region's end is not a front-end address of guest memory.
            if length >= 0 and va < region.uva_end and va + length <= region.uva_end:
                return region.gpa_start + (va - region.uva_start)
        raise GuestAddressError(f"front-end address range {va:#x}+{length:#x} is not inside "
                                "one region of guest memory")

    def describe(self) -> list[dict[str, int]]:
        """The table as plain data, for status output. Each region holds one fd (the dup
        CPython's mmap keeps) and one mapping. ``writes`` / ``bytes_written`` count what
        the device wrote into the region so far (:meth:`write`, and the data path's bursts).
        ``shrink_sealed``: the region's file carries F_SEAL_SHRINK, so the front-end can not
        shrink it under the mapping (information: a shrink is survived on the compiled
        data path either way)."""
        return [{"guest_phys_addr": r.gpa_start, "memory_size": r.desc.memory_size,
                 "userspace_addr": r.uva_start, "mmap_offset": r.desc.mmap_offset,
                 "fds_held": 0 if r.closed else 1, "writes": r.writes,
                 "bytes_written": r.bytes_written, "shrink_sealed": r.shrink_sealed}
                for r in self.regions]
