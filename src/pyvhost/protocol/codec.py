"""The sans-I/O vhost-user codec: ``(bytes, fds)`` in, typed messages out, and back.

It never touches a socket (:mod:`pyvhost.protocol.transport` does). A :class:`Decoder` is
fed what ``recvmsg`` returned and hands out whole :class:`Message` objects. Two kinds of
error come out of it:

- :class:`FramingError`: the stream itself can not be trusted any more (bad version,
  reserved flag bits, a size over the limit, fds that belong to no message). The error is
  sticky: every later call raises it again, and the connection must be closed.
- :class:`MessageError`: one message was framed right but is wrong in itself (payload size
  or fd count that does not fit its request, a value out of range, an unknown request).
  Its bytes are consumed and its fds closed; the stream goes on, so the connection may
  NACK it (REPLY_ACK) instead of closing.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pyvhost.errors import PeerError

from . import messages as m
from .constants import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    FLAGS_KNOWN,
    HEADER_SIZE,
    MAX_FDS_PER_MESSAGE,
    MAX_PAYLOAD_SIZE,
    VERSION_MASK,
    VHOST_USER_VERSION,
    Request,
    request_name,
)
from .fds import FdBag, close_all

_HEADER = struct.Struct("<III")


class HeaderFlags:
    """What a header's ``request`` and ``flags`` say, for every class that carries them (a
    message, a message error, the relay's events)."""

    __slots__ = ()
    request: int
    flags: int

    @property
    def name(self) -> str:
        return request_name(self.request)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)


class FramingError(PeerError):
    """The byte stream broke vhost-user framing; the connection must be closed."""


class MessageError(HeaderFlags, PeerError):
    """One message was malformed; the stream is still in sync."""

    def __init__(self, request: int, flags: int, reason: str) -> None:
        super().__init__(f"{request_name(request)}: {reason}")
        self.request = request
        self.flags = flags
        self.reason = reason


@dataclass(eq=False, slots=True)
class Message(HeaderFlags):
    """One vhost-user message: header fields, a typed payload, and the fds it carried."""

    request: int
    flags: int
    payload: m.Payload
    fds: FdBag = field(default_factory=FdBag)


# ---------------------------------------------------------------------------------------
# What each request carries: the payload type of the request, the number of fds it may
# carry, and the payload type of its explicit reply (None: no reply unless need_reply).
# ---------------------------------------------------------------------------------------

_Unpack = Callable[[bytes], m.Payload]
_FdRule = Callable[[m.Payload], tuple[int, ...]]


def _none(_: m.Payload) -> tuple[int, ...]:
    return (0,)


def _one(_: m.Payload) -> tuple[int, ...]:
    return (1,)


def _per_region(p: m.Payload) -> tuple[int, ...]:
    # "SET_MEM_TABLE ... the file descriptors for the memory regions are passed in the
    # ancillary data": exactly one per region, in the same order.
    assert isinstance(p, m.MemoryTable)
    return (len(p.regions),)


def _rem_mem_reg(_: m.Payload) -> tuple[int, ...]:
    # "No file descriptors SHOULD be passed in the ancillary data. For compatibility with
    # existing incorrect implementations, the back-end MAY accept messages with one file
    # descriptor. If a file descriptor is passed, the back-end MUST close it without using
    # it otherwise."
    return (0, 1)


def _vring_fd(p: m.Payload) -> tuple[int, ...]:
    # "Bit 8 is the invalid FD flag. This flag is set when there is no file descriptor in
    # the ancillary data."
    assert isinstance(p, m.VringFd)
    return (0,) if p.nofd else (1,)


@dataclass(frozen=True, slots=True)
class _Layout:
    unpack: _Unpack
    fds: _FdRule
    reply: _Unpack | None


