"""The dirty log of one connection: where the back-end tells the front-end which guest
pages it wrote while a live migration copies guest memory.

"The log memory fd is provided in the ancillary data of VHOST_USER_SET_LOG_BASE ... Log
starts at the supplied offset in the supplied file descriptor. The log covers from
address 0 to the maximum of guest regions. In pseudo-code, to mark page at addr as
dirty::

    page = addr / VHOST_LOG_PAGE
    log[page / 8] |= 1 << page % 8

Where addr is the guest physical address. Use atomic operations, as the log may be
concurrently manipulated." (vhost-user.rst, Migration)

:class:`DirtyLog` owns one mapping of that file (and the one fd CPython's ``mmap`` keeps),
checked before it is made, unmapped by :meth:`DirtyLog.close` (a replaced log, RESET_OWNER,
a closed connection). :meth:`DirtyLog.mark` marks every page of a guest-physical range.

How a mark is stored: Python has no atomic fetch-or, and a read-modify-write of a log
byte could erase a bit another writer set meanwhile (QEMU shares one log between every
vhost device of a VM: another back-end's bit lost is a page QEMU never sends again, a
corrupted guest). So a mark stores 0xFF into each log byte its range touches: a plain
store that can not lose anyone's bit. QEMU's concurrent reader (``qatomic_xchg`` of each
64-bit word, then zero) sees each byte either before the store (the bits stay set for
the next round) or after. The cost is precision: a mark dirties the whole 32 KiB group
(8 pages) around each page it covers, so QEMU may copy up to 7 pages more per group.
The compiled data path, once it logs, sets exact bits with ``__atomic_fetch_or`` as DPDK
does (docs/dirty-log.md has the hook). Ordering: the data is written before its mark, and
x86-64 (the only host pyvhost runs on, as :func:`pyvhost.virtq.split.store_le16` says)
keeps stores in program order, so QEMU never sees a bit before the data it stands for.

Memory-safety invariants, the same rules as for guest regions (:mod:`.region`):

- the mapping is made only after ``mmap_offset + mmap_size`` is checked not to wrap past
  2**64 and to lie inside the file (``fstat``), so no access to it can fault on a file
  that is short when mapped; a front-end that shrinks the file later makes the next mark
  fault (SIGBUS), as with a guest region on the pure-Python data path (QEMU seals its
  log memfd against shrinking: ``shrink_sealed``);
- :meth:`mark` takes any guest-controlled ``gpa`` and ``length`` (Python integers: no
  wrap) and writes only bytes ``< mmap_size`` of the log; what lies past the log is not
  marked and is counted in ``overflows`` (QEMU grows the log before it sends a larger
  memory table, so a correct front-end never causes one).

Marks happen on the thread that serves the connection's queues, as do the handlers that
replace or close the log: a log is never closed under a mark.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat

from pyvhost.errors import PeerError
from pyvhost.protocol.constants import VHOST_LOG_PAGE
from pyvhost.protocol.messages import LogDescription

from .region import shrink_sealed

log = logging.getLogger(__name__)

#: Guest-physical bytes one byte of the log covers: 8 pages of VHOST_LOG_PAGE.
BYTE_SPAN = 8 * VHOST_LOG_PAGE
_SHIFT = BYTE_SPAN.bit_length() - 1  # 15: gpa >> _SHIFT is the log byte of gpa
#: The largest log accepted: it covers 2**52 bytes of guest-physical memory, the widest
#: physical address x86-64 defines. A larger one is a front-end's mistake or an attack on
#: this process's address space.
MAX_LOG_SIZE = (1 << 52) // BYTE_SPAN


class DirtyLogError(PeerError):
    """The log a front-end sent can not be mapped as it says."""


class DirtyLog:
    """One mapped dirty log: ``mm[base : base + size]`` is the bitmap, bit ``p`` of it
    (byte ``p // 8``, bit ``p % 8``) for guest page ``p`` (GPA ``p * 4096``)."""

    __slots__ = ("_warned", "base", "closed", "marks", "mm", "offset", "overflows",
                 "shrink_sealed", "size")

    def __init__(self, mm: mmap.mmap, base: int, size: int, offset: int,
                 shrink_sealed: bool) -> None:
        self.mm = mm
        self.base = base
        self.size = size
        self.offset = offset
        self.shrink_sealed = shrink_sealed
        self.closed = False
        #: Calls of :meth:`mark`, and those that reached past the log (status output).
        self.marks = 0
        self.overflows = 0
        self._warned = False

    @classmethod
    def map(cls, desc: LogDescription, fd: int) -> DirtyLog:
        """Map the log ``desc`` describes from ``fd``. Does not close ``fd``."""
        size, offset = desc.mmap_size, desc.mmap_offset
        if size == 0:
            raise DirtyLogError("log of size 0")
        if offset + size > 1 << 64:
            raise DirtyLogError(f"log offset {offset:#x} + size {size:#x} overflows 64 bits")
        if size > MAX_LOG_SIZE:
            raise DirtyLogError(f"log of {size:#x} bytes: more than the {MAX_LOG_SIZE:#x} "
                                "that cover 2**52 bytes of guest-physical memory")
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise DirtyLogError(f"log fd unusable: {e}") from e
        if not stat.S_ISREG(st.st_mode):
            raise DirtyLogError(f"log fd is not a regular file (mode "
                                f"{stat.filemode(st.st_mode)})")
        end = offset + size
        if end > st.st_size:
            # Mapping past the end of the file would fault (SIGBUS) on first access.
            raise DirtyLogError(f"log offset {offset:#x} + size {size:#x} is past the end "
                                f"of its file ({st.st_size:#x} bytes)")
        start = offset - offset % mmap.PAGESIZE
        try:
            mm = mmap.mmap(fd, end - start, flags=mmap.MAP_SHARED,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        except (OSError, ValueError, OverflowError) as e:
            raise DirtyLogError(f"log mmap failed: {e}") from e
        return cls(mm, offset - start, size, offset, shrink_sealed(fd))

    @property
    def covers(self) -> int:
        """Guest-physical bytes the log covers, from address 0."""
        return self.size * BYTE_SPAN

    def mark(self, gpa: int, length: int) -> None:
        """Mark the pages of ``[gpa, gpa + length)`` dirty (see the module for how).

        ``gpa`` and ``length`` may be any integers: only log bytes below ``size`` are
        written, whatever they say."""
        if length <= 0 or gpa < 0:
            return
        self.marks += 1
        first = gpa >> _SHIFT
        last = (gpa + length - 1) >> _SHIFT
        if last >= self.size:
            self._overflow(gpa, length)
            if first >= self.size:
                return
            last = self.size - 1
        mm, at = self.mm, self.base + first
        if first == last:
            if mm[at] != 0xFF:
                mm[at] = 0xFF
        else:
            mm[at:self.base + last + 1] = b"\xff" * (last - first + 1)

    def _overflow(self, gpa: int, length: int) -> None:
        self.overflows += 1
        if not self._warned:
            self._warned = True
            log.warning("dirty log of %#x bytes covers guest-physical memory up to %#x; "
                        "a write at %#x+%#x lies past it and is not logged (further ones "
                        "are counted)", self.size, self.covers, gpa, length)

    def close(self) -> None:
        """Unmap the log (and with it the fd ``mmap`` kept). Idempotent."""
        if not self.closed:
            self.closed = True
            self.mm.close()

    def describe(self) -> dict[str, int | bool]:
        """The log as plain data, for status output."""
        return {"mmap_size": self.size, "mmap_offset": self.offset, "covers": self.covers,
                "shrink_sealed": self.shrink_sealed, "marks": self.marks,
                "overflows": self.overflows, "fds_held": 0 if self.closed else 1}
