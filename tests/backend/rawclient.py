"""A raw vhost-user front-end for back-end tests, and guest memory with a split-ring driver.

- :class:`RawClient` sends any request (or any bytes, malformed ones included) over a real
  Unix socket with the codec (:func:`~pyvhost.protocol.codec.encode`) and the transport
  module, and reads replies with a deadline through ``Decoder(replies=True)``.
- :class:`MemfdRegion` is one region of "guest" memory the test owns: a memfd, sized and
  mapped here; its ``userspace_addr`` is the address of our own mapping, as QEMU's is.
- :class:`Ring` is a minimal split-virtqueue driver living in such a region: descriptor
  table, available and used rings written and read with ``struct``, kicks over an eventfd.

Only the test side lives here: nothing in this module knows how the back-end works inside.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pyvhost.protocol import messages as m
from pyvhost.protocol.codec import Decoder, Message, encode, has_explicit_reply
from pyvhost.protocol.constants import FLAG_NEED_REPLY, VHOST_USER_VERSION, Request
from pyvhost.protocol.transport import recv_chunk, send_message

#: Every wait in these tests ends by this deadline; the number is a bound, never asserted.
TIMEOUT = 10.0

EMPTY = m.Empty()
_HEADER = struct.Struct("<III")
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4


# ---------------------------------------------------------------------------------------
# Polling and process accounting
# ---------------------------------------------------------------------------------------

def wait_until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def fd_count() -> int:
    """Open fds of this process (the test is also the back-end: the server is a thread)."""
    return len(os.listdir("/proc/self/fd"))


def maps_count(name: str) -> int:
    """Lines of /proc/self/maps mapping the memfd called ``name`` (ours and the server's)."""
    needle = f"/memfd:{name} "
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if needle in line)


def wait_fd_count(expected: int, what: str = "fd count back to baseline") -> None:
    last: list[int] = []

    def settled() -> bool:
        last[:] = [fd_count()]
        return last[0] == expected

    try:
        wait_until(settled, what)
    except AssertionError as e:
        raise AssertionError(f"{e}: {last[0]} fds open, expected {expected}") from None


# ---------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------

class ClosedByPeerError(Exception):
    """The back-end closed the connection (EOF or reset) while we waited for a reply."""


def raw_header(request: int, size: int, flags: int = VHOST_USER_VERSION) -> bytes:
    """A header with any fields, valid or not (``encode`` refuses to build bad ones)."""
    return _HEADER.pack(request, flags, size)


class RawClient:
    """One front-end connection driven by hand."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.decoder = Decoder(replies=True)
        #: Whether REPLY_ACK was negotiated: requests then carry need_reply by default.
        self.reply_ack = False

    @classmethod
    def connect(cls, path: str) -> RawClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return cls(sock)

    def close(self) -> None:
        self.decoder.close()
        self.sock.close()

    # -- sending ---------------------------------------------------------------------------
    def send(self, request: int, payload: m.Payload = EMPTY, *, flags: int = 0,
             fds: Sequence[int] = ()) -> None:
        send_message(self.sock, encode(request, payload, flags=flags), tuple(fds))

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        send_message(self.sock, data, tuple(fds))

    # -- receiving -------------------------------------------------------------------------
    def _fill(self, deadline: float) -> None:
        """One recvmsg into the decoder, waiting at most until ``deadline``."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no reply from the back-end")
        readable, _, _ = select.select([self.sock], [], [], remaining)
        if not readable:
            return
        try:
            data, fds = recv_chunk(self.sock)
        except BlockingIOError:
            return
        except ConnectionResetError as e:
            raise ClosedByPeerError("connection reset") from e
        if not data:
            raise ClosedByPeerError("EOF")
        self.decoder.feed(data, fds)

    def recv_reply(self, request: int, *, ack: bool, timeout: float = TIMEOUT) -> Message:
        """The back-end's reply to ``request``: its explicit reply or a REPLY_ACK."""
        self.decoder.expect = request
        self.decoder.expect_ack = ack
        deadline = time.monotonic() + timeout
        while True:
            msg = self.decoder.next_message()
            if msg is not None:
                msg.fds.close()
                return msg
            self._fill(deadline)

    def wait_closed(self, timeout: float = TIMEOUT) -> bytes:
        """Wait for the back-end to close the connection; returns what it sent before."""
        got = bytearray()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("the back-end did not close the connection")
            readable, _, _ = select.select([self.sock], [], [], remaining)
            if not readable:
                continue
            try:
                data, fds = recv_chunk(self.sock)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                return bytes(got)
            for fd in fds:
                os.close(fd)
            if not data:
                return bytes(got)
            got += data

    def sync(self) -> None:
        """A GET_FEATURES round trip whose reply must be the next message: proves that the
        back-end sent nothing unasked before it (no timing involved)."""
        self.send(Request.GET_FEATURES)
        self.recv_reply(Request.GET_FEATURES, ack=False)

    # -- round trips -----------------------------------------------------------------------
    def request(self, request: int, payload: m.Payload = EMPTY, *,
                fds: Sequence[int] = (), need_reply: bool | None = None) -> m.Payload | None:
        """Send a request the way QEMU does and return its reply payload.

        ``need_reply`` defaults to "REPLY_ACK negotiated and no explicit reply". Returns
        the explicit reply, the REPLY_ACK u64, or None when no reply is expected.
        """
        explicit = has_explicit_reply(request)
        if need_reply is None:
            need_reply = self.reply_ack and not explicit
        self.send(request, payload, flags=FLAG_NEED_REPLY if need_reply else 0, fds=fds)
        if explicit:
            return self.recv_reply(request, ack=False).payload
        if need_reply:
            return self.recv_reply(request, ack=True).payload
        return None

    def get_u64(self, request: int) -> int:
        reply = self.request(request)
        assert isinstance(reply, m.U64), reply
        return reply.value

    def ack(self, request: int, payload: m.Payload = EMPTY, *,
            fds: Sequence[int] = ()) -> int:
        """Send with need_reply and return the REPLY_ACK value (0 is success)."""
        reply = self.request(request, payload, fds=fds, need_reply=True)
        assert isinstance(reply, m.U64), reply
        return reply.value


