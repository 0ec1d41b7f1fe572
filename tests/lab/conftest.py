"""Fixtures of the lab tests: the guest image (built once per session) and booted guests.

Each guest is a real ``qemu-system-x86_64`` (TCG, q35, memfd boot RAM, qboot; TESTBED.md),
started paused (``-S``) so the console is connected before the guest prints anything, then
resumed over QMP. QEMU is started through ``procs``, so it is ended by pid when the test ends,
pass or fail; the sockets' directory is removed after it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from pyvhost.lab.guest import GuestConsole
from pyvhost.lab.image import GuestImage, ImageBuildError, build_image
from support.procs import Procs, Started, need, wait_for_socket

QBOOT = Path("/usr/share/qemu/qboot.rom")
BOOT_TIMEOUT = 300  # seconds to the ready marker: TCG on a busy 2-core machine


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
    qemu: Started
    qmp: QEMUMonitorProtocol
    console: GuestConsole
    sockets: Path


BootGuest = Callable[..., Vm]


@pytest.fixture
def boot_guest(guest_image: GuestImage, procs: Procs,
               tmp_path: Path) -> Iterator[BootGuest]:
    """``boot_guest(ip=..., net_socket=..., channel="serial"|"virtio")``: a guest at its
    ready marker, with its QMP monitor connected."""
    qemu_binary = need("qemu-system-x86_64", "qemu-system-x86")
    if not QBOOT.is_file():
        pytest.skip(f"{QBOOT} missing (Debian package qemu-system-data)")
    vms: list[Vm] = []
    dirs: list[Path] = []

    def boot(*, ip: str | None = None, mac: str = "52:54:00:12:34:56",
             net_socket: Path | None = None, channel: str = "serial",
             extra_args: Sequence[str] = ()) -> Vm:
        # Unix socket paths have at most 107 bytes: tmp_path can be longer.
        sockets = Path(tempfile.mkdtemp(prefix="pvlab-"))
        dirs.append(sockets)
        serial, port, qmp_path = sockets / "serial", sockets / "port", sockets / "qmp"
        argv = [qemu_binary, "-machine", "q35,memory-backend=ram0",
                "-object", "memory-backend-memfd,id=ram0,size=256M,share=on",
                "-m", "256M,slots=8,maxmem=4G", "-accel", "tcg", "-bios", str(QBOOT),
                "-nodefaults", "-nographic", "-no-reboot", "-S",
                "-kernel", str(guest_image.kernel), "-initrd", str(guest_image.initrd),
                "-chardev", f"socket,id=ser0,path={serial},server=on,wait=off",
                "-serial", "chardev:ser0",
                "-qmp", f"unix:{qmp_path},server=on,wait=off"]
        if channel == "virtio":
            argv += ["-device", "virtio-serial-pci",
                     "-chardev", f"socket,id=port0,path={port},server=on,wait=off",
                     "-device", "virtserialport,chardev=port0,name=pyvhost.0"]
            cmdline_channel: str | None = "port:pyvhost.0"
        elif channel == "serial":
            cmdline_channel = None
        else:
            raise ValueError(f"channel {channel!r}")
        if net_socket is not None:
            # vectors=0: QEMU 7.2 + TCG + vhost-user + MSI-X crashes (TESTBED.md).
            argv += ["-chardev", f"socket,id=c0,path={net_socket}",
                     "-netdev", "vhost-user,id=n0,chardev=c0",
                     "-device", f"virtio-net-pci,netdev=n0,vectors=0,mac={mac}"]
        argv += ["-append", guest_image.cmdline(ip=ip, mac=mac, channel=cmdline_channel)]
        argv += list(extra_args)
        qemu = procs.start(argv, f"qemu{len(vms)}")
        chardev = port if channel == "virtio" else serial
        try:
            wait_for_socket(chardev, qemu.proc, timeout=60)
            wait_for_socket(qmp_path, qemu.proc, timeout=60)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"{e}; QEMU said:\n{qemu.output()}") from e
        console = GuestConsole.connect(chardev, timeout=60,
                                       name=f"guest{len(vms)}",
                                       log=tmp_path / f"console{len(vms)}.log")
        qmp = QEMUMonitorProtocol(str(qmp_path))
        try:
            qmp.connect()
        except Exception:
            console.close()
            raise
        vm = Vm(qemu, qmp, console, sockets)
        vms.append(vm)
        qmp.cmd("cont")
        console.wait_ready(BOOT_TIMEOUT)
        return vm

    try:
        yield boot
    finally:
        for vm in vms:
            with contextlib.suppress(Exception):
                vm.qmp.close()
            vm.console.close()
        procs.close()  # QEMU by pid, before its sockets' directory goes
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
