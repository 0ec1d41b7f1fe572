"""The image builder without the network: cache key, cache hits, atomic builds, apt errors."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest

from pyvhost.lab import image as image_mod
from pyvhost.lab.image import (
    BUILDER_VERSION,
    ImageBuildError,
    ImageInputs,
    KernelPackage,
    build_image,
    cache_root,
    fetch_kernel,
    kernel_cmdline,
    resolve_kernel_package,
)

from .test_initramfs import DEBIAN_DEPENDS, _elf_with_sections, _read_newc

KERNEL = KernelPackage("linux-image-6.1.0-99-cloud-amd64", "6.1.999-1")
RELEASE = "6.1.0-99-cloud-amd64"


class FakeFetch:
    """Stands in for ``apt-get download`` + ``dpkg-deb -x``: a tree with synthetic modules."""

    def __init__(self) -> None:
        self.calls: list[KernelPackage] = []

    def __call__(self, kernel: KernelPackage, workdir: Path,
                 progress: image_mod.Progress) -> Path:
        self.calls.append(kernel)
        progress(f"fake download of {kernel.name}")
        root = workdir / "unpacked"
        (root / "boot").mkdir(parents=True)
        (root / "boot" / f"vmlinuz-{RELEASE}").write_bytes(b"fake bzImage " +
                                                           kernel.version.encode())
        kdir = root / "lib" / "modules" / RELEASE / "kernel" / "drivers"
        kdir.mkdir(parents=True)
        for name, deps in DEBIAN_DEPENDS.items():
            modinfo = f"depends={','.join(deps)}\0name={name}\0".encode()
            (kdir / f"{name}.ko").write_bytes(_elf_with_sections({".modinfo": modinfo}))
        return root


@pytest.fixture
def busybox(tmp_path: Path) -> Path:
    path = tmp_path / "busybox"
    path.write_bytes(b"\x7fELF not really busybox")
    return path


def _build(cache: Path, busybox: Path, fetch: FakeFetch, **kw: object) -> image_mod.GuestImage:
    messages: list[str] = []
    args: dict[str, object] = {"kernel": KERNEL, "cache_dir": cache, "busybox": busybox,
                               "progress": messages.append, "fetch": fetch}
    args.update(kw)
    return build_image(**args)  # type: ignore[arg-type]


def test_build_then_cache_hit(tmp_path: Path, busybox: Path) -> None:
    cache, fetch = tmp_path / "cache", FakeFetch()
    first = _build(cache, busybox, fetch)
    assert fetch.calls == [KERNEL]
    assert first.directory == cache / first.key
    assert first.kernel.read_bytes() == b"fake bzImage 6.1.999-1"
    assert first.kernel_release == RELEASE
    assert first.modules[:2] == ("virtio_ring", "virtio")
    assert "unrelated" not in first.modules
    # Only the finished image is left: no staging directory, no unpacked package.
    assert [p.name for p in cache.iterdir()] == [first.key]
    assert sorted(p.name for p in first.directory.iterdir()) == ["initrd.cpio",
                                                                 "manifest.json", "vmlinuz"]

    files = {str(e["name"]): e for e in _read_newc(first.initrd.read_bytes())}
    assert stat.S_ISCHR(int(str(files["dev/console"]["mode"])))
    assert files["dev/console"]["rdev"] == (5, 1)
    assert files["bin/busybox"]["data"] == busybox.read_bytes()
    assert files["lib/modules/order"]["data"] == "".join(
        f"{m}\n" for m in first.modules).encode()
    assert bytes(files["init"]["data"]).startswith(b"#!/bin/sh")  # type: ignore[call-overload]
    assert all(f"lib/modules/{m}.ko" in files for m in first.modules)

    again = _build(cache, busybox, fetch)
    assert again == first
    assert fetch.calls == [KERNEL]  # not rebuilt


def test_a_changed_input_builds_a_new_image(tmp_path: Path, busybox: Path) -> None:
    cache, fetch = tmp_path / "cache", FakeFetch()
    first = _build(cache, busybox, fetch)
    newer = _build(cache, busybox, fetch, kernel=dataclasses.replace(KERNEL, version="6.1.999-2"))
    fewer = _build(cache, busybox, fetch, modules=("virtio_blk",))
    busybox.write_bytes(b"\x7fELF another busybox")
    other_busybox = _build(cache, busybox, fetch)
    keys = {first.key, newer.key, fewer.key, other_busybox.key}
    assert len(keys) == 4 and len(fetch.calls) == 4
    assert fewer.modules == ("virtio_ring", "virtio", "virtio_blk")
    assert {p.name for p in cache.iterdir()} == keys


def test_cache_key_changes_exactly_when_an_input_does() -> None:
    base = ImageInputs(kernel=KERNEL, busybox_sha256="b" * 64, init_sha256="i" * 64,
                       tool_sha256="t" * 64, modules=("virtio_net",))
    assert base.key() == dataclasses.replace(base).key()
    assert base.builder_version == BUILDER_VERSION
    changed = [
        dataclasses.replace(base, kernel=dataclasses.replace(KERNEL, version="6.1.999-2")),
        dataclasses.replace(base, kernel=dataclasses.replace(KERNEL, name="linux-image-x")),
        dataclasses.replace(base, busybox_sha256="c" * 64),
        dataclasses.replace(base, init_sha256="j" * 64),
        dataclasses.replace(base, tool_sha256="u" * 64),
        dataclasses.replace(base, modules=("virtio_net", "virtio_blk")),
        dataclasses.replace(base, modules=()),
        dataclasses.replace(base, builder_version=BUILDER_VERSION + 1),
    ]
    keys = {base.key(), *(c.key() for c in changed)}
    assert len(keys) == len(changed) + 1


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path, busybox: Path) -> None:
    cache = tmp_path / "cache"

    def broken(kernel: KernelPackage, workdir: Path, progress: image_mod.Progress) -> Path:
        (workdir / "half.deb").write_bytes(b"partial")
        raise ImageBuildError("network down")

    with pytest.raises(ImageBuildError, match="network down"):
        _build(cache, busybox, broken)  # type: ignore[arg-type]
    assert list(cache.iterdir()) == []

    with pytest.raises(ImageBuildError, match="nosuch is not in the kernel package"):
        _build(cache, busybox, FakeFetch(), modules=("virtio_net", "nosuch"))
    assert list(cache.iterdir()) == []


def test_cache_root_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "pyvhost" / "guest"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # ignored, as the XDG spec says
    assert cache_root() == Path.home() / ".cache" / "pyvhost" / "guest"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "pyvhost" / "guest"


def test_kernel_cmdline() -> None:
    line = kernel_cmdline(ip="10.99.0.1/24", mac="52:54:00:00:00:01", channel="port:p0",
                          extra=["nokaslr"])
    words = line.split()
    assert "console=ttyS0" in words and "memhp_default_state=online_movable" in words
    assert "quiet" in words and "loglevel=1" in words
    assert words[-4:] == ["pyvhost.ip=10.99.0.1/24", "pyvhost.mac=52:54:00:00:00:01",
                          "pyvhost.channel=port:p0", "nokaslr"]
    assert "pyvhost." not in kernel_cmdline()
    with pytest.raises(ValueError, match="whitespace"):
        kernel_cmdline(ip="10.0.0.1/24 init=/bin/sh")


def _fake_tool(bindir: Path, name: str, script: str) -> None:
    path = bindir / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def test_resolve_kernel_package_follows_the_metapackage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_tool(tmp_path, "apt-cache", """cat <<'EOF'
