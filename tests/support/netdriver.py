"""A guest's virtio-net driver on pyvhost's own front-end, for traffic through a back-end
process (``pyvhost net``) while the guest's memory changes.

- :func:`driver_ring`  the driver side of one split virtqueue
  (:class:`~support.ring.DriverRing`), laid out in the front-end's guest RAM where
  :meth:`Frontend.setup_vring` put it.
- :class:`SlotAllocator` fixed-size buffer slots in hot-plugged regions. A region about to
  be unplugged is closed to new buffers (``drain``) and tells how many it still has out:
  a guest's unplug guarantees that nothing in a removed DIMM is still handed to a device.
- :class:`NetDriver`    one guest: a :class:`~pyvhost.frontend.Frontend` (QEMU's part), a
  :class:`~pyvhost.frontend.FrontendMemory` (boot RAM with the rings, DIMMs for buffers),
  a receive and a transmit queue.
- :func:`make_frame` / :class:`FlowCheck`  frames with a flow id, a sequence number and a
  crc32 over both and the payload; the receiver checks every frame arrives once, in
  order, intact.
- :class:`Duplex`       two drivers exchanging such frames both ways, each sender paced by
  its receiver's posted buffers, so that a drop is never legitimate.

Everything here is the test's side: nothing knows how the back-end works inside. All
waits end at a deadline, a bound for a busy machine, never asserted as a speed.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import struct
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pyvhost.devices.virtio_net import VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS
from pyvhost.frontend import Frontend, FrontendMemory, GuestRam
from pyvhost.frontend.frontend import SUPPORTED_PROTOCOL_FEATURES, split_ring_layout
from pyvhost.protocol.constants import ProtocolFeature, VirtioFeature, VirtioStatus
from pyvhost.units import MiB

from .memfd import GuestView
from .ring import Buffer, DriverRing, RingLayout

#: Every wait ends by this deadline (seconds); generous for a shared 2-core machine.
TIMEOUT = 60.0
RX, TX = 0, 1
#: virtio-net header with VERSION_1 (num_buffers included), no MRG_RXBUF.
HDR = 12
#: A buffer slot: room for the header and the largest untagged Ethernet frame (1514).
SLOT = 2048
MIN_FRAME, MAX_FRAME = 60, 1514
#: The driver's features: 12-byte header, event index on; no MRG_RXBUF, so every frame
#: must fit one receive chain (ours all do), and no offloads (header all zero).
NET_FEATURES = (int(VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX)
                | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS)
DRIVER_OK = int(VirtioStatus.ACKNOWLEDGE | VirtioStatus.DRIVER | VirtioStatus.FEATURES_OK
                | VirtioStatus.DRIVER_OK)
ETHERTYPE = b"\x88\xb5"  # IEEE local experimental
BROADCAST = b"\xff" * 6



def mac(n: int) -> bytes:
    """A locally administered unicast MAC address ending in ``n`` (up to 32 bits)."""
    return b"\x02\x00" + (n & 0xFFFFFFFF).to_bytes(4, "big")


# ---------------------------------------------------------------------------------------
# Rings
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RamOffsets:
    """One region of the front-end's guest RAM addressed by offset from its start, as a
    :class:`~support.ring.RingMemory`."""

    ram: GuestRam

    def read(self, addr: int, length: int) -> bytes:
        return self.ram.read(addr, length)

    def write(self, addr: int, data: bytes) -> None:
        self.ram.write(addr, data)

    def va(self, addr: int) -> int:
        return self.ram.userspace_addr + addr


def driver_ring(fe: Frontend, index: int, size: int, ram: GuestRam, offset: int) -> DriverRing:
    """Queue ``index`` of ``size`` entries in ``ram`` at ``offset``, set up on the back-end
    by the front-end (which owns its eventfds). The driver negotiated EVENT_IDX."""
    desc, avail, used, _ = split_ring_layout(size)
    # The rings must be zero (avail idx 0, no flags) before the back-end sees them.
    ring = DriverRing(RamOffsets(ram), RingLayout(size, offset + desc, offset + avail,
                                                  offset + used),
                      index=index, event_idx=True)
    vring = fe.setup_vring(index, size, ram, offset)
    ring.kick_fd, ring.call_fd = vring.kick_fd, vring.call_fd
    assert ring.vas == (vring.desc_addr, vring.avail_addr, vring.used_addr)
    return ring


# ---------------------------------------------------------------------------------------
# Buffer slots in hot-pluggable regions
# ---------------------------------------------------------------------------------------

class _Area:
    __slots__ = ("draining", "free", "out", "ram", "served")

    def __init__(self, ram: GuestRam) -> None:
        self.ram = ram
        base = ram.guest_phys_addr
        self.free = [base + SLOT * i for i in reversed(range(ram.memory_size // SLOT))]
        self.out = 0
        self.served = 0  # buffers ever handed out here
        self.draining = False


class SlotAllocator:
    """Buffer slots of :data:`SLOT` bytes in the regions given to it.

    New buffers go to the newest region that is not draining, so frames live in the
    memory hot-added last; a draining region hands out nothing and counts what is still
    out, so that the caller unplugs it only once the device holds nothing in it.
    """

    def __init__(self) -> None:
        self._areas: list[_Area] = []
        self._owner: dict[int, _Area] = {}

    def add(self, ram: GuestRam) -> None:
        self._areas.append(_Area(ram))

    def _area(self, ram: GuestRam) -> _Area:
        for area in self._areas:
            if area.ram is ram:
                return area
        raise AssertionError(f"test bug: {ram!r} is not a buffer region")

    def drain(self, ram: GuestRam) -> None:
        self._area(ram).draining = True

    def outstanding(self, ram: GuestRam) -> int:
        return self._area(ram).out

    def served(self, ram: GuestRam) -> int:
        """How many buffers were ever handed out in ``ram``."""
        return self._area(ram).served

    def remove(self, ram: GuestRam) -> int:
        """Forget a drained region; returns how many buffers it served."""
        area = self._area(ram)
        assert area.out == 0, f"{area.out} buffers still out in {ram!r} (test bug)"
        self._areas.remove(area)
        return area.served

    @property
    def regions(self) -> list[GuestRam]:
        return [a.ram for a in self._areas]

    def alloc(self) -> int | None:
        for area in reversed(self._areas):
            if not area.draining and area.free:
                area.out += 1
                area.served += 1
                gpa = area.free.pop()
                self._owner[gpa] = area
                return gpa
        return None

    def release(self, gpa: int) -> None:
        area = self._owner.pop(gpa)
        area.out -= 1
        area.free.append(gpa)


# ---------------------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------------------

#: After the Ethernet header: flow id, sequence number, crc32 of (flow, seq, payload).
_TAG = struct.Struct("!HQI")
_FLOW_SEQ = struct.Struct("!HQ")
TAG_END = 14 + _TAG.size


def make_frame(dst: bytes, src: bytes, flow: int, seq: int, rng: random.Random,
               size: int | None = None) -> bytes:
    """A frame of ``size`` (default random in 60..1514) bytes with a random payload."""
    if size is None:
        size = rng.randint(MIN_FRAME, MAX_FRAME)
    payload = rng.randbytes(size - TAG_END)
    crc = zlib.crc32(payload, zlib.crc32(_FLOW_SEQ.pack(flow, seq)))
    return dst + src + ETHERTYPE + _TAG.pack(flow, seq, crc) + payload


def frame_tag(frame: bytes) -> tuple[int, int]:
    """(flow, seq) of a frame made by :func:`make_frame`; checks the crc."""
    assert len(frame) >= TAG_END and frame[12:14] == ETHERTYPE, \
        f"not one of our frames ({len(frame)} bytes: {frame[:TAG_END].hex()})"
    flow, seq, crc = _TAG.unpack_from(frame, 14)
    payload = frame[TAG_END:]
    got = zlib.crc32(payload, zlib.crc32(_FLOW_SEQ.pack(flow, seq)))
    assert got == crc, (f"flow {flow} seq {seq}: {len(frame)}-byte frame corrupted "
                        f"(crc {got:#010x}, sent {crc:#010x})")
    return flow, seq


class FlowCheck:
    """The receiving end of one flow: every frame once, in order, intact."""

    def __init__(self, flow: int, src: bytes, dst: bytes) -> None:
        self.flow, self.src, self.dst = flow, src, dst
        self.received = 0

    def check(self, frame: bytes) -> None:
        flow, seq = frame_tag(frame)
        assert flow == self.flow, f"flow {flow} arrived where flow {self.flow} is expected"
        assert frame[:6] == self.dst and frame[6:12] == self.src, \
            f"flow {flow} seq {seq}: addresses changed: {frame[:12].hex()}"
        assert seq == self.received, (f"flow {flow}: got seq {seq}, expected "
                                      f"{self.received} (lost, duplicated or reordered)")
        self.received += 1


# ---------------------------------------------------------------------------------------
# A guest
# ---------------------------------------------------------------------------------------

class NetDriver:
    """One guest on one vhost-user-net socket: QEMU's messages plus a virtio-net driver.

    Boot RAM (GPA 0) holds the rings and is never unplugged; receive and transmit
    buffers live in DIMMs (:meth:`plug`), which come and go.
    """

    def __init__(self, path: str, address: bytes, *, mem_slots: bool | None = None,
                 rx_size: int = 256, tx_size: int = 256, boot_size: int = 2 * MiB) -> None:
        self.path = path
        self.mac = address
        self.mem_slots = mem_slots
        self.rx_size, self.tx_size, self.boot_size = rx_size, tx_size, boot_size
        self.fe = Frontend()
        self.memory = FrontendMemory()
        #: Guest memory by GPA, as the driver sees it.
        self.guest = GuestView(self.memory)
        self.slots = SlotAllocator()
        self.rx: DriverRing | None = None
        self.tx: DriverRing | None = None
        self._rx_bufs: dict[int, int] = {}  # head -> slot GPA
        self._tx_bufs: dict[int, int | None] = {}  # head -> slot GPA (None: shared)
        self._shared: dict[bytes, int] = {}  # flood frame -> its one slot
        self._k = 0  # varies the chain layouts
        #: Requests sent to change the memory table, by name.
        self.memory_requests: dict[str, int] = {}
        #: For every DIMM unplugged: how many buffers it carried while plugged.
        self.unplugged_served: list[int] = []

    # -- set-up -----------------------------------------------------------------------------
    def start(self) -> NetDriver:
        """Negotiate like QEMU 7.2, send the boot table, set up both queues, DRIVER_OK."""
        fe = self.fe
        fe.connect(self.path, timeout=TIMEOUT)
        protocol = SUPPORTED_PROTOCOL_FEATURES
        if self.mem_slots is False:
            protocol &= ~ProtocolFeature.CONFIGURE_MEM_SLOTS
        negotiated = fe.negotiate(features=NET_FEATURES, protocol_features=protocol)
        if self.mem_slots is not None:
            assert negotiated.mem_slots == self.mem_slots, negotiated.protocol_feature_names
        assert negotiated.features & NET_FEATURES == NET_FEATURES, hex(negotiated.features)
        boot = self.memory.add_boot_ram(self.boot_size)
        self._update()
        _, _, _, rx_total = split_ring_layout(self.rx_size)
        tx_offset = -(-rx_total // 4096) * 4096
        self.rx = driver_ring(fe, RX, self.rx_size, boot, 0)
        self.tx = driver_ring(fe, TX, self.tx_size, boot, tx_offset)
        fe.set_status(DRIVER_OK)
        return self

    def close(self) -> None:
        """Hang up, then free the guest RAM (the back-end drops its copies on hang-up)."""
        self.fe.close()
        self.memory.close()

    def _rings(self) -> tuple[DriverRing, DriverRing]:
        assert self.rx is not None and self.tx is not None, "start() first"
        return self.rx, self.tx

    @property
    def call_fds(self) -> list[int]:
        rx, tx = self._rings()
        assert rx.call_fd is not None and tx.call_fd is not None
        return [rx.call_fd, tx.call_fd]

    # -- memory hot-plug ---------------------------------------------------------------------
    def _update(self) -> list[str]:
        sent = self.fe.update_memory(self.memory)
        for name in sent:
            self.memory_requests[name] = self.memory_requests.get(name, 0) + 1
        return sent

    def plug(self, size: int) -> GuestRam:
        """Hot-add a DIMM; buffers go there once the back-end acknowledged it."""
        ram = self.memory.add_dimm(size)
        sent = self._update()
        assert sent == (["ADD_MEM_REG"] if self.fe.uses_mem_slots else ["SET_MEM_TABLE"]), sent
        self.slots.add(ram)
        return ram

    def drain(self, ram: GuestRam) -> None:
        """Stop putting buffers in ``ram`` (the guest offlines the memory)."""
        self.slots.drain(ram)

    def drained(self, ram: GuestRam) -> bool:
        return self.slots.outstanding(ram) == 0

    def unplug(self, ram: GuestRam, replace_with: int | None = None) -> GuestRam | None:
        """Remove a drained DIMM (and, with ``replace_with``, add one of that size in the
        same table update): QEMU's order is detach, tell the back-end, free the RAM.
        Records in :attr:`unplugged_served` how many buffers the DIMM carried."""
        self.unplugged_served.append(self.slots.remove(ram))
        self.memory.detach(ram)
        new = self.memory.add_dimm(replace_with) if replace_with is not None else None
        try:
            sent = self._update()
        finally:
            ram.close()
        if self.fe.uses_mem_slots:
            assert sent == ["REM_MEM_REG"] + (["ADD_MEM_REG"] if new else []), sent
        else:
            assert sent == ["SET_MEM_TABLE"], sent
        if new is not None:
            self.slots.add(new)
        return new

    # -- data path ---------------------------------------------------------------------------
    @property
    def rx_outstanding(self) -> int:
        """Receive chains posted and not yet taken back."""
        return len(self._rx_bufs)

    @property
    def tx_outstanding(self) -> int:
        """Transmit chains the device has not returned yet."""
        return len(self._tx_bufs)

    def post_rx(self, limit: int | None = None) -> int:
        """Post receive buffers until the ring or the slots run out (or ``limit``)."""
        rx, _ = self._rings()
        posted = 0
        while rx.room >= 2 and (limit is None or posted < limit):
            gpa = self.slots.alloc()
            if gpa is None:
                break
            self._k += 1
            if self._k % 2:
                head = rx.add([Buffer(gpa, SLOT, True)], publish=False)
            else:  # header and frame in separate descriptors, as Linux's "big packets" do
                head = rx.add([Buffer(gpa, HDR, True), Buffer(gpa + HDR, SLOT - HDR, True)],
                              publish=False)
            self._rx_bufs[head] = gpa
            posted += 1
        if posted:
            rx.publish()
            rx.kick()
        return posted

    def can_send(self) -> bool:
        _, tx = self._rings()
        return tx.room >= 3

    def send(self, frame: bytes) -> bool:
        """Queue one frame (not yet published); False when no slot or descriptor is free."""
        _, tx = self._rings()
        if tx.room < 3:
            return False
        gpa = self.slots.alloc()
        if gpa is None:
            return False
        self.guest.write(gpa, bytes(HDR) + frame)
        self._k += 1
        layout = self._k % 3
        n = len(frame)
        if layout == 0:
            head = tx.add([Buffer(gpa, HDR + n)], publish=False)
        elif layout == 1:
            head = tx.add([Buffer(gpa, HDR), Buffer(gpa + HDR, n)], publish=False)
        else:
            half = n // 2
            head = tx.add([Buffer(gpa, HDR), Buffer(gpa + HDR, half),
                           Buffer(gpa + HDR + half, n - half)], publish=False)
        self._tx_bufs[head] = gpa
        return True

    def flood(self, frame: bytes, count: int) -> int:
        """Queue up to ``count`` chains that all point at one buffer holding ``frame``
        (the device only reads it; that slot stays taken), publish and kick; returns how
        many were queued."""
        _, tx = self._rings()
        gpa = self._shared.get(frame)
        if gpa is None:
            gpa = self.slots.alloc()
            assert gpa is not None, "no buffer slot for a flood frame"
            self.guest.write(gpa, bytes(HDR) + frame)
            self._shared[frame] = gpa
        n = min(count, tx.room)
        chain = [Buffer(gpa, HDR + len(frame))]
        for _ in range(n):
            self._tx_bufs[tx.add(chain, publish=False)] = None
        if n:
            self.flush_tx()
        return n

    def flush_tx(self) -> None:
        _, tx = self._rings()
        tx.publish()
        tx.kick()

    def reap_tx(self) -> int:
        """Take back sent chains; returns how many."""
        _, tx = self._rings()
        used = tx.take_used()
        for head, _ in used:
            gpa = self._tx_bufs.pop(head)
            if gpa is not None:
                self.slots.release(gpa)
        return len(used)

    def reap_rx(self) -> list[bytes]:
        """The frames received since the last call, virtio-net header checked and cut."""
        rx, _ = self._rings()
        frames = []
        for head, written in rx.take_used():
            gpa = self._rx_bufs.pop(head)
            assert HDR + 14 <= written <= SLOT, f"receive chain {head}: {written} bytes written"
            data = self.guest.read(gpa, written)
            self.slots.release(gpa)
            # VERSION_1 without offloads: flags 0, gso_type 0; num_buffers is 1 without
            # MRG_RXBUF ("the device MUST set num_buffers to 1" then).
            assert data[:2] == b"\0\0" and data[10:12] == b"\x01\x00", data[:HDR].hex()
            frames.append(data[HDR:])
        return frames


# ---------------------------------------------------------------------------------------
# Two guests talking
# ---------------------------------------------------------------------------------------

class Flow:
    """Frames from ``src`` to ``dst``, numbered from 0, random sizes."""

    def __init__(self, flow: int, src: NetDriver, dst: NetDriver, seed: int) -> None:
        self.src, self.dst = src, dst
        self.rng = random.Random(seed)
        self.sent = 0
        self.check = FlowCheck(flow, src.mac, dst.mac)
        self.flow = flow

    @property
    def in_flight(self) -> int:
        return self.sent - self.check.received

    def send_some(self, limit: int | None) -> int:
        """Send while the receiver has a posted buffer for every frame in flight (so the
        switch never has a legitimate reason to drop) and the sender has room."""
        n = 0
        while (self.in_flight < self.dst.rx_outstanding and (limit is None or self.sent < limit)
               and self.src.can_send()):
            frame = make_frame(self.dst.mac, self.src.mac, self.flow, self.sent, self.rng)
            if not self.src.send(frame):
                break
            self.sent += 1
            n += 1
        return n


def wait_any(fds: Iterable[int], timeout: float) -> None:
    """Sleep until one of the call eventfds fires (or ``timeout``), and clear them."""
    ready, _, _ = select.select(list(fds), [], [], timeout)
    for fd in ready:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(fd)


class Duplex:
    """Two guests exchanging sequenced frames both ways through a switch."""

    def __init__(self, a: NetDriver, b: NetDriver, seed: int = 0,
                 limit: int | None = None) -> None:
        self.a, self.b = a, b
        self.flows = [Flow(1, a, b, seed), Flow(2, b, a, seed + 1)]
        #: Frames per flow to send in all; None: until told to stop.
        self.limit = limit
        self.sending = True

    @property
    def drivers(self) -> tuple[NetDriver, NetDriver]:
        return self.a, self.b

    def pump(self) -> int:
        """One round: take back what the device returned, check what arrived, post
        receive buffers, send what credit allows. Returns the work done."""
        work = 0
        for drv in self.drivers:
            work += drv.reap_tx()
        for flow in self.flows:
            for frame in flow.dst.reap_rx():
                flow.check.check(frame)
                work += 1
        for drv in self.drivers:
            work += drv.post_rx()
        if self.sending:
            for flow in self.flows:
                n = flow.send_some(self.limit)
                if n:
                    flow.src.flush_tx()
                work += n
        return work

    def run_until(self, done: Callable[[], bool], what: str, timeout: float = TIMEOUT,
                  also: Callable[[], int] | None = None) -> None:
        """Pump until ``done()``; ``also`` is pumped too (other traffic of the test)."""
        deadline = time.monotonic() + timeout
        fds = [fd for drv in self.drivers for fd in drv.call_fds]
        while not done():
            work = self.pump() + (also() if also is not None else 0)
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: "
                                     + ", ".join(f"flow {f.flow} sent {f.sent} received "
                                                 f"{f.check.received}" for f in self.flows))
            if work == 0:
                wait_any(fds, 0.02)

    def finish(self, timeout: float = TIMEOUT) -> None:
        """Stop sending and wait until every frame sent has arrived."""
        self.sending = False
        self.run_until(lambda: all(f.in_flight == 0 for f in self.flows)
                       and all(d.tx_outstanding == 0 for d in self.drivers),
                       "every frame in flight to arrive", timeout)

    @property
    def complete(self) -> bool:
        """With a limit: every frame of both flows sent and received."""
        return self.limit is not None and all(
            f.sent == self.limit and f.check.received == self.limit for f in self.flows)
