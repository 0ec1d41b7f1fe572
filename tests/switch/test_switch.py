"""The switch's forwarding decisions, with fake ports: learning, flooding, aging, leaving."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from pyvhost.switch import NET_HDR, MacTable, Port, Switch

A, B, C = (bytes([0x02, 0, 0, 0, 0, n]) for n in (0xA, 0xB, 0xC))
UNKNOWN = bytes([0x02, 0, 0, 0, 0, 0xEE])
BROADCAST = b"\xff" * 6
MULTICAST = bytes([0x01, 0x00, 0x5E, 0, 0, 1])


def frame(dst: bytes, src: bytes, payload: bytes = b"x" * 46) -> bytes:
    return bytes(NET_HDR) + dst + src + b"\x88\xb5" + payload


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakePort(Port):
    kind = "fake"

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.got: list[bytes] = []

    def deliver(self, frames: Sequence[bytes | bytearray]) -> None:
        self.got.extend(bytes(f) for f in frames)
        self.counters.tx_frames += len(frames)

    def take(self) -> list[bytes]:
        got, self.got = self.got, []
        return got


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sw(clock: Clock) -> Switch:
    return Switch(aging=300, clock=clock)


@pytest.fixture
def ports(sw: Switch) -> tuple[FakePort, FakePort, FakePort]:
    p = (FakePort("p0"), FakePort("p1"), FakePort("p2"))
    for port in p:
        sw.add_port(port)
    return p


def test_unknown_unicast_floods_to_every_other_port(sw: Switch,
                                                    ports: tuple[FakePort, ...]) -> None:
    p0, p1, p2 = ports
    f = frame(UNKNOWN, A)
    sw.receive(p0, [f])
    assert p0.take() == [] and p1.take() == [f] and p2.take() == [f]


@pytest.mark.parametrize("dst", [BROADCAST, MULTICAST], ids=["broadcast", "multicast"])
def test_group_addresses_flood_even_when_learned(sw: Switch, ports: tuple[FakePort, ...],
                                                 dst: bytes) -> None:
    p0, p1, p2 = ports
    sw.receive(p1, [frame(A, dst)])  # a group source address is never learned
    assert dst not in {mac for mac, _, _ in sw.table.entries(0)}
    p0.take(), p2.take()
    f = frame(dst, A)
    sw.receive(p0, [f])
    assert p0.take() == [] and p1.take() == [f] and p2.take() == [f]


def test_learned_unicast_goes_to_exactly_one_port(sw: Switch,
                                                  ports: tuple[FakePort, ...]) -> None:
    p0, p1, p2 = ports
    sw.receive(p1, [frame(BROADCAST, B)])  # p1 announces B
    for p in ports:
        p.take()
    f = frame(B, A)
    sw.receive(p0, [f])
    assert p1.take() == [f] and p0.take() == [] and p2.take() == []
    # ... and the answer to A goes only to p0, which A was learned on.
    g = frame(A, B)
    sw.receive(p1, [g])
    assert p0.take() == [g] and p1.take() == [] and p2.take() == []
    assert p0.counters.rx_frames == 1 and p0.counters.rx_bytes == len(f) - NET_HDR


def test_frame_to_a_mac_behind_the_ingress_port_is_filtered(
        sw: Switch, ports: tuple[FakePort, ...]) -> None:
    p0 = ports[0]
    sw.receive(p0, [frame(BROADCAST, A), frame(BROADCAST, B)])
    for p in ports:
        p.take()
    sw.receive(p0, [frame(B, A)])
    assert all(p.take() == [] for p in ports)
    assert p0.counters.rx_drops == {"same_port": 1}


def test_a_mac_that_moves_is_relearned(sw: Switch, ports: tuple[FakePort, ...]) -> None:
    p0, p1, p2 = ports
    sw.receive(p1, [frame(BROADCAST, B)])
    sw.receive(p2, [frame(BROADCAST, B)])  # B moved to p2
    for p in ports:
        p.take()
    f = frame(B, A)
    sw.receive(p0, [f])
    assert p2.take() == [f] and p1.take() == []


def test_entries_age_out_and_unicast_floods_again(sw: Switch, clock: Clock,
                                                  ports: tuple[FakePort, ...]) -> None:
    p0, p1, p2 = ports
    sw.receive(p1, [frame(BROADCAST, B)])
    for p in ports:
        p.take()
    clock.now += 299
    sw.receive(p0, [frame(B, A)])
    assert p1.take() and not p2.take()
    clock.now += 302  # B has been silent for 601 s, A for 302 s
    f = frame(B, C)
    sw.receive(p0, [f])
    assert p1.take() == [f] and p2.take() == [f]
    assert [mac for mac, _, _ in sw.table.entries(clock.now)] == [C]


def test_a_leaving_port_is_flushed_and_gets_nothing(sw: Switch,
                                                    ports: tuple[FakePort, ...]) -> None:
    p0, p1, p2 = ports
    sw.receive(p1, [frame(BROADCAST, B)])
    sw.remove_port(p1)
    for p in ports:
        p.take()
    f = frame(B, A)
    sw.receive(p0, [f])
    assert p1.take() == [] and p2.take() == [f]  # B is unknown again: flooded
    state = sw.describe()
    assert [p["name"] for p in state["ports"]] == ["p0", "p2"]  # type: ignore[attr-defined]
    assert [p["name"] for p in state["departed"]] == ["p1"]  # type: ignore[attr-defined]
    # A port joins at any time and takes part at once.
    p3 = FakePort("p3")
    sw.add_port(p3)
    sw.receive(p0, [f])
    assert p3.take() == [f]


def test_one_batch_per_egress_port_in_arrival_order(sw: Switch,
                                                    ports: tuple[FakePort, ...]) -> None:
    p0, p1, p2 = ports
    calls: list[int] = []
    original = p1.deliver

    def counting(frames: Sequence[bytes | bytearray]) -> None:
        calls.append(len(frames))
        original(frames)

    p1.deliver = counting  # type: ignore[method-assign]
    sw.receive(p1, [frame(BROADCAST, B)])
    p2.take()
    frames = [frame(B if i % 2 else UNKNOWN, A, bytes([i]) * 46) for i in range(10)]
    sw.receive(p0, frames)
    assert calls == [10] and p1.take() == frames
    assert p2.take() == frames[0::2]


def test_table_is_bounded() -> None:
    table: MacTable[str] = MacTable(300, max_entries=4)
    for i in range(10):
        table.learn(bytes([2, 0, 0, 0, 0, i]), "p", 0.0)
    assert len(table) == 4
    # Once entries age out there is room again.
    assert table.learn(bytes([2, 0, 0, 0, 1, 0]), "p", 1000.0)
    assert len(table) == 1


def test_aging_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Switch(aging=0)
