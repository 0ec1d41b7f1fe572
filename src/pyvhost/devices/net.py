"""virtio-net (virtio 1.2, section 5.1): the reflector port.

``ReflectNet`` sends every frame the driver transmits straight back to it with the
Ethernet source and destination swapped, like DPDK testpmd's macswap engine, so a real
front-end can generate traffic and count what returns. Queue 0 is receiveq1, queue 1 is
transmitq1.

Guest-controlled lengths: a transmitted chain is read up to ``MAX_FRAME`` bytes past its
header; longer chains are dropped and counted, never read whole (a descriptor may claim
4 GiB).
"""

from __future__ import annotations

import struct

from pyvhost.backend.device import QueueContext, VirtioDevice
from pyvhost.memory import GuestMemory
from pyvhost.protocol.constants import VirtioFeature
from pyvhost.virtq import DescriptorChain, SplitQueue

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

RX, TX = 0, 1
#: Largest frame carried: 64 KiB of TSO payload plus Ethernet and VLAN headers.
MAX_FRAME = 65550
#: "struct virtio_net_hdr": 10 bytes, 12 with num_buffers (VERSION_1 or MRG_RXBUF).
HDR_LEGACY, HDR_V1 = 10, 12
BATCH = 64
_NUM_BUFFERS = struct.Struct("<H")
_ONE_BUFFER = b"\x01\x00"


class ReflectNet(VirtioDevice):
    """A virtio-net device that reflects every transmitted frame, MACs swapped."""

    name = "virtio-net-reflect"
    num_queues = 2
    max_queue_size = 32768

    def __init__(self, mac: bytes = b"\x52\x54\x00\x12\x34\x56") -> None:
        self.mac = mac
        self.hdr_len = HDR_V1
        self.mrg_rxbuf = False
        self.stats = {"tx_frames": 0, "tx_bytes": 0, "rx_frames": 0, "rx_bytes": 0,
                      "drop_no_rx_buffer": 0, "drop_too_big": 0, "drop_malformed": 0}

    def device_features(self) -> int:
        return int(VirtioFeature.VERSION_1 | VirtioFeature.RING_INDIRECT_DESC
                   | VirtioFeature.RING_EVENT_IDX) | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS \
            | VIRTIO_NET_F_MRG_RXBUF

    def queue_num(self) -> int:
        # QEMU compares GET_QUEUE_NUM with the number of queue *pairs* for net devices.
        return self.num_queues // 2

    def config(self) -> bytes:
        # struct virtio_net_config: mac[6], status, max_virtqueue_pairs, mtu
        return self.mac + struct.pack("<HHH", VIRTIO_NET_S_LINK_UP, 1, 1500)

    def features_acked(self, features: int) -> None:
        self.mrg_rxbuf = bool(features & VIRTIO_NET_F_MRG_RXBUF)
        self.hdr_len = HDR_V1 if features & (int(VirtioFeature.VERSION_1)
                                             | VIRTIO_NET_F_MRG_RXBUF) else HDR_LEGACY

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "mac": self.mac.hex(":"), "stats": dict(self.stats)}

    def reset(self) -> None:
        self.hdr_len = HDR_V1
        self.mrg_rxbuf = False

    def handle_kick(self, ctx: QueueContext, index: int) -> None:
        tx = ctx.queue(TX)
        if tx is None:
            return
        # Keep taking until the ring stays empty: with kicks suppressed while we work, a
        # chain made available meanwhile must not be left waiting for a kick.
        while True:
            tx.enable_kicks(False)
            chains = tx.pop_batch(ctx.mem, BATCH)
            if not chains:
                tx.enable_kicks(True)
                if tx.pending() == 0:
                    return
                continue
            self._reflect(ctx, chains)
            tx.push_used_batch([(c.head, 0) for c in chains])
            ctx.notify(TX)

    def _reflect(self, ctx: QueueContext, chains: list[DescriptorChain]) -> None:
        rx = ctx.queue(RX)
        used: list[tuple[int, int]] = []
        hdr_len = self.hdr_len
        for chain in chains:
            total = chain.readable_len
            if total < hdr_len + 14:
                self.stats["drop_malformed"] += 1
                continue
            if total > hdr_len + MAX_FRAME:
                self.stats["drop_too_big"] += 1
                continue
            data = bytearray(chain.read(ctx.mem))
            frame_len = total - hdr_len
            self.stats["tx_frames"] += 1
            self.stats["tx_bytes"] += frame_len
            # Swap destination and source MAC (bytes 0-5 and 6-11 of the frame).
            h = hdr_len
            data[h:h + 6], data[h + 6:h + 12] = data[h + 6:h + 12], data[h:h + 6]
            # The header goes back as a plain "no offload" header.
            data[0:hdr_len] = bytes(hdr_len)
            drop = "no_rx_buffer" if rx is None else write_rx_frame(
                ctx.mem, rx, data, hdr_len=hdr_len, mrg_rxbuf=self.mrg_rxbuf, used=used)
            if drop is not None:
                self.stats["drop_" + drop] += 1
                continue
            self.stats["rx_frames"] += 1
            self.stats["rx_bytes"] += frame_len
        if rx is not None and used:
            rx.push_used_batch(used)
            ctx.notify(RX)


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
    field differs.
    """
    first = rx.pop(mem)
    if first is None:
        return "no_rx_buffer"
    room = first.writable_len
    size = len(data)
    if room >= size:
        if hdr_len == HDR_V1 and data[10:12] != _ONE_BUFFER:
            data = _with_num_buffers(data, 1)
        used.append((first.head, first.write(mem, data)))
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
        n = c.write(mem, view[pos:])
        used.append((c.head, n))
        pos += n
    return None


def _with_num_buffers(data: bytes | bytearray, n: int) -> bytearray:
    buf = data if isinstance(data, bytearray) else bytearray(data)
    _NUM_BUFFERS.pack_into(buf, 10, n)
    return buf