_R = Request
REQUESTS: dict[int, _Layout] = {
    _R.GET_FEATURES: _Layout(m.Empty.unpack, _none, m.U64.unpack),
    _R.SET_FEATURES: _Layout(m.U64.unpack, _none, None),
    _R.SET_OWNER: _Layout(m.Empty.unpack, _none, None),
    _R.RESET_OWNER: _Layout(m.Empty.unpack, _none, None),
    _R.SET_MEM_TABLE: _Layout(m.MemoryTable.unpack, _per_region, None),
    # With LOG_SHMFD (the only way pyvhost takes a log) the back-end answers: QEMU 7.2
    # reads a reply of the same request type and ignores its payload; libvhost-user
    # sends a u64, as pyvhost does.
    _R.SET_LOG_BASE: _Layout(m.LogDescription.unpack, _one, m.U64.unpack),
    _R.SET_LOG_FD: _Layout(m.Empty.unpack, _one, None),
    _R.SET_VRING_NUM: _Layout(m.VringState.unpack, _none, None),
    _R.SET_VRING_ADDR: _Layout(m.VringAddr.unpack, _none, None),
    _R.SET_VRING_BASE: _Layout(m.VringState.unpack, _none, None),
    _R.GET_VRING_BASE: _Layout(m.VringState.unpack, _none, m.VringState.unpack),
    _R.SET_VRING_KICK: _Layout(m.VringFd.unpack, _vring_fd, None),
    _R.SET_VRING_CALL: _Layout(m.VringFd.unpack, _vring_fd, None),
    _R.SET_VRING_ERR: _Layout(m.VringFd.unpack, _vring_fd, None),
    _R.GET_PROTOCOL_FEATURES: _Layout(m.Empty.unpack, _none, m.U64.unpack),
    _R.SET_PROTOCOL_FEATURES: _Layout(m.U64.unpack, _none, None),
    _R.GET_QUEUE_NUM: _Layout(m.Empty.unpack, _none, m.U64.unpack),
    _R.SET_VRING_ENABLE: _Layout(m.VringState.unpack, _none, None),
    _R.SEND_RARP: _Layout(m.Raw, _none, None),
    _R.NET_SET_MTU: _Layout(m.U64.unpack, _none, None),
    _R.SET_BACKEND_REQ_FD: _Layout(m.Empty.unpack, _one, None),
    _R.SET_VRING_ENDIAN: _Layout(m.VringState.unpack, _none, None),
    _R.GET_CONFIG: _Layout(m.ConfigSpace.unpack, _none, m.ConfigSpace.unpack),
    _R.SET_CONFIG: _Layout(m.ConfigSpace.unpack, _none, None),
    _R.RESET_DEVICE: _Layout(m.Empty.unpack, _none, None),
    _R.GET_MAX_MEM_SLOTS: _Layout(m.Empty.unpack, _none, m.U64.unpack),
    _R.ADD_MEM_REG: _Layout(m.SingleMemoryRegion.unpack, _one, None),
    _R.REM_MEM_REG: _Layout(m.SingleMemoryRegion.unpack, _rem_mem_reg, None),
    _R.SET_STATUS: _Layout(m.U64.unpack, _none, None),
    _R.GET_STATUS: _Layout(m.Empty.unpack, _none, m.U64.unpack),
}


def has_explicit_reply(request: int) -> bool:
    """Whether the spec gives this request a reply of its own (GET_* requests)."""
    layout = REQUESTS.get(request)
    return layout is not None and layout.reply is not None


# ---------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------

_EMPTY = m.Empty()


def encode(request: int, payload: m.Payload = _EMPTY, *, flags: int = 0) -> bytes:
    """The wire bytes of one message; version bits are added. Fds travel separately."""
    if flags & ~FLAGS_KNOWN:
        raise ValueError(f"unknown header flags {flags:#x}")
    body = payload.pack()
    if len(body) > MAX_PAYLOAD_SIZE:
        raise ValueError(f"payload of {len(body)} bytes exceeds {MAX_PAYLOAD_SIZE}")
    return _HEADER.pack(request, (flags & ~VERSION_MASK) | VHOST_USER_VERSION, len(body)) + body


def encode_reply(request: int, payload: m.Payload) -> bytes:
    """The wire bytes of a back-end's reply to ``request``."""
    return encode(request, payload, flags=FLAG_REPLY)


def encode_ack(request: int, ok: bool) -> bytes:
    """A REPLY_ACK: "a u64 payload: zero for success, non-zero otherwise"."""
    return encode_reply(request, m.U64(0 if ok else 1))


# ---------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------

