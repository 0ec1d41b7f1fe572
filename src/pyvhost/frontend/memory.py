"""Guest RAM for the front-end: fd-backed shared mappings placed at guest-physical addresses.

This module owns the memory a front-end shares with a back-end, the way QEMU's
``memory-backend-memfd,share=on`` objects do: each :class:`GuestRam` is one file (a memfd,
or on request a file in a directory such as a hugetlbfs mount or /dev/shm, unlinked right
after it is opened), grown with ``ftruncate`` and mapped ``MAP_SHARED`` into this process.
The address of that mapping is the region's ``userspace_addr`` (the "user address" the
back-end receives); ``mmap_offset`` is always 0 because each region has a file of its own.
:class:`FrontendMemory` owns a set of regions and hands out guest-physical addresses:
boot RAM at GPA 0, hot-plugged DIMMs above a hot-plug base (QEMU's device-memory area
starts at 4 GiB on x86).

It must not talk to a back-end (:mod:`pyvhost.frontend.frontend` does) and never touches
the memory it maps: no prefaulting, so a region costs no RAM until someone writes to it.

Every region's file is named ``pyvhost-fe-<pid>-<n>``, unique in this process, so that
the back-end's ``/proc/<pid>/fd`` and ``/proc/<pid>/maps`` can be searched for what it
still holds of ours (:mod:`pyvhost.tools.procfs`).
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import threading
from collections.abc import Iterator

from pyvhost.closing import Closing
from pyvhost.errors import LocalError
from pyvhost.protocol.messages import MemoryRegion

# Sizes come from pyvhost.units; MiB stays importable from here for cli.demo and tests/lab.
from pyvhost.units import GiB
from pyvhost.units import MiB as MiB

#: Where QEMU's x86 machines put the device-memory (DIMM hot-plug) area: just above 4 GiB.
HOTPLUG_BASE = 4 * GiB
#: Placement alignment of DIMMs; QEMU aligns pc-dimm addresses to the backend's page size
#: and at least 2 MiB on x86 (transparent huge pages).
DIMM_ALIGN = 2 * MiB
#: The highest guest-physical address + 1 this allocator hands out (x86's 52-bit space).
GPA_LIMIT = 1 << 52

NAME_PREFIX = "pyvhost-fe"

_counter = itertools.count()
_counter_lock = threading.Lock()


class GuestMemoryError(LocalError):
    """A region can not be created or placed as asked (size, alignment, overlap, host limit)."""


def name_prefix(pid: int | None = None) -> str:
    """The prefix shared by every region file of process ``pid`` (default: this one).

    The trailing dash makes it unambiguous: ``pyvhost-fe-12-`` is not a prefix of
    ``pyvhost-fe-123-0``.
    """
    return f"{NAME_PREFIX}-{os.getpid() if pid is None else pid}-"


def _next_name() -> str:
    with _counter_lock:
        n = next(_counter)
    return f"{name_prefix()}{n}"


def _mapping_address(mm: mmap.mmap) -> int:
    """The virtual address of an mmap's first byte in this process."""
    anchor = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(anchor)
    finally:
        # from_buffer exports the buffer; the mmap can not be closed while it lives.
        del anchor


