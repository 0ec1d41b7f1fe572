"""Memfd-backed guest memory for tests: the one place a test makes a memfd.

- :func:`memfd`       a memfd of a given size (and content); the caller closes it.
- :class:`MemfdRegion` one region of guest memory the test owns: a memfd mapped shared
  here; its ``userspace_addr`` is the address of our own mapping, as QEMU's is. Addressed
  by offset from its start, so a ring laid out in it stays put when the test moves the
  region in guest-physical space.
- :class:`GuestView`  guest memory by GPA over a test's regions (these, or the front-end's
  :class:`~pyvhost.frontend.GuestRam`): where a buffer's bytes are.
- :class:`SharedRam`  guest memory in regions of one memfd (two adjacent ones unless a
  subclass says otherwise), known to a :class:`~pyvhost.memory.MemoryManager` (the
  device's view) and read and written by GPA with ``os.pread``/``os.pwrite`` (the
  driver's view), never through the code under test.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterable
from typing import Protocol

from pyvhost.memory import GuestMemory, MemoryManager
from pyvhost.protocol.fds import FdBag
from pyvhost.protocol.messages import MemoryRegion


def memfd(size: int = 0, *, name: str = "pyvhost-test", data: bytes | None = None,
          sealing: bool = False) -> int:
    """A new close-on-exec memfd of ``size`` bytes, ``data`` written at its start;
    ``sealing`` lets the test add seals to it (``MFD_ALLOW_SEALING``)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealing else 0))
    try:
        os.ftruncate(fd, size)
        if data is not None:
            assert os.pwrite(fd, data, 0) == len(data)
    except BaseException:
        os.close(fd)
        raise
    return fd


class MemfdRegion:
    """A memfd of ``size`` bytes mapped shared here; one region of guest memory.

    ``gpa`` is where the test currently places it in guest-physical space (a re-sent
    table may move it); ``userspace_addr`` is the address of our mapping. ``read``,
    ``write`` and ``va`` take offsets from the region's start.
    """

    def __init__(self, name: str, size: int, gpa: int) -> None:
        self.name = name
        self.size = size
        self.gpa = gpa
        self.fd = memfd(size, name=name)
        try:
            self.mm = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        # The address of our mapping. The ctypes view exports the buffer; drop it at once
        # so that the mmap can be closed later.
        view = ctypes.c_char.from_buffer(self.mm)
        self.userspace_addr = ctypes.addressof(view)
        del view

    def region(self, gpa: int | None = None, mmap_offset: int = 0) -> MemoryRegion:
        """The region's description for SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG."""
        return MemoryRegion(guest_phys_addr=self.gpa if gpa is None else gpa,
                            memory_size=self.size - mmap_offset,
                            userspace_addr=self.userspace_addr + mmap_offset,
                            mmap_offset=mmap_offset)

    @property
    def guest_phys_addr(self) -> int:
        return self.gpa

    @property
    def memory_size(self) -> int:
        return self.size

    # -- by offset (what a ring in this region sees) --------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        return self.mm[offset:offset + length]

    def write(self, offset: int, data: bytes) -> None:
        self.mm[offset:offset + len(data)] = data

    def va(self, offset: int) -> int:
        return self.userspace_addr + offset

    def close(self) -> None:
        """Unmap and close. Idempotent."""
        if self.fd < 0:
            return
        self.mm.close()
        os.close(self.fd)
        self.fd = -1


class Region(Protocol):
    """One region of guest memory: where it is, and its bytes by offset from its start."""

    @property
    def guest_phys_addr(self) -> int: ...

    @property
    def memory_size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class GuestView:
    """The test's view of guest memory: ``regions`` (looked at anew on every access, so
    a list the test grows or a front-end's memory works), addressed by GPA."""

    def __init__(self, regions: Iterable[Region]) -> None:
        self.regions = regions

    def _find(self, gpa: int, length: int) -> tuple[Region, int]:
        for r in self.regions:
            if r.guest_phys_addr <= gpa and gpa + length <= r.guest_phys_addr + r.memory_size:
                return r, gpa - r.guest_phys_addr
        raise AssertionError(f"test bug: GPA {gpa:#x}+{length} is in none of our regions")

    def read(self, gpa: int, length: int) -> bytes:
        r, off = self._find(gpa, length)
        return r.read(off, length)

    def write(self, gpa: int, data: bytes) -> None:
        r, off = self._find(gpa, len(data))
        r.write(off, data)


REGION_SIZE = 0x10000


class SharedRam:
    """128 KiB of guest memory in two adjacent 64 KiB regions of one memfd.

    GPA equals the offset in the file. The regions are far apart in front-end VA space
    (and in the opposite order), so a VA-to-GPA slip shows. A subclass may lay out other
    ``REGIONS`` of the file (GPA still equal to the offset) and an ``END`` to match.
    """

    LOW = MemoryRegion(0x0, REGION_SIZE, 0x7F00_0020_0000, 0x0)
    HIGH = MemoryRegion(REGION_SIZE, REGION_SIZE, 0x7F00_0010_0000, REGION_SIZE)
    REGIONS: tuple[MemoryRegion, ...] = (LOW, HIGH)
    END = 2 * REGION_SIZE  # the file's size: first GPA past the regions

    def __init__(self, name: str = "pyvhost-ring", content: bytes = b"") -> None:
        self.fd = memfd(self.END, name=name, data=content[:self.END] or None)
        self.manager = MemoryManager()
        with FdBag([os.dup(self.fd) for _ in self.REGIONS]) as bag:
            self.manager.set_table(list(self.REGIONS), bag)

    @property
    def mem(self) -> GuestMemory:
        """The device's view: the manager's current snapshot."""
        return self.manager.current

    def va(self, gpa: int) -> int:
        """The front-end VA of a GPA (SET_VRING_ADDR carries VAs)."""
        for r in self.REGIONS:
            if r.guest_phys_addr <= gpa < r.guest_phys_addr + r.memory_size:
                return r.userspace_addr + gpa - r.guest_phys_addr
        raise ValueError(f"GPA {gpa:#x} is not guest memory")

    def write(self, gpa: int, data: bytes) -> None:
        assert os.pwrite(self.fd, data, gpa) == len(data)

    def read(self, gpa: int, length: int) -> bytes:
        return os.pread(self.fd, length, gpa)

    def close(self) -> None:
        self.manager.clear()
        os.close(self.fd)
