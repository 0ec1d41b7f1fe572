"""Fixtures of the lab tests: the guest image (built once per session) and booted guests.

Each guest is a real ``qemu-system-x86_64`` (TCG, q35, memfd boot RAM, qboot: see
:mod:`pyvhost.lab.qemu` for why)
started by :class:`pyvhost.lab.qemu.Qemu`: paused (``-S``) so the console is connected before
the guest prints anything, then resumed over QMP. It is ended by pid when the test ends, pass
or fail, and its sockets' directory is removed after it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from pyvhost.lab.guest import GuestConsole
from pyvhost.lab.image import GuestImage, ImageBuildError, build_image
from pyvhost.lab.qemu import BOOT_TIMEOUT, QBOOT, Channel, Qemu, VhostUserNet, guest_config
from support.procs import need

from .memfds import NetNs, make_netns, remove_netns


class GuestChannelWarning(UserWarning):
    """A guest console had to send a command again, or fetch its answer again (a lost or
    garbled line, an answer whose length or MD5 did not match)."""


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(autouse=True)
def report_console_resends(request: pytest.FixtureRequest) -> Iterator[None]:
    """When a real guest's console sent a command again, say so in the test run's output
    (its warnings summary), pass or fail: a captured log line shows only on failure."""
    if request.node.get_closest_marker("qemu") is None:
        yield
        return
    keep = _Keep()
    logger = logging.getLogger("pyvhost.lab.guest")
    level = logger.level
    # The console logs resends and re-fetches at INFO: make sure they reach the handler.
    logger.setLevel(min(level or logging.INFO, logging.INFO))
    logger.addHandler(keep)
    try:
        yield
    finally:
        logger.removeHandler(keep)
        logger.setLevel(level)
        for message in keep.messages:
            warnings.warn(GuestChannelWarning(message), stacklevel=1)


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The test guest's kernel and initramfs, from the user's cache or built now (once)."""
    need("apt-get", "apt")
    need("dpkg-deb", "dpkg")
    try:
        # As root (CI), missing or stale package lists get one `apt-get update`.
        return build_image(update_lists=os.geteuid() == 0)
    except ImageBuildError as e:
        pytest.skip(f"cannot build the guest image: {e}")


@dataclass
class Vm:
    qemu: Qemu
    qmp: QEMUMonitorProtocol  # the monitor left free for tests (Qemu.qmp_path)
    console: GuestConsole


BootGuest = Callable[..., Vm]


@pytest.fixture
def boot_guest(guest_image: GuestImage, tmp_path: Path) -> Iterator[BootGuest]:
    """``boot_guest(ip=..., net_socket=..., channel="serial"|"virtio")``: a guest at its
    ready marker, with its QMP monitor connected."""
    need("qemu-system-x86_64", "qemu-system-x86")
    if not QBOOT.is_file():
        pytest.skip(f"{QBOOT} missing (Debian package qemu-system-data)")
    vms: list[Vm] = []
    started: list[Qemu] = []

    def boot(*, ip: str | None = None, mac: str = "52:54:00:12:34:56",
             net_socket: Path | None = None, channel: Channel = "serial",
             queues: int = 1, smp: int = 1, extra_args: Sequence[str] = ()) -> Vm:
        nets = ((VhostUserNet(net_socket, mac=mac, queues=queues),)
                if net_socket is not None else ())
        n = len(started)
        qemu = Qemu(guest_config(guest_image, ip=ip, channel=channel, vhost_user_net=nets,
                                 smp=smp, extra_args=tuple(extra_args)),
                    log=tmp_path / f"qemu{n}.log", console_log=tmp_path / f"console{n}.log")
        started.append(qemu)
        console = qemu.boot(BOOT_TIMEOUT)
        qmp = QEMUMonitorProtocol(str(qemu.qmp_path))
        qmp.connect()
        vm = Vm(qemu, qmp, console)
        vms.append(vm)
        return vm

    try:
        yield boot
    finally:
        for vm in vms:
            with contextlib.suppress(Exception):
                vm.qmp.close()
        for q in reversed(started):
            q.stop()  # by pid; removes its sockets' directory


@pytest.fixture
def netns() -> Iterator[NetNs]:
    """A fresh network namespace and a unique tap name for it; removed after the test."""
    ns = make_netns()
    try:
        yield ns
    finally:
        remove_netns(ns)
