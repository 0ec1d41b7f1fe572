"""The switch's software offloads (:mod:`pyvhost.switch.offload`) against an independent
checksum, with hypothesis: segments reassemble into the payload they came from, every
checksum verifies, and every bad header a sender could write is refused."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvhost.switch.offload import (
    ALL,
    MAX_SEGMENTS,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    HeaderError,
    Offload,
    adapt_egress,
    check_ingress,
    complete_checksum,
    internet_checksum,
    segment,
)

NET_HDR = 12
SRC4, DST4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
SRC6 = bytes.fromhex("fd000000000000000000000000000001")
DST6 = bytes.fromhex("fd0000000000000000000000000000ff")
ETH = bytes.fromhex("020000000002" "020000000001")
FIN, SYN, PSH, ACK, CWR = 0x01, 0x02, 0x08, 0x10, 0x80


def ones_sum(data: bytes) -> int:
    """RFC 1071 the slow, obvious way: 16-bit words, end-around carry (independent of the
    module's integer trick)."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for (word,) in struct.iter_unpack(">H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return total


def verifies(data: bytes) -> bool:
    """A block with its checksum inside sums to 0xFFFF (one's complement zero)."""
    return ones_sum(data) == 0xFFFF


def vnet(flags: int = 0, gso_type: int = 0, hdr_len: int = 0, gso_size: int = 0,
         csum_start: int = 0, csum_offset: int = 0) -> bytes:
    return struct.pack("<BBHHHHH", flags, gso_type, hdr_len, gso_size, csum_start,
                       csum_offset, 0)


@dataclass
class Built:
    frame: bytes
    l3: int  # offsets in the Ethernet frame (after the virtio-net header)
    l4: int
    payload: bytes


def tcp_frame(payload: bytes, *, ipv6: bool = False, mss: int = 1448, flags: int = ACK | PSH,
              seq: int = 1000, ip_id: int = 7, vlan: bool = False, options: bytes = b"",
              gso: bool = True) -> Built:
    """A TCP frame as a Linux or DPDK driver hands it over with TSO: NEEDS_CSUM, the
    pseudo-header sum in the TCP checksum field, total lengths of the whole frame."""
    eth = ETH + (b"\x81\x00\x00\x05" if vlan else b"") + (b"\x86\xdd" if ipv6 else b"\x08\x00")
    tcp_hlen = 20 + len(options)
    tcp = struct.pack(">HHIIBBHHH", 40000, 5201, seq, 1, (tcp_hlen // 4) << 4, flags,
                      65535, 0, 0) + options
    tcp_len = tcp_hlen + len(payload)
    ip: bytes | bytearray
    if ipv6:
        ip = struct.pack(">IHBB", 6 << 28, tcp_len, 6, 64) + SRC6 + DST6
        pseudo = ones_sum(SRC6 + DST6 + struct.pack(">IxxxB", tcp_len, 6))
    else:
        ip = bytearray(struct.pack(">BBHHHBBH", 0x45, 0, 20 + tcp_len, ip_id, 0x4000, 64, 6,
                                   0) + SRC4 + DST4)
        struct.pack_into(">H", ip, 10, ~ones_sum(bytes(ip)) & 0xFFFF)
        pseudo = ones_sum(SRC4 + DST4 + struct.pack(">xBH", 6, tcp_len))
    l3 = len(eth)
    l4 = l3 + len(ip)
    tcp = tcp[:16] + struct.pack(">H", pseudo) + tcp[18:]
    gso_type = (VIRTIO_NET_HDR_GSO_TCPV6 if ipv6 else VIRTIO_NET_HDR_GSO_TCPV4) if gso else 0
    hdr = vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, l4 + tcp_hlen, mss if gso else 0,
               l4, 16)
    return Built(hdr + eth + bytes(ip) + tcp + payload, l3, l4, payload)


def check_segments(built: Built, segments: list[bytearray], mss: int, *, ipv6: bool,
                   seq: int, flags: int, ip_id: int) -> None:
    """Each segment is a complete, correct TCP/IP packet; together they carry the payload."""
    got = b""
    for i, seg in enumerate(segments):
        s = bytes(seg)
        assert s[:10] == bytes(10), "segments carry a no-offload header"
        eth = s[NET_HDR:]
        l3, l4 = built.l3, built.l4
        assert eth[:l3] == built.frame[NET_HDR:NET_HDR + l3]
        doff = (eth[l4 + 12] >> 4) * 4
        data = eth[l4 + doff:]
        last = i == len(segments) - 1
        assert len(data) == (mss if not last else len(built.payload) - mss * i)
        tcp_len = len(eth) - l4
        if ipv6:
            assert struct.unpack_from(">H", eth, l3 + 4)[0] == tcp_len
            pseudo = eth[l3 + 8:l3 + 40] + struct.pack(">IxxxB", tcp_len, 6)
        else:
            assert struct.unpack_from(">H", eth, l3 + 2)[0] == len(eth) - l3
            assert struct.unpack_from(">H", eth, l3 + 4)[0] == (ip_id + i) & 0xFFFF
            assert verifies(eth[l3:l4]), "IPv4 header checksum"
            pseudo = eth[l3 + 12:l3 + 20] + struct.pack(">xBH", 6, tcp_len)
        assert verifies(pseudo + eth[l4:]), f"TCP checksum of segment {i}"
        assert struct.unpack_from(">I", eth, l4 + 4)[0] == (seq + i * mss) & 0xFFFFFFFF
        want = flags
        if not last:
            want &= ~(FIN | PSH)
        if i:
            want &= ~CWR
        assert eth[l4 + 13] == want
        got += data
    assert got == built.payload


@settings(max_examples=150, deadline=None)
@given(payload=st.binary(min_size=1, max_size=9000), mss=st.integers(1, 3000),
       ipv6=st.booleans(), vlan=st.booleans(), seq=st.integers(0, 2**32 - 1),
       ip_id=st.integers(0, 0xFFFF),
       flags=st.sampled_from([ACK, ACK | PSH, ACK | PSH | FIN, ACK | CWR | PSH, ACK | FIN]),
       options=st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(range(8))]))
