"""A vhost-user connection as a port of the switch: the ``SwitchPort`` virtio-net device.

On a kick of its transmit queue the device runs its forward step (:mod:`.forward`,
compiled where the extension is built) one burst at a time: the step takes the chains,
the device consults and updates the switch's MAC table once for the burst (routes are
cached while the table and the ports do not change: :meth:`SwitchPort._route`), holds
every egress port's memory through its connection for the burst (the host's
``enter_device``: :meth:`~pyvhost.backend.device.DeviceHost.enter_device`), and the step
copies each frame from this guest's buffers straight into the egress ports' receive
chains, then returns the transmitted chains. A guest error breaks the queue of the port
whose guest made it, a guest-memory fault (a region's file shrank) closes that port's
connection only; the other ports go on. Frames the step leaves to Python take the old
path: bytes handed to the :class:`~.core.Switch`, which calls :meth:`VhostPort.deliver`
on each egress port, which writes them into this device's receive queue. Those are
frames with an offload header (checked by the step as :func:`~.offload.check_ingress`
checks it) to a port that did not negotiate what it asks (completed or segmented by
:func:`~.offload.adapt_egress`), and frames to a tap, to a port with no receive queue
enabled (``port_down``), or to a port with a receive queue that carries a dirty log the
compiled step can not mark (no libatomic: :func:`pyvhost.datapath.serves_log`). Of a port
with several receive queues enabled, each frame goes to the one its flow hash picks
(:func:`~.flow.flow_hash`), on either path. A transmit queue that carries such a log runs
the pure-Python step; both steps mark the logs they serve.

Queues 2k and 2k+1 are receiveq(k+1) and transmitq(k+1) (virtio 1.2, 5.1.2); with
``queue_pairs`` > 1 the port offers VIRTIO_NET_F_MQ and max_virtqueue_pairs. With
vhost-user the control queue belongs to the front-end (QEMU, DPDK virtio_user), which
turns pairs on and off with SET_VRING_ENABLE: every enabled transmit queue is served on
its kicks, and frames for the driver go to one enabled receive queue chosen by a hash of
their flow (:func:`flow_hash`), so one flow stays in order.

Features offered: VERSION_1, RING_INDIRECT_DESC, EVENT_IDX, MAC, STATUS, MRG_RXBUF, CSUM,
GUEST_CSUM, HOST_TSO4/6, GUEST_TSO4/6 (and MQ). A transmitted header is checked against
what the driver negotiated (by the forward step, as :func:`~.offload.check_ingress`; bad
ones are dropped and counted as ``malformed``) and travels with the frame; on the way to
a driver that did not negotiate what a header asks for, the switch completes the checksum
or segments the frame (:func:`~.offload.adapt_egress`).
(RING_INDIRECT_DESC was withheld for a while, wrongly blamed for a DPDK testpmd crash
whose cause was the used index briefly reading 0: see ``store_le16`` in
:mod:`pyvhost.virtq.split`.)

Guest-controlled lengths: a transmitted chain is read only when its readable length is
between a minimal Ethernet frame and :data:`~.core.MAX_ETHERNET` plus the header; other
chains are dropped and counted, never read (a descriptor may claim 4 GiB).
"""

from __future__ import annotations

import functools
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from pyvhost import datapath
from pyvhost.backend.device import DeviceHost, QueueContext, VirtioDevice
from pyvhost.devices.virtio_net import (
    HDR_LEGACY,
    HDR_V1,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    net_config,
    write_rx_frame,
)
from pyvhost.memory import MemoryFaultError
from pyvhost.protocol.constants import VirtioFeature
from pyvhost.virtq import SplitQueue, VirtqueueError

from . import forward
from .core import MAX_ETHERNET, NET_HDR, Port, Switch
from .flow import flow_hash
from .offload import HeaderError, Offload, adapt_egress

log = logging.getLogger(__name__)