class GuestRam(Closing):
    """One region of guest RAM: a shared, fd-backed mapping at a guest-physical address.

    ``directory=None`` makes a memfd (``memfd_create(name, MFD_CLOEXEC)``); otherwise a
    file is created in ``directory`` and unlinked at once, so only our fd and mapping (and
    whatever the back-end keeps) hold it. On hugetlbfs the size must be a multiple of the
    huge page size (the directory's block size).
    """

    __slots__ = ("_fd", "_mm", "guest_phys_addr", "memory_size", "mmap_offset", "name",
                 "userspace_addr")

    def __init__(self, guest_phys_addr: int, memory_size: int, *,
                 directory: str | os.PathLike[str] | None = None,
                 name: str | None = None) -> None:
        page = mmap.PAGESIZE
        if directory is not None:
            try:
                page = max(page, os.statvfs(directory).f_bsize)
            except OSError as e:
                raise GuestMemoryError(f"can not use directory {os.fspath(directory)!r} "
                                       f"for guest RAM: {e.strerror}") from e
        if memory_size <= 0 or memory_size % page:
            raise GuestMemoryError(f"region size {memory_size:#x} must be a positive "
                                   f"multiple of the page size {page:#x}")
        if guest_phys_addr < 0 or guest_phys_addr % page:
            raise GuestMemoryError(f"GPA {guest_phys_addr:#x} is not aligned to the page "
                                   f"size {page:#x}")
        if guest_phys_addr + memory_size > GPA_LIMIT:
            raise GuestMemoryError(f"region at GPA {guest_phys_addr:#x} + {memory_size:#x} "
                                   f"ends above {GPA_LIMIT:#x}")
        self.name = name or _next_name()
        self.guest_phys_addr = guest_phys_addr
        self.memory_size = memory_size
        #: Each region has its own file, mapped from its start.
        self.mmap_offset = 0
        self._fd = self._open(directory)
        try:
            os.ftruncate(self._fd, memory_size)
            # MAP_SHARED without MAP_POPULATE: nothing is faulted in until touched.
            self._mm: mmap.mmap | None = mmap.mmap(
                self._fd, memory_size, flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            os.close(self._fd)
            raise GuestMemoryError(f"can not allocate {memory_size:#x} bytes of guest RAM "
                                   f"{self.name!r}: {e.strerror}") from e
        #: The front-end virtual address: the ``userspace_addr`` sent to the back-end.
        self.userspace_addr = _mapping_address(self._mm)

    def _open(self, directory: str | os.PathLike[str] | None) -> int:
        if directory is None:
            try:
                return os.memfd_create(self.name, os.MFD_CLOEXEC)
            except OSError as e:
                raise GuestMemoryError(f"memfd_create({self.name!r}) failed: "
                                       f"{e.strerror}") from e
        path = os.path.join(os.fspath(directory), self.name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise GuestMemoryError(f"can not create {path!r}: {e.strerror}") from e
        os.unlink(path)
        return fd

    # -- what the protocol needs ------------------------------------------------------------
    @property
    def fd(self) -> int:
        """The region's fd (still owned by the region: the transport sends a copy)."""
        if self._mm is None:
            raise GuestMemoryError(f"guest RAM {self.name!r} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._mm is None

    @property
    def end(self) -> int:
        """The first guest-physical address past the region."""
        return self.guest_phys_addr + self.memory_size

    def region(self) -> MemoryRegion:
        """The "memory region description" the back-end is sent for this region."""
        return MemoryRegion(self.guest_phys_addr, self.memory_size, self.userspace_addr,
                            self.mmap_offset)

    def contains_va(self, address: int, size: int = 1) -> bool:
        """Whether ``[address, address + size)`` lies inside this region's mapping."""
        return (self.userspace_addr <= address
                and address + size <= self.userspace_addr + self.memory_size)

    # -- access (tests, rings) -----------------------------------------------------------
    def write(self, offset: int, data: bytes) -> None:
        """Write guest RAM at ``offset`` from the region's start (faults those pages in)."""
        mm = self._mapped()
        if offset < 0 or offset + len(data) > self.memory_size:
            raise GuestMemoryError(f"write of {len(data)} bytes at {offset:#x} is outside "
                                   f"{self.name!r} ({self.memory_size:#x} bytes)")
        mm[offset:offset + len(data)] = data

    def read(self, offset: int, size: int) -> bytes:
        mm = self._mapped()
        if offset < 0 or size < 0 or offset + size > self.memory_size:
            raise GuestMemoryError(f"read of {size} bytes at {offset:#x} is outside "
                                   f"{self.name!r} ({self.memory_size:#x} bytes)")
        return mm[offset:offset + size]

    def _mapped(self) -> mmap.mmap:
        if self._mm is None:
            raise GuestMemoryError(f"guest RAM {self.name!r} is closed")
        return self._mm

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap and close. Idempotent. Tell the back-end first: it may still map the file."""
        mm, self._mm = self._mm, None
        if mm is None:
            return
        mm.close()
        os.close(self._fd)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd {self._fd}"
        return (f"GuestRam({self.name!r}, GPA {self.guest_phys_addr:#x}+{self.memory_size:#x}, "
                f"VA {self.userspace_addr:#x}, {state})")


class FrontendMemory(Closing):
    """The guest RAM of one front-end: boot RAM at GPA 0 and DIMMs placed above.

    Regions never overlap in GPA. :meth:`detach` takes a region out of the set without
    closing it, because QEMU tells the back-end about an unplug before it frees the RAM:
    ``detach`` -> tell the back-end -> ``close``. :meth:`close` closes every region still
    in the set.
    """

    def __init__(self, *, directory: str | os.PathLike[str] | None = None,
                 hotplug_base: int = HOTPLUG_BASE, dimm_align: int = DIMM_ALIGN) -> None:
        if dimm_align <= 0 or dimm_align & (dimm_align - 1):
            raise GuestMemoryError(f"DIMM alignment {dimm_align:#x} is not a power of two")
        self.directory = directory
        self.hotplug_base = hotplug_base
        self.dimm_align = dimm_align
        self._regions: list[GuestRam] = []  # sorted by guest_phys_addr

    @property
    def name_prefix(self) -> str:
        """What every region file of this process is named with (see :func:`name_prefix`)."""
        return name_prefix()

    @property
    def regions(self) -> tuple[GuestRam, ...]:
        """The regions, by ascending GPA (the order QEMU's vhost memory map has)."""
        return tuple(self._regions)

    def __iter__(self) -> Iterator[GuestRam]:
        return iter(tuple(self._regions))

    def __len__(self) -> int:
        return len(self._regions)

    @property
    def total_size(self) -> int:
        return sum(r.memory_size for r in self._regions)

    def add(self, guest_phys_addr: int, memory_size: int) -> GuestRam:
        """A new region at exactly ``guest_phys_addr``; refused if it overlaps another."""
        for r in self._regions:
            if guest_phys_addr < r.end and r.guest_phys_addr < guest_phys_addr + memory_size:
                raise GuestMemoryError(
                    f"GPA {guest_phys_addr:#x}+{memory_size:#x} overlaps {r!r}")
        ram = GuestRam(guest_phys_addr, memory_size, directory=self.directory)
        self._regions.append(ram)
        self._regions.sort(key=lambda r: r.guest_phys_addr)
        return ram

    def add_at_va(self, memory_size: int) -> GuestRam:
        """A region whose guest-physical address is its own user address, as DPDK's
        virtio-user front-end sends it ("the guest address equal to the front-end's
        virtual address"). Mappings never overlap, so neither do these GPAs."""
        ram = GuestRam(0, memory_size, directory=self.directory)
        ram.guest_phys_addr = ram.userspace_addr
        self._regions.append(ram)
        self._regions.sort(key=lambda r: r.guest_phys_addr)
        return ram

    def add_boot_ram(self, memory_size: int) -> GuestRam:
        """Boot RAM at GPA 0 (must fit below the hot-plug base)."""
        if memory_size > self.hotplug_base:
            raise GuestMemoryError(f"boot RAM of {memory_size:#x} bytes does not fit below "
                                   f"the hot-plug base {self.hotplug_base:#x}")
        return self.add(0, memory_size)

    def add_dimm(self, memory_size: int) -> GuestRam:
        """A hot-plugged region at the lowest aligned free GPA at or above the hot-plug base."""
        align = self.dimm_align
        candidate = self.hotplug_base
        for r in self._regions:
            if r.end <= candidate:
                continue
            if candidate + memory_size <= r.guest_phys_addr:
                break
            candidate = max(candidate, -(-r.end // align) * align)
        return self.add(candidate, memory_size)

    def detach(self, ram: GuestRam) -> GuestRam:
        """Take ``ram`` out of the set without closing it; the caller closes it later."""
        try:
            self._regions.remove(ram)
        except ValueError:
            raise GuestMemoryError(f"{ram!r} is not part of this guest memory") from None
        return ram

    def close(self) -> None:
        """Unmap and close every region in the set. Idempotent."""
        regions, self._regions = self._regions, []
        for r in regions:
            r.close()