# ---------------------------------------------------------------------------------------
# Guest memory owned by the test
# ---------------------------------------------------------------------------------------

class MemfdRegion:
    """A memfd of ``size`` bytes mapped shared here; one region of guest memory.

    ``gpa`` is where the test currently places it in guest-physical space (a re-sent
    table may move it); ``va`` is the address of our mapping (the region's
    ``userspace_addr``). Offsets into the region are plain ints from its start.
    """

    def __init__(self, name: str, size: int, gpa: int) -> None:
        self.name = name
        self.size = size
        self.gpa = gpa
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.mm = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        # The address of our mapping. The ctypes view exports the buffer; drop it at once
        # so that the mmap can be closed later.
        view = ctypes.c_char.from_buffer(self.mm)
        self.va = ctypes.addressof(view)
        del view

    def region(self, gpa: int | None = None, mmap_offset: int = 0) -> m.MemoryRegion:
        """The region's description for SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG."""
        return m.MemoryRegion(guest_phys_addr=self.gpa if gpa is None else gpa,
                              memory_size=self.size - mmap_offset,
                              userspace_addr=self.va + mmap_offset,
                              mmap_offset=mmap_offset)

    def contains(self, gpa: int, length: int) -> bool:
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size

    def close(self) -> None:
        """Unmap and close. Idempotent."""
        if self.fd < 0:
            return
        self.mm.close()
        os.close(self.fd)
        self.fd = -1


class Guest:
    """The test's view of guest memory: its regions, addressed by GPA."""

    def __init__(self, regions: Sequence[MemfdRegion] = ()) -> None:
        self.regions = list(regions)

    def _find(self, gpa: int, length: int) -> tuple[MemfdRegion, int]:
        for r in self.regions:
            if r.contains(gpa, length):
                return r, gpa - r.gpa
        raise ValueError(f"test bug: GPA {gpa:#x}+{length} is in none of our regions")

    def read(self, gpa: int, length: int) -> bytes:
        r, off = self._find(gpa, length)
        return r.mm[off:off + length]

    def write(self, gpa: int, data: bytes) -> None:
        r, off = self._find(gpa, len(data))
        r.mm[off:off + len(data)] = data


