"""The switch's forward step: frames of one transmit queue straight into the receive
queues of the ports they go to, one burst per call; pure Python.

This is the reference the compiled forward step (``pyvhost.datapath._native.Forwarder``,
in ``_switch.pxi``) must agree with byte for byte, and the step :class:`~.vhost.SwitchPort`
runs where the extension is not built or ``PYVHOST_PURE=1`` (:func:`engine`). It is
written with the virtqueue's own methods (pop, unpop, push_used_batch, enable_kicks,
decide_notify) and :func:`~pyvhost.devices.virtio_net.write_rx_frame`, so every guest
value is checked exactly as their docstrings say, and writes mark the dirty log while a
queue carries one (the compiled step makes the same marks itself; where it can not reach
a log, :func:`pyvhost.datapath.serves_log`, the switch runs this one).

A burst, as :class:`~.vhost.SwitchPort` drives it (the MAC table stays in Python and is
consulted and updated once per burst, never per frame):

1. :meth:`Forwarder.pull` takes up to ``limit`` chains of the transmit queue. A chain
   whose readable part is shorter than a header and an Ethernet header, or longer than
   the largest frame, is dropped (``malformed``, ``too_big``); the others are *kept*,
   unread but for their header and MACs. A header that asks for an offload (flags or
   gso_type non-zero) is checked here as :func:`~.offload.check_ingress` checks it
   against the sender's negotiated offloads (``offload``): a frame it refuses is
   dropped as ``malformed``, the others are kept with their header and the offloads a
   receiver needs to take them as they are (:func:`~.offload.needs`). A header with
   flags and gso_type zero asks for nothing: its other fields are zeroed (as
   check_ingress does). A burst holds at most :data:`MAX_MACS` distinct destination
   and source MACs; the chain that would bring one more is left in the ring.
2. :meth:`Forwarder.macs`: the distinct sources (to learn), the distinct destinations
   (to look up) and, for each destination, the first kept frame whose *source* it is.
   Learning within a burst only ever points a MAC at the ingress port, so the decision
   for frame ``k`` to ``dst`` is the table's answer before the burst, or ``same_port``
   once ``dst`` was learned as a source at a frame ``<= k`` - exactly what learning and
   looking up frame by frame gives.
3. :meth:`Forwarder.push` copies the kept frames, in order from ``start``, into the
   egress ports (:class:`Out`) their destination's route names (a bit mask), each
   with its header (zero: "no offload", or the sender's checked one) of the port's
   length, ``num_buffers`` set, never truncated; of a port with several enabled receive
   queues, into the one the frame's flow hash picks (:mod:`.flow`, the Python path's
   choice). It stops at a frame whose route is ``slow`` (a tap, a port with no receive
   queue, a port whose log the step can not mark: the Python path), or at a frame with an
   offload header that one of its egress ports does not take as it is
   (:attr:`Out.accepts`: the checksum must be completed or the frame segmented,
   :func:`~.offload.adapt_egress`), and returns its index. A GSO frame is not held to a
   port's ``max_eth`` (the receive buffers decide, as on the Python path).
4. :meth:`Forwarder.frame` gives such a frame's bytes (the header as the switch carries
   it); :meth:`Forwarder.finish` returns
   every chain taken, as used with length 0, and decides the notification.

Errors: a transmit queue error in pull breaks the queue (returned, the frames kept before
it are still pushed); a receive queue error in push breaks that queue only
(:attr:`Forwarder.out_errors`: per port, the error of its first queue that broke; the
port's other queues go on); counters follow ``_fill``'s rule (a broken queue's frames
of the call count as ``bad_descriptor``, none as sent). A queue already broken when push
is called takes nothing: the frames routed to it count as ``bad_descriptor``. A
truncated region: this path can not catch SIGBUS (see :mod:`pyvhost.datapath.reference`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pyvhost.devices.virtio_net import MAX_FRAME, write_rx_frame
from pyvhost.memory import GuestMemory
from pyvhost.virtq import DescriptorChain, SplitQueue, VirtqueueError

from .core import MAX_ETHERNET, NET_HDR
from .flow import flow_hash
from .offload import HeaderError, Offload, check_ingress, needs

#: Distinct destination (and source) MACs per burst: bounds the Python work per burst.
MAX_MACS = 16
#: ``same_at`` for a destination never learned in the burst.
NEVER = 0x7FFFFFFF
#: What pull and push count (:attr:`Forwarder.stats`).
STATS = ("malformed", "too_big", "same_port", "frames", "bytes")
#: What push counts per egress port (:attr:`Forwarder.out_stats`), and per receive queue
#: of each (:attr:`Forwarder.out_queue_stats`, the port's queues in :attr:`Out.queues`
#: order), in this order.
OUT_STATS = ("tx_frames", "tx_bytes", "too_big", "no_rx_buffer", "bad_descriptor")
_SENT, _BYTES, _TOO_BIG, _NO_RX, _BAD = range(5)
_NO_OFFLOAD = bytes(10)  # flags .. csum_offset

assert MAX_ETHERNET == MAX_FRAME  # the compiled step bounds frames with MAX_FRAME


@dataclass(slots=True)
class Out:
    """One egress port for a push: its held memory, its enabled receive queues (``rx``,
    then ``more_rx``, in queue order), its header length and MRG_RXBUF, and the largest
    Ethernet frame it takes (mtu plus an Ethernet header and a VLAN tag; larger ones are
    dropped as ``too_big``). With several queues each frame goes to
    ``queues[flow_hash(frame) % len(queues)]`` (:mod:`.flow`), as the Python path sends
    it, so a flow stays on one queue and in order."""

    mem: GuestMemory
    rx: SplitQueue
    hdr_len: int
    mrg_rxbuf: bool
    max_eth: int
    more_rx: tuple[SplitQueue, ...] = ()
    #: The offloads its driver takes (its negotiated GUEST_CSUM / GUEST_TSO4/6): a frame
    #: whose header needs more takes the Python path (:func:`~.offload.adapt_egress`).
    accepts: int = 0
    #: Every receive queue of the port a frame may go to, in queue order (``rx``, then
    #: ``more_rx``).
    queues: tuple[SplitQueue, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.queues = (self.rx, *self.more_rx)


class ForwardStep(Protocol):
    """What both forward steps offer (this module's :class:`Forwarder` and the compiled
    one): see :class:`Forwarder`."""

    stats: dict[str, int]
    out_stats: list[list[int]]
    out_queue_stats: list[list[list[int]]]
    out_errors: list[BaseException | None]
    in_fault: BaseException | None
    more: bool

    @property
    def frames(self) -> int: ...

    def pull(self, mem: GuestMemory, tx: SplitQueue, hdr_len: int, limit: int,
             offload: int = 0) -> tuple[int, VirtqueueError | None]: ...

    def macs(self) -> tuple[list[bytes], list[bytes], list[int]]: ...

    def frame(self, mem: GuestMemory, k: int) -> bytes: ...

    def push(self, mem: GuestMemory, start: int, masks: list[int], same_at: list[int],
             slow: list[bool], outs: list[Out]) -> int: ...

    def finish(self, mem: GuestMemory, tx: SplitQueue) -> None: ...

    def again(self, mem: GuestMemory, tx: SplitQueue, limit: int, bursts: int,
              masks: list[int], same_at: list[int], slow: list[bool],
              outs: list[Out]) -> tuple[int, int, VirtqueueError | None]: ...


class Forwarder:
    """One transmit queue's forward step (reference). Not re-entrant."""

    def __init__(self) -> None:
        self.stats: dict[str, int] = dict.fromkeys(STATS, 0)
        self.out_stats: list[list[int]] = []
        self.out_queue_stats: list[list[list[int]]] = []
        self.out_errors: list[BaseException | None] = []
        #: A guest-memory fault of the ingress port during push (compiled step only).
        self.in_fault: BaseException | None = None
        #: pull stopped before it saw the ring empty (kicks are still off).
        self.more = False
        #: chain, total, dst, the offloads a receiver needs, the header (10 bytes)
        self._frames: list[tuple[DescriptorChain, int, int, int, bytes]] = []
        self._used: list[tuple[int, int]] = []
        #: Where the last push stopped (:meth:`again` needs the burst pushed whole).
        self._pushed = 0
        self._in_hdr = 12
        self._srcs: list[bytes] = []
        self._dsts: list[bytes] = []
        self._src_first: list[int] = []

    @property
    def frames(self) -> int:
        """Frames kept by the last pull."""
        return len(self._frames)

    def pull(self, mem: GuestMemory, tx: SplitQueue, hdr_len: int, limit: int,
             offload: int = 0) -> tuple[int, VirtqueueError | None]:
        """Take up to ``limit`` chains; returns how many, and the error that broke the
        queue (if one did). ``offload`` is what the sender negotiated (an
        :class:`~.offload.Offload`: CSUM, HOST_TSO4/6), which its headers are checked
        against. ``mem`` must be held until :meth:`finish`."""
        if hdr_len not in (10, 12):
            raise ValueError(f"virtio-net header length {hdr_len}: 10 or 12")
        self._in_hdr = hdr_len
        self._srcs, self._dsts, self._src_first = [], [], []
        self.stats = dict.fromkeys(STATS, 0)
        return self._pull(mem, tx, limit, offload, closed=False)

    def _pull(self, mem: GuestMemory, tx: SplitQueue, limit: int, offload: int,
              closed: bool) -> tuple[int, VirtqueueError | None]:
        """:meth:`pull`'s walk, counting into :attr:`stats`. ``closed`` (:meth:`again`):
        the MACs are the last burst's and stay so; the chain of a frame with a MAC not
        among them, or with an offload header, is left in the ring and ends the pull."""
        hdr_len = self._in_hdr
        self._frames = []
        self._pushed = 0
        self._used = []
        self.more = False
        allowed = Offload(offload & 7)
        st = self.stats
        taken = 0
        try:
            tx.enable_kicks(False)
            while taken < limit:
                chain = tx.pop(mem)
                if chain is None:
                    tx.enable_kicks(True)
                    if tx.pending() == 0:
                        break
                    tx.enable_kicks(False)
                    continue
                taken += 1
                self._used.append((chain.head, 0))
                total = chain.readable_len
                if total < hdr_len + 14:
                    st["malformed"] += 1
                    continue
                if total > hdr_len + MAX_FRAME:
                    st["too_big"] += 1
                    continue
                head = chain.read(mem, hdr_len + 12)
                if closed and (head[0] or head[1]):
                    self._unpull(tx)
                    taken -= 1
                    break
                need = 0
                vnet = _NO_OFFLOAD
                if head[0] or head[1]:
                    # An offload header: check_ingress's checks, its drops (malformed).
                    raw = chain.read(mem, total)
                    if hdr_len != NET_HDR:
                        raw = raw[:hdr_len] + b"\0\0" + raw[hdr_len:]
                    try:
                        check_ingress(raw, allowed)
                    except HeaderError:
                        st["malformed"] += 1
                        continue
                    need = needs(head[0], head[1])
                    vnet = bytes(head[:10])
                dst, src = head[hdr_len:hdr_len + 6], head[hdr_len + 6:hdr_len + 12]
                new_dst, new_src = dst not in self._dsts, src not in self._srcs
                if (closed and (new_dst or new_src)) or \
                        (new_dst and len(self._dsts) == MAX_MACS) or \
                        (new_src and len(self._srcs) == MAX_MACS):
                    self._unpull(tx)
                    taken -= 1
                    break
                if new_dst:
                    self._dsts.append(dst)
                if new_src:
                    self._srcs.append(src)
                    self._src_first.append(len(self._frames))
                di = self._dsts.index(dst)
                self._frames.append((chain, total, di, need, vnet))
                st["frames"] += 1
                st["bytes"] += total - hdr_len
        except VirtqueueError as e:
            return taken, e
        return taken, None

    def _unpull(self, tx: SplitQueue) -> None:
        tx.unpop(1)
        self._used.pop()
        self.more = True

    def macs(self) -> tuple[list[bytes], list[bytes], list[int]]:
        """The distinct source MACs (first seen first), the distinct destination MACs,
        and for each destination the index of the first kept frame whose unicast source
        it is (:data:`NEVER` if none)."""
        src_at = []
        for dst in self._dsts:
            at = NEVER
            if not dst[0] & 1 and dst in self._srcs:
                at = self._src_first[self._srcs.index(dst)]
            src_at.append(at)
        return list(self._srcs), list(self._dsts), src_at

    def frame(self, mem: GuestMemory, k: int) -> bytes:
        """Kept frame ``k``: its header as the switch carries it (the driver's, checked, or
        zero where flags and gso_type are: check_ingress's), then the frame."""
        chain, total, _, need, _ = self._frames[k]
        data = chain.read(mem, total)
        if not need:
            data = _NO_OFFLOAD + data[10:]
        return data

    def push(self, mem: GuestMemory, start: int, masks: list[int], same_at: list[int],
             slow: list[bool], outs: list[Out]) -> int:
        """Copy kept frames from ``start`` on to their egress ports; per destination
        (``macs()``'s order) a bit mask of ``outs``, the frame index from which it is a
        ``same_port`` drop, and whether its frames need the Python path. Returns the
        index of the first frame not done (a slow one), or :attr:`frames`. A port with
        several receive queues takes each frame on the queue its flow hash picks; every
        outcome of the frame there counts on that queue. Each queue's used elements are
        published once, at the end, and its notification decided."""
        n = len(self._dsts)
        if len(masks) != n or len(same_at) != n or len(slow) != n:
            raise ValueError("one route per destination MAC")
        if len(outs) > 64:
            raise ValueError("at most 64 egress ports per push")
        for m in masks:
            if m < 0 or m >> len(outs):
                raise ValueError("a route names an egress port out of range")
        h = self._in_hdr
        queues = [out.queues for out in outs]
        # Per receive queue of each port: its counts, used elements, error, whether it
        # was broken before this call (then it takes nothing: its frames count as bad).
        stats = [[[0] * len(OUT_STATS) for _ in qs] for qs in queues]
        errors: list[list[VirtqueueError | None]] = [[None] * len(qs) for qs in queues]
        used: list[list[list[tuple[int, int]]]] = [[[] for _ in qs] for qs in queues]
        dead = [[q.broken is not None for q in qs] for qs in queues]
        routed = [[0] * len(qs) for qs in queues]
        done = [[0] * len(qs) for qs in queues]
        self.in_fault = None
        same_port = 0
        k = start
        while k < len(self._frames):
            chain, total, j, need, vnet = self._frames[k]
            if k >= same_at[j]:
                same_port += 1
                k += 1
                continue
            if slow[j] or (need and _refused(need, masks[j], outs)):
                break
            eth = total - h
            gso = vnet[1]
            data: bytes | None = None
            hashed: int | None = None
            mask = masks[j]
            o = 0
            while mask:
                if mask & 1:
                    out = outs[o]
                    qs = queues[o]
                    q = 0
                    if len(qs) > 1:
                        if hashed is None:
                            if data is None:
                                data = chain.read(mem, total)[h:]
                            hashed = flow_hash(data, 0)
                        q = hashed % len(qs)
                    st = stats[o][q]
                    if eth > out.max_eth and not gso:
                        st[_TOO_BIG] += 1
                    else:
                        routed[o][q] += 1
                        if errors[o][q] is None and not dead[o][q]:
                            if data is None:
                                data = chain.read(mem, total)[h:]
                            try:
                                reason = write_rx_frame(
                                    out.mem, qs[q], vnet + bytes(out.hdr_len - 10) + data,
                                    hdr_len=out.hdr_len, mrg_rxbuf=out.mrg_rxbuf,
                                    used=used[o][q])
                            except VirtqueueError as e:
                                errors[o][q] = e
                            else:
                                done[o][q] += 1
                                if reason is None:
                                    st[_SENT] += 1
                                    st[_BYTES] += eth
                                else:
                                    st[_NO_RX if reason == "no_rx_buffer" else _TOO_BIG] += 1
                mask >>= 1
                o += 1
            k += 1
        for o, qs in enumerate(queues):
            for q, rx in enumerate(qs):
                st = stats[o][q]
                if errors[o][q] is not None or dead[o][q]:
                    st[_BAD] += routed[o][q] - done[o][q] + st[_SENT]
                    st[_SENT] = st[_BYTES] = 0
                elif used[o][q]:
                    rx.push_used_batch(used[o][q])
                    rx.decide_notify()
        self.stats["same_port"] = same_port
        self.out_queue_stats = stats
        self.out_stats = _port_sums(stats)
        # A port's error: its first queue's (in queue order) that broke.
        self.out_errors = [next((e for e in errs if e is not None), None) for errs in errors]
        self._pushed = k
        return k

    def finish(self, mem: GuestMemory, tx: SplitQueue) -> None:
        """Return every chain pull took (used, length 0) unless the queue broke, and
        decide the notification."""
        if self._used and tx.broken is None:
            tx.push_used_batch(self._used)
            tx.decide_notify()
        self._used = []

    def again(self, mem: GuestMemory, tx: SplitQueue, limit: int, bursts: int,
              masks: list[int], same_at: list[int], slow: list[bool],
              outs: list[Out]) -> tuple[int, int, VirtqueueError | None]:
        """More bursts of the same traffic in one call, after a burst pushed whole (push
        returned :attr:`frames`, no port's error, no fault): finish that burst, then up
        to ``bursts`` times pull (up to ``limit`` chains), push every frame with the
        same routes, finish. Returns the chains taken in all, by the last pull, and the
        transmit queue's error if one broke it (the frames before it still went
        through, no chain of that burst is returned). :attr:`stats`,
        :attr:`out_stats` and :attr:`out_queue_stats` are the sums over the call's
        bursts, :attr:`out_errors` each port's first error, :attr:`more` the last
        pull's. The notifications are decided per burst and sent by the caller after.

        A pull here is *closed*: it takes only frames whose MACs are all among the
        last burst's (the routes then hold: the caller checked the MAC table did not
        change) and without an offload header; the chain of any other frame is left in
        the ring and ends the call, for the next ordinary pull. It stops after a burst
        in which a port's queue broke, or whose pull saw the ring empty or stopped
        early. No route may be slow, and each destination's ``same_at`` must be 0 or
        :data:`NEVER`: its frames are then all ``same_port`` drops or none, in any
        burst, as a burst of their own would find (a position inside a burst would not
        carry over). This is what lets the compiled step run several bursts without
        Python in between (issue 12: Python's work per burst)."""
        n = len(self._dsts)
        if len(masks) != n or len(same_at) != n or len(slow) != n:
            raise ValueError("one route per destination MAC")
        if any(slow) or any(a not in (0, NEVER) for a in same_at):
            raise ValueError("again: no slow route, same_at 0 or NEVER only")
        if self._frames and self._pushed < len(self._frames):
            raise ValueError("again: the last burst was not pushed whole")
        self.finish(mem, tx)
        total = last = 0
        error: VirtqueueError | None = None
        sums = dict.fromkeys(STATS, 0)
        per_queue = [[[0] * len(OUT_STATS) for _ in out.queues] for out in outs]
        out_errors: list[BaseException | None] = [None] * len(outs)
        self.in_fault = None
        for _ in range(bursts):
            self.stats = dict.fromkeys(STATS, 0)
            last, error = self._pull(mem, tx, limit, 0, closed=True)
            total += last
            broke = False
            if self._frames:
                self.push(mem, 0, masks, same_at, slow, outs)
                for o, port in enumerate(self.out_queue_stats):
                    for q, qst in enumerate(port):
                        per_queue[o][q] = [a + b for a, b in zip(per_queue[o][q], qst,
                                                                 strict=True)]
                for o, e in enumerate(self.out_errors):
                    if e is not None:
                        broke = True
                        if out_errors[o] is None:
                            out_errors[o] = e
            for key in STATS:
                sums[key] += self.stats[key]
            if error is not None:
                break
            self.finish(mem, tx)
            if broke or last < limit:
                break
        self.stats = sums
        self.out_queue_stats = per_queue
        self.out_stats = _port_sums(per_queue)
        self.out_errors = out_errors
        return total, last, error


def _port_sums(per_queue: list[list[list[int]]]) -> list[list[int]]:
    """Each port's counts (:data:`OUT_STATS`): the sums of its queues'."""
    return [[sum(col) for col in zip(*per, strict=True)] for per in per_queue]


def _refused(need: int, mask: int, outs: list[Out]) -> bool:
    """Whether a port of ``mask`` does not take a frame needing ``need`` as it is: the
    switch must complete its checksum or segment it (the Python path's adapt_egress)."""
    o = 0
    while mask:
        if mask & 1 and need & ~outs[o].accepts:
            return True
        mask >>= 1
        o += 1
    return False


def engine() -> Callable[[], ForwardStep]:
    """The forward step that runs: the compiled one where the data path is compiled
    (``pyvhost.datapath.name()``), else this reference."""
    from pyvhost import datapath

    if datapath.name() == "compiled":
        from pyvhost.datapath import _native

        return _native.Forwarder
    return Forwarder