RX, TX = 0, 1
#: Most queue pairs a port offers (virtio allows 0x8000; this bounds fds and rings).
MAX_QUEUE_PAIRS = 64
#: The mtu field of the config space; non-GSO frames longer than it (plus ETH_OVERHEAD:
#: an Ethernet header and one VLAN tag) are dropped (``too_big``), not passed to a driver.
#: VIRTIO_NET_F_MTU is not offered (DPDK 22.11's virtio_user is not known to read the
#: field), so the limit is not announced: it is the size Linux's virtio_net sizes its
#: receive buffers for without GUEST_TSO (GOOD_PACKET_LEN).
DEFAULT_MTU = 1500
ETH_OVERHEAD = 18
#: The oldest sighting of no destination: routes that found none never age.
_NEVER_SEEN = float("inf")
#: Chains taken from the transmit ring per burst (the forward step's Python work is per
#: burst: profiled, a burst of 64 spent more time in Python than in the copies), and per
#: turn of the loop: a busy port yields after TX_BUDGET frames so that the others (and
#: the control socket) are served. The bursts after the first of a turn run inside the
#: forward step while the routes hold (``again``: no Python between them); measured in
#: BENCHMARKS.md (issue 12), a budget of four bursts where it was one.
BATCH = 256
TX_BUDGET = 1024


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
    """A virtio-net device whose frames go through a :class:`Switch`, with
    ``queue_pairs`` receive/transmit queue pairs."""

    name = "virtio-net-switch-port"
    num_queues = 2
    max_queue_size = 32768
    #: Frames reach guest memory through write_rx_frame and the queues' used-ring methods
    #: only, which mark the dirty log while the front-end logs (live migration).
    logs_dirty_pages = True
    announces = True

    def __init__(self, switch: Switch, mac: bytes = b"\x52\x54\x00\x12\x34\x56", *,
                 queue_pairs: int = 1, mtu: int = DEFAULT_MTU) -> None:
        if not 1 <= queue_pairs <= MAX_QUEUE_PAIRS:
            raise ValueError(f"queue_pairs must be 1 to {MAX_QUEUE_PAIRS}, not {queue_pairs}")
        if not 68 <= mtu <= MAX_ETHERNET - ETH_OVERHEAD:
            raise ValueError(f"mtu {mtu} out of range")
        self.switch = switch
        self.mac = mac
        self.queue_pairs = queue_pairs
        # Queues 2k and 2k+1 are receiveq(k+1) and transmitq(k+1) (virtio 1.2, 5.1.2);
        # there is no control queue: with vhost-user the front-end (QEMU, DPDK) serves it
        # and turns pairs on and off with SET_VRING_ENABLE.
        self.num_queues = 2 * queue_pairs
        self.mtu = mtu
        self.hdr_len = HDR_V1
        self.mrg_rxbuf = False
        #: What the driver may ask for in a transmitted header, and what its receive side
        #: takes (from the negotiated CSUM / HOST_TSO* and GUEST_CSUM / GUEST_TSO* bits).
        self.tx_offload = Offload.NONE
        self.rx_offload = Offload.NONE
        self.host: DeviceHost | None = None
        self.port = VhostPort(self)
        self.joined = False
        #: The forward step of each transmit queue (compiled where built), and the
        #: reference one used for a log the compiled step can not mark.
        self._engine = forward.engine()
        self._forwarders: dict[int, forward.ForwardStep] = {}
        self._reference: dict[int, forward.ForwardStep] = {}
        #: The last burst's routes, while they hold (see :meth:`_route`): the table's
        #: and the port set's versions, the destinations, src_at, the oldest sighting of
        #: a destination found, then ports, targets, same_at and the lookups.
        self._routes: tuple[int, int, list[bytes], list[int], float, list[Port], list[int],
                            list[int], list[Port | None]] | None = None
        #: The last burst's routes as masks over its outs (:meth:`_remap`).
        self._remapped: tuple[list[int], list[int], list[int], list[bool]] | None = None
        #: This port as the forward step's egress (:func:`_out`), while it holds.
        self._as_out: forward.Out | None = None
        #: Per transmit queue, what its last ``again`` ran with (:meth:`_steady_start`).
        self._steady: dict[int, _Steady] = {}

    # -- VirtioDevice --------------------------------------------------------------------
    def device_features(self) -> int:
        features = int(VirtioFeature.VERSION_1 | VirtioFeature.RING_INDIRECT_DESC
                       | VirtioFeature.RING_EVENT_IDX) \
            | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MRG_RXBUF \
            | VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM \
            | VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6 \
            | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6
        if self.queue_pairs > 1:
            features |= VIRTIO_NET_F_MQ
        return features

    def queue_num(self) -> int:
        # QEMU compares GET_QUEUE_NUM with the number of queue *pairs* for net devices.
        return self.queue_pairs

    def config(self) -> bytes:
        return net_config(self.mac, self.queue_pairs, self.mtu)

    def attach(self, host: DeviceHost) -> None:
        self.host = host
        self.port.name = host.name
        self._join()

    def receive_queues(self) -> tuple[int, ...]:
        # Other ports' bursts write frames into the receive queues (run_device).
        return tuple(range(0, self.num_queues, 2))

    def features_acked(self, features: int) -> None:
        self.mrg_rxbuf = bool(features & VIRTIO_NET_F_MRG_RXBUF)
        self.hdr_len = HDR_V1 if features & (int(VirtioFeature.VERSION_1)
                                             | VIRTIO_NET_F_MRG_RXBUF) else HDR_LEGACY
        self.tx_offload = _offloads(features, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4,
                                    VIRTIO_NET_F_HOST_TSO6)
        self.rx_offload = _offloads(features, VIRTIO_NET_F_GUEST_CSUM,
                                    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6)
        self._join()

    def reset(self) -> None:
        """Connection closed or reset: the port leaves the switch (its MACs are flushed);
        a reset connection that negotiates again joins again."""
        self.hdr_len = HDR_V1
        self.mrg_rxbuf = False
        self.tx_offload = self.rx_offload = Offload.NONE
        self._steady.clear()
        if self.joined:
            self.joined = False
            self.switch.remove_port(self.port)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "mac": self.mac.hex(":"), "port": self.port.name,
                "queue_pairs": self.queue_pairs,
                "offloads": {"tx": self.tx_offload.name or "NONE",
                             "rx": self.rx_offload.name or "NONE"},
                "counters": self.port.counters.as_dict()}

    def announce(self, mac: bytes) -> None:
        """A migrated guest's MAC now lives behind this port (SEND_RARP on a migration's
        destination): a broadcast RARP from ``mac`` enters the switch here, so the MAC
        table points at this port at once, and the other ports see the announcement (as
        DPDK's vhost library sends it)."""
        self._join()
        self.switch.receive(self.port, [bytes(NET_HDR) + rarp_frame(mac)])

    def _join(self) -> None:
        if not self.joined:
            self.joined = True
            self.switch.add_port(self.port)

    # -- transmit queues: frames from the guest into the switch ----------------------------
    def handle_kick(self, ctx: QueueContext, index: int) -> None:
        if index % 2 == 0:
            # New receive buffers. The switch never waits for them (a frame for a ring
            # without a buffer is dropped at once, as no_rx_buffer), so it never needs
            # this kick: each one would cost a wake-up and a turn of the loop per burst
            # the driver refills. Ask the driver not to send it again (as DPDK's vhost
            # PMD does for every queue it polls): without EVENT_IDX, set
            # VIRTQ_USED_F_NO_NOTIFY; with it, avail_event of a receive queue is never
            # moved, so the driver kicks only when its index wraps past it. A new ring
            # (reconnect, resume) starts with kicks on again: its first kick ends here.
            rx = ctx.queue(index)
            if rx is not None and rx.broken is None:
                rx.enable_kicks(False)
            return
        tx = ctx.queue(index)
        if tx is None:
            return
        mem = ctx.mem
        # While the front-end logs (a live migration), both steps mark the log for every
        # write; the compiled one only a log it can reach (datapath.serves_log).
        pure = tx.log is not None and not datapath.serves_log(tx.log)
        steps = self._reference if pure else self._forwarders
        fwd = steps.get(index)
        if fwd is None:
            fwd = steps[index] = forward.Forwarder() if pure else self._engine()
        served = 0
        steady = self._steady.get(index)
        if steady is not None and (steady.fwd is not fwd or tx.broken is not None):
            steady = None
        while True:
            # The last turn ended in again() with routes that may still hold: this one
            # starts there, without the first burst's Python (pull, the table, push).
            done = self._steady_start(ctx, index, tx, steady) if steady is not None else None
            steady = None
            if done is not None:
                taken = 0
                more, last, error = done
            else:
                # Kicks stay off while we work (with EVENT_IDX: avail_event is not
                # moved); a chain made available meanwhile is seen by the pending() check
                # after they are back on (inside pull). Each transmit queue has its own
                # avail_event.
                taken, error = fwd.pull(mem, tx, self.hdr_len, BATCH, self.tx_offload)
                # A full burst: the ring may hold more, which the step may take at once
                # (again) if the routes hold, up to the turn's budget.
                bursts = (TX_BUDGET - served - taken) // BATCH \
                    if taken == BATCH and error is None else 0
                more, last, error_again = self._forward(ctx, index, fwd, tx, bursts)
                error = error or error_again
            if error is not None:
                # A chain the queue can not serve (a descriptor outside guest memory, a
                # loop, ...): the queue is broken (the connection reports it). Frames
                # read before it still went through; no chain is returned.
                self.port.counters.drop_rx("bad_descriptor")
                raise error
            # The chains go back once their frames are copied (zero copy until then;
            # again() returned its own bursts' already: nothing left then).
            fwd.finish(mem, tx)
            ctx.notify(index)
            served += taken + more
            if (taken if last < 0 else last) < BATCH and not fwd.more:
                return  # the ring was seen empty with kicks on
            if served >= TX_BUDGET and self.host is not None:
                # Let the other ports run; come back on the loop's next turn (kicks stay
                # off until then: we will look at the ring anyway).
                self.host.serve_again(index)
                return

    def _forward(self, ctx: QueueContext, index: int, fwd: forward.ForwardStep,
                 tx: SplitQueue, bursts: int) -> tuple[int, int, VirtqueueError | None]:
        """Switch the frames ``fwd.pull`` kept: the MAC table once for the burst, then
        the forward step into every egress port it can serve (of one with several
        receive queues, the one each frame's flow hash picks), the Python path for the
        rest (offload headers, taps, ports without a receive queue, a log the compiled
        step can not mark). Then, if the burst went whole through the step with routes
        that hold for any burst of the same MACs (:meth:`_again`), up to ``bursts`` more
        bursts inside the step. Returns the chains those took, the last pull's count
        (-1 if none ran) and the transmit queue's error if one broke it."""
        counters = self.port.counters
        self._steady.pop(index, None)
        st = fwd.stats
        for reason in ("malformed", "too_big"):
            if st[reason]:
                counters.drop_rx(reason, st[reason])
        m = fwd.frames
        result: tuple[int, int, VirtqueueError | None] = (0, -1, None)
        if not m:
            return result
        mem = ctx.mem
        switch = self.switch
        srcs, dsts, src_at = fwd.macs()
        ctx.account(index, m, st["bytes"])
        with switch.lock:  # the table is shared by every port's bursts (--workers)
            now, ports, targets, same_at = self._route(srcs, dsts, src_at, m, st["bytes"])
        failed: list[tuple[SwitchPort, BaseException]] = []
        # Every egress port's memory is held for the burst (and, with workers, its receive
        # queues locked): its Out, or None (Python path).
        hosts, held, order = _enter_each(ports)
        try:
            outs: list[forward.Out] = []
            out_of: list[int] = []            # slot -> index in outs, or -1
            out_dev: list[tuple[SwitchPort, QueueContext]] = []
            for p, c in zip(ports, held, strict=True):
                spec = _out(p, c)
                if spec is None or c is None or not isinstance(p, VhostPort):
                    out_of.append(-1)
                    continue
                out_of.append(len(outs))
                outs.append(spec)
                out_dev.append((p.device, c))
            masks, slow = self._remap(targets, out_of)
            own = False                       # masks and slow are the cached lists
            k = 0
            while True:
                k = fwd.push(mem, k, masks, same_at, slow, outs)
                faulted = False
                for o, ((dev, c), ost) in enumerate(zip(out_dev, fwd.out_stats, strict=True)):
                    dev._count_out(c, outs[o], ost, fwd.out_queue_stats[o])
                    err = fwd.out_errors[o]
                    if err is None:
                        continue
                    failed.append((dev, err))
                    if not own:
                        masks, slow, own = list(masks), list(slow), True
                    for j in range(len(masks)):
                        if not masks[j] >> o & 1:
                            continue
                        if isinstance(err, MemoryFaultError):
                            # Its memory is gone (the connection is closed below): no
                            # frame goes there any more, the others go on.
                            masks[j] &= ~(1 << o)
                            faulted = True
                        else:
                            slow[j] = True   # its frames now take the Python path
                if st["same_port"]:
                    counters.drop_rx("same_port", st["same_port"])
                if fwd.in_fault is not None or k >= m:
                    break
                if faulted:
                    continue  # nothing of that push was kept: the same frames again
                # Frame k goes where the forward step can not: the Python path.
                counters.rx_python += 1
                data = fwd.frame(mem, k)
                if self.hdr_len != NET_HDR:
                    data = data[:self.hdr_len] + b"\0\0" + data[self.hdr_len:]
                switch.forward(self.port, [data], now)
                k += 1
            # The routes must still be the table's (the Python path above may have
            # learnt, or another worker's port): the cached ones, of this version.
            routes = self._routes
            if bursts > 0 and k >= m and fwd.in_fault is None and not failed and not own \
                    and routes is not None and routes[0] == switch.table.version \
                    and not any(slow) and all(a == 0 or a == forward.NEVER for a in same_at):
                result = self._again(ctx, index, fwd, tx, bursts, srcs, masks, same_at,
                                     slow, outs, out_dev, failed)
                if not failed and fwd.in_fault is None and out_of == list(range(len(ports))):
                    self._steady[index] = _Steady(fwd, routes, ports, srcs, masks,
                                                  same_at, slow, outs)
        finally:
            _leave_each(hosts, held, order)
        _report(failed, fwd)
        return result

    def _again(self, ctx: QueueContext, index: int, fwd: forward.ForwardStep,
               tx: SplitQueue, bursts: int, srcs: list[bytes], masks: list[int],
               same_at: list[int], slow: list[bool], outs: list[forward.Out],
               out_dev: list[tuple[SwitchPort, QueueContext]],
               failed: list[tuple[SwitchPort, BaseException]]) -> tuple[
                   int, int, VirtqueueError | None]:
        """Up to ``bursts`` more bursts of this burst's MACs with its routes, in one call
        of the step (``again``: closed pulls, so every frame has a route already
        decided; no route slow, ``same_at`` 0 or NEVER: true of any burst of these
        MACs while the MAC table does not change, which the cached routes vouch for).
        Then what _forward does per burst, once for them all: the counters, the sources
        learnt again (their age), each egress port's counts and notifications; errors
        into ``failed``."""
        counters = self.port.counters
        total, last, error = fwd.again(ctx.mem, tx, BATCH, bursts, masks, same_at, slow,
                                       outs)
        st = fwd.stats
        for reason in ("malformed", "too_big", "same_port"):
            if st[reason]:
                counters.drop_rx(reason, st[reason])
        if st["frames"]:
            ctx.account(index, st["frames"], st["bytes"])
            counters.rx_frames += st["frames"]
            counters.rx_bytes += st["bytes"]
            switch = self.switch
            with switch.lock:
                now = switch.tick()
                for src in srcs:
                    switch.table.learn(src, self.port, now)
        for o, ((dev, c), ost) in enumerate(zip(out_dev, fwd.out_stats, strict=True)):
            dev._count_out(c, outs[o], ost, fwd.out_queue_stats[o])
            err = fwd.out_errors[o]
            if err is not None:
                failed.append((dev, err))
        return total, last, error

    def _steady_start(self, ctx: QueueContext, index: int, tx: SplitQueue,
                      steady: _Steady) -> tuple[int, int, VirtqueueError | None] | None:
        """A turn that starts with again() on what the last one ended with: if its
        routes still hold (the same cached routes, MAC table version, port set, none
        aged) and every egress port's view is the same (:func:`_out` gives the same
        :class:`~.forward.Out`: the same memory snapshot, queues, header, offloads and
        mtu), with each egress port's memory held as _forward holds it. Returns what
        :meth:`_forward` returns, or None (nothing done) where anything changed."""
        switch = self.switch
        table = switch.table
        routes = steady.routes
        with switch.lock:
            now = switch.tick()
            holds = self._routes is routes and routes[0] == table.version \
                and routes[1] == switch.ports_version and now - routes[4] <= table.aging
        if not holds:
            del self._steady[index]
            return None
        failed: list[tuple[SwitchPort, BaseException]] = []
        fwd = steady.fwd
        result: tuple[int, int, VirtqueueError | None] | None = None
        hosts, held, order = _enter_each(steady.ports)
        try:
            out_dev: list[tuple[SwitchPort, QueueContext]] = []
            for p, c, last in zip(steady.ports, held, steady.outs, strict=True):
                if c is None or _out(p, c) is not last or not isinstance(p, VhostPort):
                    break
                out_dev.append((p.device, c))
            else:
                bursts = TX_BUDGET // BATCH
                result = self._again(ctx, index, fwd, tx, bursts, steady.srcs, steady.masks,
                                     steady.same_at, steady.slow, steady.outs, out_dev,
                                     failed)
        finally:
            _leave_each(hosts, held, order)
        if result is None or failed or fwd.in_fault is not None:
            self._steady.pop(index, None)
        _report(failed, fwd)
        return result

    def _route(self, srcs: list[bytes], dsts: list[bytes], src_at: list[int], m: int,
               nbytes: int) -> tuple[float, list[Port], list[int], list[int]]:
        """The burst's decisions, with the switch's lock held: the clock, the egress
        ports, each destination's route over them (a bit mask) and ``same_at`` (lists
        the caller must not change: they may be the cached ones).

        Cached (:attr:`_routes`) while the MAC table maps every address to the same port
        (:attr:`MacTable.version <.table.MacTable.version>`), the switch has the same
        ports, the burst has the same destinations and ``src_at``, and no destination
        the lookups found can have aged out: the lookups, the learning and so the routes
        are then what they were. Learning still runs for every burst (it refreshes the
        entries' ages). This relies on a clock that never goes back, as
        :meth:`MacTable.expire <.table.MacTable.expire>` does: an entry's last sighting
        then only moves forward, so one not aged by the oldest sighting the cache saw
        is not aged now."""
        switch = self.switch
        counters = self.port.counters
        now = switch.tick()
        table = switch.table
        version = table.version
        port = self.port
        cached = self._routes
        if cached is not None and cached[0] == version and cached[1] == switch.ports_version \
                and cached[2] == dsts and cached[3] == src_at and now - cached[4] <= table.aging:
            for src in srcs:
                table.learn(src, port, now)
            counters.rx_frames += m
            counters.rx_bytes += nbytes
            if table.version == version:
                return now, cached[5], cached[6], cached[7]
            before = cached[8]   # the table was the cached one until this learning
        else:
            # Look up before learning: within a burst learning only points MACs at this
            # port, which same_at accounts for frame by frame (see forward's docstring).
            before = [None if d[0] & 1 else table.lookup(d, now) for d in dsts]
            for src in srcs:
                table.learn(src, port, now)
            counters.rx_frames += m
            counters.rx_bytes += nbytes
        ports: list[Port] = []
        slots: dict[Port, int] = {}
        targets: list[int] = []
        same_at: list[int] = []
        others: list[Port] | None = None
        for j, dst in enumerate(dsts):
            owner = before[j]
            at = src_at[j] if table.owner(dst) is port else forward.NEVER
            if owner is port:
                targets.append(0)
                same_at.append(0)
                continue
            if owner is None:
                if others is None:
                    others = switch.others(port)
                to = others
            else:
                to = [owner]
            mask = 0
            for p in to:
                slot = slots.get(p)
                if slot is None:
                    slot = slots[p] = len(ports)
                    ports.append(p)
                mask |= 1 << slot
            targets.append(mask)
            same_at.append(at)
        if table.version == version:
            # Nothing moved since the lookups: cache the routes, with the oldest sighting
            # of a destination found (an entry older than the aging time is not found).
            oldest = min((seen for j, d in enumerate(dsts) if before[j] is not None
                          and (seen := table.seen(d)) is not None), default=_NEVER_SEEN)
            self._routes = (version, switch.ports_version, list(dsts), list(src_at),
                            oldest, ports, targets, same_at, before)
        else:
            self._routes = None
        return now, ports, targets, same_at

    def _remap(self, targets: list[int], out_of: list[int]) -> tuple[list[int], list[bool]]:
        """:func:`_remap`, cached while the routes (the same ``targets`` list: see
        :meth:`_route`) and the ports' outs are the ones of the last burst; lists the
        caller must not change (it copies them first)."""
        last = self._remapped
        if last is not None and last[0] is targets and last[1] == out_of:
            return last[2], last[3]
        masks, slow = _remap(targets, out_of)
        self._remapped = (targets, out_of, masks, slow)
        return masks, slow

    def _count_out(self, ctx: QueueContext, out: forward.Out, st: list[int],
                   per_queue: list[list[int]]) -> None:
        """What a push did to this port's receive queues: counters (``st`` the port's,
        ``per_queue`` each queue's), and the interrupts."""
        counters = self.port.counters
        sent, nbytes, too_big, no_rx, bad = st
        counters.tx_frames += sent
        counters.tx_bytes += nbytes
        if too_big:
            counters.drop_tx("too_big", too_big)
        if no_rx:
            counters.drop_tx("no_rx_buffer", no_rx)
        if bad:
            counters.drop_tx("bad_descriptor", bad)
        for rx, qst in zip(out.queues, per_queue, strict=True):
            if qst[0]:
                ctx.account(rx.index, qst[0], qst[1])
            if rx.notify_decided is not None:
                ctx.notify(rx.index)

    # -- receive queues: frames from the switch to the guest -------------------------------
    def deliver(self, frames: Sequence[bytes | bytearray]) -> None:
        """Write ``frames`` into the receive queues; count what went and what was dropped."""
        done = False

        def write(ctx: QueueContext) -> None:
            nonlocal done
            done = True
            self._write(ctx, frames)

        if self.host is not None:
            self.host.run_device(RX, write)
        if not done:
            self.port.counters.drop_tx("port_down", len(frames))

    def _egress(self, frames: Sequence[bytes | bytearray]) -> list[bytes | bytearray]:
        """``frames`` as this port's driver may receive them: offloads it did not
        negotiate done in software, frames larger than it takes dropped (never cut)."""
        counters = self.port.counters
        accepts = self.rx_offload
        largest = NET_HDR + self.mtu + ETH_OVERHEAD
        out: list[bytes | bytearray] = []
        for data in frames:
            if data[0] or data[1]:
                try:
                    adapted = adapt_egress(data, accepts)
                except HeaderError:
                    counters.drop_tx("malformed")
                    continue
                if data[1] and adapted[0] is data:
                    out.append(data)  # GSO kept: the receive buffers decide
                    continue
            else:
                adapted = (data,)
            for frame in adapted:
                # "The device MUST NOT pass received packets that exceed mtu (plus low level
                # ethernet header length) size with gso_type NONE".
                if len(frame) > largest:
                    counters.drop_tx("too_big")
                else:
                    out.append(frame)
        return out

    def _write(self, ctx: QueueContext, frames: Sequence[bytes | bytearray]) -> None:
        counters = self.port.counters
        queues = [q for i in range(0, self.num_queues, 2) if (q := ctx.queue(i)) is not None]
        if not queues:
            counters.drop_tx("port_down", len(frames))
            return
        out = self._egress(frames)
        if len(queues) == 1:
            self._fill(ctx, queues[0], out)
            return
        # Several receive queues enabled: one flow always goes to the same queue, so its
        # frames stay in order.
        groups: dict[int, list[bytes | bytearray]] = {}
        n = len(queues)
        for data in out:
            groups.setdefault(flow_hash(data) % n, []).append(data)
        for k, group in groups.items():
            self._fill(ctx, queues[k], group)

    def _fill(self, ctx: QueueContext, rx: SplitQueue,
              frames: Sequence[bytes | bytearray]) -> None:
        counters = self.port.counters
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
            ctx.account(rx.index, sent, nbytes - hdr_len * sent)
        if used:
            rx.push_used_batch(used)
            ctx.notify(rx.index)


