"""A timestamping vhost-user relay: sits between a front-end (QEMU) and any back-end.

Owns one listening Unix socket. For each front-end that connects it connects once to the
back-end's socket and forwards every message both ways, unchanged (bytes and SCM_RIGHTS
fds), while recording when each message went through. That gives the back-end's share of a
memory hot-add for any back-end, pyvhost or DPDK, measured the same way: the time from
the front-end's SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG to the back-end's REPLY_ACK
(:class:`MemoryUpdate`), and which regions (and which files, by device and inode) the
table carried.

It can also hide protocol feature bits from the front-end (``hide_protocol_features``):
the back-end's GET_PROTOCOL_FEATURES reply is masked on its way, so QEMU negotiates as if
the back-end lacked them. Hiding CONFIGURE_MEM_SLOTS makes QEMU use SET_MEM_TABLE with a
back-end that would otherwise get ADD_MEM_REG / REM_MEM_REG.

Framing only, no interpretation beyond that: messages are read whole (header, then exactly
``size`` bytes), so the fds that arrive belong to the message being read ("the fds ride on
the message's first byte"). A size over the protocol's largest payload, fds beyond
:data:`MAX_FDS_PER_MESSAGE`, or a truncated message ends that connection pair. The relay
keeps no fd: each one received is closed right after it was passed on (or on any error).
Runs in threads of the calling process; for labs and benchmarks, not production.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pyvhost.errors import LocalError, PeerError
from pyvhost.protocol.codec import HeaderFlags
from pyvhost.protocol.constants import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_FDS_PER_MESSAGE,
    MAX_PAYLOAD_SIZE,
    Request,
    request_name,
)
from pyvhost.protocol.fds import close_all
from pyvhost.protocol.messages import MemoryTable, PayloadError, SingleMemoryRegion
from pyvhost.protocol.transport import TransportError, recv_chunk, send_message

_HEADER = struct.Struct("<III")
_U64 = struct.Struct("<Q")
MEMORY_REQUESTS = frozenset({Request.SET_MEM_TABLE, Request.ADD_MEM_REG, Request.REM_MEM_REG})

Direction = Literal["to_backend", "to_frontend"]


class RelayError(LocalError):
    """The relay could not listen, or could not reach the back-end."""


class RelayStreamError(PeerError):
    """A peer sent something the relay can not frame; that connection pair is closed."""


@dataclass(frozen=True, slots=True)
class RegionInfo:
    """One region of a memory message, and the file its fd referred to (``None``: no fd)."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    file: tuple[int, int] | None  # (st_dev, st_ino) of the fd sent with it


@dataclass(frozen=True, slots=True)
class Event(HeaderFlags):
    """One message that went through, stamped (``time.monotonic()``) when fully received."""

    t: float
    connection: int
    direction: Direction
    request: int
    flags: int
    size: int
    fds: int


@dataclass(slots=True)
class MemoryUpdate:
    """A memory-table request of the front-end and, if it asked for one, the back-end's ack.

    ``sent``: when the relay had the whole request from the front-end; ``acked``: when it had
    the back-end's REPLY_ACK (None while pending, or without NEED_REPLY); ``ok``: the ack's
    u64 was zero.
    """

    connection: int
    request: int
    regions: tuple[RegionInfo, ...]
    sent: float
    need_reply: bool
    acked: float | None = None
    ok: bool | None = None

    @property
    def name(self) -> str:
        return request_name(self.request)

    @property
    def backend_seconds(self) -> float | None:
        """Request received from the front-end -> ack received from the back-end."""
        return None if self.acked is None else self.acked - self.sent


