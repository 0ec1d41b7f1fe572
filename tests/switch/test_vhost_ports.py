"""The switch between real vhost-user connections (in-process front-ends over Unix sockets):
learning, flooding and aging as guests see it, and bad input from one port."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from backend.harness import HDR, MAX_FRAME, NET_FEATURES
from backend.rawclient import read_eventfd, wait_until
from pyvhost.devices.virtio_net import (
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MRG_RXBUF,
)
from support.ring import Buffer

from .conftest import Guest, Switched
from .test_offload import DST4, DST6, SRC4, SRC6, check_segments, tcp_frame, verifies

BROADCAST = b"\xff" * 6


def mac(n: int) -> bytes:
    return bytes([0x02, 0, 0, 0, 0, n])


def frame(dst: bytes, src: bytes, size: int = 64, fill: int = 0) -> bytes:
    return dst + src + b"\x88\xb5" + bytes([fill]) * (size - 14)


def three_guests(switched: Switched, specs: list[tuple[str, int]], rx_size: int,
                 posted: int) -> Iterator[tuple[Guest, Guest, Guest]]:
    """Guests (tag, features) with ``posted`` receive buffers each; closed afterwards."""
    made: list[Guest] = []
    try:
        for tag, features in specs:
            g = Guest(switched, tag, features=features, rx_size=rx_size)
            g.post_rx(posted)
            made.append(g)
        yield made[0], made[1], made[2]
    finally:
        for g in made:
            g.close()


@pytest.fixture
def guests(switched: Switched) -> Iterator[tuple[Guest, Guest, Guest]]:
    yield from three_guests(switched, [(tag, NET_FEATURES) for tag in "abc"], HDR + MAX_FRAME,
                            32)


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


# -- offloads: CSUM / GUEST_CSUM, HOST_TSO4/6 / GUEST_TSO4/6 -------------------------------

CSUM_TSO_TX = NET_FEATURES | VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6
GUEST_TSO = NET_FEATURES | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 \
    | VIRTIO_NET_F_GUEST_TSO6
#: A receive buffer as large as the harness's buffer slots.
SLOT_RX = 4096


def recv_whole(g: Guest, count: int) -> list[bytes]:
    """``count`` frames with their virtio-net header (Guest.recv strips it)."""
    out = []
    for head, written in g.port.rx.wait_used(count):
        gpa = g.rx_bufs.pop(head)
        out.append(g.port.guest.read(gpa, written))
        g.port.pool.release(gpa)
    return out


@pytest.fixture
def offload_guests(switched: Switched) -> Iterator[tuple[Guest, Guest, Guest]]:
    """A sends with CSUM and HOST_TSO4/6; P takes no offload; T takes GUEST_CSUM/TSO4/6."""
    yield from three_guests(switched, [("a", CSUM_TSO_TX), ("p", NET_FEATURES),
                                       ("t", GUEST_TSO)], SLOT_RX, 48)


def _send_whole(g: Guest, frame: bytes) -> None:
    g.send([frame[HDR:]], hdr=frame[:HDR])


def test_needs_csum_frame_is_completed_for_a_port_without_guest_csum(
        offload_guests: tuple[Guest, Guest, Guest]) -> None:
    a, p, t = offload_guests
    for ipv6 in (False, True):
        built = tcp_frame(bytes(range(256)) * 4, ipv6=ipv6, gso=False)
        _send_whole(a, built.frame)
        (plain,) = recv_whole(p, 1)
        (kept,) = recv_whole(t, 1)
        # P: flags zero, a full checksum that verifies with the pseudo-header.
        assert plain[:10] == bytes(10)
        eth = plain[HDR:]
        tcp_len = len(eth) - built.l4
        pseudo = (SRC6 + DST6 + struct.pack(">IxxxB", tcp_len, 6) if ipv6
                  else SRC4 + DST4 + struct.pack(">xBH", 6, tcp_len))
        assert verifies(pseudo + eth[built.l4:])
        # T negotiated GUEST_CSUM: the partial checksum and its header, as sent.
        assert kept[:10] == built.frame[:10] and kept[HDR:] == built.frame[HDR:]
    assert a.counters["rx_drops"] == {} and p.counters["tx_drops"] == {}


@pytest.mark.parametrize("ipv6", [False, True], ids=["tso4", "tso6"])
def test_tso_frame_is_segmented_for_a_port_without_guest_tso(
        offload_guests: tuple[Guest, Guest, Guest], ipv6: bool) -> None:
    a, p, t = offload_guests
    payload = bytes(i * 7 & 0xFF for i in range(3000))
    built = tcp_frame(payload, ipv6=ipv6, mss=1000, flags=0x18 | 0x01, seq=2**32 - 1500)
    _send_whole(a, built.frame)
    segments = recv_whole(p, 3)
    check_segments(built, [bytearray(s) for s in segments], 1000, ipv6=ipv6,
                   seq=2**32 - 1500, flags=0x19, ip_id=7)
    # T negotiated GUEST_TSO4/6: one frame, the header kept.
    (whole,) = recv_whole(t, 1)
    assert whole[:10] == built.frame[:10] and whole[HDR:] == built.frame[HDR:]
    assert p.counters["tx_frames"] == 3 and t.counters["tx_frames"] == 1
    assert a.counters["rx_frames"] == 1


def test_malformed_offload_headers_are_dropped_and_counted_for_that_port(
        offload_guests: tuple[Guest, Guest, Guest]) -> None:
    a, p, t = offload_guests
    good = tcp_frame(bytes(2000), mss=1000)
    bad = [
        bytearray(good.frame),  # gso_size 0
        bytearray(good.frame),  # csum_start past the end
        bytearray(good.frame),  # UDP GSO (never offered)
        bytearray(good.frame),  # IPv4 protocol not TCP
    ]
    struct.pack_into("<H", bad[0], 4, 0)
    struct.pack_into("<H", bad[1], 6, 4000)
    bad[2][1] = 3
    bad[3][HDR + good.l3 + 9] = 17
    for b in bad:
        _send_whole(a, bytes(b))
    _send_whole(a, good.frame)  # and one that is fine, after them
    assert len(recv_whole(p, 2)) == 2 and len(recv_whole(t, 1)) == 1
    assert a.counters["rx_drops"] == {"malformed": 4}
    assert a.counters["rx_frames"] == 1
    # P (no CSUM negotiated) may not send NEEDS_CSUM: dropped on P only.
    _send_whole(p, good.frame)
    assert p.counters["rx_drops"] == {"malformed": 1}
    assert a.counters["rx_drops"] == {"malformed": 4}
    plain = frame(BROADCAST, mac(9), fill=3)
    p.send([plain])
    assert recv_whole(t, 1)[0][HDR:] == plain


def test_frames_larger_than_the_receiver_takes_are_dropped_not_cut(
        switched: Switched) -> None:
    a = Guest(switched, "a", features=CSUM_TSO_TX)
    t = Guest(switched, "t", features=GUEST_TSO, rx_size=SLOT_RX)
    p = Guest(switched, "p", rx_size=SLOT_RX)
    try:
        t.post_rx(8)
        p.post_rx(16)
        # A 20000-byte GSO frame: T takes TSO but has 4 KiB buffers and no MRG_RXBUF.
        big = tcp_frame(bytes(20000), mss=1448)
        gpa = 0  # below the pool's slots (the pool hands out the top of RAM first)
        a.port.guest.write(gpa, big.frame)
        a.port.tx.add([Buffer(gpa, len(big.frame))])
        # A non-GSO frame longer than the MTU (1500) plus Ethernet header and VLAN tag.
        jumbo = frame(BROADCAST, mac(1), size=1600)
        a.port.guest.write(gpa + 32768, bytes(HDR) + jumbo)
        a.port.tx.add([Buffer(gpa + 32768, HDR + len(jumbo))])
        a.port.tx.kick()
        a.port.tx.wait_used(2)
        assert len(recv_whole(p, 14)) == 14  # segmented for P: 14 segments of <= 1448
        wait_until(lambda: t.counters["tx_drops"] == {"too_big": 2}, "drops counted on T")
        assert t.port.rx.used_idx() == 0  # nothing cut
        assert p.counters["tx_drops"] == {"too_big": 1}  # the jumbo frame
    finally:
        for g in (a, t, p):
            g.close()


def test_offload_frames_between_ports_that_negotiated_them_take_the_forward_step(
        switched: Switched) -> None:
    """NEEDS_CSUM and TSO frames from a port with CSUM/HOST_TSO to one with GUEST_CSUM/
    GUEST_TSO go through the forward step with their header (issue 12): none of them is
    counted as having taken the Python path (``rx_python``); one to a port without the
    offloads is."""
    a = Guest(switched, "a2", features=CSUM_TSO_TX | GUEST_TSO, rx_size=SLOT_RX)
    t = Guest(switched, "t2", features=GUEST_TSO, rx_size=SLOT_RX)
    try:
        t.post_rx(48)
        sent = []
        for ipv6 in (False, True):
            sent.append(tcp_frame(bytes(range(256)) * 4, ipv6=ipv6, gso=False).frame)
            sent.append(tcp_frame(bytes(3000), ipv6=ipv6, mss=1000).frame)
        for f in sent:
            _send_whole(a, f)
        got = recv_whole(t, len(sent))
        assert [g[:10] + g[HDR:] for g in got] == [f[:10] + f[HDR:] for f in sent]
        assert _python_path(a) == 0
        assert a.counters["rx_drops"] == {} and t.counters["tx_drops"] == {}
        p = Guest(switched, "p2", features=NET_FEATURES, rx_size=SLOT_RX)
        try:
            p.post_rx(48)
            _send_whole(a, sent[0])
            recv_whole(t, 1)
            recv_whole(p, 1)
            assert _python_path(a) == 1
        finally:
            p.close()
    finally:
        a.close()
        t.close()


def _python_path(g: Guest) -> object:
    """The frames ``g``'s port left to the Python path."""
    return g.counters["rx_python"]
