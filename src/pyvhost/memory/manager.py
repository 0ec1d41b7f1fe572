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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from pyvhost.errors import PeerError
from pyvhost.protocol.constants import VHOST_MEMORY_BASELINE_NREGIONS, VHOST_USER_MAX_MEM_SLOTS
from pyvhost.protocol.fds import FdBag
from pyvhost.protocol.messages import MemoryRegion

from .guest import GuestMemory
from .region import MappedRegion, file_id_of


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
    """Holds the current snapshot of one connection and applies updates to it."""

    def __init__(self, max_slots: int = VHOST_USER_MAX_MEM_SLOTS) -> None:
        self.max_slots = max_slots
        self._lock = threading.Lock()
        self._current = GuestMemory()

    @property
    def current(self) -> GuestMemory:
        """The newest snapshot (not held: use :meth:`hold` to read through it)."""
        return self._current

    @contextmanager
    def hold(self) -> Iterator[GuestMemory]:
        """Hold the current snapshot for reading; its mappings outlive any swap meanwhile."""
        with self._lock:
            mem = self._current.acquire()
        try:
            yield mem
        finally:
            mem.release()

    def _swap(self, regions: tuple[MappedRegion, ...]) -> GuestMemory:
        # Called with self._lock held. The new snapshot takes its holds before the old one
        # lets go, so kept regions are never unmapped in between.
        old = self._current
        self._current = GuestMemory(regions, old.generation + 1)
        old.retire()
        return self._current

    # -- SET_MEM_TABLE -------------------------------------------------------------------
    def set_table(self, regions: Sequence[MemoryRegion], fds: FdBag) -> MemoryUpdate:
        """Replace the table. ``fds`` has one fd per region, in order; the bag is not
        closed here (the caller closes it), but fds kept are taken from it."""
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
            kept = 0
            try:
                for i, desc in enumerate(regions):
                    fd = fds.peek(i)
                    same = next((r for r in old.regions
                                 if r.same_as(desc, file_id_of(fd))), None)
                    if same is not None:
                        chosen.append(same)  # unchanged: keep the mapping, drop the new fd
                        kept += 1
                    else:
                        region = MappedRegion.map(desc, fd)
                        fresh.append(region)
                        chosen.append(region)
            except BaseException:
                for region in fresh:
                    region.mm.close()
                raise
            self._swap(tuple(chosen))
            removed = len(old.regions) - kept
        return MemoryUpdate(added=len(fresh), kept=kept, removed=removed)

    # -- ADD_MEM_REG ---------------------------------------------------------------------
    def add_region(self, desc: MemoryRegion, fd: int) -> MemoryUpdate:
        """Map one more region. ``fd`` stays the caller's."""
        with self._lock:
            old = self._current
            if len(old) >= self.max_slots:
                raise MemoryTableError(f"no free memory slot: all {self.max_slots} are used")
            _check_disjoint([r.desc for r in old.regions] + [desc])
            region = MappedRegion.map(desc, fd)
            self._swap((*old.regions, region))
        return MemoryUpdate(added=1, kept=len(old), removed=0)

    # -- REM_MEM_REG ---------------------------------------------------------------------
    def remove_region(self, desc: MemoryRegion) -> MemoryUpdate:
        """Drop the region with this GPA, VA and size. "The mmap offset is ignored"."""
        with self._lock:
            old = self._current
            match = [r for r in old.regions
                     if r.desc.guest_phys_addr == desc.guest_phys_addr
                     and r.desc.userspace_addr == desc.userspace_addr
                     and r.desc.memory_size == desc.memory_size]
            if not match:
                raise MemoryTableError(f"no region [{desc.describe()}] to remove")
            self._swap(tuple(r for r in old.regions if r is not match[0]))
        return MemoryUpdate(added=0, kept=len(old) - 1, removed=1)

    def clear(self) -> None:
        """Drop every region (RESET_OWNER, disconnect)."""
        with self._lock:
            if len(self._current):
                self._swap(())
