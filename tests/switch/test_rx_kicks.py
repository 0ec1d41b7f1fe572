"""Receive-queue kicks: the switch never waits for receive buffers (a frame for a ring
without one is dropped), so the first kick of a receive queue turns its kicks off
(VIRTQ_USED_F_NO_NOTIFY without EVENT_IDX), and buffers posted later without a kick are
filled all the same."""

from __future__ import annotations

from backend.rawclient import TIMEOUT, wait_until
from support.ring import Buffer

from .conftest import Guest, Switched

VIRTQ_USED_F_NO_NOTIFY = 1


def frame(n: int) -> bytes:
    return b"\xff" * 6 + b"\x02\0\0\0\0\x0a" + b"\x88\xb5" + bytes([n]) * 50


def test_a_receive_kick_turns_that_rings_kicks_off(switched: Switched) -> None:
    a, b = Guest(switched, "a"), Guest(switched, "b")
    try:
        b.post_rx(2)  # kicked (the back-end also serves each ring once when it starts)
        wait_until(lambda: bool(b.port.rx.used_flags() & VIRTQ_USED_F_NO_NOTIFY),
                   "the receive ring's kicks to be turned off", TIMEOUT)
        # The transmit ring's kicks are the ones the switch waits for: still on.
        assert not a.port.tx.used_flags() & VIRTQ_USED_F_NO_NOTIFY
        for _ in range(3):  # posted, never kicked
            gpa = b.port.pool.alloc()
            b.rx_bufs[b.port.rx.add([Buffer(gpa, b.rx_size, True)])] = gpa
        a.send([frame(n) for n in range(5)])
        assert [f[14] for f in b.recv(5)] == list(range(5))
        assert b.counters["tx_frames"] == 5
    finally:
        a.close()
        b.close()
