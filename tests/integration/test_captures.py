"""Bytes captured from real QEMU 7.2 and DPDK 22.11 sessions (tests/data/captures).

1. The codec decodes every captured message, fed whole and one byte at a time, and
   re-encodes it to the same bytes.
2. QEMU 7.2's own request sequence, replayed against pyvhost's back-end with fresh memfds
   standing in for QEMU's guest RAM, is accepted message by message, with the replies
   QEMU waits for, and leaves the memory table QEMU meant.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import pytest

from pyvhost.backend import Server
from pyvhost.backend.connection import protocol_features_for
from pyvhost.devices.reflect import ReflectNet
from pyvhost.protocol import messages as m
from pyvhost.protocol.codec import Decoder, Message, encode, has_explicit_reply
from pyvhost.protocol.constants import (
    FLAG_NEED_REPLY,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ProtocolFeature,
    Request,
)
from pyvhost.protocol.transport import recv_chunk, send_message
from support.captures import Captured, load
from support.memfd import memfd

FILES = ["qemu72_dpdk_setmemtable.jsonl", "qemu72_memslots.jsonl",
         "dpdk_virtio_user_handshake.jsonl", "qemu100_dpdk_setmemtable.jsonl",
         "qemu100_memslots.jsonl", "qemu100_pyvhost_memslots.jsonl",
         "qemu100_pyvhost_mq2.jsonl", "qemu72_pyvhost_mq2.jsonl",
         "qemu100_pyvhost_virtio_mem.jsonl", "qemu72_pyvhost_virtio_mem.jsonl"]


def dummy_fds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]


def decode_one(c: Captured, chunked: bool) -> Message:
    dec = Decoder(replies=not c.to_backend)
    if not c.to_backend:
        dec.expect = c.request
        dec.expect_ack = len(c.raw) == 20 and c.request not in (
            Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM,
            Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS)
    fds = dummy_fds(c.nfds)
    if chunked:
        dec.feed(c.raw[:1], fds)
        msg = dec.next_message()
        assert msg is None
        for i in range(1, len(c.raw)):
            dec.feed(c.raw[i:i + 1])
            msg = dec.next_message()
            assert (msg is None) == (i < len(c.raw) - 1)
    else:
        dec.feed(c.raw, fds)
        msg = dec.next_message()
    assert msg is not None
    assert dec.buffered == 0
    return msg


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "bytewise"])
def test_codec_decodes_and_reencodes_captured_messages(name: str, chunked: bool) -> None:
    captured = load(name)
    assert len(captured) > 20
    for c in captured:
        msg = decode_one(c, chunked)
        with msg.fds:
            assert msg.request == c.request
            assert len(msg.fds) == c.nfds
            assert encode(msg.request, msg.payload, flags=msg.flags) == c.raw


def test_captures_show_what_testbed_says() -> None:
    """The facts the rest of the suite relies on, read from the real bytes."""
    qemu_dpdk = [c for c in load("qemu72_dpdk_setmemtable.jsonl") if c.to_backend]
    tables = [decode_one(c, False) for c in qemu_dpdk if c.request == Request.SET_MEM_TABLE]
    sizes = [len(t.payload.regions) for t in tables if isinstance(t.payload, m.MemoryTable)]
    # Without CONFIGURE_MEM_SLOTS every hot-plug re-sends the whole table, one fd a region.
    assert sizes == [1, 2, 3, 2]
    assert [len(t.fds) for t in tables] == sizes
    for t in tables:
        t.fds.close()
    memslots = [c.request for c in load("qemu72_memslots.jsonl") if c.to_backend]
    assert memslots.count(Request.ADD_MEM_REG) == 3
    assert memslots.count(Request.REM_MEM_REG) == 1
    assert Request.SET_MEM_TABLE not in memslots


# ---------------------------------------------------------------------------------------
# Replay against pyvhost's back-end
# ---------------------------------------------------------------------------------------

@pytest.fixture
def served() -> Iterator[tuple[Server, socket.socket]]:
    server = Server(ReflectNet)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server.adopt(b, "replay")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    a.settimeout(10)
    try:
        yield server, a
    finally:
        server.stop()
        thread.join(10)
        server.close()
        a.close()


class RamFiles:
    """One sparse memfd per guest RAM block QEMU had, keyed by its userspace address."""

    def __init__(self) -> None:
        self.fds: dict[int, int] = {}

    def fd_for(self, region: m.MemoryRegion) -> int:
        if region.userspace_addr not in self.fds:
            self.fds[region.userspace_addr] = memfd(
                region.mmap_offset + region.memory_size,
                name=f"pyvhost-replay-{region.userspace_addr:x}")
        return self.fds[region.userspace_addr]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def _reply(sock: socket.socket, request: int, ack: bool) -> m.Payload:
    dec = Decoder(replies=True)
    dec.expect, dec.expect_ack = request, ack
    while True:
        msg = dec.next_message()
        if msg is not None:
            return msg.payload
        data, fds = recv_chunk(sock)
        assert data, f"back-end closed the connection instead of answering {request}"
        dec.feed(data, fds)


@pytest.mark.parametrize("name", ["qemu72_dpdk_setmemtable.jsonl", "qemu72_memslots.jsonl",
                                  "qemu100_dpdk_setmemtable.jsonl",
                                  "qemu100_pyvhost_memslots.jsonl"])
def test_pyvhost_accepts_qemu72_sequence(served: tuple[Server, socket.socket],
                                          name: str) -> None:
    server, sock = served
    ram = RamFiles()
    eventfds: list[int] = []
    acks = 0
    offered_protocol = int(protocol_features_for(ReflectNet()))
    try:
        for c in load(name):
            if not c.to_backend:
                continue
            msg = decode_one(c, False)
            msg.fds.close()
            payload = msg.payload
            request = msg.request
            fds: list[int] = []
            if request == Request.SET_BACKEND_REQ_FD:
                continue  # QEMU sends it only to back-ends offering BACKEND_REQ
            if request in (Request.GET_CONFIG, Request.SET_CONFIG) and not (
                    offered_protocol & ProtocolFeature.CONFIG):
                continue  # captured from a back-end that offered CONFIG; ours does not
            if request == Request.SET_PROTOCOL_FEATURES:
                # QEMU acks the intersection of what it wants and what was offered (what
                # this device's connection answered to GET_PROTOCOL_FEATURES).
                assert isinstance(payload, m.U64)
                payload = m.U64(payload.value & offered_protocol)
            if request == Request.SET_FEATURES:
                assert isinstance(payload, m.U64)
                offered = ReflectNet().device_features() | VHOST_USER_F_PROTOCOL_FEATURES
                payload = m.U64(payload.value & offered)
            if isinstance(payload, m.MemoryTable):
                fds = [ram.fd_for(r) for r in payload.regions]
            elif isinstance(payload, m.SingleMemoryRegion) and request == Request.ADD_MEM_REG:
                fds = [ram.fd_for(payload.region)]
            elif isinstance(payload, m.VringFd) and not payload.nofd:
                fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                eventfds.append(fd)
                fds = [fd]
            send_message(sock, encode(request, payload, flags=msg.flags), fds)
            if has_explicit_reply(request):
                reply = _reply(sock, request, ack=False)
                if request == Request.GET_PROTOCOL_FEATURES:
                    assert isinstance(reply, m.U64)
                    offered_protocol = reply.value
            elif msg.flags & FLAG_NEED_REPLY:
                answer = _reply(sock, request, ack=True)
                assert answer == m.U64(0), f"pyvhost NACKed QEMU's {Request(request).name}"
                acks += 1
        assert acks > 0
        # The last GET_VRING_BASE was answered, so every earlier request was handled.
        conn = server.connections[0]
        table = [(r.gpa_start, r.desc.memory_size) for r in conn.memory.current.regions]
        assert table == [(0, 0x10000000), (0x108000000, 0x8000000)]
        assert not conn.closed
    finally:
        ram.close()
        for fd in eventfds:
            os.close(fd)