@dataclass
class _Pair:
    index: int
    front: socket.socket
    back: socket.socket
    threads: list[threading.Thread] = field(default_factory=list)

    def shut(self) -> None:
        for s in (self.front, self.back):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def _recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes | None:
    """Exactly ``n`` bytes (``None``: clean EOF before the first byte); fds go to ``fds``."""
    buf = bytearray()
    while len(buf) < n:
        data, got = recv_chunk(sock, n - len(buf))
        fds.extend(got)
        if len(fds) > MAX_FDS_PER_MESSAGE:
            raise RelayStreamError(f"{len(fds)} fds on one message (at most "
                                   f"{MAX_FDS_PER_MESSAGE})")
        if not data:
            if not buf and not fds:
                return None
            raise RelayStreamError(f"connection closed in the middle of a message "
                                   f"({len(buf)} of {n} bytes)")
        buf += data
    return bytes(buf)


def _file_of(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def memory_regions(request: int, payload: bytes, fds: list[int]) -> tuple[RegionInfo, ...]:
    """The regions a SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG payload describes, each with
    the file of its fd (the i-th fd goes with the i-th region). Unparsable: ``()``."""
    try:
        if request == Request.SET_MEM_TABLE:
            regions = MemoryTable.unpack(payload).regions
        elif request in (Request.ADD_MEM_REG, Request.REM_MEM_REG):
            regions = (SingleMemoryRegion.unpack(payload).region,)
        else:
            return ()
    except PayloadError:
        return ()  # the back-end judges the payload; the relay only reports what it can
    return tuple(RegionInfo(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset,
                            _file_of(fds[i]) if i < len(fds) else None)
                 for i, r in enumerate(regions))


class Relay:
    """``Relay(listen, backend).start()``; point the front-end at ``listen``; ``stop()``.

    ``on_event`` (optional) is called on the relay's threads for each message.
    """

    def __init__(self, listen: Path | str, backend: Path | str, *,
                 hide_protocol_features: int = 0, connect_timeout: float = 30.0,
                 on_event: Callable[[Event], None] | None = None) -> None:
        self.listen_path = Path(listen)
        self.backend_path = Path(backend)
        self.hide_protocol_features = int(hide_protocol_features)
        self.connect_timeout = connect_timeout
        self.on_event = on_event
        self._listener: socket.socket | None = None
        self._accepter: threading.Thread | None = None
        self._pairs: list[_Pair] = []
        self._events: list[Event] = []
        self._updates: list[MemoryUpdate] = []
        self._pending: dict[tuple[int, int], MemoryUpdate] = {}
        self._errors: list[str] = []
        self._cond = threading.Condition()
        self._stopping = threading.Event()

    # -- lifetime --------------------------------------------------------------------------
    def start(self) -> Relay:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.listen_path))
            listener.listen(4)
            listener.settimeout(0.2)
        except OSError as e:
            listener.close()
            raise RelayError(f"relay cannot listen on {self.listen_path}: {e}") from e
        self._listener = listener
        self._accepter = threading.Thread(target=self._accept_loop, name="relay-accept",
                                          daemon=True)
        self._accepter.start()
        return self

    def stop(self) -> None:
        """Close every socket, wait for the threads, remove the listening socket's path."""
        self._stopping.set()
        if self._accepter is not None:
            self._accepter.join(5)
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.listen_path.unlink()
        with self._cond:
            pairs = list(self._pairs)
        for pair in pairs:
            pair.shut()
        for pair in pairs:
            for t in pair.threads:
                t.join(5)
            pair.front.close()
            pair.back.close()

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what was seen ---------------------------------------------------------------------
    def events(self) -> list[Event]:
        with self._cond:
            return list(self._events)

    def memory_updates(self) -> list[MemoryUpdate]:
        with self._cond:
            return list(self._updates)

    def errors(self) -> list[str]:
        """Why connection pairs ended other than by a clean close."""
        with self._cond:
            return list(self._errors)

    @property
    def connections(self) -> int:
        with self._cond:
            return len(self._pairs)

    def wait_updates(self, count: int, timeout: float, *, acked: bool = True
                     ) -> list[MemoryUpdate]:
        """Wait until at least ``count`` memory updates were seen (and, with ``acked``, the
        ones that asked for a reply got it); returns them all (fewer on timeout)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                done = len(self._updates) >= count and not (
                    acked and any(u.need_reply and u.acked is None for u in self._updates))
                left = deadline - time.monotonic()
                if done or left <= 0:
                    return list(self._updates)
                self._cond.wait(left)

    # -- the threads -----------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                front, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            front.settimeout(None)
            try:
                back = self._connect_backend()
            except RelayError as e:
                with self._cond:
                    self._errors.append(str(e))
                front.close()
                continue
            with self._cond:
                pair = _Pair(len(self._pairs), front, back)
                self._pairs.append(pair)
            for src, dst, direction in ((front, back, "to_backend"),
                                        (back, front, "to_frontend")):
                t = threading.Thread(target=self._pump, args=(pair, src, dst, direction),
                                     name=f"relay-{pair.index}-{direction}", daemon=True)
                pair.threads.append(t)
                t.start()

    def _connect_backend(self) -> socket.socket:
        deadline = time.monotonic() + self.connect_timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.backend_path))
            except OSError as e:
                s.close()
                if time.monotonic() > deadline or self._stopping.is_set():
                    raise RelayError(f"relay cannot connect to the back-end at "
                                     f"{self.backend_path}: {e}") from e
                time.sleep(0.05)
            else:
                return s

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket,
              direction: Direction) -> None:
        try:
            while self._forward_one(pair, src, dst, direction):
                pass
        except (OSError, PeerError) as e:
            if not self._stopping.is_set():
                with self._cond:
                    self._errors.append(f"connection {pair.index} {direction}: {e}")
        finally:
            pair.shut()  # the other direction ends too: a half relay is no relay
            with self._cond:
                self._cond.notify_all()

    def _forward_one(self, pair: _Pair, src: socket.socket, dst: socket.socket,
                     direction: Direction) -> bool:
        fds: list[int] = []
        try:
            header = _recv_exact(src, HEADER_SIZE, fds)
            if header is None:
                return False
            request, flags, size = _HEADER.unpack(header)
            if size > MAX_PAYLOAD_SIZE:
                raise RelayStreamError(f"{request_name(request)}: payload size {size} > "
                                       f"{MAX_PAYLOAD_SIZE}")
            payload = _recv_exact(src, size, fds) if size else b""
            if payload is None:
                raise RelayStreamError(f"{request_name(request)}: no payload")
            now = time.monotonic()
            if (direction == "to_frontend" and request == Request.GET_PROTOCOL_FEATURES
                    and flags & FLAG_REPLY and size == _U64.size and self.hide_protocol_features):
                (value,) = _U64.unpack(payload)
                payload = _U64.pack(value & ~self.hide_protocol_features)
            self._record(pair.index, direction, now, request, flags, payload, fds)
            send_message(dst, header + payload, fds)
            return True
        except TransportError as e:
            raise RelayStreamError(str(e)) from e
        finally:
            close_all(fds)  # passed on (the peer has its own copies) or dropped: never kept

    def _record(self, conn: int, direction: Direction, now: float, request: int, flags: int,
                payload: bytes, fds: list[int]) -> None:
        event = Event(now, conn, direction, request, flags, len(payload), len(fds))
        with self._cond:
            self._events.append(event)
            if direction == "to_backend" and request in MEMORY_REQUESTS and not flags & FLAG_REPLY:
                update = MemoryUpdate(conn, request, memory_regions(request, payload, fds), now,
                                      bool(flags & FLAG_NEED_REPLY))
                self._updates.append(update)
                if update.need_reply:
                    self._pending[(conn, request)] = update
            elif direction == "to_frontend" and flags & FLAG_REPLY:
                pending = self._pending.pop((conn, request), None)
                if pending is not None:
                    pending.acked = now
                    pending.ok = len(payload) == _U64.size and _U64.unpack(payload)[0] == 0
            self._cond.notify_all()
        if self.on_event is not None:
            self.on_event(event)
