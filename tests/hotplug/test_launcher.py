"""The QEMU launcher's command line for a booted test guest (no QEMU started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvhost.lab.image import GuestImage, KernelPackage
from pyvhost.lab.qemu import (
    QBOOT,
    VIRTIO_PORT,
    GiB,
    MiB,
    Qemu,
    QemuConfig,
    QemuError,
    VhostUserNet,
    VirtioMem,
    command_line,
    guest_config,
)

IMAGE = GuestImage(Path("img"), "k", Path("img/vmlinuz"), Path("img/initrd.cpio"),
                   KernelPackage("linux-image-x", "1"), "6.1.0-x", ())


def argv(config: QemuConfig) -> list[str]:
    return command_line(config, Path("c.sock"), Path("q.sock"), console=Path("con.sock"))


def test_serial_console_boot() -> None:
    net = VhostUserNet(Path("vh.sock"), mac="52:54:00:00:00:01")
    a = argv(guest_config(IMAGE, ip="10.0.0.1/24", vhost_user_net=(net,)))
    assert "-S" in a and "-no-reboot" in a
    assert a[a.index("-bios") + 1] == str(QBOOT)
    assert a[a.index("-kernel") + 1] == "img/vmlinuz"
    assert a[a.index("-initrd") + 1] == "img/initrd.cpio"
    append = a[a.index("-append") + 1]
    assert "pyvhost.ip=10.0.0.1/24" in append and "pyvhost.mac=52:54:00:00:00:01" in append
    assert "memhp_default_state=online_movable" in append
    assert "socket,id=console0,path=con.sock,server=on,wait=off" in a
    assert a[a.index("-serial") + 1] == "chardev:console0"
    assert any(x.endswith("vectors=0,mac=52:54:00:00:00:01") for x in a)


def test_virtio_console_and_virtio_mem() -> None:
    a = argv(guest_config(IMAGE, channel="virtio",
                          virtio_mem=(VirtioMem("v0", 2 * GiB, 256 * MiB),)))
    assert f"virtserialport,chardev=console0,name={VIRTIO_PORT}" in a
    assert a[a.index("-serial") + 1] == "null"
    assert f"pyvhost.channel=port:{VIRTIO_PORT}" in a[a.index("-append") + 1]
    assert "memory-backend-memfd,id=v0-mem,size=2048M,share=on" in a
    assert "virtio-mem-pci,id=v0,memdev=v0-mem,requested-size=256M" in a


def test_boot_needs_a_kernel_a_console_and_a_paused_start() -> None:
    for config in (QemuConfig(), QemuConfig(kernel=Path("k"), console="serial",
                                            paused=False)):
        q = Qemu(config)
        try:
            with pytest.raises(QemuError):
                q.boot()
        finally:
            q.stop()
