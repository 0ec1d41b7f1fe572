"""A raw vhost-user front-end for back-end tests.

- :class:`RawClient` sends any request (or any bytes, malformed ones included) over a real
  Unix socket with the codec (:func:`~pyvhost.protocol.codec.encode`) and the transport
  module, and reads replies with a deadline through ``Decoder(replies=True)``.
  Its guest memory is :mod:`support.memfd`'s, its rings :class:`~support.ring.DriverRing`.

Only the test side lives here: nothing in this module knows how the back-end works inside.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Sequence

from pyvhost.protocol import messages as m
from pyvhost.protocol.codec import Decoder, Message, encode, has_explicit_reply
from pyvhost.protocol.constants import FLAG_NEED_REPLY, VHOST_USER_VERSION, Request
from pyvhost.protocol.transport import recv_chunk, send_message

# Every wait in these tests ends by TIMEOUT, a bound never asserted. Both names stay
# importable from here for the tests that take them from this module.
from support.poll import TIMEOUT as TIMEOUT
from support.poll import wait_until as wait_until

EMPTY = m.Empty()
_HEADER = struct.Struct("<III")


# ---------------------------------------------------------------------------------------
# Polling and process accounting
# ---------------------------------------------------------------------------------------

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
    def _recv(self, timeout: float) -> tuple[bytes, list[int]] | None:
        """One recvmsg, waiting at most ``timeout``: None if nothing came; ``b""`` at EOF."""
        readable, _, _ = select.select([self.sock], [], [], timeout)
        if not readable:
            return None
        try:
            return recv_chunk(self.sock)
        except BlockingIOError:
            return None
        except ConnectionResetError as e:
            raise ClosedByPeerError("connection reset") from e

    def _fill(self, deadline: float) -> None:
        """One recvmsg into the decoder, waiting at most until ``deadline``."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no reply from the back-end")
        chunk = self._recv(remaining)
        if chunk is None:
            return
        data, fds = chunk
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
            try:
                chunk = self._recv(remaining)
            except ClosedByPeerError:
                return bytes(got)
            if chunk is None:
                continue
            data, fds = chunk
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


def read_eventfd(fd: int | None) -> int:
    """The eventfd's counter, reset to zero; 0 if it was not signalled."""
    assert fd is not None, "no such eventfd (test bug)"
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0