def rarp_frame(mac: bytes) -> bytes:
    """The broadcast RARP request QEMU's announce_self sends (RFC 903: "request reverse",
    sender and target hardware address ``mac``, no protocol addresses), 60 bytes."""
    rarp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 3, mac, bytes(4), mac, bytes(4))
    return (b"\xff" * 6 + mac + b"\x80\x35" + rarp).ljust(60, b"\0")


def _offloads(features: int, csum: int, tso4: int, tso6: int) -> Offload:
    """The offloads a set of negotiated bits gives. TSO needs the checksum offload too
    ("VIRTIO_NET_F_HOST_TSO4 Requires VIRTIO_NET_F_CSUM", "VIRTIO_NET_F_GUEST_TSO4
    Requires VIRTIO_NET_F_GUEST_CSUM"): without it, TSO bits count for nothing."""
    if not features & csum:
        return Offload.NONE
    result = Offload.CSUM
    if features & tso4:
        result |= Offload.TSO4
    if features & tso6:
        result |= Offload.TSO6
    return result


def _out(port: Port, ctx: QueueContext | None) -> forward.Out | None:
    """The forward step's view of an egress port, or None when it takes the Python path:
    not a vhost-user port, gone, no ready receive queue (port_down), or a queue broken or
    carrying a dirty log the compiled step can not mark (:func:`pyvhost.datapath.serves_log`;
    the pure step marks every log, the Python path too). Its ready receive queues are
    those :meth:`SwitchPort._write` chooses from, in the same order, so the flow hash
    sends a flow to the same queue on either path."""
    if ctx is None or not isinstance(port, VhostPort):
        return None
    dev = port.device
    queues = ctx.ready_queues(0, dev.num_queues, 2)
    if not queues:
        return None
    for rx in queues:
        if rx.broken is not None or (rx.log is not None and not datapath.serves_log(rx.log)):
            return None
    # The last burst's view of this port, if nothing it holds changed (the same snapshot
    # and queues, the same negotiated header, offloads and mtu): one object less per
    # burst. An Out is never changed once made.
    last = dev._as_out
    mem, max_eth, accepts = ctx.mem, dev.mtu + ETH_OVERHEAD, int(dev.rx_offload)
    if last is not None and last.mem is mem and last.queues == queues \
            and last.hdr_len == dev.hdr_len and last.mrg_rxbuf == dev.mrg_rxbuf \
            and last.max_eth == max_eth and last.accepts == accepts:
        return last
    out = dev._as_out = forward.Out(mem, queues[0], dev.hdr_len, dev.mrg_rxbuf, max_eth,
                                    queues[1:], accepts)
    return out


