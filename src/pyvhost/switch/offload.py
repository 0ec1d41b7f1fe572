"""Checksum and TCP segmentation offload in software, for the switch (virtio 1.2, 5.1.6).

A frame inside the switch is a 12-byte ``struct virtio_net_hdr`` followed by the Ethernet
frame (see :mod:`.core`); the header travels with the frame. This module owns the three
things done with that header:

- :func:`check_ingress`: a port received a frame; every header field its sender controls is
  checked against the frame and against the offloads the sender negotiated. A frame that
  fails is dropped by the port and counted as ``malformed`` (:class:`HeaderError`).
- :func:`adapt_egress`: a port is about to send a frame; where the port did not negotiate
  what the header asks for, the work is done here: the partial checksum is completed
  (NEEDS_CSUM without GUEST_CSUM) and a TCP GSO frame is cut into segments (without
  GUEST_TSO4/6), each with its own IP length, id, header checksum, TCP sequence number,
  flags and checksum.
- :func:`internet_checksum`: RFC 1071, the checksum both need.

It knows no port, ring or fd, and keeps no state: bytes in, bytes out.

Memory-safety: every offset read from a header (``csum_start``, ``csum_offset``,
``hdr_len``, the IP header length, the TCP data offset) is checked against the frame's
length before it is used, so a hostile header can make a frame dropped, never an index
outside the frame (Python slicing would not fault, but would silently compute a wrong
checksum or a short segment).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .core import MAX_ETHERNET, NET_HDR

# virtio_net_hdr.flags
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_F_RSC_INFO = 4
# virtio_net_hdr.gso_type
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80

#: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset (little-endian: VERSION_1).
_VNET = struct.Struct("<BBHHHH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q = 0x0800, 0x86DD, 0x8100
IPPROTO_TCP = 6
TCP_CSUM_OFFSET = 16
TCP_FIN, TCP_PSH, TCP_CWR = 0x01, 0x08, 0x80
#: A GSO frame is cut into at most this many segments; more is refused as malformed. It
#: bounds the work one guest frame can cause (a 64 KiB frame with gso_size 1 would be
#: 65535 segments); Linux does not send TCP segments smaller than 48 bytes
#: (net.ipv4.tcp_min_snd_mss), and 65535 / 48 < 1400.
MAX_SEGMENTS = 1400
#: No MSS is larger than the largest frame.
MAX_GSO_SIZE = MAX_ETHERNET
_NO_OFFLOAD = bytes(10)  # flags .. csum_offset, all zero
_ZERO_FIELDS = bytes(8)  # hdr_len .. csum_offset


class Offload(enum.IntFlag):
    """Offloads of one direction of one port: what its sender may ask for (ingress:
    CSUM, HOST_TSO4/6) or what its receiver takes (egress: GUEST_CSUM, GUEST_TSO4/6)."""

    NONE = 0
    CSUM = 1
    TSO4 = 2
    TSO6 = 4


ALL = Offload.CSUM | Offload.TSO4 | Offload.TSO6


class HeaderError(Exception):
    """A header field the sender controls is invalid; the frame is dropped and counted."""


@dataclass(frozen=True, slots=True)
class TcpLayout:
    """Offsets into a frame (counted from the start of the switch's frame, virtio-net
    header included) of a TCP segment over IPv4 or IPv6."""

    l3: int
    l4: int
    payload: int
    ipv6: bool


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The 16-bit one's complement sum of ``data`` (RFC 1071; an odd length is padded with
    a zero byte), added to ``initial``; not complemented.

    The sum of 16-bit words modulo 0xFFFF equals the big-endian integer of the data
    modulo 0xFFFF (2**16 is 1 modulo 0xFFFF), which Python computes in C; a one's
    complement sum is 0 only for all-zero input, else 0xFFFF stands for 0.
    """
    if len(data) % 2:
        data = bytes(data) + b"\0"
    n = int.from_bytes(data, "big") + initial
    r = n % 0xFFFF
    return 0xFFFF if r == 0 and n else r


def _fold(value: int) -> int:
    """The checksum to store: the complement of a one's complement sum; 0 is sent as
    0xFFFF (as Linux's skb_checksum_help does: CSUM_MANGLED_0)."""
    return (~value & 0xFFFF) or 0xFFFF


# -- ingress ---------------------------------------------------------------------------------

