"""The switch between real vhost-user connections (in-process front-ends over Unix sockets):
learning, flooding and aging as guests see it, and bad input from one port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from backend.harness import HDR, NET_FEATURES
from backend.rawclient import Buffer, read_eventfd, wait_until
from pyvhost.devices.net import VIRTIO_NET_F_MRG_RXBUF

from .conftest import Guest, Switched

BROADCAST = b"\xff" * 6


def mac(n: int) -> bytes:
    return bytes([0x02, 0, 0, 0, 0, n])


def frame(dst: bytes, src: bytes, size: int = 64, fill: int = 0) -> bytes:
    return dst + src + b"\x88\xb5" + bytes([fill]) * (size - 14)


@pytest.fixture
def guests(switched: Switched) -> Iterator[tuple[Guest, Guest, Guest]]:
    made: list[Guest] = []
    try:
        for tag in ("a", "b", "c"):
            g = Guest(switched, tag)
            g.post_rx(32)
            made.append(g)
        yield made[0], made[1], made[2]
    finally:
        for g in made:
            g.close()


def test_unknown_floods_then_learned_unicast_goes_to_one_port(
        switched: Switched, guests: tuple[Guest, Guest, Guest]) -> None:
    a, b, c = guests
    first = frame(mac(2), mac(1), fill=1)  # B's address is not known yet
    a.send([first])
    assert b.recv(1) == [first] and c.recv(1) == [first]
    b.send([frame(BROADCAST, mac(2), fill=2)])  # B speaks: learned on B's port
    assert len(a.recv(1)) == 1 and len(c.recv(1)) == 1
    assert switched.learned() == {mac(1): a.device.port.name, mac(2): b.device.port.name}

    unicast = frame(mac(2), mac(1), fill=3)
    marker = frame(BROADCAST, mac(1), fill=4)
    a.send([unicast, marker])
    assert b.recv(2) == [unicast, marker]
    # The switch handles a batch in order: C got the marker, and nothing before it.
    assert c.recv(1) == [marker] and c.recv_now() == []
    assert a.recv_now() == []  # never back to the ingress port
    assert a.counters["rx_frames"] == 3 and b.counters["tx_frames"] == 3


def test_aged_entry_floods_again(switched: Switched,
                                 guests: tuple[Guest, Guest, Guest]) -> None:
    a, b, c = guests
    b.send([frame(BROADCAST, mac(2))])
    a.recv(1), c.recv(1)
    switched.clock.now += 301
    f = frame(mac(2), mac(1), fill=7)
    a.send([f])
    assert b.recv(1) == [f] and c.recv(1) == [f]  # B aged out: flooded
    assert mac(2) not in switched.learned()


def test_a_port_that_leaves_is_flushed_others_go_on(
        switched: Switched, guests: tuple[Guest, Guest, Guest]) -> None:
    a, b, c = guests
    c.send([frame(BROADCAST, mac(3))])
    a.recv(1), b.recv(1)
    c.close()
    wait_until(lambda: mac(3) not in switched.learned(), "C's address flushed")
    wait_until(lambda: len(switched.switch.ports) == 2, "C's port gone")
    f = frame(mac(3), mac(1))
    a.send([f])
    assert b.recv(1) == [f]  # unknown again: flooded to the ports still there
    # A new port joins while the others run, and is reached at once.
    d = Guest(switched, "d")
    try:
        d.post_rx(4)
        g = frame(BROADCAST, mac(2))
        b.send([g])
        assert d.recv(1) == [g] and a.recv(1) == [g]
    finally:
        d.close()


def test_bad_frames_from_a_port_are_dropped_and_counted(
        switched: Switched, guests: tuple[Guest, Guest, Guest]) -> None:
    a, b, c = guests
    port = a.port
    gpa = port.pool.alloc()
    port.guest.write(gpa, bytes(HDR) + frame(BROADCAST, mac(1)))
    port.tx.add([Buffer(gpa, HDR + 13)])  # shorter than an Ethernet header
    port.tx.add([Buffer(0, HDR + 65550 + 1)])  # larger than any Ethernet frame
    port.guest.write(gpa + 2048, b"\x01" + bytes(HDR - 1) + frame(BROADCAST, mac(1)))
    port.tx.add([Buffer(gpa + 2048, HDR + 64)])  # NEEDS_CSUM, not negotiated
    good = frame(BROADCAST, mac(1), fill=9)
    port.guest.write(gpa + 1024, bytes(HDR) + good)
    port.tx.add([Buffer(gpa + 1024, HDR + len(good))])
    port.tx.kick()
    port.tx.wait_used(4)
    assert b.recv(1) == [good] and c.recv(1) == [good]
    assert a.counters["rx_drops"] == {"malformed": 2, "too_big": 1}
    assert a.counters["rx_frames"] == 1

    # A descriptor outside guest memory breaks A's transmit queue (reported through its
    # err eventfd, DEVICE_NEEDS_RESET); it is counted; B and C are unaffected.
    port.tx.add([Buffer(0x7000_0000, 64)])
    port.tx.kick()
    wait_until(lambda: read_eventfd(port.tx.err_fd) > 0, "A's tx queue reported broken")
    assert a.counters["rx_drops"] == {"malformed": 2, "too_big": 1, "bad_descriptor": 1}
    f = frame(mac(3), mac(2))
    b.send([f])
    assert c.recv(1) == [f]
    g = frame(mac(2), mac(3))
    c.send([g])
    assert b.recv(1) == [g]


def test_receive_side_drops_no_buffer_too_big_and_mrg_rxbuf(switched: Switched) -> None:
    a = Guest(switched, "a")
    small = Guest(switched, "small", rx_size=HDR + 100)  # no MRG_RXBUF: one chain a frame
    mrg = Guest(switched, "mrg", features=NET_FEATURES | VIRTIO_NET_F_MRG_RXBUF,
                rx_size=HDR + 500)
    try:
        big = frame(BROADCAST, mac(1), size=1400, fill=5)
        a.send([big])  # nobody posted buffers yet
        wait_until(lambda: small.counters["tx_drops"] == {"no_rx_buffer": 1}, "drop counted")
        small.post_rx(4)
        mrg.post_rx(4)
        a.send([big])
        wait_until(lambda: mrg.port.rx.used_idx() == 3, "frame spread over 3 buffers")
        used = mrg.port.rx.take_used()
        data = b"".join(mrg.port.guest.read(mrg.rx_bufs[h], n) for h, n in used)
        assert data[10:12] == b"\x03\x00"  # num_buffers
        assert data[HDR:] == big
        assert small.counters["tx_drops"] == {"no_rx_buffer": 1, "too_big": 1}
        assert small.port.rx.used_idx() == 0  # never truncated
        assert mrg.counters["tx_frames"] == 1
    finally:
        for g in (a, small, mrg):
            g.close()
