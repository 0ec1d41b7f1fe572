"""A scriptable in-process vhost-user back-end for the front-end's tests.

It listens on a real Unix socket, serves connections one after another in a thread,
records every request (code, flags, fd count, payload), answers GET_* requests and
REPLY_ACKs, and keeps what a back-end keeps of guest memory: the region fds and an mmap
of each. ``leak=True`` makes it forget to release replaced or removed regions, like a
buggy back-end; ``nack`` and ``misbehave`` script failures.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import struct
import threading
from dataclasses import dataclass, field

from pyvhost.closing import Closing
from pyvhost.protocol import messages as m
from pyvhost.protocol.codec import Decoder, Message, encode, encode_ack, encode_reply
from pyvhost.protocol.constants import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ProtocolFeature,
    Request,
    VirtioFeature,
)
from pyvhost.protocol.transport import recv_chunk, send_message

PF = ProtocolFeature
ALL_MEMORY_FEATURES = PF.MQ | PF.REPLY_ACK | PF.CONFIGURE_MEM_SLOTS | PF.STATUS


@dataclass(frozen=True)
class Record:
    request: int
    flags: int
    nfds: int
    payload: m.Payload

    @property
    def name(self) -> str:
        return Request(self.request).name

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


@dataclass
class _Held:
    region: m.MemoryRegion
    fd: int
    mm: mmap.mmap


@dataclass
class FakeBackend(Closing):
    path: str
    features: int = int(VirtioFeature.VERSION_1) | VHOST_USER_F_PROTOCOL_FEATURES
    protocol_features: int = int(ALL_MEMORY_FEATURES)
    queue_num: int = 2
    max_mem_slots: int = 32
    leak: bool = False
    #: Keep a dup of a region fd every this many memory requests (0: never): a slow leak.
    leak_every: int = 0
    #: Requests answered with a NACK (when need_reply is set).
    nack: set[int] = field(default_factory=set)
    #: request -> "wrong-request" | "no-reply-flag" | "bad-size" | "need-reply-flag" |
    #: "close" | "silent"
    misbehave: dict[int, str] = field(default_factory=dict)
    vring_base: int = 7
    records: list[Record] = field(default_factory=list)
    status: int = 0
    #: The device config space GET_CONFIG answers from.
    config: bytes = b""

    def __post_init__(self) -> None:
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listener.bind(self.path)
        self._listener.listen(4)
        self._held: list[_Held] = []
        self._leaked: list[_Held] = []
        self._dups: list[int] = []
        self._memory_requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-backend", daemon=True)
        self._conn: socket.socket | None = None
        self.done = threading.Event()
        self._thread.start()

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        for held in self._held + self._leaked:
            held.mm.close()
            os.close(held.fd)
        self._held.clear()
        self._leaked.clear()
        for fd in self._dups:
            os.close(fd)
        self._dups.clear()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # -- what tests look at -------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [r.name for r in self.records]

    @property
    def table(self) -> list[m.MemoryRegion]:
        return [h.region for h in self._held]

    def wait_done(self, timeout: float = 5.0) -> bool:
        """Wait until the current connection ended."""
        return self.done.wait(timeout)

    # -- serving ------------------------------------------------------------------------------
    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.done.clear()
            self._conn = conn
            try:
                self._serve_one(conn)
            finally:
                self._conn = None
                conn.close()
                self._release_all()
                self.done.set()

    def _serve_one(self, conn: socket.socket) -> None:
        decoder = Decoder()
        try:
            while True:
                msg = decoder.next_message()
                if msg is None:
                    try:
                        data, fds = recv_chunk(conn)
                    except OSError:
                        return
                    if not data:
                        return
                    decoder.feed(data, fds)
                    continue
                with msg.fds:
                    if not self._handle(conn, msg):
                        return
        finally:
            decoder.close()

    def _handle(self, conn: socket.socket, msg: Message) -> bool:
        self.records.append(Record(msg.request, msg.flags, len(msg.fds), msg.payload))
        req = Request(msg.request)
        trick = self.misbehave.get(req)
        if trick == "close":
            return False
        if trick == "silent":
            return True
        ok = True
        reply: m.Payload | None = None
        if req == Request.GET_FEATURES:
            reply = m.U64(self.features)
        elif req == Request.GET_PROTOCOL_FEATURES:
            reply = m.U64(self.protocol_features)
        elif req == Request.GET_QUEUE_NUM:
            reply = m.U64(self.queue_num)
        elif req == Request.GET_MAX_MEM_SLOTS:
            reply = m.U64(self.max_mem_slots)
        elif req == Request.GET_STATUS:
            reply = m.U64(self.status)
        elif req == Request.GET_CONFIG:
            assert isinstance(msg.payload, m.ConfigSpace)
            size = msg.payload.size
            reply = m.ConfigSpace(msg.payload.offset, size, 0, self.config[:size].ljust(size,
                                                                                      b"\0"))
        elif req == Request.SET_STATUS:
            assert isinstance(msg.payload, m.U64)
            self.status = msg.payload.value
        elif req == Request.GET_VRING_BASE:
            assert isinstance(msg.payload, m.VringState)
            reply = m.VringState(msg.payload.index, self.vring_base)
        elif req in self.nack:
            ok = False
        elif req == Request.SET_MEM_TABLE:
            assert isinstance(msg.payload, m.MemoryTable)
            self._slow_leak(msg.fds.peek(0))
            self._release_all()
            for i, region in enumerate(msg.payload.regions):
                self._hold(region, msg.fds.take(i))
        elif req == Request.ADD_MEM_REG:
            assert isinstance(msg.payload, m.SingleMemoryRegion)
            self._slow_leak(msg.fds.peek(0))
            self._hold(msg.payload.region, msg.fds.take(0))
        elif req == Request.REM_MEM_REG:
            assert isinstance(msg.payload, m.SingleMemoryRegion)
            gone = msg.payload.region
            for held in list(self._held):
                if (held.region.guest_phys_addr, held.region.memory_size,
                        held.region.userspace_addr) == (gone.guest_phys_addr,
                                                        gone.memory_size, gone.userspace_addr):
                    self._held.remove(held)
                    self._drop(held)
        if reply is not None:
            return self._send(conn, msg.request, reply, trick)
        if msg.need_reply:
            return self._send(conn, msg.request, m.U64(0 if ok else 1), trick)
        return True

    def _send(self, conn: socket.socket, request: int, payload: m.Payload,
              trick: str | None) -> bool:
        if trick == "wrong-request":
            data = encode_reply(Request.GET_FEATURES if request != Request.GET_FEATURES
                                else Request.GET_QUEUE_NUM, payload)
        elif trick == "no-reply-flag":
            data = encode(request, payload)
        elif trick == "need-reply-flag":
            data = encode(request, payload, flags=FLAG_REPLY | FLAG_NEED_REPLY)
        elif trick == "bad-size":
            body = payload.pack() + b"\0\0\0\0"
            data = struct.pack("<III", request, FLAG_REPLY | 1, len(body)) + body
        elif isinstance(payload, m.U64) and payload.value in (0, 1) and request not in (
                Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM,
                Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS):
            data = encode_ack(request, payload.value == 0)
        else:
            data = encode_reply(request, payload)
        try:
            send_message(conn, data)
        except OSError:
            return False
        return True

    def _slow_leak(self, fd: int) -> None:
        self._memory_requests += 1
        if self.leak_every and self._memory_requests % self.leak_every == 0:
            self._dups.append(os.dup(fd))

    def _hold(self, region: m.MemoryRegion, fd: int) -> None:
        mm = mmap.mmap(fd, region.memory_size, flags=mmap.MAP_SHARED,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=region.mmap_offset)
        self._held.append(_Held(region, fd, mm))

    def _drop(self, held: _Held) -> None:
        if self.leak:
            self._leaked.append(held)
            return
        held.mm.close()
        os.close(held.fd)

    def _release_all(self) -> None:
        held, self._held = self._held, []
        for h in held:
            self._drop(h)
