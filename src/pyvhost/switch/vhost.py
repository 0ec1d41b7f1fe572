"""A vhost-user connection as a port of the switch: the ``SwitchPort`` virtio-net device.

On a kick of its transmit queue the device takes the chains the driver made available,
checks each frame and hands the good ones to the :class:`~.core.Switch` in one batch; the
switch calls :meth:`VhostPort.deliver` on other ports, which writes frames into this
device's receive queue through its connection (:meth:`DeviceHost.run_device`), so the
connection's memory snapshot is held and a guest error breaks this port's queue only.

Queue 0 is receiveq1, queue 1 is transmitq1 (virtio 1.2, 5.1.2). Features offered:
VERSION_1, EVENT_IDX, MAC, STATUS, MRG_RXBUF; no checksum or segmentation offload yet, so
every header a driver sends must say "no offload" (checked, else the frame is malformed).
RING_INDIRECT_DESC is not offered: with it, DPDK 22.11's virtio_user front-end crashed in
its own transmit path (testpmd txonly, segfault in librte_net_virtio) within seconds
against this port; without it, never in the same runs.

Guest-controlled lengths: a transmitted chain is read only when its readable length is
between a minimal Ethernet frame and :data:`~.core.MAX_ETHERNET` plus the header; other
chains are dropped and counted, never read (a descriptor may claim 4 GiB).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from pyvhost.backend.device import DeviceHost, QueueContext, VirtioDevice
from pyvhost.devices.net import (
    HDR_LEGACY,
    HDR_V1,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
    write_rx_frame,
)
from pyvhost.memory import GuestMemory
from pyvhost.protocol.constants import VirtioFeature
from pyvhost.virtq import DescriptorChain, SplitQueue, VirtqueueError

from .core import MAX_ETHERNET, NET_HDR, Port, Switch

RX, TX = 0, 1
#: Chains taken from the transmit ring per batch, and per turn of the loop: a busy port
#: yields after TX_BUDGET frames so that the others (and the control socket) are served.
BATCH = 64
TX_BUDGET = 256


class VhostPort(Port):
    """The switch's view of a :class:`SwitchPort`."""

    kind = "vhost-user"

    def __init__(self, device: SwitchPort) -> None:
        super().__init__("vhost-user")
        self.device = device

    def deliver(self, frames: Sequence[bytes | bytearray]) -> None:
        self.device.deliver(frames)

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "mac": self.device.mac.hex(":")}