class Decoder:
    """Turns a byte stream with fds into messages.

    ``replies=False`` decodes what a back-end receives (requests); ``replies=True`` decodes
    what a front-end receives (replies; the front-end tells which request each answers via
    ``expect``).
    """

    def __init__(self, *, replies: bool = False, max_payload: int = MAX_PAYLOAD_SIZE) -> None:
        self._replies = replies
        self._max_payload = max_payload
        self._buf = bytearray()
        self._consumed = 0  # stream offset of self._buf[0]
        # (stream offset just past the chunk, fds that came with it), oldest first
        self._fd_chunks: list[tuple[int, list[int]]] = []
        self._error: FramingError | None = None
        #: For replies: the request whose reply is expected next (set by the front-end).
        self.expect: int | None = None
        self.expect_ack = False

    # -- input ---------------------------------------------------------------------------
    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Add what one recvmsg returned. The decoder owns ``fds`` from here on."""
        if self._error is not None:
            close_all(fds)
            raise self._error
        if fds and not data:
            close_all(fds)
            self._fail("fds arrived without any bytes")
        self._buf += data
        if fds:
            self._fd_chunks.append((self._consumed + len(self._buf), list(fds)))

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a whole message."""
        return len(self._buf)

    @property
    def broken(self) -> FramingError | None:
        return self._error

    def close(self) -> None:
        """Drop buffered bytes and close every fd not handed out."""
        for _, fds in self._fd_chunks:
            close_all(fds)
        self._fd_chunks.clear()
        self._buf.clear()

    # -- output --------------------------------------------------------------------------
    def next_message(self) -> Message | None:
        """The next whole message, or None if more bytes are needed.

        Raises FramingError (sticky) or MessageError (this message only).
        """
        if self._error is not None:
            raise self._error
        if len(self._buf) < HEADER_SIZE:
            return None
        request, flags, size = _HEADER.unpack_from(self._buf)
        # "Version: this is version 0x1 of the protocol" - anything else is not our stream.
        if flags & VERSION_MASK != VHOST_USER_VERSION:
            self._fail(f"{request_name(request)}: version {flags & VERSION_MASK}, expected "
                       f"{VHOST_USER_VERSION}")
        if flags & ~FLAGS_KNOWN:
            self._fail(f"{request_name(request)}: reserved flag bits set ({flags:#x})")
        if bool(flags & FLAG_REPLY) != self._replies:
            self._fail(f"{request_name(request)}: reply flag is "
                       f"{'set' if flags & FLAG_REPLY else 'clear'} on a "
                       f"{'reply' if self._replies else 'request'}")
        if size > self._max_payload:
            self._fail(f"{request_name(request)}: payload size {size} exceeds the limit "
                       f"{self._max_payload}")
        end = HEADER_SIZE + size
        if len(self._buf) < end:
            return None
        start_offset = self._consumed
        body = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        self._consumed += end
        fds = FdBag(self._claim_fds(start_offset, self._consumed))
        if len(fds) > MAX_FDS_PER_MESSAGE:
            fds.close()
            self._fail(f"{request_name(request)}: {len(fds)} fds, at most "
                       f"{MAX_FDS_PER_MESSAGE} allowed")
        try:
            payload = self._payload(request, flags, body, fds)
        except BaseException:
            fds.close()
            raise
        return Message(request, flags, payload, fds)

    def _claim_fds(self, start: int, end: int) -> list[int]:
        """The fds of chunks that ended inside ``(start, end]``.

        The kernel ends a unix-stream read right after a segment that carried fds, and a
        sender attaches them to the first bytes of its message, so fds arrive with a chunk
        ending inside the message they belong to.
        """
        claimed: list[int] = []
        while self._fd_chunks and self._fd_chunks[0][0] <= end:
            chunk_end, fds = self._fd_chunks.pop(0)
            if chunk_end <= start:  # pragma: no cover - every chunk end is after a start
                close_all(fds)
                continue
            claimed.extend(fds)
        return claimed

    def _payload(self, request: int, flags: int, body: bytes, fds: FdBag) -> m.Payload:
        layout = REQUESTS.get(request)
        if self._replies and (layout is not None or self.expect_ack):
            # A REPLY_ACK is a u64 whatever the request, even one this codec does not know
            # (a back-end NACKs an unknown request that had need_reply set).
            return self._reply_payload(request, flags, body, fds, layout)
        if layout is None:
            raise MessageError(request, flags, f"unknown request ({len(body)} byte payload, "
                                               f"{len(fds)} fds)")
        try:
            payload = layout.unpack(body)
        except (m.PayloadError, ValueError, struct.error) as e:
            raise MessageError(request, flags, str(e)) from e
        allowed = layout.fds(payload)
        if len(fds) not in allowed:
            raise MessageError(request, flags,
                               f"carries {len(fds)} fds, expected "
                               f"{' or '.join(map(str, allowed))}")
        return payload

    def _reply_payload(self, request: int, flags: int, body: bytes, fds: FdBag,
                       layout: _Layout | None) -> m.Payload:
        if len(fds):
            raise MessageError(request, flags, f"reply carries {len(fds)} fds")
        if self.expect is not None and request != self.expect:
            self._fail(f"reply to {request_name(request)} while waiting for "
                       f"{request_name(self.expect)}")
        unpack = (m.U64.unpack if self.expect_ack or layout is None or layout.reply is None
                  else layout.reply)
        try:
            return unpack(body)
        except (m.PayloadError, ValueError, struct.error) as e:
            raise MessageError(request, flags, str(e)) from e

    def _fail(self, reason: str) -> None:
        self._error = FramingError(reason)
        self.close()
        raise self._error
