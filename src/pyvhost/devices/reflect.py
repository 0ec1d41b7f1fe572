"""virtio-net (virtio 1.2, section 5.1): the reflector port.

``ReflectNet`` sends every frame the driver transmits straight back to it with the
Ethernet source and destination swapped, like DPDK testpmd's macswap engine, so a real
front-end can generate traffic and count what returns. Queue 0 is receiveq1, queue 1 is
transmitq1.

Guest-controlled lengths: a transmitted chain is read up to ``MAX_FRAME`` bytes past its
header; longer chains are dropped and counted, never read whole (a descriptor may claim
4 GiB).

The per-frame work is :mod:`pyvhost.datapath`'s: one call per burst of chains, compiled
where the extension is built. On the compiled path a region that shrinks under its
mapping closes this connection (:class:`~pyvhost.memory.MemoryFaultError`); on the
pure-Python path it kills the process with SIGBUS. While the front-end logs dirty pages
(a live migration: the queues carry a dirty log), each kick is served by
:data:`pyvhost.datapath.LoggingReflector`, the path that marks the log (the compiled one
where it runs and libatomic is found, else the pure one); ``logging_kicks`` counts those
kicks.
"""

from __future__ import annotations

import weakref

from pyvhost import datapath
from pyvhost.backend.device import DeviceHost, QueueContext, VirtioDevice
from pyvhost.protocol.constants import VirtioFeature
from pyvhost.virtq import SplitQueue

from .virtio_net import (
    HDR_LEGACY,
    HDR_V1,
    RX,
    TX,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    net_config,
)

#: Full bursts served per kick before the loop gets its turn back: a driver that keeps the
#: transmit ring full (faster than the pure-Python path drains it) must not starve the
#: connection's control messages (a memory table update waited over 30 s for one) or the
#: other connections. The rest is served on the loop's next turn (:meth:`serve_again`).
KICK_BURSTS = 8


class ReflectNet(VirtioDevice):
    """A virtio-net device that reflects every transmitted frame, MACs swapped."""

    name = "virtio-net-reflect"
    num_queues = 2
    max_queue_size = 32768
    logs_dirty_pages = True

    def __init__(self, mac: bytes = b"\x52\x54\x00\x12\x34\x56") -> None:
        self.mac = mac
        self.hdr_len = HDR_V1
        self.mrg_rxbuf = False
        self._path = datapath.Reflector()
        self._logging_path = datapath.LoggingReflector()
        #: Kicks served while the queues carried a dirty log (on the logging path).
        self.logging_kicks = 0
        # Weak: the connection owns this device; a strong reference back would make a
        # cycle that keeps every closed connection until the cycle collector runs.
        self._host: weakref.ref[DeviceHost] | None = None
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
        return {"name": self.name, "mac": self.mac.hex(":"), "stats": dict(self.stats),
                "data_path": datapath.name(), "logging_data_path": datapath.logging_name(),
                "logging_kicks": self.logging_kicks}

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

    def attach(self, host: DeviceHost) -> None:
        self._host = weakref.ref(host)

    def kick_queues(self, index: int) -> tuple[int, ...]:
        # A kick of either queue runs the burst, which takes from TX and writes into RX.
        return (TX, RX)

    def receive_queues(self) -> tuple[int, ...]:
        return (RX,)

    def reset(self) -> None:
        self.hdr_len = HDR_V1
        self.mrg_rxbuf = False

    def handle_kick(self, ctx: QueueContext, index: int) -> None:
        tx = ctx.queue(TX)
        if tx is None:
            return
        rx = ctx.queue(RX)
        path = self._path
        if tx.log is not None or (rx is not None and rx.log is not None):
            # The front-end logs (a live migration): the path that marks every write.
            path = self._logging_path
            self.logging_kicks += 1
        burst = path.burst
        limit = datapath.BURST
        st = self.stats
        before = (st["tx_frames"], st["tx_bytes"], st["rx_frames"], st["rx_bytes"])
        try:
            # A full burst means more may be waiting; a short one saw the ring empty with
            # kicks enabled again.
            full = 0
            while burst(ctx.mem, tx, rx, self.hdr_len, self.mrg_rxbuf, limit, st) == limit:
                _notify(ctx, rx, tx)
                full += 1
                host = self._host() if self._host is not None else None
                if full == KICK_BURSTS and host is not None:
                    host.serve_again(index)  # the rest on the loop's next turn
                    break
        finally:
            _notify(ctx, rx, tx)
            # Per-queue counters (metrics), once per kick: what the bursts took and wrote.
            ctx.account(TX, st["tx_frames"] - before[0], st["tx_bytes"] - before[1])
            ctx.account(RX, st["rx_frames"] - before[2], st["rx_bytes"] - before[3])


def _notify(ctx: QueueContext, *queues: SplitQueue | None) -> None:
    """Signal the driver for each queue the burst published to, if it asked to be (the
    burst took the decision: ``notify_decided``)."""
    for q in queues:
        if q is not None and q.notify_decided is not None:
            ctx.notify(q.index)
