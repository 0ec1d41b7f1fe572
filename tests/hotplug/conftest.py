"""Fixtures: real QEMU guests (7.2, or $PYVHOST_QEMU's: ``qemu_under_test``) started
through pyvhost.lab.qemu (TCG): paused ones with no kernel (``start_qemu``), and booted
test guests (``boot_vm``, the image built once per session with virtio_mem among its
modules)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from click.testing import CliRunner

from pyvhost.cli.main import cli
from pyvhost.lab.image import DEFAULT_MODULES, GuestImage, ImageBuildError, build_image
from pyvhost.lab.qemu import (
    BOOT_TIMEOUT,
    QBOOT,
    QEMU_ENV,
    Qemu,
    QemuConfig,
    guest_config,
    qemu_binary,
    qemu_version,
)
from support.procs import need

StartQemu = Callable[[QemuConfig], Qemu]
BootVm = Callable[..., Qemu]
# The lab image plus the virtio-mem driver (CONFIG_VIRTIO_MEM=m in Debian's cloud kernel).
HOTPLUG_MODULES = (*DEFAULT_MODULES, "virtio_mem")


@pytest.fixture(scope="session")
def qemu_under_test() -> tuple[int, int, int]:
    """The version of the QEMU the tests start: Debian's 7.2, or $PYVHOST_QEMU's (CI runs
    the QEMU tests of pyvhost mem and the lab's hot-plug tests against 7.2 and 10.0)."""
    binary = qemu_binary()
    if shutil.which(binary) is None:
        if os.environ.get(QEMU_ENV):
            pytest.fail(f"${QEMU_ENV}={binary} does not exist")
        need("qemu-system-x86_64", "qemu-system-x86")
    return qemu_version(binary)


@pytest.fixture
def start_qemu(tmp_path: Path, qemu_under_test: tuple[int, int, int]) -> Iterator[StartQemu]:
    """Start QEMU guests; every one is stopped (by pid) and its sockets removed at the end."""
    started: list[Qemu] = []

    def start(config: QemuConfig) -> Qemu:
        q = Qemu(config, log=tmp_path / f"qemu{len(started)}.log")
        started.append(q)
        return q.start(timeout=120)

    try:
        yield start
    finally:
        for q in reversed(started):
            q.stop()


@pytest.fixture(scope="session")
def hotplug_image() -> GuestImage:
    """The test guest (tests/lab's image, with virtio_mem), from the cache or built once."""
    need("apt-get", "apt")
    need("dpkg-deb", "dpkg")
    try:
        return build_image(modules=HOTPLUG_MODULES, update_lists=os.geteuid() == 0)
    except ImageBuildError as e:
        pytest.skip(f"cannot build the guest image: {e}")


@pytest.fixture
def boot_vm(hotplug_image: GuestImage, tmp_path: Path,
            qemu_under_test: tuple[int, int, int]) -> Iterator[BootVm]:
    """``boot_vm(ip=..., **QemuConfig fields)``: a booted guest at its ready marker;
    ``q.console`` is its command channel, ``q.qmp_path`` the monitor for ``pyvhost mem``."""
    if not QBOOT.is_file():
        pytest.skip(f"{QBOOT} missing (Debian package qemu-system-data)")
    started: list[Qemu] = []

    def boot(**kwargs: Any) -> Qemu:
        n = len(started)
        q = Qemu(guest_config(hotplug_image, **kwargs), log=tmp_path / f"qemu{n}.log",
                 console_log=tmp_path / f"console{n}.log")
        started.append(q)
        q.boot(BOOT_TIMEOUT)
        return q

    try:
        yield boot
    finally:
        for q in reversed(started):
            q.stop()


def run_mem(*args: str) -> tuple[int, str]:
    """``pyvhost mem ARGS`` in this process: (exit code, stdout)."""
    result = CliRunner().invoke(cli, ["mem", *args], catch_exceptions=False)
    return result.exit_code, result.stdout


def run_json(*args: str) -> tuple[int, dict[str, Any]]:
    code, out = run_mem(*args, "--json")
    doc: dict[str, Any] = json.loads(out)
    return code, doc


def objects(q: Qemu) -> set[str]:
    """Child objects of /objects, as QEMU lists them."""
    listing = cast(list[dict[str, str]], q.control.cmd("qom-list", path="/objects"))
    return {o["name"] for o in listing if o["type"].startswith("child<")}