@dataclass(frozen=True, slots=True)
class Buffer:
    """One descriptor's buffer: guest-physical address, length, device-writable or not."""

    gpa: int
    length: int
    writable: bool = False


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def read_eventfd(fd: int) -> int:
    """The eventfd's counter, reset to zero; 0 if it was not signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class Ring:
    """The driver side of one split virtqueue, laid out in ``region`` at ``offset``.

    Layout (virtio 1.2, 2.7): descriptor table (16 * size, 16-aligned), available ring
    (flags, idx, ring[size], used_event), used ring (flags, idx, ring[size], avail_event;
    4-aligned). The kick, call and err eventfds are ours; the back-end gets copies.
    """

    def __init__(self, index: int, size: int, region: MemfdRegion, offset: int) -> None:
        self.index = index
        self.size = size
        self.region = region
        self.desc_off = offset
        self.avail_off = offset + 16 * size
        self.used_off = (self.avail_off + 6 + 2 * size + 63) & ~63
        self.end_off = self.used_off + 6 + 8 * size
        assert self.end_off <= region.size, "ring does not fit its region"
        region.mm[offset:self.end_off] = bytes(self.end_off - offset)
        self.avail_idx = 0
        self.last_used = 0
        self.free = list(range(size))
        self.chains: dict[int, list[int]] = {}
        self.kick_fd = _eventfd()
        self.call_fd = _eventfd()
        self.err_fd = _eventfd()

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd, self.err_fd):
            os.close(fd)

    def addr(self) -> m.VringAddr:
        va = self.region.va
        return m.VringAddr(self.index, 0, va + self.desc_off, va + self.used_off,
                           va + self.avail_off, 0)

    # -- raw access (also for writing broken rings on purpose) ----------------------------
    def write_desc(self, i: int, gpa: int, length: int, flags: int, nxt: int = 0) -> None:
        _DESC.pack_into(self.region.mm, self.desc_off + 16 * i, gpa, length, flags, nxt)

    def put_avail(self, head: int) -> None:
        """Put ``head`` in the next available slot (not yet published)."""
        _U16.pack_into(self.region.mm, self.avail_off + 4 + 2 * (self.avail_idx % self.size),
                       head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def publish(self, idx: int | None = None) -> None:
        """Write the available idx (ours, or any value to corrupt the ring)."""
        _U16.pack_into(self.region.mm, self.avail_off + 2,
                       self.avail_idx if idx is None else idx)

    def used_idx(self) -> int:
        return int(_U16.unpack_from(self.region.mm, self.used_off + 2)[0])

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    # -- driver ---------------------------------------------------------------------------
    def add(self, buffers: Sequence[Buffer]) -> int:
        """Make one chain of ``buffers`` available (readable ones first); returns its head."""
        assert buffers and len(buffers) <= len(self.free), "ring full (test bug)"
        idx = [self.free.pop() for _ in buffers]
        for k, (i, b) in enumerate(zip(idx, buffers, strict=True)):
            last = k == len(buffers) - 1
            flags = (VIRTQ_DESC_F_WRITE if b.writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.write_desc(i, b.gpa, b.length, flags, 0 if last else idx[k + 1])
        self.chains[idx[0]] = idx
        self.put_avail(idx[0])
        self.publish()
        return idx[0]

    def add_indirect(self, guest: Guest, table_gpa: int, buffers: Sequence[Buffer]) -> int:
        """Make one chain available through an indirect table written at ``table_gpa``."""
        table = b"".join(
            _DESC.pack(b.gpa, b.length,
                       (VIRTQ_DESC_F_WRITE if b.writable else 0)
                       | (VIRTQ_DESC_F_NEXT if k < len(buffers) - 1 else 0),
                       k + 1 if k < len(buffers) - 1 else 0)
            for k, b in enumerate(buffers))
        guest.write(table_gpa, table)
        i = self.free.pop()
        self.write_desc(i, table_gpa, len(table), VIRTQ_DESC_F_INDIRECT)
        self.chains[i] = [i]
        self.put_avail(i)
        self.publish()
        return i

    def take_used(self) -> list[tuple[int, int]]:
        """Used elements (head, written length) returned since the last call."""
        out: list[tuple[int, int]] = []
        new = self.used_idx()
        while self.last_used != new:
            slot = self.last_used % self.size
            head, length = _USED_ELEM.unpack_from(self.region.mm, self.used_off + 4 + 8 * slot)
            self.free.extend(self.chains.pop(head))
            out.append((head, length))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def wait_used(self, count: int, timeout: float = TIMEOUT) -> list[tuple[int, int]]:
        """Wait until ``count`` more chains were used; returns them in order."""
        got: list[tuple[int, int]] = []

        def done() -> bool:
            got.extend(self.take_used())
            return len(got) >= count

        wait_until(done, f"{count} used chains on queue {self.index} (got {len(got)})",
                   timeout)
        return got


def close_quietly(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)

