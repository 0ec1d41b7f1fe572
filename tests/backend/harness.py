"""A virtio-net front-end and driver for back-end tests, built on :mod:`.rawclient` and
:class:`~support.ring.DriverRing`.

:class:`NetPort` plays QEMU 7.2's part on one connection (negotiation, memory table,
vrings) and a guest driver's (receive buffers on queue 0, frames on queue 1), so that
frames can be pushed through a ``ReflectNet`` and checked to come back with their MAC
addresses swapped. Everything it allocates (memfds, eventfds, the socket) is released
by :meth:`NetPort.close`, so tests can count fds around it.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence

from pyvhost.devices.virtio_net import VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS
from pyvhost.protocol import messages as m
from pyvhost.protocol.constants import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    ProtocolFeature,
    Request,
    VirtioFeature,
    VirtioStatus,
)
from support.memfd import GuestView, MemfdRegion
from support.ring import Buffer, DriverRing, RingLayout

from .rawclient import EMPTY, RawClient

PF = ProtocolFeature
#: What QEMU 7.2 asks of a vhost-user-net back-end (REPLY_ACK, memory slots, status...),
#: never CONFIG (acked only for devices such as vhost-user-blk; net offers none).
QEMU_PROTOCOL = PF.REPLY_ACK | PF.CONFIGURE_MEM_SLOTS | PF.STATUS | PF.MQ
#: What QEMU 7.2 asks when the back-end lacks CONFIGURE_MEM_SLOTS (and DPDK 22.11 asks).
TABLE_PROTOCOL = PF.REPLY_ACK | PF.STATUS | PF.MQ
#: The driver's features: the virtio-net header is 12 bytes (VERSION_1), no MRG_RXBUF.
NET_FEATURES = (int(VirtioFeature.VERSION_1) | VHOST_USER_F_PROTOCOL_FEATURES
                | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS)
DRIVER_OK = int(VirtioStatus.ACKNOWLEDGE | VirtioStatus.DRIVER | VirtioStatus.FEATURES_OK
                | VirtioStatus.DRIVER_OK)

RX, TX = 0, 1
HDR = 12
MAX_FRAME = 2048
SLOT = 4096
INDIRECT_AT = 3584  # where in a tx slot an indirect table goes (after hdr + frame)
RAM_GPA = 0
RAM_SIZE = 1 << 20
RING_GPA = 0x4000_0000
RING_SIZE = 64 << 10


def region_name(tag: str) -> str:
    """A memfd name unique to this test run, so /proc/self/maps lines can be told apart."""
    return f"pyvhost-test-{tag}-{uuid.uuid4().hex[:8]}"


def make_frames(count: int, seed: int = 0) -> list[bytes]:
    """Ethernet frames of many sizes (14 bytes up to MAX_FRAME) with random payloads."""
    rng = random.Random(seed)
    frames = []
    for i in range(count):
        size = 14 + (i * 211 + rng.randrange(64)) % (MAX_FRAME - 13)
        dst = bytes([0x02, 0, 0, 0, i & 0xFF, 1])
        src = bytes([0x02, 0, 0, 0, i & 0xFF, 2])
        frames.append(dst + src + b"\x88\xb5" + rng.randbytes(size - 14))
    return frames


def swapped(frame: bytes) -> bytes:
    return frame[6:12] + frame[0:6] + frame[12:]


class Pool:
    """Fixed-size buffer slots in one region of guest memory."""

    def __init__(self, region: MemfdRegion, count: int) -> None:
        assert count * SLOT <= region.size
        self.region = region
        self.free = list(range(count))

    def alloc(self) -> int:
        return self.region.gpa + SLOT * self.free.pop()

    def release(self, gpa: int) -> None:
        self.free.append((gpa - self.region.gpa) // SLOT)


class NetPort:
    """One vhost-user-net connection, driven like QEMU 7.2 plus a guest driver."""

    def __init__(self, path: str, *, tag: str = "port", protocol: int = QEMU_PROTOCOL,
                 features: int = NET_FEATURES, queue_size: int = 64,
                 queue_pairs: int = 1) -> None:
        self.client = RawClient.connect(path)
        self.protocol = protocol
        self.wanted_features = features
        self.features = 0
        self.queue_size = queue_size
        self.ram = MemfdRegion(region_name(f"{tag}-ram"), RAM_SIZE, RAM_GPA)
        self.ring_mem = MemfdRegion(region_name(f"{tag}-rings"), RING_SIZE, RING_GPA)
        self.regions = [self.ram, self.ring_mem]
        self.guest = GuestView(self.regions)
        self.pool = Pool(self.ram, RAM_SIZE // SLOT)
        self.rx = self._ring(RX, 0)
        self.tx = self._ring(TX, RING_SIZE // 2)
        #: Every ring: queue 2k is receiveq(k+1), 2k+1 transmitq(k+1). Pairs after the
        #: first sit in the first half (receive) and second half (transmit) of ring_mem.
        self.rings = [self.rx, self.tx]
        for k in range(1, queue_pairs):
            step = RING_SIZE // 2 // queue_pairs
            self.rings.append(self._ring(2 * k, k * step))
            self.rings.append(self._ring(2 * k + 1, RING_SIZE // 2 + k * step))
        self.extra: list[MemfdRegion] = []
        self.closed = False

    def _ring(self, index: int, offset: int) -> DriverRing:
        """Queue ``index`` at ``offset`` of ring_mem, with its kick, call and err eventfds.
        Its addresses are offsets in ring_mem, which a test may move in GPA space."""
        layout = RingLayout.contiguous(self.queue_size, offset, used_align=64)
        assert layout.end <= RING_SIZE, "ring does not fit its region"
        return DriverRing.with_eventfds(self.ring_mem, layout, index=index)

    def extra_region(self, tag: str, gpa: int, size: int = RAM_SIZE) -> MemfdRegion:
        """One more memfd region of this port (closed with the port)."""
        region = MemfdRegion(region_name(tag), size, gpa)
        self.extra.append(region)
        self.regions.append(region)
        return region

    def close(self) -> None:
        """Release everything the port holds. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.client.close()
        for ring in self.rings:
            ring.close()
        for region in (self.ram, self.ring_mem, *self.extra):
            region.close()

    # -- control plane ---------------------------------------------------------------------
    def ok(self, request: int, payload: m.Payload = EMPTY, *,
           fds: Sequence[int] = ()) -> None:
        """A request that must succeed (REPLY_ACK 0 when acks are on)."""
        reply = self.client.request(request, payload, fds=fds)
        assert reply is None or reply == m.U64(0), f"{Request(request).name} refused"

    def negotiate(self) -> None:
        """QEMU 7.2's order: features, protocol features, queues, slots, owner, features."""
        c = self.client
        offered = c.get_u64(Request.GET_FEATURES)
        assert offered & VHOST_USER_F_PROTOCOL_FEATURES
        pf = self.protocol & c.get_u64(Request.GET_PROTOCOL_FEATURES)
        self.ok(Request.SET_PROTOCOL_FEATURES, m.U64(pf))
        c.reply_ack = bool(pf & PF.REPLY_ACK)
        if pf & PF.MQ:
            assert c.get_u64(Request.GET_QUEUE_NUM) >= 1
        if pf & PF.CONFIGURE_MEM_SLOTS:
            assert c.get_u64(Request.GET_MAX_MEM_SLOTS) >= 2
        self.ok(Request.SET_OWNER)
        self.features = self.wanted_features & offered
        self.ok(Request.SET_FEATURES, m.U64(self.features))

    def set_mem_table(self, regions: Sequence[MemfdRegion]) -> None:
        table = m.MemoryTable(tuple(r.region() for r in regions))
        self.ok(Request.SET_MEM_TABLE, table, fds=[r.fd for r in regions])

    def add_region(self, region: MemfdRegion) -> None:
        self.ok(Request.ADD_MEM_REG, m.SingleMemoryRegion(region.region()), fds=[region.fd])

    def remove_region(self, region: MemfdRegion, *, with_fd: bool = False) -> None:
        self.ok(Request.REM_MEM_REG, m.SingleMemoryRegion(region.region()),
                fds=[region.fd] if with_fd else [])

    def setup_memory(self) -> None:
        if self.protocol & PF.CONFIGURE_MEM_SLOTS:
            for region in (self.ram, self.ring_mem):
                self.add_region(region)
        else:
            self.set_mem_table([self.ram, self.ring_mem])

    def setup_ring(self, ring: DriverRing) -> None:
        i = ring.index
        self.ok(Request.SET_VRING_NUM, m.VringState(i, ring.size))
        self.ok(Request.SET_VRING_BASE, m.VringState(i, 0))
        self.ok(Request.SET_VRING_ADDR, ring.addr())
        assert ring.kick_fd is not None and ring.call_fd is not None
        assert ring.err_fd is not None
        self.ok(Request.SET_VRING_KICK, m.VringFd(i, False), fds=[ring.kick_fd])
        self.ok(Request.SET_VRING_CALL, m.VringFd(i, False), fds=[ring.call_fd])
        self.ok(Request.SET_VRING_ERR, m.VringFd(i, False), fds=[ring.err_fd])
        if self.features & VHOST_USER_F_PROTOCOL_FEATURES:
            self.ok(Request.SET_VRING_ENABLE, m.VringState(i, 1))

    def start(self) -> NetPort:
        """Negotiate, send memory, start both rings, set DRIVER_OK."""
        self.negotiate()
        self.setup_memory()
        for ring in self.rings:
            self.setup_ring(ring)
        if self.protocol & PF.STATUS:
            self.ok(Request.SET_STATUS, m.U64(DRIVER_OK))
        return self

    def status(self) -> int:
        return self.client.get_u64(Request.GET_STATUS)

    # -- data plane ------------------------------------------------------------------------
    def _post_rx(self, k: int, pool: Pool) -> tuple[int, int]:
        gpa = pool.alloc()
        if k % 2:
            head = self.rx.add([Buffer(gpa, HDR, True), Buffer(gpa + HDR, MAX_FRAME, True)])
        else:
            head = self.rx.add([Buffer(gpa, HDR + MAX_FRAME, True)])
        return head, gpa

    def _post_tx(self, k: int, frame: bytes, pool: Pool) -> tuple[int, int]:
        gpa = pool.alloc()
        self.guest.write(gpa, bytes(HDR) + frame)
        hdr, body = Buffer(gpa, HDR), Buffer(gpa + HDR, len(frame))
        layout = k % 4
        if layout == 0:
            head = self.tx.add([Buffer(gpa, HDR + len(frame))])
        elif layout == 1:
            head = self.tx.add([hdr, body])
        elif layout == 2:
            half = len(frame) // 2
            head = self.tx.add([hdr, Buffer(gpa + HDR, half),
                                Buffer(gpa + HDR + half, len(frame) - half)])
        elif self.features & VirtioFeature.RING_INDIRECT_DESC:
            head = self.tx.add_indirect(gpa + INDIRECT_AT, [hdr, body], memory=self.guest)
        else:
            head = self.tx.add([hdr, body])
        return head, gpa

    def exchange(self, frames: Sequence[bytes], pool: Pool | None = None) -> list[bytes]:
        """Transmit ``frames`` on queue 1; return what arrived on queue 0 (headers checked).

        Works in batches of half the queue so that ring indices wrap around.
        """
        pool = pool or self.pool
        batch = self.queue_size // 2
        received: list[bytes] = []
        for start in range(0, len(frames), batch):
            chunk = frames[start:start + batch]
            rx_bufs = dict(self._post_rx(k, pool) for k in range(len(chunk)))
            self.rx.kick()
            tx_bufs = dict(self._post_tx(start + k, f, pool) for k, f in enumerate(chunk))
            self.tx.kick()
            tx_used = self.tx.wait_used(len(chunk))
            rx_used = self.rx.wait_used(len(chunk))
            assert sorted(h for h, _ in tx_used) == sorted(tx_bufs)
            for head, written in rx_used:
                data = self.guest.read(rx_bufs[head], written)
                assert data[:HDR] == bytes(10) + b"\x01\x00", data[:HDR].hex()
                received.append(data[HDR:])
            for gpa in (*rx_bufs.values(), *tx_bufs.values()):
                pool.release(gpa)
        return received

    def check_traffic(self, count: int = 40, seed: int = 1, pool: Pool | None = None) -> None:
        """Frames sent come back MAC-swapped with their payload intact."""
        frames = make_frames(count, seed)
        got = self.exchange(frames, pool)
        assert len(got) == len(frames)
        for i, (sent, back) in enumerate(zip(frames, got, strict=True)):
            assert back == swapped(sent), f"frame {i} ({len(sent)} bytes) came back wrong"
