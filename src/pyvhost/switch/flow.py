"""The flow hash that picks a receive queue of a port with several enabled (VIRTIO_NET_F_MQ).

One function, :func:`flow_hash`, used by every path that writes a frame into a port with
several receive queues: the Python path (:meth:`~.vhost.SwitchPort.deliver`), the pure
forward step (:mod:`.forward`) and, in C, the compiled one (``flow_hash`` in
``pyvhost/datapath/_switch.pxi``, held equal by tests/datapath/test_switch_differential.py).
A frame goes to ``queues[flow_hash(frame) % len(queues)]`` of the port's enabled receive
queues in queue order, so the frames of one flow stay on one queue, in order, whichever
path carries them.

The hash is zlib's CRC-32 of the Ethernet addresses, then for IPv4 / IPv6 the IP
addresses and protocol and (TCP or UDP, IPv4 unfragmented) the ports, else the
EtherType. It owns no state and reads only inside the frame: every field is a slice,
and a slice past the end is shorter (a truncated frame hashes what it has).
"""

from __future__ import annotations

import zlib

from .core import NET_HDR

#: Bytes of the Ethernet frame the hash may read: an IPv4 header of the largest IHL (60)
#: after the Ethernet header (14), then both ports (4). The compiled step reads no more.
HASHED = 14 + 60 + 4


def flow_hash(frame: bytes | bytearray, start: int = NET_HDR) -> int:
    """A hash of the flow of the Ethernet frame at ``frame[start:]`` (after the
    virtio-net header, by default the switch's 12 bytes)."""
    e = start
    ethertype = frame[e + 12:e + 14]
    l3 = e + 14
    if ethertype == b"\x08\x00" and len(frame) >= l3 + 20:
        ihl = (frame[l3] & 0xF) * 4
        key = frame[l3 + 12:l3 + 20] + frame[l3 + 9:l3 + 10]
        # The ports only where they are: TCP or UDP, not a fragment (offset 0, no MF).
        if frame[l3 + 9] in (6, 17) and not frame[l3 + 6] & 0x3F | frame[l3 + 7]:
            key += frame[l3 + ihl:l3 + ihl + 4]
        return zlib.crc32(key, zlib.crc32(frame[e:e + 12]))
    if ethertype == b"\x86\xdd" and len(frame) >= l3 + 40:
        key = frame[l3 + 8:l3 + 40] + frame[l3 + 6:l3 + 7]
        if frame[l3 + 6] in (6, 17):
            key += frame[l3 + 40:l3 + 44]
        return zlib.crc32(key, zlib.crc32(frame[e:e + 12]))
    return zlib.crc32(frame[e:e + 14])