@dataclass(slots=True)
class _Steady:
    """What a transmit queue's last ``again`` ran with: its step, the routes it used
    (:attr:`SwitchPort._routes` then, with the table's and the port set's versions they
    were made at), the egress ports and their views, the sources to learn again, and
    the routes as the step takes them (masks, same_at, slow: the cached lists, never
    changed)."""

    fwd: forward.ForwardStep
    routes: tuple[int, int, list[bytes], list[int], float, list[Port], list[int],
                  list[int], list[Port | None]]
    ports: list[Port]
    srcs: list[bytes]
    masks: list[int]
    same_at: list[int]
    slow: list[bool]
    outs: list[forward.Out]


def _remap(targets: list[int], out_of: list[int]) -> tuple[list[int], list[bool]]:
    """Routes over port slots as masks over the forward step's outs; a route that names
    a port without an out takes the Python path (slow)."""
    masks: list[int] = []
    slow: list[bool] = []
    for t in targets:
        mask = 0
        is_slow = False
        slot = 0
        while t:
            if t & 1:
                o = out_of[slot]
                if o < 0:
                    is_slow = True
                else:
                    mask |= 1 << o
            t >>= 1
            slot += 1
        masks.append(0 if is_slow else mask)
        slow.append(is_slow)
    return masks, slow


