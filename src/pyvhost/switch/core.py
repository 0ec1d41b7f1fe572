"""The learning switch: ports, forwarding decisions and per-port counters.

A :class:`Switch` is shared by every port of one ``pyvhost net`` process. A port hands it
a batch of frames it received (:meth:`Switch.receive`); the switch learns each source MAC,
picks the egress ports (the one port a known unicast address lives on, or every other port
for broadcast, multicast and unknown unicast; never the ingress port) and gives each egress
port its frames as one batch (:meth:`Port.deliver`), so a port signals its driver once per
batch, not once per frame.

Frames are ``bytes``-like: a 12-byte virtio-net header (``struct virtio_net_hdr`` with
``num_buffers``, as VERSION_1 and MRG_RXBUF lay it out) followed by the Ethernet frame. The
header travels between ports unchanged; a port that receives a frame checks its offload
fields, and a port that sends one does in software what its peer did not negotiate
(:mod:`.offload`). Ports validate what they receive before handing it
over (at least a header and an Ethernet header; see :data:`MIN_FRAME`), so the switch
reads addresses without checks.

This module owns no fd and knows nothing of vhost-user or taps: the ports do
(:mod:`.vhost`, :mod:`.tap`). Ports' bursts may run on several threads (``pyvhost net
--workers``): :attr:`Switch.lock` guards the MAC table and the port list, and a port's
counters have a lock of their own for the drop dictionaries (the frame and byte counts
are added under the switch's lock on the way in, under the egress port's receive queue
locks on the way out). Both are leaves of the lock order (:mod:`pyvhost.backend.queuelock`):
no other lock is taken, and no frame is delivered, while one is held.

A vhost-user port's frames normally do not come here as bytes: its forward step
(:mod:`.forward`, compiled where built) copies them from guest to guest and consults and
updates :attr:`Switch.table` once per burst; frames that need Python (offload headers, a
tap among the egress ports) come through :meth:`Switch.receive` / :meth:`Switch.forward`.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from .table import DEFAULT_AGING, MacTable

#: Bytes of the virtio-net header every frame starts with inside the switch.
NET_HDR = 12
#: The smallest frame a port may hand over: a header and an Ethernet header (dst, src, type).
MIN_FRAME = NET_HDR + 14
#: Largest Ethernet frame carried (64 KiB of payload plus Ethernet and VLAN headers).
MAX_ETHERNET = 65550
#: Ports that left are kept for status output, this many, newest last.
DEPARTED_KEPT = 32
#: How often (seconds of the switch's clock) receive() sweeps aged entries out.
SWEEP_EVERY = 1.0


class PortCounters:
    """What one port did, from the switch's side: ``rx`` is what the switch received from
    the port (the port's guest or tap transmitted it), ``tx`` what the switch sent out of
    the port. Bytes count Ethernet frames, without the virtio-net header. Drops are counted
    by reason, on the port where they happened: ``rx_drops`` for frames refused on the way
    in (malformed, too_big, bad_descriptor), ``tx_drops`` for frames the port could not
    take (no_rx_buffer, too_big, port_down, error, malformed). ``rx_python``: of the frames
    a vhost-user port's forward step kept, those it left to the Python path (bytes through
    :meth:`Switch.forward`: to a tap, to a port without a ready receive queue, or with an
    offload header the receiver did not negotiate), counted once per frame."""

    __slots__ = ("_lock", "rx_bytes", "rx_drops", "rx_frames", "rx_python", "tx_bytes",
                 "tx_drops", "tx_frames")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rx_frames = 0
        self.rx_bytes = 0
        self.rx_python = 0
        self.tx_frames = 0
        self.tx_bytes = 0
        self.rx_drops: dict[str, int] = {}
        self.tx_drops: dict[str, int] = {}

    def drop_rx(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self.rx_drops[reason] = self.rx_drops.get(reason, 0) + n

    def drop_tx(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self.tx_drops[reason] = self.tx_drops.get(reason, 0) + n

    def as_dict(self) -> dict[str, object]:
        with self._lock:
            return {"rx_frames": self.rx_frames, "rx_bytes": self.rx_bytes,
                    "tx_frames": self.tx_frames, "tx_bytes": self.tx_bytes,
                    "rx_drops": dict(self.rx_drops), "tx_drops": dict(self.tx_drops),
                    "rx_python": self.rx_python}


class Port(ABC):
    """One port of a switch. A port counts its own tx side (in :meth:`deliver`) and its rx
    drops; the switch counts accepted rx frames."""

    #: "vhost-user" or "tap"; shown in status output.
    kind = "port"

    def __init__(self, name: str) -> None:
        self.name = name
        self.counters = PortCounters()

    @abstractmethod
    def deliver(self, frames: Sequence[bytes | bytearray]) -> None:
        """Send ``frames`` out of this port; count what went (tx) and what was dropped
        (tx_drops). Must never raise because of what the port's peer did, and must not
        block."""

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "kind": self.kind, **self.counters.as_dict()}


class Switch:
    """An L2 learning switch over any number of :class:`Port` objects."""

    def __init__(self, aging: float = DEFAULT_AGING, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.table: MacTable[Port] = MacTable(aging, clock=clock)
        self.clock = clock
        self.ports: list[Port] = []
        self.departed: list[dict[str, object]] = []
        #: Changes whenever :attr:`ports` does.
        self.ports_version = 0
        self._next_sweep = clock() + SWEEP_EVERY
        #: Guards :attr:`table`, :attr:`ports` and :attr:`departed` (bursts of several
        #: worker threads): a leaf lock, held for table operations only.
        self.lock = threading.Lock()

    # -- membership ----------------------------------------------------------------------
    def add_port(self, port: Port) -> None:
        with self.lock:
            if port not in self.ports:
                self.ports.append(port)
                self.ports_version += 1

    def remove_port(self, port: Port) -> None:
        """The port left: forget the addresses learned on it; keep its final counters."""
        with self.lock:
            if port not in self.ports:
                return
            self.ports.remove(port)
            self.ports_version += 1
            self.table.flush(port)
        described = port.describe()
        with self.lock:
            self.departed.append(described)
            del self.departed[:-DEPARTED_KEPT]

    # -- forwarding ----------------------------------------------------------------------
    def tick(self) -> float:
        """The switch's clock now; sweeps aged MAC entries out once per SWEEP_EVERY.
        Called with :attr:`lock` held."""
        now = self.clock()
        if now >= self._next_sweep:
            self.table.expire(now)
            self._next_sweep = now + SWEEP_EVERY
        return now

    def receive(self, ingress: Port, frames: Sequence[bytes | bytearray]) -> None:
        """Forward frames that ``ingress`` received (each at least :data:`MIN_FRAME` long)."""
        if not frames:
            return
        with self.lock:
            now = self.tick()
            c = ingress.counters
            c.rx_frames += len(frames)
            c.rx_bytes += sum(map(len, frames)) - NET_HDR * len(frames)
        self.forward(ingress, frames, now)

    def forward(self, ingress: Port, frames: Sequence[bytes | bytearray], now: float) -> None:
        """Learn, decide and deliver ``frames`` already counted as received on
        ``ingress`` (:meth:`receive`; the compiled forward step counts its own)."""
        with self.lock:
            out = self._decide(ingress, frames, now)
        for port, batch in out.items():
            port.deliver(batch)

    def _decide(self, ingress: Port, frames: Sequence[bytes | bytearray],
                now: float) -> dict[Port, list[bytes | bytearray]]:
        """Learn and look up (with :attr:`lock` held): the frames each port gets."""
        table = self.table
        c = ingress.counters
        out: dict[Port, list[bytes | bytearray]] = {}
        others: list[Port] | None = None
        for frame in frames:
            table.learn(bytes(frame[18:24]), ingress, now)
            dst = bytes(frame[12:18])
            port = None if dst[0] & 1 else table.lookup(dst, now)
            if port is None:
                # Broadcast, multicast or unknown unicast: every port but the ingress one.
                if others is None:
                    others = self.others(ingress)
                for p in others:
                    batch = out.get(p)
                    if batch is None:
                        out[p] = [frame]
                    else:
                        batch.append(frame)
            elif port is ingress:
                # The destination lives behind the port the frame came from: a switch
                # filters it (802.1D), it never goes back.
                c.drop_rx("same_port")
            else:
                batch = out.get(port)
                if batch is None:
                    out[port] = [frame]
                else:
                    batch.append(frame)
        return out

    def others(self, ingress: Port) -> list[Port]:
        """Where a flooded frame from ``ingress`` goes: every other port."""
        return [p for p in self.ports if p is not ingress]

    # -- status --------------------------------------------------------------------------
    def describe(self) -> dict[str, object]:
        now = self.clock()
        with self.lock:
            entries = list(self.table.entries(now))
            ports = list(self.ports)
            departed = list(self.departed)
        return {
            "mac_aging": self.table.aging,
            "mac_table": [{"mac": mac.hex(":"), "port": port.name, "age": round(age, 3)}
                          for mac, port, age in entries],
            "ports": [p.describe() for p in ports],
            "departed": departed,
        }
