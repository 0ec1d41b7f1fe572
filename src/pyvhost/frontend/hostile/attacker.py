"""The hostile front-end's tools: a connection that can say anything, and read what comes back.

:class:`Attacker` is one connection to the back-end under test. It can negotiate and
start a device the way QEMU 7.2 does (:mod:`pyvhost.frontend.profiles`), then put any bytes
and fds on the wire (:meth:`Attacker.send`): payloads are packed here by hand
(:func:`region`, :func:`table`, ...), because the typed messages of
:mod:`pyvhost.protocol.messages` refuse to carry the values a hostile case needs.
:meth:`Attacker.response` reads one reply with a deadline and says what it was
(:class:`Response`). Every file and fd it makes is closed by :meth:`Attacker.close`, and
the names of its region files are kept so that the runner can tell whether the back-end
still holds any of them.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Literal

from pyvhost.protocol.constants import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    VHOST_USER_VERSION,
    Request,
)
from pyvhost.protocol.fds import close_all
from pyvhost.protocol.transport import recv_chunk
from pyvhost.units import MiB

from .. import profiles
from ..frontend import Frontend, Negotiated
from ..memory import FrontendMemory, GuestRam

_HEADER = struct.Struct("<III")
_REGION = struct.Struct("<QQQQ")
_U64 = struct.Struct("<Q")

Kind = Literal["ack", "nack", "reply", "closed", "silent"]


@dataclass(frozen=True, slots=True)
class Response:
    """What came back for a request: ``ack`` (REPLY_ACK 0), ``nack`` (non-zero), ``reply``
    (an explicit reply), ``closed`` (the back-end hung up), ``silent`` (nothing in time)."""

    kind: Kind
    request: int = 0
    value: int = 0
    detail: str = ""

    def __str__(self) -> str:
        if self.kind in ("ack", "nack", "reply"):
            return f"{self.kind} {self.value:#x}"
        return self.kind + (f" ({self.detail})" if self.detail else "")


def header(request: int, size: int, flags: int = VHOST_USER_VERSION | FLAG_NEED_REPLY) -> bytes:
    return _HEADER.pack(request, flags, size)


def message(request: int, payload: bytes = b"", *, need_reply: bool = True,
            flags: int | None = None) -> bytes:
    """A message with any payload; need_reply set unless told otherwise."""
    if flags is None:
        flags = VHOST_USER_VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return header(request, len(payload), flags) + payload


def region(gpa: int, size: int, uaddr: int, offset: int = 0) -> bytes:
    """One "memory region description", any values (masked to 64 bits)."""
    mask = (1 << 64) - 1
    return _REGION.pack(gpa & mask, size & mask, uaddr & mask, offset & mask)


def table(*regions: bytes, count: int | None = None) -> bytes:
    """A "memory regions description": ``num regions`` (default: as many as given)."""
    return struct.pack("<II", len(regions) if count is None else count, 0) + b"".join(regions)


def single(reg: bytes) -> bytes:
    """A "single memory region description": 64-bit padding, then the region."""
    return _U64.pack(0) + reg


def u64(value: int) -> bytes:
    return _U64.pack(value & ((1 << 64) - 1))


def state(index: int, num: int) -> bytes:
    """"A vring state description": 32-bit index, 32-bit num."""
    return struct.pack("<II", index & 0xFFFFFFFF, num & 0xFFFFFFFF)


def vring_addr(index: int, desc: int, used: int, avail: int, flags: int = 0) -> bytes:
    return struct.pack("<IIQQQQ", index, flags, desc, used, avail, 0)


class Attacker:
    """One connection of the hostile front-end (see the module docstring)."""

    def __init__(self, path: str, *, device: str = "net", timeout: float = 3.0) -> None:
        self.path = path
        self.device = device
        self.timeout = timeout
        self.fe = Frontend()
        self.memory = FrontendMemory()
        self.session = profiles.Session(profiles.get("qemu-7.2"), self.fe, self.memory,
                                        device=device)
        self._extra: list[GuestRam] = []
        self._fds: list[int] = []
        self._buf = b""
        #: Names of every region file this connection made (the back-end must let go).
        self.files: set[str] = set()
        self.negotiated: Negotiated | None = None

    # -- set-up, the way QEMU does it ---------------------------------------------------------
    def connect(self) -> None:
        self.fe.connect(self.path, timeout=self.timeout)

    def negotiate(self) -> Negotiated:
        if not self.fe.connected:
            self.connect()
        self.negotiated = self.session.negotiate()
        return self.negotiated

    def start(self, boot_size: int = 2 * MiB) -> GuestRam:
        """Negotiate, boot RAM at GPA 0 with the device's rings in it, DRIVER_OK."""
        if self.negotiated is None:
            self.negotiate()
        boot = self.session.add_region(boot_size, boot=True)
        self.files.add(boot.name)
        self.session.start(boot)
        return boot

    @property
    def mem_slots(self) -> bool:
        return self.fe.uses_mem_slots

    def ram(self, size: int = 2 * MiB, gpa: int = 0) -> GuestRam:
        """A region file outside the front-end's memory set (no overlap checks: hostile
        tables name what they like); closed with the attacker."""
        ram = GuestRam(gpa, size)
        self._extra.append(ram)
        self.files.add(ram.name)
        return ram

    def fd(self, fd: int) -> int:
        """Keep ``fd`` to close it with the attacker."""
        self._fds.append(fd)
        return fd

    # -- the wire -----------------------------------------------------------------------------
    @property
    def sock(self) -> socket.socket:
        return self.fe.sock

    def send(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> bool:
        """Send bytes (and fds) as they are; False if the back-end already hung up."""
        try:
            self.fe.send_raw(data, fds)
        except (BrokenPipeError, ConnectionResetError):
            return False
        except TimeoutError:
            return False
        return True

    def response(self, timeout: float | None = None) -> Response:
        """Read one whole reply within ``timeout`` seconds (its fds are closed)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            if len(self._buf) >= HEADER_SIZE:
                request, flags, size = _HEADER.unpack_from(self._buf)
                if len(self._buf) >= HEADER_SIZE + size:
                    body = self._buf[HEADER_SIZE:HEADER_SIZE + size]
                    self._buf = self._buf[HEADER_SIZE + size:]
                    value = _U64.unpack_from(body)[0] if size >= 8 else 0
                    if not flags & FLAG_REPLY:
                        return Response("reply", request, value, "reply flag missing")
                    if size == 8 and request not in _EXPLICIT:
                        return Response("ack" if value == 0 else "nack", request, value)
                    return Response("reply", request, value)
            left = deadline - time.monotonic()
            if left <= 0:
                return Response("silent", detail="no reply in time")
            try:
                ready, _, _ = select.select([self.sock], [], [], left)
            except (OSError, ValueError):
                return Response("closed")
            if not ready:
                continue
            try:
                data, fds = recv_chunk(self.sock)
            except (ConnectionResetError, BrokenPipeError):
                return Response("closed", detail="reset")
            except OSError as e:
                return Response("closed", detail=str(e))
            close_all(fds)
            if not data:
                return Response("closed")
            self._buf += data

    def ask(self, data: bytes, fds: list[int] | tuple[int, ...] = (),
            timeout: float | None = None) -> Response:
        """Send, then read the reply."""
        if not self.send(data, fds):
            return Response("closed", detail="while sending")
        return self.response(timeout)

    def ping(self, timeout: float | None = None) -> Response:
        """GET_FEATURES: does this connection still answer, in order?"""
        return self.ask(message(Request.GET_FEATURES, need_reply=False), timeout=timeout)

    # -- lifetime -----------------------------------------------------------------------------
    def hang_up(self) -> None:
        """Close the connection but keep our memory (the back-end may still map it)."""
        with contextlib.suppress(OSError):
            self.fe.close()

    def close(self) -> None:
        self.session.close()
        self.hang_up()
        self.memory.close()
        for ram in self._extra:
            ram.close()
        self._extra.clear()
        fds, self._fds = self._fds, []
        close_all(fds)


_EXPLICIT = frozenset({Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES,
                       Request.GET_QUEUE_NUM, Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS,
                       Request.GET_VRING_BASE, Request.GET_CONFIG})


def memfd(size: int, name: str) -> int:
    """A memfd of ``size`` bytes (not mapped here)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


__all__ = ["Attacker", "Response", "header", "memfd", "message", "region", "single",
           "state", "table", "u64", "vring_addr"]
