"""Readiness for the service manager: ``READY=1`` over ``$NOTIFY_SOCKET`` once every
socket listens, ``STATUS=`` as front-ends come and go, ``STOPPING=1`` at the end.

The test plays systemd's part: it binds the datagram socket (a path, or an abstract name
written ``@name``) and gives its address to ``pyvhost net`` in ``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import os
import signal
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.harness import NetPort
from pyvhost.backend import sdnotify
from pyvhost.tools.procfs import unix_listening
from support.procs import Procs

from .conftest import TIMEOUT, metrics_url, start_net


class Manager:
    """The service manager's end: a bound datagram socket and its NOTIFY_SOCKET value."""

    def __init__(self, address: str, sock: socket.socket) -> None:
        self.address = address
        self.sock = sock

    def receive(self, timeout: float = TIMEOUT) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096)
        return dict(line.split("=", 1) for line in data.decode().splitlines())

    def receive_until(self, key: str, timeout: float = TIMEOUT) -> dict[str, str]:
        while True:
            got = self.receive(timeout)
            if key in got:
                return got


@pytest.fixture(params=["path", "abstract"])
def manager(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[Manager]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        if request.param == "path":
            address = str(short_dir / "notify")
            sock.bind(address)
        else:
            address = f"@pyvhost-test-{uuid.uuid4().hex}"
            sock.bind("\0" + address[1:])
        yield Manager(address, sock)
    finally:
        sock.close()


def test_notify_address() -> None:
    assert sdnotify.notify_address("/run/systemd/notify") == b"/run/systemd/notify"
    assert sdnotify.notify_address("@abc") == b"\0abc"
    assert sdnotify.notify_address("vsock:2:1234") is None
    assert sdnotify.notify_address("") is None


def test_notify_sends_one_datagram(manager: Manager, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", manager.address)
    assert sdnotify.ready("serving\nx")
    got = manager.receive()
    assert got == {"READY": "1", "STATUS": "serving x",
                   "MAINPID": str(os.getpid())}
    with pytest.raises(ValueError, match="assignment"):
        sdnotify.notify("READY")


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.ready("serving")
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    assert not sdnotify.ready("serving")  # logged, never raised


def test_ready_once_every_socket_listens_then_stopping(manager: Manager, procs: Procs,
                                                      short_dir: Path) -> None:
    a, b, ctl = short_dir / "a.sock", short_dir / "b.sock", short_dir / "ctl.sock"
    env = dict(os.environ, NOTIFY_SOCKET=manager.address)
    net = start_net(procs, "--socket", str(a), "--socket", str(b), "--control", str(ctl),
                    "--metrics", "127.0.0.1:0", env=env)
    ready = manager.receive()
    # At the moment READY=1 arrives, everything a VM needs is there: the vhost-user
    # sockets and the control socket listen, the metrics endpoint accepts.
    listening = {p.name: unix_listening(p) for p in (a, b, ctl)}
    assert all(listening.values()), (listening, net.output())
    url = metrics_url(net, timeout=0.1)  # logged before READY=1
    host, port = url.removeprefix("http://").split("/")[0].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT):
        pass
    assert ready["READY"] == "1"
    assert ready["MAINPID"] == str(net.pid)
    assert "serving" in ready["STATUS"] and str(a) in ready["STATUS"], ready

    # systemctl status follows the front-ends.
    port_a = NetPort(str(a), tag="notify").start()
    try:
        assert "1 front-end connected" in manager.receive_until("STATUS")["STATUS"]
    finally:
        port_a.close()
    assert "0 front-ends connected" in manager.receive_until("STATUS")["STATUS"]

    os.kill(net.pid, signal.SIGTERM)
    stopping = manager.receive_until("STOPPING")
    assert stopping["STOPPING"] == "1" and "SIGTERM" in stopping["STATUS"]
    assert net.proc.wait(TIMEOUT) == 0, net.output()
