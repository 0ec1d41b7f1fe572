"""``pyvhost net --poll-us``: after a kick that found work, the queue is polled with its
kicks off, and goes back to kicks once a window passes without work."""

from __future__ import annotations

from backend.harness import HDR
from backend.rawclient import TIMEOUT, wait_until
from support.ring import Buffer

from .conftest import Guest, Switched

VRING_USED_F_NO_NOTIFY = 1


def frame(dst: bytes, src: bytes, n: int) -> bytes:
    return dst + src + b"\x88\xb5" + bytes([n]) * 50


def test_polled_queue_serves_frames_without_kicks(switched: Switched) -> None:
    switched.server.poll_us = 10_000_000  # a window far longer than the test
    a, b = Guest(switched, "a"), Guest(switched, "b")
    try:
        b.post_rx(8)
        a.send([frame(b"\xff" * 6, b"\x02\0\0\0\0\x0a", 1)])  # kicked: found work
        assert b.recv(1)[0][14] == 1
        # Polled now: kicks are off, and a frame made available without a kick goes.
        wait_until(lambda: bool(a.port.tx.used_flags() & VRING_USED_F_NO_NOTIFY),
                   "kicks to be turned off while polling", TIMEOUT)
        gpa = a.port.pool.alloc()
        a.port.guest.write(gpa, bytes(HDR) + frame(b"\xff" * 6, b"\x02\0\0\0\0\x0a", 2))
        a.port.tx.add([Buffer(gpa, HDR + 64)])  # published, never kicked
        a.port.tx.wait_used(1)
        assert b.recv(1)[0][14] == 2
    finally:
        a.close()
        b.close()


def test_idle_queue_goes_back_to_kicks(switched: Switched) -> None:
    switched.server.poll_us = 1000
    a, b = Guest(switched, "a"), Guest(switched, "b")
    try:
        b.post_rx(8)
        a.send([frame(b"\xff" * 6, b"\x02\0\0\0\0\x0a", 1)])
        assert b.recv(1)[0][14] == 1
        # No more work: once the window passed, the burst that saw the ring empty left
        # kicks on, and the loop stops serving the queue.
        wait_until(lambda: not a.port.tx.used_flags() & VRING_USED_F_NO_NOTIFY
                   and not any(c._again for c in switched.server.connections),
                   "the queue to go back to kicks", TIMEOUT)
        a.send([frame(b"\xff" * 6, b"\x02\0\0\0\0\x0a", 3)])  # a kick serves it
        assert b.recv(1)[0][14] == 3
    finally:
        a.close()
        b.close()
