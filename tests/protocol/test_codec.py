"""The sans-I/O codec against hand-built wire bytes.

Every golden message below is assembled with ``struct`` straight from the layouts in
QEMU's docs/interop/vhost-user.rst, not with the code under test. Each one is fed whole,
one byte at a time, and followed by the first bytes of the next message. Received fds are
real (eventfds), so a test can tell with ``os.fstat`` whether the codec closed them.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvhost.protocol import messages as m
from pyvhost.protocol.codec import (
    REQUESTS,
    Decoder,
    FramingError,
    Message,
    MessageError,
    encode,
    encode_ack,
    encode_reply,
    has_explicit_reply,
)
from pyvhost.protocol.constants import MAX_PAYLOAD_SIZE, Request

# ---------------------------------------------------------------------------------------
# Wire bytes, by hand
# ---------------------------------------------------------------------------------------

#: "request u32, flags u32, size u32", little-endian.
HEADER = struct.Struct("<III")
V1 = 0x1  # version bits
REPLY = 0x4
NEED_REPLY = 0x8


def wire(request: int, payload: bytes = b"", flags: int = V1) -> bytes:
    return HEADER.pack(request, flags, len(payload)) + payload


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def region_bytes(gpa: int, size: int, uva: int, offset: int) -> bytes:
    # "guest address u64, size u64, user address u64, mmap offset u64"
    return struct.pack("<QQQQ", gpa, size, uva, offset)


R0 = (0x0, 0x8000_0000, 0x7F00_0000_0000, 0x0)
R1 = (0x1_0000_0000, 0x4000_0000, 0x7F80_0000_0000, 0x1000)
REGION0 = m.MemoryRegion(*R0)
REGION1 = m.MemoryRegion(*R1)


@dataclass(frozen=True)
class Golden:
    name: str
    wire: bytes
    request: int
    flags: int
    payload: m.Payload  # what the decoder must produce
    nfds: int = 0
    #: Whether ``encode`` produces exactly these bytes (a few accepted forms are not ours).
    canonical: bool = True


def _goldens() -> list[Golden]:
    r = Request
    g: list[Golden] = []

    def add(name: str, request: int, payload_wire: bytes, payload: m.Payload, nfds: int = 0,
            flags: int = V1, canonical: bool = True) -> None:
        g.append(Golden(name, wire(request, payload_wire, flags), request, flags, payload,
                        nfds, canonical))

    empty = m.Empty()
    add("GET_FEATURES", r.GET_FEATURES, b"", empty)
    add("SET_FEATURES", r.SET_FEATURES, u64(0x1_4000_0000), m.U64(0x1_4000_0000))
    add("SET_FEATURES+need_reply", r.SET_FEATURES, u64(1 << 32), m.U64(1 << 32),
        flags=V1 | NEED_REPLY)
    add("SET_OWNER", r.SET_OWNER, b"", empty)
    add("RESET_OWNER", r.RESET_OWNER, b"", empty)
    add("SET_MEM_TABLE/2", r.SET_MEM_TABLE,
        struct.pack("<II", 2, 0) + region_bytes(*R0) + region_bytes(*R1),
        m.MemoryTable((REGION0, REGION1)), nfds=2)
    add("SET_MEM_TABLE/0", r.SET_MEM_TABLE, struct.pack("<II", 0, 0), m.MemoryTable(()))
    add("SET_MEM_TABLE/8", r.SET_MEM_TABLE,
        struct.pack("<II", 8, 0) + b"".join(
            region_bytes(i << 30, 1 << 30, 0x7F00_0000_0000 + (i << 31), 0) for i in range(8)),
        m.MemoryTable(tuple(m.MemoryRegion(i << 30, 1 << 30, 0x7F00_0000_0000 + (i << 31), 0)
                            for i in range(8))), nfds=8)
    # The fixed-size struct (room for 8 regions) that some front-ends send.
    add("SET_MEM_TABLE/2-in-fixed-struct", r.SET_MEM_TABLE,
        struct.pack("<II", 2, 0) + region_bytes(*R0) + region_bytes(*R1) + bytes(6 * 32),
        m.MemoryTable((REGION0, REGION1)), nfds=2, canonical=False)
    # "Log description: log size u64, log offset u64", with the log's fd.
    add("SET_LOG_BASE", r.SET_LOG_BASE, struct.pack("<QQ", 0x10000, 0x0),
        m.LogDescription(0x10000, 0), nfds=1)
    add("SET_LOG_FD", r.SET_LOG_FD, b"", empty, nfds=1)
    add("SET_VRING_NUM", r.SET_VRING_NUM, struct.pack("<II", 1, 256), m.VringState(1, 256))
    add("SET_VRING_ADDR", r.SET_VRING_ADDR,
        # "vring index u32, flags u32, descriptor u64, used u64, available u64, log u64"
        struct.pack("<IIQQQQ", 1, 0, 0x7F00_0000_1000, 0x7F00_0000_3000,
                    0x7F00_0000_2000, 0),
        m.VringAddr(index=1, flags=0, descriptor=0x7F00_0000_1000, used=0x7F00_0000_3000,
                    available=0x7F00_0000_2000, log=0))
    add("SET_VRING_BASE", r.SET_VRING_BASE, struct.pack("<II", 0, 0xFFFE),
        m.VringState(0, 0xFFFE))
    add("GET_VRING_BASE", r.GET_VRING_BASE, struct.pack("<II", 1, 0), m.VringState(1, 0))
    # "Bits (0-7) of the payload contain the vring index. Bit 8 is the invalid FD flag."
    add("SET_VRING_KICK", r.SET_VRING_KICK, u64(3), m.VringFd(3, False), nfds=1)
    add("SET_VRING_KICK/nofd", r.SET_VRING_KICK, u64(0x100 | 3), m.VringFd(3, True))
    add("SET_VRING_CALL", r.SET_VRING_CALL, u64(0xFF), m.VringFd(0xFF, False), nfds=1)
    add("SET_VRING_ERR", r.SET_VRING_ERR, u64(0), m.VringFd(0, False), nfds=1)
    add("GET_PROTOCOL_FEATURES", r.GET_PROTOCOL_FEATURES, b"", empty)
    add("SET_PROTOCOL_FEATURES", r.SET_PROTOCOL_FEATURES, u64(0x8209), m.U64(0x8209))
    add("GET_QUEUE_NUM", r.GET_QUEUE_NUM, b"", empty)
    add("SET_VRING_ENABLE", r.SET_VRING_ENABLE, struct.pack("<II", 1, 1), m.VringState(1, 1))
    add("SEND_RARP", r.SEND_RARP, b"\x52\x54\x00\x12\x34\x56\x00\x00",
        m.Raw(b"\x52\x54\x00\x12\x34\x56\x00\x00"))
    add("NET_SET_MTU", r.NET_SET_MTU, u64(9000), m.U64(9000))
    add("SET_BACKEND_REQ_FD", r.SET_BACKEND_REQ_FD, b"", empty, nfds=1)
    add("SET_VRING_ENDIAN", r.SET_VRING_ENDIAN, struct.pack("<II", 0, 1), m.VringState(0, 1))
    # "offset u32, size u32, flags u32, payload size bytes"
    add("GET_CONFIG", r.GET_CONFIG, struct.pack("<III", 0, 8, 0) + bytes(8),
        m.ConfigSpace(0, 8, 0, bytes(8)))
    add("SET_CONFIG", r.SET_CONFIG, struct.pack("<III", 4, 2, 1) + b"\xaa\xbb",
        m.ConfigSpace(4, 2, 1, b"\xaa\xbb"))
    add("RESET_DEVICE", r.RESET_DEVICE, b"", empty)
    add("GET_MAX_MEM_SLOTS", r.GET_MAX_MEM_SLOTS, b"", empty)
    # "Single memory region description: padding u64, then the region".
    add("ADD_MEM_REG", r.ADD_MEM_REG, u64(0) + region_bytes(*R1),
        m.SingleMemoryRegion(REGION1), nfds=1)
    add("REM_MEM_REG", r.REM_MEM_REG, u64(0) + region_bytes(*R1),
        m.SingleMemoryRegion(REGION1))
    # "the back-end MAY accept messages with one file descriptor"
    add("REM_MEM_REG/compat-fd", r.REM_MEM_REG, u64(0) + region_bytes(*R1),
        m.SingleMemoryRegion(REGION1), nfds=1)
    add("SET_STATUS", r.SET_STATUS, u64(0xF), m.U64(0xF))
    add("GET_STATUS", r.GET_STATUS, b"", empty, flags=V1 | NEED_REPLY)
    return g


GOLDEN = _goldens()
GOLDEN_IDS = [g.name for g in GOLDEN]

#: A message to follow each golden one with: SET_FEATURES, 12 + 8 bytes.
NEXT = wire(Request.SET_FEATURES, u64(0xDEAD_BEEF))

# ---------------------------------------------------------------------------------------
# fd helpers
# ---------------------------------------------------------------------------------------


def new_fds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]


def assert_closed(fd: int) -> None:
    """``fd`` is closed. Call it right after the codec should have closed it: the number
    is free for reuse from then on."""
    with pytest.raises(OSError) as info:
        os.fstat(fd)
    assert info.value.errno == errno.EBADF


def assert_open(fd: int) -> None:
    os.fstat(fd)


def count_open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def drain(decoder: Decoder) -> list[Message]:
    out: list[Message] = []
    while (msg := decoder.next_message()) is not None:
        out.append(msg)
    return out


def check_message(msg: Message, g: Golden, fds: list[int]) -> None:
    """``msg`` is ``g`` decoded, carrying exactly ``fds``; then its fds are closed."""
    assert msg.request == g.request
    assert msg.flags == g.flags
    assert type(msg.payload) is type(g.payload)
    assert msg.payload == g.payload
    assert list(msg.fds) == fds
    assert msg.need_reply == bool(g.flags & NEED_REPLY)
    assert not msg.is_reply
    for fd in fds:
        assert_open(fd)  # handed over, not closed
    msg.fds.close()
    for fd in fds:
        assert_closed(fd)


# ---------------------------------------------------------------------------------------
# Golden messages
# ---------------------------------------------------------------------------------------


def test_goldens_cover_every_request_the_codec_knows() -> None:
    assert {g.request for g in GOLDEN} == set(REQUESTS)


@pytest.mark.parametrize("g", [g for g in GOLDEN if g.canonical],
                         ids=[g.name for g in GOLDEN if g.canonical])
def test_encode_produces_golden_bytes(g: Golden) -> None:
    assert encode(g.request, g.payload, flags=g.flags & NEED_REPLY) == g.wire


@pytest.mark.parametrize("g", GOLDEN, ids=GOLDEN_IDS)
def test_golden_fed_whole(g: Golden) -> None:
    dec = Decoder()
    fds = new_fds(g.nfds)
    dec.feed(g.wire, fds)
    msg = dec.next_message()
    assert msg is not None
    assert dec.next_message() is None
    assert dec.buffered == 0
    check_message(msg, g, fds)


@pytest.mark.parametrize("g", GOLDEN, ids=GOLDEN_IDS)
def test_golden_fed_one_byte_at_a_time(g: Golden) -> None:
    dec = Decoder()
    fds = new_fds(g.nfds)
    msg: Message | None = None
    for i in range(len(g.wire)):
        # The sender's fds ride on the first byte of its message.
        dec.feed(g.wire[i:i + 1], fds if i == 0 else ())
        msg = dec.next_message()
        if i < len(g.wire) - 1:
            assert msg is None, f"message complete after {i + 1} of {len(g.wire)} bytes"
            assert dec.buffered == i + 1
    assert msg is not None
    assert dec.buffered == 0
    check_message(msg, g, fds)


@pytest.mark.parametrize("g", GOLDEN, ids=GOLDEN_IDS)
@pytest.mark.parametrize("tail", [1, 11, 12, 13])
def test_golden_with_trailing_bytes(g: Golden, tail: int) -> None:
    dec = Decoder()
    fds = new_fds(g.nfds)
    if fds:
        # A read ends right after the segment that carried fds (the kernel never glues
        # data after it), so only a read that stopped inside this message can have
        # brought them; the rest of it comes with the next message's first bytes.
        dec.feed(g.wire[:1], fds)
        assert dec.next_message() is None
        dec.feed(g.wire[1:] + NEXT[:tail])
    else:
        dec.feed(g.wire + NEXT[:tail])
    msg = dec.next_message()
    assert msg is not None
    # The next message's first bytes stay buffered, and are not a message yet.
    assert dec.buffered == tail
    assert dec.next_message() is None
    assert dec.buffered == tail
    check_message(msg, g, fds)
    dec.feed(NEXT[tail:])
    nxt = dec.next_message()
    assert nxt is not None
    assert nxt.request == Request.SET_FEATURES
    assert nxt.payload == m.U64(0xDEAD_BEEF)
    assert len(nxt.fds) == 0
    assert dec.buffered == 0


def test_all_goldens_back_to_back_in_one_chunk() -> None:
    fdless = [g for g in GOLDEN if g.nfds == 0]
    dec = Decoder()
    dec.feed(b"".join(g.wire for g in fdless))
    msgs = drain(dec)
    assert len(msgs) == len(fdless)
    for msg, g in zip(msgs, fdless, strict=True):
        check_message(msg, g, [])


# ---------------------------------------------------------------------------------------
# Which message an fd belongs to
# ---------------------------------------------------------------------------------------

GET_FEATURES = wire(Request.GET_FEATURES)
KICK1 = wire(Request.SET_VRING_KICK, u64(1))
CALL2 = wire(Request.SET_VRING_CALL, u64(2))


def test_fd_in_a_later_chunk_goes_to_the_second_message() -> None:
    dec = Decoder()
    (fd,) = new_fds(1)
    # The first message and the start of the second arrive without fds; the fd comes with
    # the chunk that completes the second.
    dec.feed(GET_FEATURES + KICK1[:3])
    first = dec.next_message()
    assert first is not None and first.request == Request.GET_FEATURES
    assert len(first.fds) == 0
    assert dec.next_message() is None
    dec.feed(KICK1[3:], [fd])
    second = dec.next_message()
    assert second is not None and second.request == Request.SET_VRING_KICK
    assert list(second.fds) == [fd]
    second.fds.close()
    assert_closed(fd)


def test_fd_on_a_chunk_holding_two_messages_goes_to_the_one_it_ends_in() -> None:
    # The kernel may glue an fd-less segment before the segment that carries fds: the fds
    # then belong to the message the chunk ends in, not the one it starts with.
    dec = Decoder()
    (fd,) = new_fds(1)
    dec.feed(GET_FEATURES + KICK1, [fd])
    first, second = drain(dec)
    assert first.request == Request.GET_FEATURES and len(first.fds) == 0
    assert second.request == Request.SET_VRING_KICK and list(second.fds) == [fd]
    second.fds.close()
    assert_closed(fd)


def test_fds_of_consecutive_messages_stay_apart() -> None:
    dec = Decoder()
    fa, fb = new_fds(2)
    # A read stops right after the segment carrying fds; the rest of that segment comes in
    # the next read, glued to the next message's segment and its fds.
    dec.feed(CALL2[:4], [fa])
    assert dec.next_message() is None
    dec.feed(CALL2[4:] + KICK1, [fb])
    first, second = drain(dec)
    assert first.request == Request.SET_VRING_CALL and list(first.fds) == [fa]
    assert second.request == Request.SET_VRING_KICK and list(second.fds) == [fb]
    first.fds.close()
    assert_closed(fa)
    assert_open(fb)
    second.fds.close()
    assert_closed(fb)


def test_decoder_close_closes_fds_of_an_unfinished_message() -> None:
    dec = Decoder()
    (fd,) = new_fds(1)
    dec.feed(KICK1[:5], [fd])
    assert dec.next_message() is None
    assert_open(fd)
    dec.close()
    assert_closed(fd)
    assert dec.buffered == 0


# ---------------------------------------------------------------------------------------
# Replies
# ---------------------------------------------------------------------------------------


def reply_wire(request: int, payload: bytes) -> bytes:
    return wire(request, payload, V1 | REPLY)


REPLIES = [
    (Request.GET_FEATURES, u64(0x1_7000_0000), m.U64(0x1_7000_0000)),
    (Request.GET_PROTOCOL_FEATURES, u64(0x1_8209), m.U64(0x1_8209)),
    (Request.GET_QUEUE_NUM, u64(2), m.U64(2)),
    (Request.GET_VRING_BASE, struct.pack("<II", 1, 0x1234), m.VringState(1, 0x1234)),
    (Request.GET_CONFIG, struct.pack("<III", 0, 6, 0) + b"\x52\x54\x00\x12\x34\x56",
     m.ConfigSpace(0, 6, 0, b"\x52\x54\x00\x12\x34\x56")),
    (Request.GET_MAX_MEM_SLOTS, u64(509), m.U64(509)),
    (Request.GET_STATUS, u64(0xF), m.U64(0xF)),
]


@pytest.mark.parametrize(("request_", "body", "payload"), REPLIES,
                         ids=[r.name for r, _, _ in REPLIES])
def test_reply_golden(request_: Request, body: bytes, payload: m.Payload) -> None:
    golden = reply_wire(request_, body)
    assert encode_reply(request_, payload) == golden
    assert has_explicit_reply(request_)
    for chunking in ([golden], [golden[i:i + 1] for i in range(len(golden))]):
        dec = Decoder(replies=True)
        dec.expect = request_
        got: list[Message] = []
        for chunk in chunking:
            dec.feed(chunk)
            got.extend(drain(dec))
        assert len(got) == 1
        assert got[0].request == request_
        assert got[0].is_reply
        assert got[0].payload == payload
        assert dec.buffered == 0


def test_encode_ack_bytes() -> None:
    # REPLY_ACK: "a u64 payload: zero for success, non-zero otherwise"
    assert encode_ack(Request.SET_MEM_TABLE, True) == (
        HEADER.pack(5, V1 | REPLY, 8) + u64(0))
    nack = encode_ack(Request.ADD_MEM_REG, False)
    assert nack[:12] == HEADER.pack(37, V1 | REPLY, 8)
    assert len(nack) == 20
    assert struct.unpack("<Q", nack[12:])[0] != 0


def test_ack_decoded_for_a_request_with_its_own_reply_type() -> None:
    # With REPLY_ACK expected, even a GET_* answer is read as the u64 ack.
    dec = Decoder(replies=True)
    dec.expect = Request.SET_MEM_TABLE
    dec.expect_ack = True
    dec.feed(encode_ack(Request.SET_MEM_TABLE, False))
    msg = dec.next_message()
    assert msg is not None and msg.payload == m.U64(1)
    dec.expect = Request.GET_CONFIG
    dec.feed(reply_wire(Request.GET_CONFIG, u64(0)))
    msg = dec.next_message()
    assert msg is not None and msg.payload == m.U64(0)


def test_ack_for_a_request_without_reply_type_is_a_u64() -> None:
    assert not has_explicit_reply(Request.SET_FEATURES)
    assert not has_explicit_reply(99)
    dec = Decoder(replies=True)
    dec.feed(reply_wire(Request.SET_FEATURES, u64(0)))
    msg = dec.next_message()
    assert msg is not None and msg.payload == m.U64(0)


def test_reply_to_another_request_than_expected_is_a_framing_error() -> None:
    dec = Decoder(replies=True)
    dec.expect = Request.GET_FEATURES
    dec.feed(reply_wire(Request.GET_PROTOCOL_FEATURES, u64(0)))
    with pytest.raises(FramingError):
        dec.next_message()
    with pytest.raises(FramingError):
        dec.next_message()


def test_request_arriving_at_a_reply_decoder_is_a_framing_error() -> None:
    dec = Decoder(replies=True)
    dec.feed(wire(Request.GET_FEATURES, u64(0)))
    with pytest.raises(FramingError):
        dec.next_message()


def test_reply_carrying_an_fd_is_refused_and_the_fd_closed() -> None:
    dec = Decoder(replies=True)
    (fd,) = new_fds(1)
    dec.feed(reply_wire(Request.GET_FEATURES, u64(1)), [fd])
    with pytest.raises(MessageError):
        dec.next_message()
    assert_closed(fd)
    dec.feed(reply_wire(Request.GET_FEATURES, u64(7)))
    msg = dec.next_message()
    assert msg is not None and msg.payload == m.U64(7)


def test_reply_with_a_wrong_size_is_a_message_error() -> None:
    dec = Decoder(replies=True)
    dec.feed(reply_wire(Request.GET_FEATURES, b"\x00" * 4)
             + reply_wire(Request.GET_FEATURES, u64(3)))
    with pytest.raises(MessageError):
        dec.next_message()
    msg = dec.next_message()
    assert msg is not None and msg.payload == m.U64(3)


# ---------------------------------------------------------------------------------------
# Framing errors: sticky, and every pending fd closed
# ---------------------------------------------------------------------------------------

FRAMING = {
    "version-0": HEADER.pack(1, 0x0, 0),
    "version-2": HEADER.pack(1, 0x2, 0),
    "version-3": HEADER.pack(1, 0x3, 0),
    "reserved-bit-4": HEADER.pack(1, V1 | 0x10, 0),
    "reserved-bit-31": HEADER.pack(1, V1 | 1 << 31, 0),
    "reply-flag-on-request": HEADER.pack(1, V1 | REPLY, 0),
    "payload-over-limit": HEADER.pack(Request.SET_CONFIG, V1, MAX_PAYLOAD_SIZE + 1),
    "payload-size-u32-max": HEADER.pack(Request.SET_MEM_TABLE, V1, 0xFFFF_FFFF),
}


def assert_sticky(dec: Decoder, err: FramingError) -> None:
    assert dec.broken is err
    with pytest.raises(FramingError) as again:
        dec.next_message()
    assert again.value is err
    (late,) = new_fds(1)
    with pytest.raises(FramingError):
        dec.feed(GET_FEATURES, [late])
    assert_closed(late)
    with pytest.raises(FramingError):
        dec.next_message()


def assert_framing_error(dec: Decoder, fds: Sequence[int]) -> None:
    """The next message breaks the stream: ``fds`` are closed, nothing stays buffered, and
    the error sticks."""
    with pytest.raises(FramingError) as info:
        dec.next_message()
    for fd in fds:
        assert_closed(fd)
    assert dec.buffered == 0
    assert_sticky(dec, info.value)


@pytest.mark.parametrize("header", FRAMING.values(), ids=FRAMING.keys())
def test_framing_error_is_sticky_and_closes_pending_fds(header: bytes) -> None:
    dec = Decoder()
    fds = new_fds(2)
    # The bad header is detected as soon as it is whole; the fds that came with it are
    # closed then, without waiting for a payload.
    dec.feed(header, fds)
    assert_framing_error(dec, fds)


@pytest.mark.parametrize("header", FRAMING.values(), ids=FRAMING.keys())
def test_framing_error_after_a_good_message(header: bytes) -> None:
    dec = Decoder()
    (fd,) = new_fds(1)
    # The fd came with a chunk that ends inside the bad message: not the good one's.
    dec.feed(GET_FEATURES + header, [fd])
    good = dec.next_message()
    assert good is not None and good.request == Request.GET_FEATURES
    assert len(good.fds) == 0
    assert_open(fd)
    assert_framing_error(dec, [fd])


def test_bad_header_fed_byte_by_byte_fails_at_the_twelfth_byte() -> None:
    dec = Decoder()
    header = FRAMING["version-0"]
    for i in range(11):
        dec.feed(header[i:i + 1])
        assert dec.next_message() is None
    dec.feed(header[11:])
    with pytest.raises(FramingError):
        dec.next_message()


def test_payload_of_exactly_the_limit_is_not_a_framing_error() -> None:
    dec = Decoder()
    dec.feed(wire(99, bytes(MAX_PAYLOAD_SIZE)) + GET_FEATURES)
    with pytest.raises(MessageError):  # unknown request, but well framed
        dec.next_message()
    msg = dec.next_message()
    assert msg is not None and msg.request == Request.GET_FEATURES


def test_fds_without_bytes_are_a_framing_error() -> None:
    dec = Decoder()
    fds = new_fds(2)
    with pytest.raises(FramingError) as info:
        dec.feed(b"", fds)
    for fd in fds:
        assert_closed(fd)
    assert_sticky(dec, info.value)


def test_more_fds_than_any_message_may_carry_is_a_framing_error() -> None:
    dec = Decoder()
    fds = new_fds(9)
    dec.feed(KICK1, fds)
    assert_framing_error(dec, fds)


# ---------------------------------------------------------------------------------------
# Message errors: this message is refused, its fds closed, the stream goes on
# ---------------------------------------------------------------------------------------

TWO_REGIONS = struct.pack("<II", 2, 0) + region_bytes(*R0) + region_bytes(*R1)
NINE_REGIONS = struct.pack("<II", 9, 0) + b"".join(
    region_bytes(i << 20, 1 << 20, 0x7F00_0000_0000 + (i << 20), 0) for i in range(9))

MESSAGE_ERRORS: dict[str, tuple[bytes, int]] = {
    "GET_FEATURES-with-payload": (wire(Request.GET_FEATURES, u64(0)), 0),
    "SET_FEATURES-4-bytes": (wire(Request.SET_FEATURES, b"\x00" * 4), 0),
    "SET_FEATURES-16-bytes": (wire(Request.SET_FEATURES, b"\x00" * 16), 0),
    "SET_VRING_NUM-12-bytes": (wire(Request.SET_VRING_NUM, b"\x00" * 12), 0),
    "SET_VRING_ADDR-32-bytes": (wire(Request.SET_VRING_ADDR, b"\x00" * 32), 0),
    "ADD_MEM_REG-no-padding": (wire(Request.ADD_MEM_REG, region_bytes(*R0)), 1),
    "SET_MEM_TABLE-short-header": (wire(Request.SET_MEM_TABLE, b"\x01\x00\x00\x00"), 1),
    "SET_MEM_TABLE-says-2-has-1": (
        wire(Request.SET_MEM_TABLE, struct.pack("<II", 2, 0) + region_bytes(*R0)), 2),
    "SET_MEM_TABLE-says-1-has-2": (
        wire(Request.SET_MEM_TABLE, struct.pack("<II", 1, 0) + region_bytes(*R0)
             + region_bytes(*R1)), 1),
    "SET_MEM_TABLE-9-regions": (wire(Request.SET_MEM_TABLE, NINE_REGIONS), 8),
    "SET_MEM_TABLE-too-many-fds": (wire(Request.SET_MEM_TABLE, TWO_REGIONS), 3),
    "SET_MEM_TABLE-too-few-fds": (wire(Request.SET_MEM_TABLE, TWO_REGIONS), 1),
    "SET_MEM_TABLE-no-fds": (wire(Request.SET_MEM_TABLE, TWO_REGIONS), 0),
    "GET_FEATURES-with-fd": (GET_FEATURES, 1),
    "SET_OWNER-with-2-fds": (wire(Request.SET_OWNER), 2),
    "KICK-nofd-bit-plus-fd": (wire(Request.SET_VRING_KICK, u64(0x100 | 1)), 1),
    "KICK-without-nofd-bit-or-fd": (wire(Request.SET_VRING_KICK, u64(1)), 0),
    "CALL-two-fds": (wire(Request.SET_VRING_CALL, u64(1)), 2),
    "ERR-reserved-bit-9": (wire(Request.SET_VRING_ERR, u64(0x200)), 1),
    "ADD_MEM_REG-no-fd": (wire(Request.ADD_MEM_REG, u64(0) + region_bytes(*R0)), 0),
    "REM_MEM_REG-two-fds": (wire(Request.REM_MEM_REG, u64(0) + region_bytes(*R0)), 2),
    "SET_LOG_FD-no-fd": (wire(Request.SET_LOG_FD), 0),
    "SET_LOG_BASE-no-fd": (wire(Request.SET_LOG_BASE, struct.pack("<QQ", 4096, 0)), 0),
    "SET_LOG_BASE-u64-payload": (wire(Request.SET_LOG_BASE, u64(4096)), 1),
    "SET_CONFIG-size-mismatch": (
        wire(Request.SET_CONFIG, struct.pack("<III", 0, 8, 0) + bytes(4)), 0),
    "SET_CONFIG-over-256": (
        wire(Request.SET_CONFIG, struct.pack("<III", 0, 257, 0) + bytes(257)), 0),
    "unknown-request-99": (wire(99, b"\x01\x02"), 1),
    "unknown-request-0": (wire(0), 0),
    "IOTLB_MSG-unsupported": (wire(Request.IOTLB_MSG, bytes(64)), 1),
}


@pytest.mark.parametrize(("bad", "nfds"), MESSAGE_ERRORS.values(), ids=MESSAGE_ERRORS.keys())
def test_message_error_closes_fds_and_the_stream_goes_on(bad: bytes, nfds: int) -> None:
    dec = Decoder()
    fds = new_fds(nfds)
    (good_fd,) = new_fds(1)
    dec.feed(bad, fds)
    dec.feed(KICK1, [good_fd])
    with pytest.raises(MessageError) as info:
        dec.next_message()
    for fd in fds:
        assert_closed(fd)
    assert info.value.request == struct.unpack_from("<I", bad)[0]
    assert dec.broken is None
    nxt = dec.next_message()
    assert nxt is not None
    assert nxt.request == Request.SET_VRING_KICK
    assert list(nxt.fds) == [good_fd]
    nxt.fds.close()
    assert_closed(good_fd)


def test_message_error_keeps_need_reply_so_it_can_be_nacked() -> None:
    dec = Decoder()
    dec.feed(wire(Request.SET_FEATURES, b"\x00" * 4, V1 | NEED_REPLY))
    with pytest.raises(MessageError) as info:
        dec.next_message()
    assert info.value.need_reply
    assert info.value.request == Request.SET_FEATURES
    dec.feed(wire(Request.SET_FEATURES, b"\x00" * 4))
    with pytest.raises(MessageError) as info:
        dec.next_message()
    assert not info.value.need_reply


def test_encode_refuses_unknown_flags_and_oversized_payloads() -> None:
    with pytest.raises(ValueError):
        encode(Request.GET_FEATURES, flags=0x10)
    with pytest.raises(ValueError):
        encode(Request.SET_CONFIG, m.Raw(bytes(MAX_PAYLOAD_SIZE + 1)))


# ---------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
REGIONS = st.builds(m.MemoryRegion, U64, U64, U64, U64)


def _with(requests: Sequence[Request], payloads: st.SearchStrategy[m.Payload],
          nfds: int | None = None) -> st.SearchStrategy[tuple[int, m.Payload, int]]:
    def fds_of(p: m.Payload) -> int:
        if nfds is not None:
            return nfds
        if isinstance(p, m.VringFd):
            return 0 if p.nofd else 1
        assert isinstance(p, m.MemoryTable)
        return len(p.regions)
    return st.tuples(st.sampled_from(list(requests)), payloads).map(
        lambda t: (int(t[0]), t[1], fds_of(t[1])))


R = Request
VALID_REQUESTS = st.one_of(
    _with([R.GET_FEATURES, R.SET_OWNER, R.RESET_OWNER, R.GET_PROTOCOL_FEATURES,
           R.GET_QUEUE_NUM, R.RESET_DEVICE, R.GET_MAX_MEM_SLOTS, R.GET_STATUS],
          st.just(m.Empty()), 0),
    _with([R.SET_LOG_FD, R.SET_BACKEND_REQ_FD], st.just(m.Empty()), 1),
    _with([R.SET_FEATURES, R.SET_PROTOCOL_FEATURES, R.NET_SET_MTU, R.SET_STATUS],
          st.builds(m.U64, U64), 0),
    _with([R.SET_VRING_NUM, R.SET_VRING_BASE, R.GET_VRING_BASE, R.SET_VRING_ENABLE,
           R.SET_VRING_ENDIAN], st.builds(m.VringState, U32, U32), 0),
    _with([R.SET_VRING_ADDR], st.builds(m.VringAddr, U32, U32, U64, U64, U64, U64), 0),
    _with([R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR],
          st.builds(m.VringFd, st.integers(0, 255), st.booleans())),
    _with([R.SET_MEM_TABLE],
          st.lists(REGIONS, max_size=8).map(lambda rs: m.MemoryTable(tuple(rs)))),
    _with([R.ADD_MEM_REG], st.builds(m.SingleMemoryRegion, REGIONS), 1),
    _with([R.REM_MEM_REG], st.builds(m.SingleMemoryRegion, REGIONS), 0),
    _with([R.GET_CONFIG, R.SET_CONFIG],
          st.tuples(U32, U32, st.binary(max_size=256)).map(
              lambda t: m.ConfigSpace(t[0], len(t[2]), t[1], t[2])), 0),
    _with([R.SET_LOG_BASE], st.builds(m.LogDescription, U64, U64), 1),
    _with([R.SEND_RARP], st.binary(max_size=64).map(m.Raw), 0),
)


@st.composite
def cut_points(draw: st.DrawFn, length: int, forced: Sequence[int] = ()) -> list[int]:
    """Sorted chunk boundaries in ``(0, length]``, always including ``length``."""
    cuts = set(draw(st.lists(st.integers(1, max(1, length)), max_size=8)))
    cuts.update(forced)
    cuts.add(length)
    return sorted(c for c in cuts if 0 < c <= length)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=st.lists(st.tuples(VALID_REQUESTS, st.booleans()), min_size=1, max_size=5),
       data=st.data())
def test_round_trip_in_any_chunking(msgs: list[tuple[tuple[int, m.Payload, int], bool]],
                                    data: st.DataObject) -> None:
    wires: list[bytes] = []
    fds: list[list[int]] = []
    for (request, payload, nfds), need_reply in msgs:
        flags = NEED_REPLY if need_reply else 0
        b = encode(request, payload, flags=flags)
        # The header, read back by hand.
        assert HEADER.unpack_from(b) == (request, V1 | flags, len(b) - 12)
        wires.append(b)
        fds.append(new_fds(nfds))
    stream = b"".join(wires)
    starts: list[int] = []
    ends: list[int] = []
    pos = 0
    for b in wires:
        starts.append(pos)
        pos += len(b)
        ends.append(pos)
    # As the kernel does: a read ends right after the segment that carried fds.
    forced = [end for end, f in zip(ends, fds, strict=True) if f]
    cuts = data.draw(cut_points(len(stream), forced))
    dec = Decoder()
    got: list[Message] = []
    prev = 0
    for cut in cuts:
        # fds ride on the first byte of their message.
        chunk_fds = [fd for start, f in zip(starts, fds, strict=True) if prev <= start < cut
                     for fd in f]
        dec.feed(stream[prev:cut], chunk_fds)
        got.extend(drain(dec))
        prev = cut
    assert dec.buffered == 0
    assert len(got) == len(msgs)
    for msg, ((request, payload, _), need_reply), f in zip(got, msgs, fds, strict=True):
        assert msg.request == request
        assert msg.need_reply == need_reply
        assert msg.payload == payload
        assert list(msg.fds) == f
        msg.fds.close()
    for f in fds:
        for fd in f:
            assert_closed(fd)


def _header(t: tuple[int, int, bytes]) -> bytes:
    request, flags, body = t
    return HEADER.pack(request, flags, len(body)) + body


#: Byte soup that often looks like vhost-user: random bytes, plausible messages with random
#: payloads, and headers announcing any size.
PIECES = st.one_of(
    st.binary(max_size=40),
    st.tuples(st.integers(0, 45), st.sampled_from([0x1, 0x9, 0x0, 0x5, 0x11, 0x3]),
              st.binary(max_size=300)).map(_header),
    st.tuples(st.integers(0, 45), U32).map(lambda t: HEADER.pack(t[0], V1, t[1])),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=st.lists(PIECES, max_size=8), replies=st.booleans(), data=st.data())
def test_byte_soup_raises_only_codec_errors_and_leaks_no_fd(
        pieces: list[bytes], replies: bool, data: st.DataObject) -> None:
    soup = b"".join(pieces)
    cuts = data.draw(cut_points(len(soup))) if soup else [0]
    before = count_open_fds()
    created: list[int] = []
    dec = Decoder(replies=replies)
    prev = 0
    broken = False
    for cut in cuts:
        nfds = data.draw(st.integers(0, 10))
        fds = new_fds(nfds)
        created.extend(fds)
        try:
            dec.feed(soup[prev:cut], fds)
        except FramingError:
            broken = True
        prev = cut
        while True:
            try:
                msg = dec.next_message()
            except FramingError:
                broken = True
                break
            except MessageError:
                assert not broken
                continue
            assert not broken, "a message came out of a broken decoder"
            if msg is None:
                break
            msg.fds.close()
    dec.close()
    for fd in created:
        assert_closed(fd)
    assert count_open_fds() == before
