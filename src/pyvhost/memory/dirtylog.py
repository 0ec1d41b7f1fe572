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

How a mark is stored: the exact bit of every page, set with an atomic fetch-or (libatomic's
``__atomic_fetch_or_1`` through ctypes, one call per log byte a range touches), as DPDK,
libvhost-user and rust-vmm do: QEMU shares one log between every vhost device of a VM, so
another back-end may set bits of the same byte at the same moment, and QEMU's reader takes
each 64-bit word with ``qatomic_xchg`` and zeroes it. Where libatomic is missing (a host
without the GCC runtime) a mark reads the byte and writes it back with the bits added:
exact, never losing a bit QEMU has not yet taken (QEMU only clears bits, and a bit set
again is a page sent again), but not atomic against another writer of the same byte
(``atomic`` in :meth:`DirtyLog.describe` says which). A mark never sets the bit of a page
the back-end did not write: a bit too many makes QEMU copy a page again, and on TCG it
also records the page as written for its code cache (without invalidating the code
translated from it). Ordering: the data is written before its mark, and x86-64 (the only
host pyvhost runs on, as :func:`pyvhost.virtq.split.store_le16` says) keeps stores in
program order, so QEMU never sees a bit before the data it stands for.

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

import ctypes
import ctypes.util
import logging
import mmap
import threading
from collections.abc import Callable

from pyvhost.errors import PeerError
from pyvhost.protocol.constants import VHOST_LOG_PAGE
from pyvhost.protocol.messages import LogDescription

from .region import map_shared, regular_file, shrink_sealed

log = logging.getLogger(__name__)

#: Guest-physical bytes one byte of the log covers: 8 pages of VHOST_LOG_PAGE.
BYTE_SPAN = 8 * VHOST_LOG_PAGE
_PAGE_SHIFT = VHOST_LOG_PAGE.bit_length() - 1  # 12: gpa >> _PAGE_SHIFT is its page


def _fetch_or() -> Callable[[int, int, int], int] | None:
    """libatomic's ``uint8_t __atomic_fetch_or_1(uint8_t *, uint8_t, int memorder)``."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("atomic") or "libatomic.so.1")
        fn = lib.__atomic_fetch_or_1
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_uint8, ctypes.c_int)
    fn.restype = ctypes.c_uint8
    return fn


_ATOMIC_FETCH_OR = _fetch_or()
#: Whether libatomic was found: logs then have an :attr:`DirtyLog.address`, and the
#: compiled data path marks them itself (:mod:`pyvhost.datapath`).
ATOMIC = _ATOMIC_FETCH_OR is not None
_RELEASE = 3  # __ATOMIC_RELEASE: the data written before the mark is visible first
#: The largest log accepted: it covers 2**52 bytes of guest-physical memory, the widest
#: physical address x86-64 defines. A larger one is a front-end's mistake or an attack on
#: this process's address space.
MAX_LOG_SIZE = (1 << 52) // BYTE_SPAN


class DirtyLogError(PeerError):
    """The log a front-end sent can not be mapped as it says."""


class DirtyLog:
    """One mapped dirty log: ``mm[base : base + size]`` is the bitmap, bit ``p`` of it
    (byte ``p // 8``, bit ``p % 8``) for guest page ``p`` (GPA ``p * 4096``)."""

    __slots__ = ("_address", "_lock", "_warned", "base", "closed", "marks", "mm", "offset",
                 "overflows", "shrink_sealed", "size")

    def __init__(self, mm: mmap.mmap, base: int, size: int, offset: int,
                 shrink_sealed: bool) -> None:
        self.mm = mm
        self.base = base
        self.size = size
        self.offset = offset
        self.shrink_sealed = shrink_sealed
        self.closed = False
        #: The host address of the bitmap's first byte, for the atomic fetch-or; the
        #: buffer export is dropped at once, so that the mapping can still be closed.
        #: Used only while the log is open (marks check ``closed``; the connection takes
        #: the log off its queues before closing it).
        self._address: int | None = None
        if _ATOMIC_FETCH_OR is not None:
            view = ctypes.c_char.from_buffer(mm)
            self._address = ctypes.addressof(view) + base
            del view
        #: Calls of :meth:`mark`, and those that reached past the log (status output).
        self.marks = 0
        self.overflows = 0
        self._warned = False
        #: Guards the counts and the read-modify-write fallback: bursts of one connection
        #: may run on several worker threads (``pyvhost net --workers``), and ``+=`` on an
        #: attribute is not atomic between threads, even under the GIL.
        self._lock = threading.Lock()

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
        st = regular_file(fd, "log ", DirtyLogError)
        end = offset + size
        if end > st.st_size:
            # Mapping past the end of the file would fault (SIGBUS) on first access.
            raise DirtyLogError(f"log offset {offset:#x} + size {size:#x} is past the end "
                                f"of its file ({st.st_size:#x} bytes)")
        start = offset - offset % mmap.PAGESIZE
        mm = map_shared(fd, start, end - start, "log ", DirtyLogError)
        return cls(mm, offset - start, size, offset, shrink_sealed(fd))

    @property
    def address(self) -> int | None:
        """The host address of the bitmap (byte 0: pages 0-7), for a compiled data path
        that sets bits itself (docs/dirty-log.md); None when libatomic is missing (the
        pure path's read-modify-write then marks). Valid while the log is open."""
        return None if self.closed else self._address

    @property
    def covers(self) -> int:
        """Guest-physical bytes the log covers, from address 0."""
        return self.size * BYTE_SPAN

    def mark(self, gpa: int, length: int) -> None:
        """Set the bit of every page of ``[gpa, gpa + length)`` (see the module for how).

        ``gpa`` and ``length`` may be any integers: only log bytes below ``size`` are
        written, whatever they say."""
        if length <= 0 or gpa < 0 or self.closed:
            return
        with self._lock:
            self.marks += 1
        page = gpa >> _PAGE_SHIFT
        last = (gpa + length - 1) >> _PAGE_SHIFT
        if last >> 3 >= self.size:
            self._overflow(gpa, length)
            if page >> 3 >= self.size:
                return
            last = 8 * self.size - 1
        fetch_or, address = _ATOMIC_FETCH_OR, self._address
        while page <= last:
            byte = page >> 3
            end = min(last, page | 7)
            bits = ((1 << (end - page + 1)) - 1) << (page & 7)
            # byte < size: the store is inside the bitmap (checked above).
            if fetch_or is not None and address is not None:
                fetch_or(address + byte, bits, _RELEASE)
            else:
                at = self.base + byte
                with self._lock:      # our own threads at least never lose a bit
                    old = self.mm[at]
                    if old & bits != bits:
                        self.mm[at] = old | bits
            page = end + 1

    def record(self, marks: int, overflows: int) -> None:
        """Count what the compiled data path marked itself, at :attr:`address` (its
        ``log_mark`` counts as :meth:`mark` does), after its burst."""
        with self._lock:
            self.marks += marks
            if not overflows:
                return
            self.overflows += overflows
            warn = not self._warned
            self._warned = True
        if warn:
            log.warning("dirty log of %#x bytes covers guest-physical memory up to %#x; "
                        "%d writes of the compiled data path lie past it and are not "
                        "logged (further ones are counted)", self.size, self.covers,
                        overflows)

    def _overflow(self, gpa: int, length: int) -> None:
        with self._lock:
            self.overflows += 1
            warn = not self._warned
            self._warned = True
        if warn:
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
                "overflows": self.overflows, "atomic": self._address is not None,
                "fds_held": 0 if self.closed else 1}
