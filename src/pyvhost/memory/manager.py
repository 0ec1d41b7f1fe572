"""The per-connection memory table and its three updates.

- SET_MEM_TABLE replaces the whole table. QEMU re-sends every region with a fresh fd on
  each hot-plug; a region that is unchanged (same description, same file) keeps its
  mapping and the fresh fd is closed. New regions are mapped, missing ones are dropped.
- ADD_MEM_REG maps one region (CONFIGURE_MEM_SLOTS).
- REM_MEM_REG drops one region, identified by GPA, VA and size ("The mmap offset is
  ignored").

Each update is all-or-nothing: it validates and maps into a new :class:`GuestMemory`
first and swaps it in last, so a refused update leaves the table, and every mapping, as
it was. The old snapshot is retired; its regions are unmapped when the last reader lets go.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from pyvhost.errors import PeerError
from pyvhost.protocol.constants import VHOST_MEMORY_BASELINE_NREGIONS, VHOST_USER_MAX_MEM_SLOTS
from pyvhost.protocol.fds import FdBag
from pyvhost.protocol.messages import MemoryRegion

from .guest import GuestMemory
from .region import MappedRegion, file_id_of

#: Removals remembered so that a repeated REM_MEM_REG is recognised. QEMU repeats them
#: within one memory commit (once per queue pair), so a few would do; 64 bounds the memory.
REMOVED_MEMORY = 64


class MemoryTableError(PeerError):
    """A memory table update that pyvhost refuses (overlap, unknown region, too many)."""


@dataclass(frozen=True, slots=True)
class MemoryUpdate:
    """What one update did: counts of regions mapped, kept and dropped."""

    added: int
    kept: int
    removed: int


def _check_disjoint(regions: Sequence[MemoryRegion]) -> None:
    """Refuse regions that overlap in guest-physical or in front-end virtual space.

    Overlap in GPA would make a guest address ambiguous; overlap in VA would make vring
    addresses ambiguous. Regions are checked for overflow first (MemoryRegion.check).
    """
    for r in regions:
        r.check()
    keys: tuple[tuple[Callable[[MemoryRegion], int], str], ...] = (
        (lambda r: r.guest_phys_addr, "guest-physical"),
        (lambda r: r.userspace_addr, "front-end virtual"))
    for key, name in keys:
        ordered = sorted(regions, key=key)
        for a, b in itertools.pairwise(ordered):
            if key(a) + a.memory_size > key(b):
                raise MemoryTableError(f"regions overlap in {name} space: "
                                       f"[{a.describe()}] and [{b.describe()}]")


class MemoryManager:
    """Holds the current snapshot of one connection, applies updates, owns the mappings.

    Lifetime rule: a region removed from the table is unmapped once no live snapshot
    contains it. Live snapshots are the current one and retired ones a reader still
    holds; a region is in snapshot ``g`` iff ``added_gen <= g < removed_gen``. So an
    update costs O(log n) in the number of regions, not O(n) reference counting.
    """

    def __init__(self, max_slots: int = VHOST_USER_MAX_MEM_SLOTS) -> None:
        self.max_slots = max_slots
        self._lock = threading.RLock()
        self._current = GuestMemory((), 0, on_idle=self._idle)
        self._live: dict[int, GuestMemory] = {}  # retired snapshots still being read
        self._pending: list[MappedRegion] = []  # removed, maybe still read
        #: (GPA, size, VA) of the regions REM_MEM_REG removed lately, so that a repeat is
        #: recognised (see :meth:`remove_region`). Bounded: a repeat follows at once.
        self._removed: deque[tuple[int, int, int]] = deque(maxlen=REMOVED_MEMORY)

    @property
    def current(self) -> GuestMemory:
        """The newest snapshot (not held: use :meth:`hold` to read through it)."""
        return self._current

    @contextmanager
    def hold(self) -> Iterator[GuestMemory]:
        """Hold the current snapshot for reading; its mappings outlive any swap meanwhile."""
        mem = self.acquire()
        try:
            yield mem
        finally:
            mem.release()

    def acquire(self) -> GuestMemory:
        """:meth:`hold` without a ``with``: the current snapshot, held until the caller
        calls its ``release()`` (once, on every path)."""
        with self._lock:
            return self._current.acquire()

    @property
    def pending_unmap(self) -> int:
        """Regions removed from the table but still mapped for a reader."""
        return len(self._pending)

    def _swap(self, new: GuestMemory, added: Sequence[MappedRegion],
              removed: Sequence[MappedRegion]) -> None:
        # Called with self._lock held; ``new`` has generation current + 1.
        old = self._current
        for region in added:
            region.added_gen = new.generation
        for region in removed:
            region.removed_gen = new.generation
            self._pending.append(region)
        self._current = new
        self._live[old.generation] = old
        old.retire()  # calls _idle at once if nobody reads it

    def _idle(self, snapshot: GuestMemory) -> None:
        """A retired snapshot lost its last reader: unmap what only it still held."""
        with self._lock:
            self._live.pop(snapshot.generation, None)
            keep: list[MappedRegion] = []
            for region in self._pending:
                end = region.removed_gen
                assert end is not None
                if any(region.added_gen <= g < end for g in self._live):
                    keep.append(region)
                else:
                    region.unmap()
            self._pending = keep

    def _next(self, regions: tuple[MappedRegion, ...],
              va_order: tuple[MappedRegion, ...] | None = None) -> GuestMemory:
        return GuestMemory(regions, self._current.generation + 1, on_idle=self._idle,
                           va_order=va_order)

    # -- SET_MEM_TABLE -------------------------------------------------------------------
    def set_table(self, regions: Sequence[MemoryRegion], fds: FdBag) -> MemoryUpdate:
        """Replace the table. ``fds`` has one fd per region, in order; the bag is not
        closed here (the caller closes it): every fd is used only to map or to compare."""
        if len(regions) > VHOST_MEMORY_BASELINE_NREGIONS:
            raise MemoryTableError(f"{len(regions)} regions; SET_MEM_TABLE allows "
                                   f"{VHOST_MEMORY_BASELINE_NREGIONS}")
        if len(fds) != len(regions):
            raise MemoryTableError(f"{len(regions)} regions but {len(fds)} fds")
        _check_disjoint(regions)
        with self._lock:
            old = self._current
            fresh: list[MappedRegion] = []
            chosen: list[MappedRegion] = []
            try:
                for i, desc in enumerate(regions):
                    fd = fds.peek(i)
                    file_id = file_id_of(fd)
                    same = next((r for r in old.regions if r.same_as(desc, file_id)), None)
                    if same is not None:
                        chosen.append(same)  # unchanged: keep the mapping, drop the new fd
                    else:
                        region = MappedRegion.map(desc, fd)
                        fresh.append(region)
                        chosen.append(region)
            except BaseException:
                for region in fresh:
                    region.unmap()
                raise
            kept = {id(r) for r in chosen}
            removed = [r for r in old.regions if id(r) not in kept]
            self._swap(self._next(tuple(chosen)), fresh, removed)
        return MemoryUpdate(added=len(fresh), kept=len(chosen) - len(fresh),
                            removed=len(removed))

    # -- ADD_MEM_REG ---------------------------------------------------------------------
    def add_region(self, desc: MemoryRegion, fd: int) -> MemoryUpdate:
        """Map one more region. ``fd`` stays the caller's. O(log n) checks.

        A region already in the table with the same description and the same file is a
        repeat, not an overlap: QEMU 7.2 with several queue pairs sends every ADD_MEM_REG
        once per pair (one vhost_dev each, on one socket). It changes nothing
        (``added=0``); the caller closes ``fd``.
        """
        desc.check()
        # Only the connection's own thread changes the table, so the new snapshot is
        # mapped and built outside the lock and swapped in under it: readers (a burst
        # taking the snapshot, on a worker thread) wait for the swap only, not for the
        # mmap and the native table.
        old = self._current
        same = old.region_at(desc.guest_phys_addr)
        if same is not None and same.same_as(desc, file_id_of(fd)):
            return MemoryUpdate(added=0, kept=len(old), removed=0)
        if len(old) >= self.max_slots:
            raise MemoryTableError(f"no free memory slot: all {self.max_slots} are used")
        clash = old.neighbours_overlap(None, desc.guest_phys_addr, desc.userspace_addr,
                                       desc.memory_size)
        if clash is not None:
            raise MemoryTableError(f"region [{desc.describe()}] overlaps in {clash}")
        region = MappedRegion.map(desc, fd)
        try:
            i, j = old.gpa_index(region), old.va_index(region)
            regions = (*old.regions[:i], region, *old.regions[i:])
            va_order = (*old.va_order[:j], region, *old.va_order[j:])
            new = self._next(regions, va_order)
        except BaseException:
            region.unmap()  # not in any snapshot yet
            raise
        with self._lock:
            if self._current is not old:
                region.unmap()
                raise RuntimeError("the memory table changed during ADD_MEM_REG: only "
                                   "the connection's thread may change it")
            self._swap(new, [region], [])
        return MemoryUpdate(added=1, kept=len(old), removed=0)

    # -- REM_MEM_REG ---------------------------------------------------------------------
    def remove_region(self, desc: MemoryRegion) -> MemoryUpdate:
        """Drop the region with this GPA, VA and size. "The mmap offset is ignored"."""
        with self._lock:
            old = self._current
            key = (desc.guest_phys_addr, desc.memory_size, desc.userspace_addr)
            region = old.region_at(desc.guest_phys_addr)
            if (region is None or region.gpa_start != desc.guest_phys_addr
                    or region.uva_start != desc.userspace_addr
                    or region.desc.memory_size != desc.memory_size):
                if key in self._removed:
                    # The repeat of a removal (one per queue pair from QEMU 7.2, as for
                    # ADD_MEM_REG): the region is already gone, nothing changes.
                    return MemoryUpdate(added=0, kept=len(old), removed=0)
                raise MemoryTableError(f"no region [{desc.describe()}] to remove")
            i, j = old.gpa_index(region), old.va_index(region)
            regions = old.regions[:i] + old.regions[i + 1:]
            va_order = old.va_order[:j] + old.va_order[j + 1:]
            self._swap(self._next(regions, va_order), [], [region])
            self._removed.append(key)
        return MemoryUpdate(added=0, kept=len(old) - 1, removed=1)

    def clear(self) -> None:
        """Drop every region (RESET_OWNER, disconnect)."""
        with self._lock:
            self._removed.clear()
            if len(self._current):
                self._swap(self._next(()), [], self._current.regions)
