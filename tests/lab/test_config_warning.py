"""QEMU 7.2 no longer warns "vhost-user backend supports VHOST_USER_PROTOCOL_F_CONFIG but
QEMU does not" at every VM start on ``pyvhost net``: a net device does not offer the CONFIG
protocol feature (QEMU's vhost-user-net serves the config space itself).

The second test is the control: a back-end that does offer CONFIG makes the same QEMU
print the warning into the same log, so the first test's absence means something.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from backend.conftest import start_loop
from pyvhost.backend import Server
from pyvhost.backend.control import fetch_status
from pyvhost.devices.reflect import ReflectNet
from pyvhost.lab.qemu import Qemu, QemuConfig, VhostUserNet
from pyvhost.tools.procfs import unix_listening
from support.procs import Procs, need

from .conftest import BootGuest

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

WARNING = "vhost-user backend supports VHOST_USER_PROTOCOL_F_CONFIG but QEMU does not"
TIMEOUT = 120.0


def _wait(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_a_guest_on_pyvhost_net_starts_without_the_config_warning(
        boot_guest: BootGuest, procs: Procs, short_dir: Path) -> None:
    sock, ctl = short_dir / "net.sock", short_dir / "ctl.sock"
    net = procs.pyvhost("net", "--socket", str(sock), "--reflect", "--control", str(ctl))
    _wait(lambda: unix_listening(sock) and unix_listening(ctl), f"pyvhost net listening:\n"
          f"{net.output()}")
    vm = boot_guest(ip="10.99.0.1/24", mac="52:54:00:00:99:01", net_socket=sock)
    c = vm.console
    assert ",UP" in c.ip_addr("eth0")
    c.ping("10.99.0.2", count=2)  # frames through pyvhost (reflected: no answer)
    connections = fetch_status(str(ctl))["connections"]
    assert isinstance(connections, list) and len(connections) == 1, connections
    conn = connections[0]
    assert "CONFIG" not in conn["protocol_features"], conn["protocol_features"]
    assert conn["device"]["stats"]["tx_frames"] > 0, conn["device"]
    assert WARNING not in vm.qemu.output(), vm.qemu.output()
    assert procs.stop(net) == 0, net.output()


class _ServesConfig(ReflectNet):
    serves_config = True


def test_control_a_back_end_offering_config_gets_the_warning(tmp_path: Path,
                                                             short_dir: Path) -> None:
    need("qemu-system-x86_64", "qemu-system-x86")
    sock = short_dir / "config.sock"
    server = Server(lambda: _ServesConfig())
    errors: list[BaseException] = []
    server.listen(str(sock))
    thread: threading.Thread | None = None
    qemu = Qemu(QemuConfig(vhost_user_net=(VhostUserNet(sock),)), log=tmp_path / "qemu.log")
    try:
        thread = start_loop(server, errors, "config-backend")
        qemu.start()  # paused: QEMU sets the vhost-user device up at start
        _wait(lambda: WARNING in qemu.output(), f"no warning from QEMU:\n{qemu.output()}")
    finally:
        qemu.stop()
        server.stop()
        if thread is not None:
            thread.join(TIMEOUT)
        server.close()
    assert not errors, errors
