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

from pyvhost.backend.device import QueueContext, VirtioDevice
from pyvhost.protocol.constants import VirtioFeature
from pyvhost.virtq import DescriptorChain

from .virtio_net import (
    HDR_LEGACY,
    HDR_V1,
    MAX_FRAME,
    RX,
    TX,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    net_config,
    write_rx_frame,
)

#: Chains taken from the transmit ring per batch.
BATCH = 64


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
        return net_config(self.mac)

    def features_acked(self, features: int) -> None:
        self.mrg_rxbuf = bool(features & VIRTIO_NET_F_MRG_RXBUF)
        self.hdr_len = HDR_V1 if features & (int(VirtioFeature.VERSION_1)
                                             | VIRTIO_NET_F_MRG_RXBUF) else HDR_LEGACY

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "mac": self.mac.hex(":"), "stats": dict(self.stats)}

    def port_counters(self) -> dict[str, object]:
        """:attr:`stats` as a switch counts a port (pyvhost's side: ``rx`` what the
        driver transmitted, ``tx`` what was written back to it), for metrics."""
        st = self.stats
        return {"rx_frames": st["tx_frames"], "rx_bytes": st["tx_bytes"],
                "tx_frames": st["rx_frames"], "tx_bytes": st["rx_bytes"],
                "rx_drops": {r: st["drop_" + r] for r in ("too_big", "malformed")
                             if st["drop_" + r]},
                "tx_drops": {"no_rx_buffer": st["drop_no_rx_buffer"]}
                if st["drop_no_rx_buffer"] else {}}

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
            taken, nbytes = self._reflect(ctx, chains)
            tx.push_used_batch([(c.head, 0) for c in chains])
            ctx.notify(TX)
            ctx.account(TX, taken, nbytes)

    def _reflect(self, ctx: QueueContext, chains: list[DescriptorChain]) -> tuple[int, int]:
        """Reflect the frames of ``chains``; returns the frames taken and their bytes
        (the receive queue's share is accounted here)."""
        rx = ctx.queue(RX)
        used: list[tuple[int, int]] = []
        hdr_len = self.hdr_len
        taken = taken_bytes = written = written_bytes = 0
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
            taken += 1
            taken_bytes += frame_len
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
            written += 1
            written_bytes += frame_len
        if rx is not None and used:
            rx.push_used_batch(used)
            ctx.notify(RX)
        if written:
            ctx.account(RX, written, written_bytes)
        return taken, taken_bytes