Package: linux-image-cloud-amd64
Version: 6.1.192-2
Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)
Description: Linux for cloud platforms (meta-package)
 continued line: ignored

Package: linux-image-cloud-amd64
Version: 6.1.176-1
EOF
""")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert resolve_kernel_package() == KernelPackage("linux-image-6.1.0-56-cloud-amd64",
                                                     "6.1.192-2")


def test_apt_failures_say_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_tool(tmp_path, "apt-cache", "echo 'E: No packages found' >&2; exit 100\n")
    _fake_tool(tmp_path, "apt-get",
               "echo \"E: Unable to locate package $3\" >&2; exit 100\n")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ImageBuildError, match=r"(?s)No packages found.*apt-get update"):
        resolve_kernel_package()
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(ImageBuildError, match=r"(?s)Unable to locate package.*apt-get update"):
        fetch_kernel(KERNEL, work, lambda message: None)


def test_missing_apt_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ImageBuildError, match="apt-cache not found"):
        resolve_kernel_package()


def test_update_lists_runs_apt_get_update_once_and_retries(
        tmp_path: Path, busybox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir, updated = tmp_path / "bin", tmp_path / "updated"
    bindir.mkdir()
    _fake_tool(bindir, "apt-cache", f"""[ -e {updated} ] || {{ echo E: none >&2; exit 100; }}
echo 'Depends: {KERNEL.name} (= {KERNEL.version})'
""")
    _fake_tool(bindir, "apt-get", f'[ "$1" = update ] && echo updated >> {updated}\n')
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    fetch = FakeFetch()
    with pytest.raises(ImageBuildError, match="apt-get update"):
        _build(tmp_path / "cache", busybox, fetch, kernel=None)
    assert not updated.exists()
    built = _build(tmp_path / "cache", busybox, fetch, kernel=None, update_lists=True)
    assert built.kernel_package == KERNEL
    assert updated.read_text() == "updated\n"
