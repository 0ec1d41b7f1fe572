"""The forward step's ``again`` (several bursts in one call) on rings built by hand: what
it takes, where it stops, and what a guest-memory fault inside one of its bursts leaves.

The random rings of test_switch_differential hold both steps equal, ``again`` included;
these pin down its rules on plain traffic: bursts of the same MACs go through whole, a
frame with a new MAC or an offload header ends the call and stays in the ring for the next
ordinary pull, and (compiled step only: Python can not catch SIGBUS) a fault in a burst
puts that burst back - its chains unreturned and unwritten - while the bursts before it
stand and the faulting connection's error is reported.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pyvhost.memory import MemoryFaultError
from pyvhost.switch import forward

from .rings import FAR, Ram, make_queue, queue_state
from .test_differential import RX_RING, TX_RING

native = pytest.importorskip("pyvhost.datapath._native",
                             reason="the compiled data path is not built")

HDR = 12
A_MAC, B_MAC, C_MAC = (bytes.fromhex(h) for h in ("020000000001", "020000000002",
                                                  "020000000003"))
RX_SLOT = 0x800
ROUTES = ([1], [forward.NEVER], [False])


def frame(dst: bytes, src: bytes, n: int) -> bytes:
    return dst + src + b"\x88\xb5" + n.to_bytes(2, "big") + bytes(44)


class Link:
    """Ingress guest A (a transmit ring of frames, buffers in LOW or FAR) and egress guest
    B (a receive ring of 2 KiB buffers), each with its own memory file."""

    def __init__(self, frames: list[tuple[bytes, int]], header: bytes = bytes(HDR)) -> None:
        self.a, self.b = Ram(), Ram()
        self.tx, self.tx_ring = make_queue(self.a, 1, 16, TX_RING, event_idx=False, base=0)
        self.rx, self.rx_ring = make_queue(self.b, 0, 16, RX_RING, event_idx=False, base=0)
        from support.ring import Buffer
        for k, (data, gpa) in enumerate(frames):
            self.a.write(gpa, (header if k else bytes(HDR)) + data)
            self.tx_ring.add([Buffer(gpa, HDR + len(data))])
        self.rx_gpa: dict[int, int] = {}
        for k in range(16):
            gpa = 0x4000 + RX_SLOT * k
            self.rx_gpa[self.rx_ring.add([Buffer(gpa, RX_SLOT, True)])] = gpa
        self.out = forward.Out(self.b.mem, self.rx, HDR, False, 1518)

    def received(self) -> list[bytes]:
        """The frames B's used ring holds, without their headers."""
        got = []
        for slot in range(self.rx_ring.used_idx()):
            head, length = self.rx_ring.used_elem(slot)
            got.append(self.b.read(self.rx_gpa[head], length)[HDR:])
        return got

    def close(self) -> None:
        self.a.close()
        self.b.close()


@pytest.fixture(params=["reference", "compiled"])
def make(request: pytest.FixtureRequest) -> Iterator[type]:
    yield forward.Forwarder if request.param == "reference" else native.Forwarder


def first_burst(link: Link, fwd: forward.ForwardStep, limit: int = 3) -> None:
    mem = link.a.mem
    taken, error = fwd.pull(mem, link.tx, HDR, limit)
    assert (taken, error) == (limit, None)
    assert fwd.macs()[1] == [B_MAC]
    assert fwd.push(mem, 0, *ROUTES, [link.out]) == limit