def test_segments_reassemble_and_verify(payload: bytes, mss: int, ipv6: bool, vlan: bool,
                                        seq: int, ip_id: int, flags: int,
                                        options: bytes) -> None:
    if -(-len(payload) // mss) > MAX_SEGMENTS:
        mss = -(-len(payload) // MAX_SEGMENTS)
    built = tcp_frame(payload, ipv6=ipv6, mss=mss, flags=flags, seq=seq, ip_id=ip_id,
                      vlan=vlan, options=options)
    assert check_ingress(built.frame, ALL) is built.frame
    segments = segment(built.frame)
    check_segments(built, segments, mss, ipv6=ipv6, seq=seq, flags=flags, ip_id=ip_id)
    # The same through adapt_egress for a receiver without TSO; kept whole with it.
    no_tso = adapt_egress(built.frame, Offload.CSUM)
    assert [bytes(s) for s in no_tso] == [bytes(s) for s in segments]
    need = Offload.TSO6 if ipv6 else Offload.TSO4
    assert list(adapt_egress(built.frame, Offload.CSUM | need)) == [built.frame]


@settings(max_examples=150, deadline=None)
@given(payload=st.binary(min_size=0, max_size=3000), ipv6=st.booleans())
def test_completed_checksum_verifies(payload: bytes, ipv6: bool) -> None:
    built = tcp_frame(payload, ipv6=ipv6, gso=False)
    assert check_ingress(built.frame, Offload.CSUM) is built.frame
    (out,) = adapt_egress(built.frame, Offload.NONE)
    assert out[:10] == bytes(10)
    eth = bytes(out[NET_HDR:])
    # Only the checksum field changed.
    at = built.l4 + 16
    assert eth[:at] + eth[at + 2:] == built.frame[NET_HDR:NET_HDR + at] + \
        built.frame[NET_HDR + at + 2:]
    tcp_len = len(eth) - built.l4
    if ipv6:
        pseudo = SRC6 + DST6 + struct.pack(">IxxxB", tcp_len, 6)
    else:
        pseudo = SRC4 + DST4 + struct.pack(">xBH", 6, tcp_len)
    assert verifies(pseudo + eth[built.l4:])
    # A receiver with GUEST_CSUM gets the partial checksum as it was.
    assert list(adapt_egress(built.frame, Offload.CSUM)) == [built.frame]


@given(st.binary(max_size=2000), st.integers(0, 0xFFFF))
def test_internet_checksum_matches_the_obvious_loop(data: bytes, initial: int) -> None:
    ours = internet_checksum(data, initial)
    ref = ones_sum(data + b"\0" * (len(data) % 2))
    ref = (ref + initial)
    ref = (ref & 0xFFFF) + (ref >> 16)
    # 0 and 0xFFFF are the same number in one's complement.
    assert ours % 0xFFFF == ref % 0xFFFF


def test_udp_checksum_completed_at_any_offset() -> None:
    """NEEDS_CSUM is not only for TCP: any csum_start/csum_offset inside the frame."""
    # The field holds the sender's partial sum (a pseudo-header's, say 0x1234); the
    # completed checksum covers the data plus that sum.
    body = bytearray(range(200))
    body[12:14] = b"\x12\x34"  # csum_start 20 is body[6], + csum_offset 6
    frame = vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 20, 6) + ETH + b"\x88\xb5" + body
    check_ingress(frame, Offload.CSUM)
    out = complete_checksum(frame)
    assert out[:10] == bytes(10)
    assert verifies(bytes(out[NET_HDR + 20:]) + b"\x12\x34")


def test_plain_frame_untouched_and_junk_fields_cleared() -> None:
    frame = bytes(NET_HDR) + ETH + b"\x88\xb5" + bytes(50)
    assert check_ingress(frame, Offload.NONE) is frame
    assert list(adapt_egress(frame, Offload.NONE)) == [frame]
    junk = vnet(0, 0, 9999, 5, 3, 3) + frame[NET_HDR:]
    assert bytes(check_ingress(junk, Offload.NONE)) == frame


def test_data_valid_from_the_kernel_only_and_cleared_for_a_receiver_without_csum() -> None:
    frame = vnet(VIRTIO_NET_HDR_F_DATA_VALID) + ETH + b"\x88\xb5" + bytes(50)
    with pytest.raises(HeaderError):
        check_ingress(frame, ALL)  # "The driver MUST NOT set ... DATA_VALID"
    assert check_ingress(frame, ALL, kernel=True) is frame
    assert list(adapt_egress(frame, Offload.CSUM)) == [frame]
    (out,) = adapt_egress(frame, Offload.NONE)
    assert out[0] == 0


def test_kernel_gso_without_needs_csum_is_segmented() -> None:
    built = tcp_frame(bytes(3000), mss=1000)
    frame = bytearray(built.frame)
    frame[0] = 0
    with pytest.raises(HeaderError):
        check_ingress(bytes(frame), ALL)
    check_ingress(bytes(frame), ALL, kernel=True)
    assert len(adapt_egress(bytes(frame), ALL)) == 3


def _mutate(frame: bytes, at: int, fmt: str, value: int) -> bytes:
    out = bytearray(frame)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


V4 = tcp_frame(bytes(4000), mss=1000)
V6 = tcp_frame(bytes(4000), ipv6=True, mss=1000)
E4 = NET_HDR + V4.l3  # IPv4 header offset in the switch's frame
T4 = NET_HDR + V4.l4


@pytest.mark.parametrize(("frame", "allowed"), [
    pytest.param(V4.frame, Offload.CSUM | Offload.TSO6, id="tso4-not-negotiated"),
    pytest.param(V6.frame, Offload.CSUM | Offload.TSO4, id="tso6-not-negotiated"),
    pytest.param(V4.frame, Offload.NONE, id="csum-not-negotiated"),
    pytest.param(_mutate(V4.frame, 0, "<B", 0x5), ALL, id="rsc-info-flag"),
    pytest.param(_mutate(V4.frame, 0, "<B", 0), ALL, id="gso-without-needs-csum"),
    pytest.param(_mutate(V4.frame, 1, "<B", 3), ALL, id="gso-udp"),
    pytest.param(_mutate(V4.frame, 1, "<B", 0x81), ALL, id="gso-ecn"),
    pytest.param(_mutate(V4.frame, 1, "<B", VIRTIO_NET_HDR_GSO_TCPV6), ALL, id="v4-as-v6"),
    pytest.param(_mutate(V6.frame, 1, "<B", VIRTIO_NET_HDR_GSO_TCPV4), ALL, id="v6-as-v4"),
    pytest.param(_mutate(V4.frame, 2, "<H", len(V4.frame)), ALL, id="hdr-len-past-end"),
    pytest.param(_mutate(V4.frame, 4, "<H", 0), ALL, id="gso-size-zero"),
    pytest.param(_mutate(V4.frame, 4, "<H", 1), ALL, id="too-many-segments"),
    pytest.param(_mutate(V4.frame, 6, "<H", 0xFFFF), ALL, id="csum-start-past-end"),
    pytest.param(_mutate(V4.frame, 8, "<H", 0xFFF0), ALL, id="csum-offset-past-end"),
    pytest.param(_mutate(V4.frame, 8, "<H", 6), ALL, id="csum-not-at-tcp-checksum"),
    pytest.param(_mutate(V4.frame, E4 + 9, ">B", 17), ALL, id="ipv4-not-tcp"),
    pytest.param(_mutate(V4.frame, E4, ">B", 0x44), ALL, id="ipv4-ihl-too-small"),
    pytest.param(_mutate(V4.frame, E4, ">B", 0x4F), ALL, id="ipv4-options-mismatch"),
    pytest.param(_mutate(V4.frame, E4 + 2, ">H", 100), ALL, id="ipv4-total-length"),
    pytest.param(_mutate(V4.frame, E4 + 6, ">H", 0x2000), ALL, id="ipv4-fragment"),
    pytest.param(_mutate(V4.frame, NET_HDR + 12, ">H", 0x86DD), ALL, id="ethertype"),
    pytest.param(_mutate(V4.frame, T4 + 12, ">B", 0x40), ALL, id="tcp-doff-too-small"),
    pytest.param(_mutate(V6.frame, NET_HDR + V6.l3 + 6, ">B", 0), ALL, id="ipv6-ext-hdr"),
    pytest.param(_mutate(V6.frame, NET_HDR + V6.l3 + 4, ">H", 9), ALL, id="ipv6-length"),
    pytest.param(tcp_frame(b"", mss=100).frame, ALL, id="gso-without-payload"),
    pytest.param(V4.frame[:NET_HDR + V4.l4 + 10], ALL, id="truncated-tcp-header"),
    pytest.param(vnet(1, 0, 0, 0, 50, 0) + ETH + b"\x88\xb5" + bytes(36), ALL,
                 id="needs-csum-field-past-end"),
])
def test_bad_headers_are_refused(frame: bytes, allowed: Offload) -> None:
    with pytest.raises(HeaderError):
        check_ingress(frame, allowed)


def test_the_good_ones_pass() -> None:
    assert check_ingress(V4.frame, ALL) is V4.frame
    assert check_ingress(V6.frame, ALL) is V6.frame
    assert len(segment(V4.frame)) == 4 and len(segment(V6.frame)) == 4