def check_ingress(frame: bytes | bytearray, allowed: Offload, *,
                  kernel: bool = False) -> bytes | bytearray:
    """Check the header of a frame a port received; return the frame to switch.

    ``allowed`` is what the sender negotiated. ``kernel`` is for a tap: the kernel may set
    DATA_VALID ("checksum verified") and may send a GSO frame without NEEDS_CSUM (a
    forwarded frame whose checksums are already complete), which a virtio driver may not.
    A frame without offload has its other header fields zeroed (they mean nothing then,
    and a tap refuses a frame whose hdr_len exceeds its length). Raises :class:`HeaderError`.
    """
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = _VNET.unpack_from(frame)
    length = len(frame) - NET_HDR
    if not flags and not gso_type:
        if frame[2:10] != _ZERO_FIELDS:
            frame = bytearray(frame)
            frame[2:10] = _ZERO_FIELDS
        return frame
    # "The driver MUST NOT set the VIRTIO_NET_HDR_F_DATA_VALID and
    # VIRTIO_NET_HDR_F_RSC_INFO bits in flags."
    known = VIRTIO_NET_HDR_F_NEEDS_CSUM | (VIRTIO_NET_HDR_F_DATA_VALID if kernel else 0)
    if flags & ~known:
        raise HeaderError(f"flags {flags:#x} not allowed")
    needs_csum = bool(flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)
    if needs_csum:
        # "If VIRTIO_NET_F_CSUM is not negotiated, the driver MUST set flags to zero".
        if not allowed & Offload.CSUM:
            raise HeaderError("NEEDS_CSUM without VIRTIO_NET_F_CSUM")
        # The checksum field must lie inside the frame: "csum_start + csum_offset + 2 <=
        # length" is what makes the store at csum_start + csum_offset safe.
        if csum_start + csum_offset + 2 > length:
            raise HeaderError(f"csum_start {csum_start} + csum_offset {csum_offset} "
                              f"past the end of a {length}-byte frame")
    if hdr_len > length:
        raise HeaderError(f"hdr_len {hdr_len} exceeds the frame length {length}")
    if gso_type == VIRTIO_NET_HDR_GSO_NONE:
        return frame
    if gso_type == VIRTIO_NET_HDR_GSO_TCPV4:
        need = Offload.TSO4
    elif gso_type == VIRTIO_NET_HDR_GSO_TCPV6:
        need = Offload.TSO6
    else:
        # UDP, or the ECN bit: never offered, so never allowed.
        raise HeaderError(f"gso_type {gso_type:#x} not negotiated")
    # "If none of the VIRTIO_NET_F_HOST_TSO4, TSO6 or UFO options have been negotiated,
    # the driver MUST set gso_type to VIRTIO_NET_HDR_GSO_NONE."
    if not allowed & need:
        raise HeaderError(f"gso_type {gso_type} not negotiated")
    # "If gso_type differs from VIRTIO_NET_HDR_GSO_NONE, then the driver MUST also set
    # the VIRTIO_NET_HDR_F_NEEDS_CSUM bit in flags and MUST set gso_size to indicate the
    # desired MSS."
    if not needs_csum and not kernel:
        raise HeaderError("GSO frame without NEEDS_CSUM")
    tcp = tcp_layout(frame, gso_type)
    if needs_csum and (csum_start != tcp.l4 - NET_HDR or csum_offset != TCP_CSUM_OFFSET):
        raise HeaderError(f"csum_start {csum_start}/csum_offset {csum_offset} do not "
                          "point at the TCP checksum")
    payload = len(frame) - tcp.payload
    if not 0 < gso_size <= MAX_GSO_SIZE:
        raise HeaderError(f"gso_size {gso_size}")
    if payload <= 0:
        raise HeaderError("GSO frame without TCP payload")
    if -(-payload // gso_size) > MAX_SEGMENTS:
        raise HeaderError(f"gso_size {gso_size} makes more than {MAX_SEGMENTS} segments")
    return frame


def needs(flags: int, gso_type: int) -> Offload:
    """What a receiver must have negotiated to be given a frame whose header
    :func:`check_ingress` accepted (from a driver: ``kernel`` false) *as it is*, i.e.
    what :func:`adapt_egress` leaves unchanged for it: TSO4 or TSO6 for a GSO frame (its
    NEEDS_CSUM is then set), CSUM for NEEDS_CSUM alone, nothing for no offload. The
    forward step (:mod:`.forward`, compiled too) sends such a frame itself to a receiver
    that has it; any other receiver takes it on the Python path."""
    if gso_type == VIRTIO_NET_HDR_GSO_TCPV4:
        return Offload.TSO4
    if gso_type == VIRTIO_NET_HDR_GSO_TCPV6:
        return Offload.TSO6
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        return Offload.CSUM
    return Offload.NONE


def tcp_layout(frame: bytes | bytearray, gso_type: int) -> TcpLayout:
    """Where the IP and TCP headers and the payload of a GSO frame are; checks that it
    really is TCP over the IP version ``gso_type`` names, unfragmented, with lengths that
    agree with the frame. At most one 802.1Q tag; no IPv6 extension headers. Raises
    :class:`HeaderError`."""
    end = len(frame)
    l3 = NET_HDR + 14
    if end < l3:
        raise HeaderError("no Ethernet header")
    ethertype = _U16.unpack_from(frame, l3 - 2)[0]
    if ethertype == ETH_P_8021Q:
        l3 += 4
        if end < l3:
            raise HeaderError("truncated VLAN tag")
        ethertype = _U16.unpack_from(frame, l3 - 2)[0]
    if gso_type == VIRTIO_NET_HDR_GSO_TCPV4:
        if ethertype != ETH_P_IP or end < l3 + 20 or frame[l3] >> 4 != 4:
            raise HeaderError("GSO_TCPV4 frame is not IPv4")
        ihl = (frame[l3] & 0xF) * 4
        if ihl < 20 or end < l3 + ihl:
            raise HeaderError(f"bad IPv4 header length {ihl}")
        if _U16.unpack_from(frame, l3 + 2)[0] != end - l3:
            raise HeaderError("IPv4 total length does not match the frame")
        if _U16.unpack_from(frame, l3 + 6)[0] & 0x3FFF:
            raise HeaderError("IPv4 fragment")
        if frame[l3 + 9] != IPPROTO_TCP:
            raise HeaderError("GSO_TCPV4 frame is not TCP")
        l4 = l3 + ihl
        ipv6 = False
    else:
        if ethertype != ETH_P_IPV6 or end < l3 + 40 or frame[l3] >> 4 != 6:
            raise HeaderError("GSO_TCPV6 frame is not IPv6")
        if frame[l3 + 6] != IPPROTO_TCP:
            raise HeaderError("GSO_TCPV6 frame is not TCP (extension headers unsupported)")
        if _U16.unpack_from(frame, l3 + 4)[0] != end - l3 - 40:
            raise HeaderError("IPv6 payload length does not match the frame")
        l4 = l3 + 40
        ipv6 = True
    if end < l4 + 20:
        raise HeaderError("truncated TCP header")
    doff = (frame[l4 + 12] >> 4) * 4
    if doff < 20 or end < l4 + doff:
        raise HeaderError(f"bad TCP data offset {doff}")
    return TcpLayout(l3, l4, l4 + doff, ipv6)


# -- egress ----------------------------------------------------------------------------------

def adapt_egress(frame: bytes | bytearray,
                 accepts: Offload) -> Sequence[bytes | bytearray]:
    """The frames to send to a receiver that takes ``accepts``, for one switched frame
    (which :func:`check_ingress` accepted): the frame itself when the receiver handles
    what its header asks, else the checksum completed or the segments. "If
    VIRTIO_NET_F_GUEST_CSUM is not negotiated, the device MUST set flags to zero and
    SHOULD supply a fully checksummed packet to the driver"; "If none of the
    VIRTIO_NET_F_GUEST_TSO4, TSO6 ... options have been negotiated, the device MUST set
    gso_type to VIRTIO_NET_HDR_GSO_NONE". Raises :class:`HeaderError` only for a frame
    check_ingress would have refused."""
    flags = frame[0]
    gso_type = frame[1]
    if gso_type:
        need = Offload.TSO4 if gso_type == VIRTIO_NET_HDR_GSO_TCPV4 else Offload.TSO6
        # A receiver taking GSO must also be given NEEDS_CSUM ("If gso_type differs from
        # NONE, then the device MUST also set the NEEDS_CSUM bit"); a kernel frame
        # without it is segmented instead.
        if accepts & need and flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            return (frame,)
        return segment(frame)
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        if accepts & Offload.CSUM:
            return (frame,)
        return (complete_checksum(frame),)
    if flags and not accepts & Offload.CSUM:
        out = bytearray(frame)
        out[0] = 0  # DATA_VALID: only for a receiver that negotiated GUEST_CSUM
        return (out,)
    return (frame,)


def complete_checksum(frame: bytes | bytearray) -> bytearray:
    """Finish a NEEDS_CSUM frame: "the checksum from csum_start to the end of the packet
    is stored at csum_start + csum_offset" (the field holds the pseudo-header sum the
    sender left there). The header then says no offload. Raises :class:`HeaderError` if
    the checksum field is not inside the frame."""
    _, _, _, _, csum_start, csum_offset = _VNET.unpack_from(frame)
    start = NET_HDR + csum_start
    at = start + csum_offset
    if at + 2 > len(frame):
        raise HeaderError("checksum field past the end of the frame")
    out = bytearray(frame)
    out[0:10] = _NO_OFFLOAD
    _U16.pack_into(out, at, _fold(internet_checksum(memoryview(out)[start:])))
    return out


def segment(frame: bytes | bytearray) -> list[bytearray]:
    """Cut a TCP GSO frame into segments of at most gso_size bytes of payload, each fully
    checksummed and with a "no offload" header (what Linux's tcp_gso_segment does):
    IPv4 total length, id (+1 a segment) and header checksum; IPv6 payload length; TCP
    sequence number; FIN and PSH only on the last segment, CWR only on the first; the TCP
    checksum over the pseudo-header. Raises :class:`HeaderError`."""
    gso_type = frame[1]
    gso_size = _VNET.unpack_from(frame)[3]
    if gso_size == 0:
        raise HeaderError("gso_size 0")
    layout = tcp_layout(frame, gso_type & ~VIRTIO_NET_HDR_GSO_ECN)
    l3, l4, start = layout.l3, layout.l4, layout.payload
    headers = bytes(10) + frame[10:start]
    data = memoryview(frame)[start:]
    count = max(1, -(-len(data) // gso_size))
    if count > MAX_SEGMENTS:
        raise HeaderError(f"more than {MAX_SEGMENTS} segments")
    seq = _U32.unpack_from(frame, l4 + 4)[0]
    tcp_flags = frame[l4 + 13]
    tcp_hlen = start - l4
    if layout.ipv6:
        pseudo_addrs = internet_checksum(frame[l3 + 8:l3 + 40])
        ip_id = 0
    else:
        pseudo_addrs = internet_checksum(frame[l3 + 12:l3 + 20])
        ip_id = _U16.unpack_from(frame, l3 + 4)[0]
    segments: list[bytearray] = []
    for i in range(count):
        chunk = data[i * gso_size:(i + 1) * gso_size]
        seg = bytearray(headers)
        seg += chunk
        tcp_len = tcp_hlen + len(chunk)
        if layout.ipv6:
            _U16.pack_into(seg, l3 + 4, tcp_len)
        else:
            ihl = l4 - l3
            _U16.pack_into(seg, l3 + 2, ihl + tcp_len)
            _U16.pack_into(seg, l3 + 4, (ip_id + i) & 0xFFFF)
            _U16.pack_into(seg, l3 + 10, 0)
            _U16.pack_into(seg, l3 + 10, _fold(internet_checksum(seg[l3:l4])))
        _U32.pack_into(seg, l4 + 4, (seq + i * gso_size) & 0xFFFFFFFF)
        f = tcp_flags
        if i != count - 1:
            f &= ~(TCP_FIN | TCP_PSH)
        if i:
            f &= ~TCP_CWR
        seg[l4 + 13] = f
        _U16.pack_into(seg, l4 + TCP_CSUM_OFFSET, 0)
        # Pseudo-header: addresses, protocol, TCP length (the IPv6 form has the same
        # one's complement sum: the zero bytes add nothing).
        pseudo = pseudo_addrs + IPPROTO_TCP + tcp_len
        csum = internet_checksum(memoryview(seg)[l4:], pseudo)
        _U16.pack_into(seg, l4 + TCP_CSUM_OFFSET, _fold(csum))
        segments.append(seg)
    return segments