def _enter_each(ports: list[Port]) -> tuple[list[DeviceHost | None],
                                            list[QueueContext | None], list[int]]:
    """Every vhost-user port's context, its memory held and, with worker threads, its
    receive queues locked (:meth:`DeviceHost.enter_device`), None for the others and for
    connections gone, in the order of ``ports``; with their hosts and the order they were
    taken in: the lock order (their hosts' ``order``: :mod:`pyvhost.backend.queuelock`).
    :func:`_leave_each` gives them back, newest first."""
    n = len(ports)
    hosts: list[DeviceHost | None] = [None] * n
    held: list[QueueContext | None] = [None] * n
    order = sorted(range(n), key=lambda k: _lock_order(ports[k])) if n > 1 else [0] * n
    try:
        for k in order:
            port = ports[k]
            if isinstance(port, VhostPort):
                host = port.device.host
                if host is not None:
                    held[k] = host.enter_device()
                    hosts[k] = host
    except BaseException:
        _leave_each(hosts, held, order)
        raise
    return hosts, held, order


def _leave_each(hosts: list[DeviceHost | None], held: list[QueueContext | None],
                order: list[int]) -> None:
    """Give back what :func:`_enter_each` took, newest first."""
    for k in reversed(order):
        ctx, host = held[k], hosts[k]
        if ctx is not None and host is not None:
            held[k] = None
            host.leave_device(ctx)


def _lock_order(port: Port) -> int:
    host = port.device.host if isinstance(port, VhostPort) else None
    return -1 if host is None else host.order


def _report(failed: list[tuple[SwitchPort, BaseException]], fwd: forward.ForwardStep) -> None:
    """After a burst, with every hold given back: each egress port's error goes to its
    own connection (a broken queue, or closed: run_device handles it there), then the
    ingress port's fault is raised (its connection closes)."""
    for dev, err in failed:
        if dev.host is not None:
            dev.host.run_device(RX, functools.partial(_raise, err))
    if fwd.in_fault is not None:
        raise fwd.in_fault


def _raise(error: BaseException, ctx: QueueContext) -> None:
    raise error
