"""The image's pure pieces: newc archives, ``.modinfo`` parsing, module load order."""

from __future__ import annotations

import shutil
import stat
import struct
import subprocess

import pytest

from pyvhost.lab.initramfs import (
    CpioEntry,
    ModuleError,
    ModuleInfo,
    load_order,
    parse_modinfo,
    write_newc,
)

# depends= of Debian 6.1 cloud kernel modules (strings X.ko | grep ^depends=).
DEBIAN_DEPENDS = {
    "virtio": ("virtio_ring",),
    "virtio_ring": (),
    "virtio_pci_modern_dev": (),
    "virtio_pci_legacy_dev": (),
    "virtio_pci": ("virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio"),
    "failover": (),
    "net_failover": ("failover",),
    "virtio_net": ("virtio_ring", "virtio", "net_failover"),
    "virtio_blk": ("virtio", "virtio_ring"),
    "virtio_console": ("virtio", "virtio_ring"),
    "unrelated": ("virtio",),
}


def _assert_deps_first(order: list[str], depends: dict[str, tuple[str, ...]]) -> None:
    for i, name in enumerate(order):
        for dep in depends[name]:
            assert dep in order[:i], f"{name} loads before its dependency {dep}: {order}"


def test_load_order_puts_dependencies_first_even_if_asked_in_the_wrong_order() -> None:
    # An order once written down by hand: virtio before virtio_ring, which insmod refuses.
    wanted = ["virtio", "virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
              "virtio_pci", "failover", "net_failover", "virtio_net", "virtio_blk"]
    order = load_order(DEBIAN_DEPENDS, wanted)
    assert order[:2] == ["virtio_ring", "virtio"]
    assert sorted(order) == sorted(wanted)
    _assert_deps_first(order, dict(DEBIAN_DEPENDS))


def test_load_order_adds_missing_dependencies_and_is_stable() -> None:
    order = load_order(DEBIAN_DEPENDS, ["virtio_net", "virtio_blk"])
    assert set(order) == {"virtio_ring", "virtio", "failover", "net_failover", "virtio_net",
                          "virtio_blk"}
    _assert_deps_first(order, dict(DEBIAN_DEPENDS))
    assert order == load_order(DEBIAN_DEPENDS, ["virtio_net", "virtio_blk"])
    assert "unrelated" not in order


def test_load_order_keeps_the_wanted_order_among_free_modules() -> None:
    assert load_order(DEBIAN_DEPENDS, ["failover", "virtio_ring"]) == ["failover",
                                                                      "virtio_ring"]
    assert load_order(DEBIAN_DEPENDS, ["virtio_ring", "failover"]) == ["virtio_ring",
                                                                      "failover"]


def test_load_order_errors() -> None:
    with pytest.raises(ModuleError, match="nosuch is not in the kernel package"):
        load_order({"a": ("nosuch",)}, ["a"])
    with pytest.raises(ModuleError, match="circular"):
        load_order({"a": ("b",), "b": ("a",), "c": ()}, ["a", "c"])


def _elf_with_sections(sections: dict[str, bytes]) -> bytes:
    """A minimal ELF64 little-endian relocatable file holding ``sections``."""
    names = [".shstrtab", *sections]
    shstrtab = b"\0" + b"".join(n.encode() + b"\0" for n in names)
    name_off = {n: shstrtab.index(b"\0" + n.encode() + b"\0") + 1 for n in names}
    blobs = [shstrtab, *sections.values()]
    body = b""
    offsets = []
    for blob in blobs:
        offsets.append(64 + len(body))
        body += blob + b"\0" * (-len(blob) % 8)
    shoff = 64 + len(body)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    header = ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64,
                                 len(blobs) + 1, 1)
    shdrs = b"\0" * 64  # the null section
    for name, blob, off in zip(names, blobs, offsets, strict=True):
        shdrs += struct.pack("<IIQQQQIIQQ", name_off[name], 1, 0, 0, off, len(blob), 0, 0, 1, 0)
    return header + body + shdrs


def test_parse_modinfo_reads_name_and_depends() -> None:
    modinfo = b"license=GPL\0depends=virtio_ring,virtio,net_failover\0name=virtio_net\0"
    ko = _elf_with_sections({".text": b"\x90" * 5, ".modinfo": modinfo})
    assert parse_modinfo(ko) == ModuleInfo("virtio_net", ("virtio_ring", "virtio",
                                                          "net_failover"))
    ko = _elf_with_sections({".modinfo": b"depends=\0name=failover\0"})
    assert parse_modinfo(ko) == ModuleInfo("failover", ())


