"""The one place that moves vhost-user bytes and fds over a Unix socket.

``recv_chunk`` wraps ``recvmsg`` with room for SCM_RIGHTS; ``send_message`` wraps
``sendmsg``. Received fds are opened close-on-exec and handed to the caller, who passes them
to a :class:`~pyvhost.protocol.codec.Decoder` (which then owns them). If the kernel had to
truncate the ancillary data (MSG_CTRUNC: more fds than we made room for) the fds that did
fit are closed and :class:`TransportError` is raised: the peer is misbehaving.
"""

from __future__ import annotations

import array
import os
import socket
import struct

from pyvhost.errors import PeerError

from .constants import MAX_FDS_PER_MESSAGE
from .fds import close_all

#: Room for twice the fds any message may carry, so that a peer sending too many is caught
#: by the codec with a clear message rather than by truncation.
_FD_ROOM = 2 * MAX_FDS_PER_MESSAGE
_ANC_SIZE = socket.CMSG_SPACE(_FD_ROOM * struct.calcsize("i"))
RECV_SIZE = 64 * 1024


class TransportError(PeerError):
    """The socket delivered something unusable (truncated fds, a reset)."""


def recv_chunk(sock: socket.socket, size: int = RECV_SIZE) -> tuple[bytes, list[int]]:
    """One ``recvmsg``: the bytes and the fds that came with them. ``b""`` means EOF.

    Raises BlockingIOError on a non-blocking socket with nothing to read.
    """
    data, ancdata, msg_flags, _ = sock.recvmsg(size, _ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(cdata) - len(cdata) % struct.calcsize("i")
            fds.extend(array.array("i", cdata[:usable]))
    if msg_flags & socket.MSG_CTRUNC:
        close_all(fds)
        raise TransportError(f"peer sent more than {_FD_ROOM} fds at once (ancillary data "
                             "truncated)")
    if not data and fds:
        close_all(fds)
        raise TransportError("peer sent fds with no data")
    return data, fds


def send_message(sock: socket.socket, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send one whole message; fds ride on its first byte. The caller keeps its fds."""
    view = memoryview(data)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sent = sock.sendmsg([view], anc)
    while sent < len(view):
        view = view[sent:]
        sent = sock.sendmsg([view])


def peer_pid(sock: socket.socket) -> int | None:
    """The pid of the process at the other end of a Unix socket (SO_PEERCRED), if known."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, _uid, _gid = struct.unpack("3i", creds)
    return pid or None


def set_cloexec_nonblocking(fd: int) -> None:
    """Make an fd we keep close-on-exec and non-blocking (kick/call eventfds)."""
    os.set_inheritable(fd, False)
    os.set_blocking(fd, False)
