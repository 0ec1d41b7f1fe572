"""virtio-net (virtio 1.2, section 5.1): what every pyvhost net device shares.

The feature bits, the header sizes, the config space layout, and :func:`write_rx_frame`,
which writes one frame into a receive queue (MRG_RXBUF included). The reflector
(:mod:`.reflect`) and the switch's ports (:mod:`pyvhost.switch.vhost`) both build on it;
it owns no device and no queue.
"""

from __future__ import annotations

import struct

from pyvhost.memory import GuestMemory
from pyvhost.virtq import SplitQueue

# virtio 1.2, 5.1.3 "Feature bits".
VIRTIO_NET_F_CSUM = 1 << 0
VIRTIO_NET_F_GUEST_CSUM = 1 << 1
VIRTIO_NET_F_MTU = 1 << 3
VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_GUEST_TSO4 = 1 << 7
VIRTIO_NET_F_GUEST_TSO6 = 1 << 8
VIRTIO_NET_F_GUEST_ECN = 1 << 9
VIRTIO_NET_F_GUEST_UFO = 1 << 10
VIRTIO_NET_F_HOST_TSO4 = 1 << 11
VIRTIO_NET_F_HOST_TSO6 = 1 << 12
VIRTIO_NET_F_HOST_ECN = 1 << 13
VIRTIO_NET_F_HOST_UFO = 1 << 14
VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VIRTIO_NET_F_STATUS = 1 << 16
VIRTIO_NET_F_CTRL_VQ = 1 << 17
VIRTIO_NET_F_MQ = 1 << 22
VIRTIO_NET_S_LINK_UP = 1

#: Queue 0 of a pair is receiveq, queue 1 transmitq (virtio 1.2, 5.1.2).
RX, TX = 0, 1
#: Largest frame carried: 64 KiB of TSO payload plus Ethernet and VLAN headers.
MAX_FRAME = 65550
#: "struct virtio_net_hdr": 10 bytes, 12 with num_buffers (VERSION_1 or MRG_RXBUF).
HDR_LEGACY, HDR_V1 = 10, 12
_NUM_BUFFERS = struct.Struct("<H")
_CONFIG_TAIL = struct.Struct("<HHH")
_ONE_BUFFER = b"\x01\x00"




def net_config(mac: bytes, max_virtqueue_pairs: int = 1, mtu: int = 1500) -> bytes:
    """``struct virtio_net_config``: mac[6], status, max_virtqueue_pairs, mtu (the link
    is always up)."""
    return mac + _CONFIG_TAIL.pack(VIRTIO_NET_S_LINK_UP, max_virtqueue_pairs, mtu)


def write_rx_frame(mem: GuestMemory, rx: SplitQueue, data: bytes | bytearray, *,
                   hdr_len: int, mrg_rxbuf: bool, used: list[tuple[int, int]]) -> str | None:
    """Write one frame (``hdr_len`` bytes of virtio-net header, then the Ethernet frame)
    into the receive queue's buffers. Appends the chains used to ``used`` (the caller
    returns them in one batch); returns None on success, else the drop reason:
    ``no_rx_buffer`` or ``too_big``. A frame is never truncated: a dropped frame leaves
    the chains it looked at in the ring, untouched.

    With a 12-byte header, ``num_buffers`` is set to the number of chains used ("the
    device MUST set num_buffers to the number of descriptors used ..."; 1 without
    MRG_RXBUF). A ``bytearray`` is patched in place, ``bytes`` are copied only when the
    field differs. While the front-end logs, every buffer written is marked in the
    queue's dirty log (``rx.log``); the used elements are marked when they are pushed.
    """
    first = rx.pop(mem)
    if first is None:
        return "no_rx_buffer"
    room = first.writable_len
    size = len(data)
    if room >= size:
        if hdr_len == HDR_V1 and data[10:12] != _ONE_BUFFER:
            data = _with_num_buffers(data, 1)
        used.append((first.head, first.write(mem, data, rx.log)))
        return None
    if not mrg_rxbuf:
        # Without MRG_RXBUF a frame must fit one chain; the chain goes back untouched.
        rx.unpop(1)
        return "too_big"
    chains = [first]
    while room < size:
        nxt = rx.pop(mem)
        if nxt is None:
            # Not enough buffers: put back what we took, for the next frame.
            rx.unpop(len(chains))
            return "no_rx_buffer"
        chains.append(nxt)
        room += nxt.writable_len
    view = memoryview(_with_num_buffers(data, len(chains)))
    pos = 0
    for c in chains:
        n = c.write(mem, view[pos:], rx.log)
        used.append((c.head, n))
        pos += n
    return None


def _with_num_buffers(data: bytes | bytearray, n: int) -> bytearray:
    buf = data if isinstance(data, bytearray) else bytearray(data)
    _NUM_BUFFERS.pack_into(buf, 10, n)
    return buf
