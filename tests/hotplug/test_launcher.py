"""The QEMU launcher's command line for a booted test guest (no QEMU started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvhost.lab.image import GuestImage, KernelPackage
from pyvhost.lab.qemu import (
    QBOOT,
    QEMU_BINARY,
    VIRTIO_PORT,
    Qemu,
    QemuConfig,
    QemuError,
    VhostUserNet,
    VirtioMem,
    command_line,
    firmware_dirs,
    guest_config,
    qboot_path,
)
from pyvhost.units import GiB, MiB

IMAGE = GuestImage(Path("img"), "k", Path("img/vmlinuz"), Path("img/initrd.cpio"),
                   KernelPackage("linux-image-x", "1"), "6.1.0-x", ())


def argv(config: QemuConfig) -> list[str]:
    return command_line(config, Path("c.sock"), Path("q.sock"), binary=QEMU_BINARY,
                        console=Path("con.sock"))


def test_qemu_from_a_private_prefix_gets_its_firmware(tmp_path: Path) -> None:
    """PYVHOST_QEMU=PREFIX/usr/bin/qemu-system-x86_64 (QEMU 10.0 unpacked with dpkg -x):
    -L PREFIX/usr/share/qemu, then Debian's SeaBIOS; qboot from the prefix."""
    exe = tmp_path / "usr" / "bin" / "qemu-system-x86_64"
    data = tmp_path / "usr" / "share" / "qemu"
    exe.parent.mkdir(parents=True)
    data.mkdir(parents=True)
    (data / "qboot.rom").write_bytes(b"")
    assert firmware_dirs(str(exe)) == (data, Path("/usr/share/seabios"))
    assert qboot_path(str(exe)) == data / "qboot.rom"
    a = command_line(guest_config(IMAGE), Path("c"), Path("q"), binary=str(exe),
                     console=Path("con"))
    assert a[:5] == [str(exe), "-L", str(data), "-L", "/usr/share/seabios"]
    assert a[a.index("-bios") + 1] == str(data / "qboot.rom")
    # The system QEMU finds its own firmware.
    assert firmware_dirs(QEMU_BINARY) == () and firmware_dirs("/usr/bin/" + QEMU_BINARY) == ()
    assert qboot_path(QEMU_BINARY) == QBOOT


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