class SwitchPort(VirtioDevice):
    """A virtio-net device whose frames go through a :class:`Switch`."""

    name = "virtio-net-switch-port"
    num_queues = 2
    max_queue_size = 32768

    def __init__(self, switch: Switch, mac: bytes = b"\x52\x54\x00\x12\x34\x56") -> None:
        self.switch = switch
        self.mac = mac
        self.hdr_len = HDR_V1
        self.mrg_rxbuf = False
        self.host: DeviceHost | None = None
        self.port = VhostPort(self)
        self.joined = False

    # -- VirtioDevice --------------------------------------------------------------------
    def device_features(self) -> int:
        return int(VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX) \
            | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MRG_RXBUF

    def queue_num(self) -> int:
        # QEMU compares GET_QUEUE_NUM with the number of queue *pairs* for net devices.
        return self.num_queues // 2

    def config(self) -> bytes:
        # struct virtio_net_config: mac[6], status, max_virtqueue_pairs, mtu
        return self.mac + struct.pack("<HHH", VIRTIO_NET_S_LINK_UP, 1, 1500)

    def attach(self, host: DeviceHost) -> None:
        self.host = host
        self.port.name = host.name
        self._join()

    def features_acked(self, features: int) -> None:
        self.mrg_rxbuf = bool(features & VIRTIO_NET_F_MRG_RXBUF)
        self.hdr_len = HDR_V1 if features & (int(VirtioFeature.VERSION_1)
                                             | VIRTIO_NET_F_MRG_RXBUF) else HDR_LEGACY
        self._join()

    def reset(self) -> None:
        """Connection closed or reset: the port leaves the switch (its MACs are flushed);
        a reset connection that negotiates again joins again."""
        self.hdr_len = HDR_V1
        self.mrg_rxbuf = False
        if self.joined:
            self.joined = False
            self.switch.remove_port(self.port)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "mac": self.mac.hex(":"), "port": self.port.name,
                "counters": self.port.counters.as_dict()}

    def _join(self) -> None:
        if not self.joined:
            self.joined = True
            self.switch.add_port(self.port)

    # -- transmit queue: frames from the guest into the switch -----------------------------
    def handle_kick(self, ctx: QueueContext, index: int) -> None:
        if index != TX:
            return  # new receive buffers: frames only wait in the sender's ring, not here
        tx = ctx.queue(TX)
        if tx is None:
            return
        mem = ctx.mem
        served = 0
        while True:
            # Kicks stay off while we work; a chain made available meanwhile is seen by
            # the pending() check after they are back on.
            tx.enable_kicks(False)
            chains, error = _pop_batch(tx, mem, BATCH)
            if error is not None:
                # A chain the queue can not serve (a descriptor outside guest memory, a
                # loop, ...): the queue is broken (the connection reports it). Frames
                # read before it still go through.
                self.port.counters.drop_rx("bad_descriptor")
                self.switch.receive(self.port, self._ingress(mem, chains))
                raise error
            if not chains:
                tx.enable_kicks(True)
                if tx.pending() == 0:
                    return
                continue
            frames = self._ingress(mem, chains)
            tx.push_used_batch([(c.head, 0) for c in chains])
            ctx.notify(TX)
            self.switch.receive(self.port, frames)
            served += len(chains)
            if served >= TX_BUDGET and self.host is not None:
                # Let the other ports run; come back on the loop's next turn (kicks stay
                # off until then: we will look at the ring anyway).
                self.host.serve_again(TX)
                return

    def _ingress(self, mem: GuestMemory, chains: list[DescriptorChain]) -> list[bytes]:
        """The frames of ``chains`` that may enter the switch, with a 12-byte header."""
        hdr_len = self.hdr_len
        counters = self.port.counters
        smallest = hdr_len + 14
        largest = hdr_len + MAX_ETHERNET
        frames: list[bytes] = []
        for chain in chains:
            total = chain.readable_len
            if total < smallest:
                counters.drop_rx("malformed")
                continue
            if total > largest:
                counters.drop_rx("too_big")
                continue
            data = chain.read(mem, total)
            # "If VIRTIO_NET_F_CSUM is not negotiated, the driver MUST set flags to zero";
            # "If none of the VIRTIO_NET_F_HOST_TSO4, TSO6 or UFO options have been
            # negotiated, the driver MUST set gso_type to VIRTIO_NET_HDR_GSO_NONE" (0).
            if data[0] or data[1]:
                counters.drop_rx("malformed")
                continue
            if hdr_len != NET_HDR:
                data = data[:hdr_len] + b"\0\0" + data[hdr_len:]
            frames.append(data)
        return frames

    # -- receive queue: frames from the switch to the guest --------------------------------
    def deliver(self, frames: Sequence[bytes | bytearray]) -> None:
        """Write ``frames`` into the receive queue; count what went and what was dropped."""
        done = False

        def write(ctx: QueueContext) -> None:
            nonlocal done
            done = True
            self._write(ctx, frames)

        if self.host is not None:
            self.host.run_device(RX, write)
        if not done:
            self.port.counters.drop_tx("port_down", len(frames))

    def _write(self, ctx: QueueContext, frames: Sequence[bytes | bytearray]) -> None:
        counters = self.port.counters
        rx = ctx.queue(RX)
        if rx is None:
            counters.drop_tx("port_down", len(frames))
            return
        mem = ctx.mem
        hdr_len = self.hdr_len
        mrg = self.mrg_rxbuf
        used: list[tuple[int, int]] = []
        sent = nbytes = done = 0
        try:
            for data in frames:
                if hdr_len != NET_HDR:
                    data = data[:hdr_len] + data[NET_HDR:]
                reason = write_rx_frame(mem, rx, data, hdr_len=hdr_len, mrg_rxbuf=mrg,
                                        used=used)
                done += 1
                if reason is None:
                    sent += 1
                    nbytes += len(data)
                else:
                    counters.drop_tx(reason)
        except VirtqueueError:
            # The guest broke its receive ring: this frame and the rest are lost here,
            # and the chains already filled can not be returned (the queue is broken).
            counters.drop_tx("bad_descriptor", len(frames) - done + sent)
            sent = nbytes = 0
            raise
        finally:
            counters.tx_frames += sent
            counters.tx_bytes += nbytes - hdr_len * sent
        if used:
            rx.push_used_batch(used)
            ctx.notify(RX)


def _pop_batch(queue: SplitQueue, mem: GuestMemory,
               limit: int) -> tuple[list[DescriptorChain], VirtqueueError | None]:
    """Up to ``limit`` chains; stops at the first the queue refuses, and returns its error
    beside the chains taken before it."""
    chains: list[DescriptorChain] = []
    try:
        while len(chains) < limit:
            chain = queue.pop(mem)
            if chain is None:
                break
            chains.append(chain)
    except VirtqueueError as e:
        return chains, e
    return chains, None
