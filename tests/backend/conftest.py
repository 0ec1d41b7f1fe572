"""Fixtures: a pyvhost back-end serving ReflectNet on a real Unix socket from a thread."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pyvhost.backend import Server
from pyvhost.devices.reflect import ReflectNet

from .harness import NetPort
from .rawclient import TIMEOUT

MAC = b"\x52\x54\x00\xab\xcd\xef"
#: sun_path holds 108 bytes; pytest's tmp_path grows with the test's name.
_MAX_SOCKET_PATH = 100


def start_loop(server: Server, errors: list[BaseException], name: str) -> threading.Thread:
    """Run ``server``'s loop in a daemon thread; an exception there lands in ``errors``."""
    def run() -> None:
        try:
            server.run(tick=0.2)
        except BaseException as e:
            errors.append(e)
            raise

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


@dataclass
class Backend:
    """A running server: its socket path, and every device it created."""

    path: str
    devices: list[ReflectNet] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    thread: threading.Thread | None = None
    server: Server = field(init=False)

    def __post_init__(self) -> None:
        self.server = Server(self.factory)

    def factory(self) -> ReflectNet:
        dev = ReflectNet(MAC)
        self.devices.append(dev)
        return dev

    def start(self) -> None:
        """Run the loop in a background thread; an exception there fails the test."""
        self.thread = start_loop(self.server, self.errors, "pyvhost-backend")

    def stop(self) -> None:
        self.server.stop()
        if self.thread is not None:
            self.thread.join(TIMEOUT)
            assert not self.thread.is_alive(), "server loop did not stop"
        assert not self.errors, f"server loop crashed: {self.errors[0]!r}"


@pytest.fixture
def socket_dir(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, or a shorter directory when tmp_path is too long for a socket path."""
    if len(str(tmp_path / "vhost.sock")) <= _MAX_SOCKET_PATH:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="pyvhost-"))
    try:
        yield short
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture(params=[1, 2], ids=["workers1", "workers2"])
def backend(socket_dir: Path, request: pytest.FixtureRequest) -> Iterator[Backend]:
    """A server listening on ``socket_dir/vhost.sock``, its loop running in a thread;
    the kicks served on that thread (``--workers 1``) or on two worker threads."""
    b = Backend(str(socket_dir / "vhost.sock"))
    try:
        b.server.use_workers(request.param)
        b.server.listen(b.path)
        b.start()
        yield b
        b.stop()
    finally:
        b.server.stop()
        if b.thread is not None:
            b.thread.join(TIMEOUT)
        b.server.close()


@pytest.fixture
def good(backend: Backend) -> Iterator[NetPort]:
    """A connection set up like QEMU's and already passing traffic."""
    port = NetPort(backend.path, tag="good")
    try:
        port.start()
        port.check_traffic(8)
        yield port
    finally:
        port.close()
