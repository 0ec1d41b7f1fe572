"""One region of guest memory mapped into this process.

A :class:`MappedRegion` owns one ``mmap`` of the file a front-end sent for a region. It
is shared by every snapshot that contains the region (an unchanged region is not
remapped when a new table arrives) and is unmapped when the last snapshot holding it
lets go. No prefaulting: ``mmap`` without MAP_POPULATE, so the cost of mapping does not
grow with the region's size.

CPython's ``mmap`` keeps a dup of the fd it maps (for ``size()``), so a region holds
exactly one fd and one mapping; the fd that arrived on the socket is closed right after
mapping.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
from dataclasses import dataclass

from pyvhost.errors import PeerError
from pyvhost.protocol.messages import MemoryRegion

# statfs f_type of hugetlbfs (linux/magic.h HUGETLBFS_MAGIC); os.fstatvfs has no f_type,
# so hugetlbfs is told apart by its block size being the huge page size.


class RegionMapError(PeerError):
    """The fd sent for a region can not be mapped as the region says."""


@dataclass(frozen=True, slots=True)
class FileId:
    """Identity of the file behind a region: the same file arrives under new fd numbers."""

    dev: int
    ino: int


class MappedRegion:
    """A region described by the front-end and mapped shared, read-write, into this process.

    Invariant: ``self.mm[self.base : self.base + desc.memory_size]`` is exactly the
    region's guest memory, and lies inside the mapping and inside the file (checked
    against ``fstat`` before mapping, so reading it can not fault on a short file).
    """

    __slots__ = ("added_gen", "base", "bytes_written", "closed", "desc", "file_id", "mm",
                 "page_size", "removed_gen", "shrink_sealed", "writes")

    def __init__(self, desc: MemoryRegion, mm: mmap.mmap, base: int, file_id: FileId,
                 page_size: int, shrink_sealed: bool = False) -> None:
        self.desc = desc
        self.mm = mm
        self.base = base
        self.file_id = file_id
        self.page_size = page_size
        self.closed = False
        #: Generations of the snapshots that contain this region: [added_gen, removed_gen).
        #: A region object is never put back once removed (a re-add maps anew), so its
        #: snapshots are contiguous and this range says exactly which ones hold it.
        self.added_gen = 0
        self.removed_gen: int | None = None
        #: Device writes into this region through :meth:`GuestMemory.write` (for a net
        #: device: received frames written into the driver's RX buffers) and their bytes.
        #: Status output only: they show where in guest memory the driver put its buffers
        #: (e.g. in a hot-added DIMM). Two integer additions per write; not locked, so
        #: writers on several threads may lose an increment now and then.
        self.writes = 0
        self.bytes_written = 0
        #: The file carried F_SEAL_SHRINK when mapped (seals can be added, never removed):
        #: it can not shrink under the mapping, so reading it can not fault (SIGBUS).
        self.shrink_sealed = shrink_sealed

    @classmethod
    def map(cls, desc: MemoryRegion, fd: int) -> MappedRegion:
        """Map ``desc`` from ``fd``. Does not close ``fd`` (the caller owns it)."""
        desc.check()
        what = f"region {desc.describe()}: "
        st = regular_file(fd, what, RegionMapError)
        end = desc.mmap_offset + desc.memory_size
        if end > st.st_size:
            # Mapping past the end of the file would fault (SIGBUS) on first access.
            raise RegionMapError(f"region {desc.describe()}: mmap_offset + memory_size "
                                 f"({end:#x}) is past the end of its file ({st.st_size:#x})")
        try:
            page_size = max(mmap.PAGESIZE, os.fstatvfs(fd).f_bsize)
        except OSError:
            page_size = mmap.PAGESIZE
        start = desc.mmap_offset - desc.mmap_offset % page_size
        mm = map_shared(fd, start, end - start, what, RegionMapError)
        return cls(desc, mm, desc.mmap_offset - start, FileId(st.st_dev, st.st_ino), page_size,
                   shrink_sealed(fd))

    # -- lifetime (driven by the manager) -----------------------------------------------
    def unmap(self) -> None:
        """Unmap the region. The manager calls this once no snapshot that contains it is
        read any more. Idempotent."""
        if not self.closed:
            self.closed = True
            self.mm.close()

    # -- geometry ------------------------------------------------------------------------
    @property
    def gpa_start(self) -> int:
        return self.desc.guest_phys_addr

    @property
    def gpa_end(self) -> int:
        return self.desc.guest_phys_addr + self.desc.memory_size

    @property
    def uva_start(self) -> int:
        return self.desc.userspace_addr

    @property
    def uva_end(self) -> int:
        return self.desc.userspace_addr + self.desc.memory_size

    def same_as(self, desc: MemoryRegion, file_id: FileId) -> bool:
        """Whether a newly announced region is this one, unchanged."""
        return desc == self.desc and file_id == self.file_id

    def __repr__(self) -> str:
        return (f"MappedRegion({self.desc.describe()}, generations {self.added_gen}.."
                f"{self.removed_gen}{', unmapped' if self.closed else ''})")


def regular_file(fd: int, what: str, error: type[PeerError]) -> os.stat_result:
    """``fstat`` of an fd a front-end sent to be mapped, refused (``error``, its message
    starting with ``what``) unless it is a regular file: only then is ``st_size`` the
    file's length, against which the caller checks the range it maps (a mapping past the
    end of the file faults on first access)."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise error(f"{what}fd unusable: {e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what}fd is not a regular file (mode {stat.filemode(st.st_mode)})")
    return st


def map_shared(fd: int, start: int, length: int, what: str,
               error: type[PeerError]) -> mmap.mmap:
    """``length`` bytes of ``fd`` from ``start`` (page-aligned; the caller checked the
    range against the file with :func:`regular_file`), mapped shared and read-write."""
    try:
        return mmap.mmap(fd, length, flags=mmap.MAP_SHARED,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
    except (OSError, ValueError, OverflowError) as e:
        raise error(f"{what}mmap failed: {e}") from e


def shrink_sealed(fd: int) -> bool:
    """Whether ``fd``'s file has F_SEAL_SHRINK (memfds only: QEMU's memory-backend-memfd
    seals by default). Other files answer EINVAL: not sealed."""
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK)
    except OSError:
        return False


def file_id_of(fd: int) -> FileId:
    st = os.fstat(fd)
    return FileId(st.st_dev, st.st_ino)
