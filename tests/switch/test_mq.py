"""Several queue pairs on a switch port (VIRTIO_NET_F_MQ), driven by the in-process
front-end the way QEMU and DPDK drive it: GET_QUEUE_NUM, max_virtqueue_pairs in the config,
pairs turned on and off with SET_VRING_ENABLE (the control queue is the front-end's)."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from backend.harness import HDR, NET_FEATURES, NetPort
from backend.rawclient import wait_until
from pyvhost.devices.virtio_net import VIRTIO_NET_F_CSUM, VIRTIO_NET_F_MQ
from pyvhost.protocol import messages as m
from pyvhost.protocol.constants import Request, VirtioFeature
from pyvhost.switch import Switch, SwitchPort
from support.ring import Buffer, DriverRing

from .conftest import Switched

PAIRS = 3
MQ_FEATURES = NET_FEATURES | VIRTIO_NET_F_MQ | int(VirtioFeature.RING_EVENT_IDX)
RX_SIZE = 2048


def frame(dst: int, src: int, flow: int, seq: int) -> bytes:
    """An IPv4/UDP frame of flow ``flow`` (its source port), ``seq`` in the payload."""
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + 8 + 4, 0, 0, 64, 17, 0,
                     bytes([10, 0, 0, src]), bytes([10, 0, 0, dst]))
    udp = struct.pack(">HHHH", 10000 + flow, 9, 12, 0)
    return (bytes([2, 0, 0, 0, 0, dst, 2, 0, 0, 0, 0, src]) + b"\x08\x00" + ip + udp
            + struct.pack(">I", seq))


class MqGuest:
    """A driver with ``pairs`` queue pairs on one switch port."""

    def __init__(self, sw: Switched, tag: str, pairs: int, features: int) -> None:
        self.port = NetPort(sw.path, tag=tag, features=features, queue_pairs=pairs).start()
        wait_until(lambda: len(sw.devices) > 0 and sw.devices[-1].port.name != "vhost-user",
                   "port attached")
        self.device = sw.devices[-1]
        self.rx_bufs: dict[tuple[int, int], int] = {}

    def ring(self, index: int) -> DriverRing:
        return self.port.rings[index]

    def post_rx(self, pair: int, count: int) -> None:
        ring = self.ring(2 * pair)
        for _ in range(count):
            gpa = self.port.pool.alloc()
            self.rx_bufs[ring.index, ring.add([Buffer(gpa, RX_SIZE, True)])] = gpa
        ring.kick()

    def send(self, pair: int, frames: list[bytes], headers: list[bytes] | None = None) -> None:
        ring = self.ring(2 * pair + 1)
        gpas = []
        for k, f in enumerate(frames):
            gpa = self.port.pool.alloc()
            self.port.guest.write(gpa, (headers[k] if headers else bytes(HDR)) + f)
            ring.add([Buffer(gpa, HDR + len(f))])
            gpas.append(gpa)
        ring.kick()
        ring.wait_used(len(frames))
        for gpa in gpas:
            self.port.pool.release(gpa)

    def received(self, pair: int) -> list[bytes]:
        ring = self.ring(2 * pair)
        out = []
        for head, written in ring.take_used():
            gpa = self.rx_bufs.pop((ring.index, head))
            out.append(self.port.guest.read(gpa, written)[HDR:])
            self.port.pool.release(gpa)
        return out

    def avail_event(self, index: int) -> int:
        """The used ring's avail_event (what the device asked to be kicked at)."""
        return self.ring(index).avail_event()

    def enable(self, pair: int, on: bool) -> None:
        for index in (2 * pair, 2 * pair + 1):
            self.port.ok(Request.SET_VRING_ENABLE, m.VringState(index, int(on)))

    def close(self) -> None:
        self.port.close()


@pytest.fixture(params=[NET_FEATURES], ids=["plain"])
def mq(switched: Switched, request: pytest.FixtureRequest) -> Iterator[tuple[MqGuest, MqGuest]]:
    """A with three queue pairs, B with one (B's features: the parameter), on the same
    switch."""
    b_features: int = request.param
    pairs = iter([PAIRS, 1])

    def factory() -> SwitchPort:
        n = len(switched.devices)
        dev = SwitchPort(switched.switch, bytes([0x52, 0x54, 0, 0, 0, n]),
                         queue_pairs=next(pairs))
        switched.devices.append(dev)
        return dev

    switched.server.factory = factory
    made: list[MqGuest] = []
    try:
        made.append(MqGuest(switched, "a", PAIRS, MQ_FEATURES))
        made.append(MqGuest(switched, "b", 1, b_features))
        yield made[0], made[1]
    finally:
        for g in made:
            g.close()


def test_mq_is_offered_with_the_queue_count(mq: tuple[MqGuest, MqGuest]) -> None:
    a, b = mq
    c = a.port.client
    assert c.get_u64(Request.GET_QUEUE_NUM) == PAIRS
    assert c.get_u64(Request.GET_FEATURES) & VIRTIO_NET_F_MQ
    assert a.port.features & VIRTIO_NET_F_MQ
    # max_virtqueue_pairs in the config space (the front-end builds its own: CONFIG is
    # not offered for net devices, so read the device's).
    assert struct.unpack_from("<H", a.device.config(), 8)[0] == PAIRS
    # A one-pair port offers no MQ.
    assert b.port.client.get_u64(Request.GET_QUEUE_NUM) == 1
    assert not b.port.client.get_u64(Request.GET_FEATURES) & VIRTIO_NET_F_MQ