def test_parse_modinfo_rejects_what_is_not_a_module() -> None:
    with pytest.raises(ModuleError, match="not a 64-bit"):
        parse_modinfo(b"#!/bin/sh\n")
    with pytest.raises(ModuleError, match=r"no \.modinfo"):
        parse_modinfo(_elf_with_sections({".text": b"\x90"}))
    with pytest.raises(ModuleError, match="no name="):
        parse_modinfo(_elf_with_sections({".modinfo": b"depends=\0"}))
    truncated = _elf_with_sections({".modinfo": b"name=x\0"})[:-40]
    with pytest.raises(ModuleError, match="out of the file"):
        parse_modinfo(truncated)


def _read_newc(archive: bytes) -> list[dict[str, object]]:
    """Parse a newc archive independently of the writer (cpio(5))."""
    entries: list[dict[str, object]] = []
    pos = 0
    while True:
        assert pos % 4 == 0
        header = archive[pos:pos + 110]
        assert header[:6] == b"070701"
        f = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = archive[pos + 110:pos + 110 + namesize - 1].decode()
        assert archive[pos + 110 + namesize - 1] == 0
        data_at = pos + 110 + namesize + (-(110 + namesize) % 4)
        data = archive[data_at:data_at + filesize]
        entries.append({"name": name, "ino": f[0], "mode": f[1], "uid": f[2], "nlink": f[4],
                        "mtime": f[5], "rdev": (f[9], f[10]), "data": data})
        pos = data_at + filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            assert pos == len(archive)
            return entries


ENTRIES = [
    CpioEntry.directory("bin"),
    CpioEntry.directory("dev"),
    CpioEntry.char_device("dev/console", 5, 1),
    CpioEntry.file("bin/busybox", b"\x7fELF" + b"x" * 13, 0o755),
    CpioEntry.symlink("bin/sh", "busybox"),
    CpioEntry.file("init", b"#!/bin/sh\n", 0o755),
    CpioEntry.file("empty", b""),
]


def test_newc_archive_layout() -> None:
    archive = write_newc(ENTRIES)
    parsed = _read_newc(archive)
    assert [e["name"] for e in parsed] == [e.path for e in ENTRIES] + ["TRAILER!!!"]
    by_name = {e["name"]: e for e in parsed}
    console = by_name["dev/console"]
    assert stat.S_ISCHR(int(str(console["mode"]))) and console["rdev"] == (5, 1)
    assert by_name["bin/busybox"]["data"] == b"\x7fELF" + b"x" * 13
    assert by_name["bin/busybox"]["mode"] == stat.S_IFREG | 0o755
    assert by_name["bin/sh"]["data"] == b"busybox"
    assert by_name["bin"]["nlink"] == 2
    assert {e["mtime"] for e in parsed} == {0} and {e["uid"] for e in parsed} == {0}
    inos = [e["ino"] for e in parsed[:-1]]
    assert len(set(inos)) == len(inos)
    assert write_newc(ENTRIES) == archive  # reproducible


def test_newc_archive_lists_with_busybox_cpio() -> None:
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox not installed (Debian package busybox-static)")
    listing = subprocess.run([busybox, "cpio", "-t", "-v"], input=write_newc(ENTRIES),
                             capture_output=True, check=True).stdout.decode()
    lines = {line.split()[-1] if "->" not in line else line.split()[-3]: line
             for line in listing.splitlines()}
    assert lines["dev/console"].startswith("crw")
    assert lines["bin/sh"].startswith("lrwx") and lines["bin/sh"].endswith("-> busybox")
    assert lines["init"].startswith("-rwxr-xr-x")


def test_newc_refuses_bad_entries() -> None:
    with pytest.raises(ValueError, match="relative"):
        CpioEntry.file("/init", b"")
    with pytest.raises(ValueError, match="carry data"):
        CpioEntry("dev", stat.S_IFDIR | 0o755, b"x")
    with pytest.raises(ValueError, match="before its directory"):
        write_newc([CpioEntry.file("bin/sh", b"")])
    with pytest.raises(ValueError, match="twice"):
        write_newc([CpioEntry.file("a", b""), CpioEntry.file("a", b"")])
