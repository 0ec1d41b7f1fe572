"""With worker threads, a port's receive queue is written by other ports' bursts: its
control messages wait for such a write in flight (the receive queue's lock).

Two ports on two workers; A's burst is stopped (by the test) in the middle of writing a
frame into C's receive queue, after the copy and before its counters and interrupt. C's
front-end then stops that queue (GET_VRING_BASE): the reply must come after A's burst is
done with C's ring, and say that the chain it filled is taken.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.conftest import socket_dir  # noqa: F401 - fixture
from backend.harness import HDR
from backend.rawclient import TIMEOUT
from pyvhost.backend.device import QueueContext
from pyvhost.protocol import messages as m
from pyvhost.protocol.constants import Request
from pyvhost.switch import SwitchPort
from pyvhost.switch.forward import Out
from support.ring import Buffer

from .conftest import Guest, Switched


class GatedPort(SwitchPort):
    """Once armed, the next write into this port's receive queue waits for the test."""

    armed = False

    def gate(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.finished = False
        self.armed = True

    def _count_out(self, ctx: QueueContext, out: Out, st: list[int],
                   per_queue: list[list[int]]) -> None:
        if self.armed:
            self.armed = False
            self.entered.set()
            assert self.release.wait(TIMEOUT)
            super()._count_out(ctx, out, st, per_queue)
            self.finished = True
            return
        super()._count_out(ctx, out, st, per_queue)


class GatedSwitch(Switched):
    def factory(self) -> SwitchPort:
        dev = GatedPort(self.switch, bytes([0x52, 0x54, 0, 0, 0, len(self.devices)]))
        self.devices.append(dev)
        return dev


@pytest.fixture
def gated(socket_dir: Path) -> Iterator[GatedSwitch]:  # noqa: F811
    s = GatedSwitch(str(socket_dir / "g.sock"))
    try:
        s.server.use_workers(2)
        s.server.listen(s.path)
        s.start()
        yield s
    finally:
        s.server.stop()
        if s.thread is not None:
            s.thread.join(TIMEOUT)
        s.server.close()
    assert not s.errors


def test_get_vring_base_waits_for_another_ports_write(gated: GatedSwitch) -> None:
    a, c = Guest(gated, "a"), Guest(gated, "c")
    try:
        workers = gated.server.call_from_thread(
            lambda: [conn.worker_of(1) for conn in gated.server.connections], TIMEOUT)
        assert workers == ["worker-0", "worker-1"]
        port_c = c.device
        assert isinstance(port_c, GatedPort)
        c.post_rx(1)
        port_c.gate()
        data = bytes(port_c.mac) + a.device.mac + b"\x88\xb5" + bytes(50)
        gpa = a.port.pool.alloc()
        a.port.guest.write(gpa, bytes(HDR) + data)
        a.port.tx.add([Buffer(gpa, HDR + len(data))])
        a.port.tx.kick()
        assert port_c.entered.wait(TIMEOUT), "A's burst did not reach C"
        replies: list[tuple[object, bool]] = []

        def stop_rx() -> None:
            reply = c.port.client.request(Request.GET_VRING_BASE, m.VringState(0, 0))
            replies.append((reply, port_c.finished))

        t = threading.Thread(target=stop_rx)
        t.start()
        t.join(0.3)  # a window for a reply that would not wait (not asserted)
        port_c.release.set()
        t.join(TIMEOUT)
        assert replies == [(m.VringState(0, 1), True)]
        assert c.recv(1) == [data]  # written whole before the queue stopped
    finally:
        for guest in (a, c):
            dev = guest.device
            if isinstance(dev, GatedPort) and dev.armed is False and hasattr(dev, "release"):
                dev.release.set()
            guest.close()