def test_every_transmit_queue_is_served_and_kicks_are_suppressed_per_queue(
        mq: tuple[MqGuest, MqGuest]) -> None:
    a, b = mq
    b.post_rx(0, 48)
    sent: list[bytes] = []
    for pair, count in ((0, 3), (1, 5), (2, 7)):
        frames = [frame(2, 1, pair, k) for k in range(count)]
        a.send(pair, frames)
        sent += frames
    wait_until(lambda: b.ring(0).used_idx() == len(sent), "B received all")
    assert b.received(0) == sent  # in order: one pair at a time
    # EVENT_IDX: each transmit queue asks for a kick at the next chain it has not seen.
    for pair, count in ((0, 3), (1, 5), (2, 7)):
        assert a.avail_event(2 * pair + 1) == count
    assert a.device.port.counters.rx_frames == len(sent)


def test_flows_spread_over_enabled_receive_queues_and_stay_in_order(
        mq: tuple[MqGuest, MqGuest]) -> None:
    a, b = mq
    for pair in range(PAIRS):
        a.post_rx(pair, 40)
    flows = 12
    frames = [frame(1, 2, flow, seq) for seq in range(3) for flow in range(flows)]
    b.send(0, frames)
    total = len(frames)
    wait_until(lambda: sum(a.ring(2 * p).used_idx() for p in range(PAIRS)) == total,
               "A received all")
    where: dict[int, int] = {}
    got: list[bytes] = []
    for pair in range(PAIRS):
        seen: dict[int, int] = {}
        for f in a.received(pair):
            flow = struct.unpack_from(">H", f, 34)[0] - 10000
            seq = struct.unpack_from(">I", f, 42)[0]
            assert where.setdefault(flow, pair) == pair, "a flow stays on one queue"
            assert seen.get(flow, -1) == seq - 1, "a flow stays in order"
            seen[flow] = seq
            got.append(f)
    assert sorted(got) == sorted(frames)
    assert len(set(where.values())) > 1, "12 flows all hashed to one queue"

    # The front-end turns pair 2 off (as after ethtool -L combined 2): nothing more goes
    # there, and its transmit queue is not served until it is on again.
    a.enable(2, False)
    b.send(0, frames)
    wait_until(lambda: sum(a.ring(2 * p).used_idx() for p in range(2)) == 2 * total
               - sum(1 for v in where.values() if v == 2) * 3, "A received on pairs 0, 1")
    for pair in range(2):
        a.received(pair)
    assert a.ring(4).used_idx() == sum(1 for v in where.values() if v == 2) * 3
    ring = a.ring(5)
    gpa = a.port.pool.alloc()
    late = frame(2, 1, 99, 0)
    a.port.guest.write(gpa, bytes(HDR) + late)
    ring.add([Buffer(gpa, HDR + len(late))])
    ring.kick()
    b.post_rx(0, 4)
    a.send(0, [frame(2, 1, 0, 0)])  # pair 0 still works
    wait_until(lambda: b.ring(0).used_idx() == 1, "B got the frame from pair 0")
    assert ring.used_idx() == 0, "a disabled queue was served"
    a.enable(2, True)  # SET_VRING_ENABLE 1 serves what waits there
    ring.wait_used(1)
    wait_until(lambda: b.ring(0).used_idx() == 2, "B got the frame from pair 2")
    assert b.received(0)[1] == late


@pytest.mark.parametrize("mq", [NET_FEATURES | VIRTIO_NET_F_CSUM], ids=["b-csum"],
                         indirect=True)
def test_a_flow_keeps_its_queue_across_the_compiled_and_the_python_path(
        mq: tuple[MqGuest, MqGuest]) -> None:
    """Frames of one flow, some with a checksum offload header (they take the Python
    path: checked, then completed for A, which did not negotiate GUEST_CSUM) and some
    without (the forward step, compiled where built): both paths pick A's receive queue
    by the same flow hash, so each flow arrives on one queue, in order."""
    a, b = mq
    for pair in range(PAIRS):
        a.post_rx(pair, 60)
    flows = 12
    frames, headers = [], []
    for seq in range(4):
        for flow in range(flows):
            frames.append(frame(1, 2, flow, seq))
            # NEEDS_CSUM over the UDP datagram (csum_start 34, its checksum at +6) on
            # every other frame of each flow.
            offload = (seq + flow) % 2 == 1
            headers.append(struct.pack("<BBHHHHH", 1, 0, 0, 0, 34, 6, 0) if offload
                           else bytes(HDR))
    b.send(0, frames, headers)
    wait_until(lambda: sum(a.ring(2 * p).used_idx() for p in range(PAIRS)) == len(frames),
               "A received all")
    where: dict[int, int] = {}
    for pair in range(PAIRS):
        seen: dict[int, int] = {}
        for f in a.received(pair):
            flow = struct.unpack_from(">H", f, 34)[0] - 10000
            seq = struct.unpack_from(">I", f, 42)[0]
            assert where.setdefault(flow, pair) == pair, f"flow {flow} on two queues"
            assert seen.get(flow, -1) == seq - 1, "a flow stays in order"
            seen[flow] = seq
    assert len(where) == flows and len(set(where.values())) > 1, where
    assert a.device.port.counters.tx_frames == len(frames)


@pytest.mark.parametrize("pairs", [0, -1, 65])
def test_queue_pairs_out_of_range_are_refused(pairs: int) -> None:
    with pytest.raises(ValueError, match="queue_pairs"):
        SwitchPort(Switch(), queue_pairs=pairs)


def test_one_port_per_queue_count() -> None:
    dev = SwitchPort(Switch(), queue_pairs=4)
    assert dev.num_queues == 8 and dev.queue_num() == 4
    assert struct.unpack_from("<H", dev.config(), 8)[0] == 4
    assert dev.device_features() & VIRTIO_NET_F_MQ
    assert SwitchPort.num_queues == 2  # the class default is untouched
