"""Fixtures: a switch serving vhost-user ports on a real Unix socket from a thread, and a
guest driver on top of the back-end tests' front-end (:mod:`backend.harness`)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from backend.conftest import (
    socket_dir,  # noqa: F401 - fixture
    start_loop,
)
from backend.harness import HDR, MAX_FRAME, NET_FEATURES, NetPort
from backend.rawclient import TIMEOUT, wait_until
from pyvhost.backend import Server
from pyvhost.switch import Switch, SwitchPort
from support.ring import Buffer


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Switched:
    path: str
    clock: Clock = field(default_factory=Clock)
    switch: Switch = field(init=False)
    server: Server = field(init=False)
    devices: list[SwitchPort] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.switch = Switch(aging=300, clock=self.clock)
        self.server = Server(self.factory)

    def factory(self) -> SwitchPort:
        dev = SwitchPort(self.switch, bytes([0x52, 0x54, 0, 0, 0, len(self.devices)]))
        self.devices.append(dev)
        return dev

    def start(self) -> None:
        self.thread = start_loop(self.server, self.errors, "pyvhost-switch")

    def learned(self) -> dict[bytes, str]:
        with self.switch.lock:  # the workers' bursts learn meanwhile
            return {mac: port.name for mac, port, _ in self.switch.table.entries(self.clock())}


class Guest:
    """A guest driver on one port: receive buffers posted, frames sent and received."""

    def __init__(self, sw: Switched, tag: str, features: int = NET_FEATURES,
                 rx_size: int = HDR + MAX_FRAME) -> None:
        self.port = NetPort(sw.path, tag=tag, features=features).start()
        wait_until(lambda: len(sw.devices) > 0 and sw.devices[-1].port.name != "vhost-user",
                   "port attached")
        self.device = sw.devices[-1]
        self.rx_size = rx_size
        self.rx_bufs: dict[int, int] = {}

    @property
    def counters(self) -> dict[str, object]:
        return self.device.port.counters.as_dict()

    def post_rx(self, count: int = 16) -> None:
        for _ in range(count):
            gpa = self.port.pool.alloc()
            head = self.port.rx.add([Buffer(gpa, self.rx_size, True)])
            self.rx_bufs[head] = gpa
        self.port.rx.kick()

    def send(self, frames: list[bytes], hdr: bytes = bytes(HDR)) -> None:
        """Transmit and wait until the back-end returned every chain."""
        gpas = []
        for f in frames:
            gpa = self.port.pool.alloc()
            self.port.guest.write(gpa, hdr + f)
            self.port.tx.add([Buffer(gpa, len(hdr) + len(f))])
            gpas.append(gpa)
        self.port.tx.kick()
        self.port.tx.wait_used(len(frames))
        for gpa in gpas:
            self.port.pool.release(gpa)

    def _read(self, used: list[tuple[int, int]]) -> list[bytes]:
        out = []
        for head, written in used:
            gpa = self.rx_bufs.pop(head)
            data = self.port.guest.read(gpa, written)
            assert data[10:12] == b"\x01\x00", "num_buffers must be 1"
            out.append(data[HDR:])
            self.port.pool.release(gpa)
        return out

    def recv(self, count: int) -> list[bytes]:
        return self._read(self.port.rx.wait_used(count))

    def recv_now(self) -> list[bytes]:
        return self._read(self.port.rx.take_used())

    def close(self) -> None:
        self.port.close()


@pytest.fixture(params=[1, 2], ids=["workers1", "workers2"])
def switched(socket_dir: Path, request: pytest.FixtureRequest) -> Iterator[Switched]:  # noqa: F811
    """The switch on one thread (``--workers 1``) and with two worker threads."""
    s = Switched(str(socket_dir / "switch.sock"))
    try:
        s.server.use_workers(request.param)
        s.server.listen(s.path)
        s.start()
        yield s
        s.server.stop()
        assert s.thread is not None
        s.thread.join(TIMEOUT)
        assert not s.thread.is_alive(), "server loop did not stop"
        assert not s.errors, f"server loop crashed: {s.errors[0]!r}"
    finally:
        s.server.stop()
        if s.thread is not None:
            s.thread.join(TIMEOUT)
        s.server.close()