def test_bursts_of_the_same_macs_go_through_whole(make: type) -> None:
    frames = [(frame(B_MAC, A_MAC, n), 0x4000 + 0x100 * n) for n in range(12)]
    link = Link(frames)
    try:
        fwd = make()
        first_burst(link, fwd)
        assert fwd.again(link.a.mem, link.tx, 3, 2, *ROUTES, [link.out]) == (6, 3, None)
        assert fwd.stats["frames"] == 6 and fwd.out_stats == [[6, 6 * 60, 0, 0, 0]]
        assert fwd.out_errors == [None] and not fwd.more
        # Every burst's chains went back, the first's (the caller's) and the call's own.
        assert link.tx.used_idx == 9 and link.tx.last_avail_idx == 9
        assert link.tx_ring.used_idx() == 9
        fwd.finish(link.a.mem, link.tx)       # nothing left to finish
        assert link.tx.used_idx == 9
        assert link.received() == [f for f, _ in frames[:9]]
        # The rest: one more call takes it all, and sees the ring empty.
        assert fwd.again(link.a.mem, link.tx, 3, 4, *ROUTES, [link.out]) == (3, 0, None)
        assert link.received() == [f for f, _ in frames]
    finally:
        link.close()


@pytest.mark.parametrize("odd", ["new source", "new destination", "offload header"])
def test_a_frame_the_routes_do_not_cover_ends_the_call_in_the_ring(make: type,
                                                                    odd: str) -> None:
    frames = [(frame(B_MAC, A_MAC, n), 0x4000 + 0x100 * n) for n in range(8)]
    if odd == "new source":
        frames[4] = (frame(B_MAC, C_MAC, 4), frames[4][1])
    elif odd == "new destination":
        frames[4] = (frame(C_MAC, A_MAC, 4), frames[4][1])
    header = bytes([1, 0]) + bytes(HDR - 2) if odd == "offload header" else bytes(HDR)
    link = Link(frames, header if odd == "offload header" else bytes(HDR))
    try:
        if odd == "offload header":
            # Only frame 4 asks for an offload (NEEDS_CSUM): the others have zero headers.
            for k, (_, gpa) in enumerate(frames):
                link.a.write(gpa, header if k == 4 else bytes(HDR))
        fwd = make()
        first_burst(link, fwd)
        # Frame 3 goes; frame 4 stops the second burst and stays for the next pull.
        assert fwd.again(link.a.mem, link.tx, 3, 3, *ROUTES, [link.out]) == (1, 1, None)
        assert fwd.more and link.tx.last_avail_idx == 4 and link.tx.used_idx == 4
        assert link.received() == [f for f, _ in frames[:4]]
        taken, error = fwd.pull(link.a.mem, link.tx, HDR, 3, offload=1)
        assert (taken, error) == (3, None) and fwd.frames == 3
    finally:
        link.close()


@pytest.mark.parametrize("side", ["egress", "ingress"])
def test_a_fault_in_a_burst_puts_that_burst_back(side: str) -> None:
    # Frames 0-2 in LOW, the others in FAR: truncating A's file to FAR takes away the
    # buffers of the second burst, not A's rings.
    frames = [(frame(B_MAC, A_MAC, n), (0x4000 + 0x100 * n) if n < 3 else FAR + 0x100 * n)
              for n in range(9)]
    link = Link(frames)
    try:
        fwd = native.Forwarder()
        first_burst(link, fwd)
        rx_before = queue_state(link.rx)
        b_before = link.b.read(0, 0x10000)
        if side == "egress":
            os.ftruncate(link.b.fd, 0)
        else:
            os.ftruncate(link.a.fd, FAR)
        assert fwd.again(link.a.mem, link.tx, 3, 3, *ROUTES, [link.out]) == (0, 0, None)
        fault = fwd.out_errors[0] if side == "egress" else fwd.in_fault
        other = fwd.in_fault if side == "egress" else fwd.out_errors[0]
        assert isinstance(fault, MemoryFaultError) and other is None
        # The first burst's chains went back; the second burst's are in the ring again,
        # nothing of it counted or written.
        assert (link.tx.last_avail_idx, link.tx.used_idx) == (3, 3)
        assert link.tx_ring.used_idx() == 3
        assert fwd.more and fwd.stats["frames"] == 0 and fwd.out_stats == [[0] * 5]
        assert queue_state(link.rx) == rx_before
        if side == "ingress":
            assert link.b.read(0, 0x10000) == b_before
        fwd.finish(link.a.mem, link.tx)       # nothing left to finish
        assert link.tx.used_idx == 3
    finally:
        link.close()
