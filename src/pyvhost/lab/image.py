"""The test guest's image: Debian's cloud kernel and a busybox initramfs, built once and cached.

Owns fetching the kernel package (``apt-get download``, unpacked with ``dpkg-deb -x`` in a
temporary directory: never installed on the host), choosing its modules, assembling the
initramfs and the cache under ``$XDG_CACHE_HOME/pyvhost/guest/<key>/`` (``~/.cache`` without
it). The key hashes every input (kernel package and version, busybox binary, ``/init`` and its
helper, module list, builder version): a change in any of them gives a new image, nothing else
does. An image directory appears whole or not at all (built aside, then renamed).

It does not start QEMU (``pyvhost.lab.qemu`` does) and does not talk to a guest
(``pyvhost.lab.guest`` does). Building needs no root: the archive is written in Python
(:mod:`pyvhost.lab.initramfs` says why).

    python -m pyvhost.lab.image    # build (or find) the image, print its paths as JSON
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from pyvhost.errors import LocalError

from .initramfs import (
    CpioEntry,
    ModuleError,
    load_order,
    needed_modules,
    parse_modinfo,
    write_newc,
)

BUILDER_VERSION = 1
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
# What the guest needs: PCI transport, virtio-net, virtio-blk and virtio-serial. Their
# dependencies (virtio_ring, failover, ...) are found from each module's depends= string;
# listing them here only fixes the order among modules that are free to load.
DEFAULT_MODULES: tuple[str, ...] = (
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "failover", "net_failover", "virtio_net", "virtio_blk", "virtio_console",
)
READY_MARKER = "PYVHOST-READY"
# quiet/loglevel=1: only emergencies on the console, so kernel lines do not interleave with the
# command channel's framed output. panic=-1 (with QEMU's -no-reboot): a dead guest ends QEMU.
BASE_CMDLINE: tuple[str, ...] = (
    "console=ttyS0", "quiet", "loglevel=1", "panic=-1", "memhp_default_state=online_movable",
)

Progress = Callable[[str], None]


class ImageBuildError(LocalError):
    """The guest image could not be built on this host (missing tool, package, or download)."""


class AptError(ImageBuildError):
    """apt could not find or download the kernel package: often missing or stale lists."""


@dataclass(frozen=True)
class KernelPackage:
    """A Debian kernel image package, e.g. ``linux-image-6.1.0-56-cloud-amd64`` ``6.1.192-2``."""

    name: str
    version: str


@dataclass(frozen=True)
class ImageInputs:
    """Everything the image is made from; :meth:`key` changes exactly when one of them does."""

    kernel: KernelPackage
    busybox_sha256: str
    init_sha256: str
    tool_sha256: str
    modules: tuple[str, ...]
    builder_version: int = BUILDER_VERSION

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:20]


@dataclass(frozen=True)
class GuestImage:
    """A built image: pass ``kernel``, ``initrd`` and :meth:`cmdline` to QEMU."""

    directory: Path
    key: str
    kernel: Path
    initrd: Path
    kernel_package: KernelPackage
    kernel_release: str
    modules: tuple[str, ...]

    def cmdline(self, *, ip: str | None = None, mac: str | None = None,
                channel: str | None = None, extra: Sequence[str] = ()) -> str:
        return kernel_cmdline(ip=ip, mac=mac, channel=channel, extra=extra)


def kernel_cmdline(*, ip: str | None = None, mac: str | None = None,
                   channel: str | None = None, extra: Sequence[str] = ()) -> str:
    """The guest's kernel command line.

    ``ip`` is eth0's address with its prefix (``10.99.0.1/24``), ``mac`` its MAC, ``channel``
    where ``/init`` reads commands: ``ttyS0`` (default), ``hvc0`` or ``port:NAME`` for a
    virtio-serial port (``-device virtserialport,name=NAME``).
    """
    words = list(BASE_CMDLINE)
    for key, value in (("ip", ip), ("mac", mac), ("channel", channel)):
        if value is not None:
            if not value or any(c.isspace() for c in value):
                raise ValueError(f"pyvhost.{key}={value!r}: empty or contains whitespace")
            words.append(f"pyvhost.{key}={value}")
    words.extend(extra)
    return " ".join(words)


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/pyvhost/guest`` (``~/.cache/pyvhost/guest`` when unset or relative)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "pyvhost" / "guest"


def _stderr_progress(message: str) -> None:
    print(f"pyvhost guest image: {message}", file=sys.stderr, flush=True)


# --- host tools -----------------------------------------------------------------------------

_APT_HINT = ("the package lists may be missing or stale: run `apt-get update` as root, "
             "then try again")


def _run(argv: Sequence[str], *, cwd: Path | None = None, what: str,
         hint: str = "") -> str:
    try:
        done = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise ImageBuildError(f"{what}: {argv[0]} not found; the guest image builder needs "
                              "Debian's apt and dpkg") from e
    if done.returncode != 0:
        out = (done.stderr + done.stdout).strip()
        error = AptError if hint == _APT_HINT else ImageBuildError
        raise error(f"{what}: `{' '.join(argv)}` failed ({done.returncode}): {out}"
                    + (f"\n{hint}" if hint else ""))
    return done.stdout


def _stanza(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if line[0].isspace():
            continue
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def resolve_kernel_package(meta: str = KERNEL_META_PACKAGE) -> KernelPackage:
    """The real kernel package (name, candidate version) behind the metapackage ``meta``.

    ``linux-image-cloud-amd64`` only depends on ``linux-image-6.1.0-NN-cloud-amd64 (= V)``;
    asks ``apt-cache`` (the package lists), downloads nothing.
    """
    what = f"finding the kernel package behind {meta}"
    fields = _stanza(_run(["apt-cache", "show", "--no-all-versions", meta], what=what,
                          hint=_APT_HINT))
    for alternative in fields.get("Depends", "").split(","):
        dep = alternative.split("|")[0].strip()
        name, _, constraint = dep.partition(" ")
        if name.startswith("linux-image-"):
            version = constraint.strip("()").removeprefix("=").strip()
            if not version:
                version = _stanza(_run(["apt-cache", "show", "--no-all-versions", name],
                                       what=what, hint=_APT_HINT)).get("Version", "")
            if version:
                return KernelPackage(name, version)
    raise AptError(f"{what}: no linux-image-* dependency with a version in "
                          f"{fields.get('Depends', '(no Depends field)')!r}; {_APT_HINT}")


def fetch_kernel(kernel: KernelPackage, workdir: Path, progress: Progress) -> Path:
    """Download ``kernel`` with ``apt-get download`` and unpack it under ``workdir``.

    Returns the root of the unpacked tree (``boot/``, ``lib/modules/``). Nothing is installed.
    """
    spec = f"{kernel.name}={kernel.version}"
    progress(f"downloading {spec} with apt-get download (about 27 MB)")
    started = time.monotonic()
    _run(["apt-get", "download", "-q", spec], cwd=workdir, what=f"downloading {spec}",
         hint=_APT_HINT)
    debs = sorted(workdir.glob(f"{kernel.name}_*.deb"))
    if len(debs) != 1:
        raise ImageBuildError(f"apt-get download {spec} left {len(debs)} .deb files in the "
                              "download directory, expected 1")
    size_mb = debs[0].stat().st_size / 1e6
    progress(f"downloaded {size_mb:.1f} MB in {time.monotonic() - started:.1f} s; unpacking")
    root = workdir / "unpacked"
    _run(["dpkg-deb", "-x", str(debs[0]), str(root)], what=f"unpacking {debs[0].name}")
    debs[0].unlink()
    return root


KernelFetcher = Callable[[KernelPackage, Path, Progress], Path]


def _is_static_elf(path: Path) -> bool:
    """True if ``path`` is an ELF64 executable without a PT_INTERP (dynamic loader) header."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return False
        e_phoff, = struct.unpack_from("<Q", head, 0x20)
        e_phentsize, e_phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(e_phoff)
        table = f.read(e_phentsize * e_phnum)
    pt_interp = 3
    return all(struct.unpack_from("<I", table, i * e_phentsize)[0] != pt_interp
               for i in range(e_phnum))


def find_busybox() -> Path:
    """A statically linked busybox (Debian package busybox-static)."""
    candidates = [shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"]
    for c in candidates:
        if c and os.path.isfile(c) and _is_static_elf(Path(c)):
            return Path(c)
    raise ImageBuildError("no statically linked busybox found: install the Debian package "
                          "busybox-static (the guest has no C library for a dynamic one)")


def _resource(name: str) -> bytes:
    return resources.files("pyvhost.lab").joinpath(name).read_bytes()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the build ------------------------------------------------------------------------------

def _kernel_tree(root: Path) -> tuple[Path, str, dict[str, Path]]:
    """vmlinuz, the kernel release, and each module's path by name, in an unpacked package."""
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageBuildError(f"expected one boot/vmlinuz-* in the kernel package, found "
                              f"{[k.name for k in kernels]}")
    release = kernels[0].name.removeprefix("vmlinuz-")
    moddir = root / "lib" / "modules" / release
    index: dict[str, Path] = {}
    for ko in moddir.rglob("*.ko"):
        index.setdefault(ko.name.removesuffix(".ko").replace("-", "_"), ko)
    if not index:
        raise ImageBuildError(f"no uncompressed .ko modules under lib/modules/{release}")
    return kernels[0], release, index


def _modules_in_order(index: dict[str, Path],
                      wanted: Sequence[str]) -> list[tuple[str, bytes]]:
    """The wanted modules and their dependencies, in insmod order, with their bytes."""
    blobs: dict[str, bytes] = {}
    depends: dict[str, tuple[str, ...]] = {}

    def read(name: str) -> tuple[str, ...]:
        blob = index[name].read_bytes()
        try:
            info = parse_modinfo(blob)
        except ModuleError as e:
            raise ModuleError(f"{index[name].name}: {e}") from e
        blobs[name] = blob
        depends[name] = info.depends
        return info.depends

    needed_modules(wanted, index.__contains__, read)
    return [(m, blobs[m]) for m in load_order(depends, wanted)]


def _initramfs(busybox: bytes, init: bytes, tool: bytes,
               modules: Sequence[tuple[str, bytes]]) -> bytes:
    entries = [CpioEntry.directory(d) for d in
               ("bin", "dev", "lib", "lib/modules", "proc", "sys", "tmp", "hog")]
    entries += [
        CpioEntry.char_device("dev/console", 5, 1),
        CpioEntry.file("bin/busybox", busybox, 0o755),
        CpioEntry.symlink("bin/sh", "busybox"),
        CpioEntry.file("bin/pyvhost-guest", tool, 0o755),
        CpioEntry.file("init", init, 0o755),
        CpioEntry.file("lib/modules/order", "".join(f"{m}\n" for m, _ in modules).encode()),
    ]
    entries += [CpioEntry.file(f"lib/modules/{m}.ko", blob) for m, blob in modules]
    return write_newc(entries)


def _load(directory: Path) -> GuestImage:
    manifest = json.loads((directory / "manifest.json").read_text())
    kernel = manifest["inputs"]["kernel"]
    return GuestImage(directory=directory, key=manifest["key"],
                      kernel=directory / "vmlinuz", initrd=directory / "initrd.cpio",
                      kernel_package=KernelPackage(kernel["name"], kernel["version"]),
                      kernel_release=manifest["kernel_release"],
                      modules=tuple(manifest["modules"]))


def build_image(*, kernel: KernelPackage | None = None,
                modules: Sequence[str] = DEFAULT_MODULES,
                cache_dir: Path | None = None,
                busybox: Path | None = None,
                progress: Progress | None = None,
                update_lists: bool = False,
                fetch: KernelFetcher = fetch_kernel) -> GuestImage:
    """The guest image for these inputs: from the cache, or built now (and cached).

    ``kernel`` defaults to what ``linux-image-cloud-amd64`` points to now (asks apt-cache);
    ``cache_dir`` to :func:`cache_root`. ``progress`` gets a line for each slow step (default:
    stderr). With ``update_lists`` (needs root), an apt failure is followed by one
    ``apt-get update`` and a second attempt. Raises :class:`ImageBuildError` saying what to
    install or run when it cannot.
    """
    say = progress if progress is not None else _stderr_progress
    try:
        return _build_image(kernel, modules, cache_dir, busybox, say, fetch)
    except AptError as e:
        if not update_lists:
            raise
        say(f"{e}\nrunning apt-get update, then trying once more")
    _run(["apt-get", "update", "-q"], what="updating the package lists")
    return _build_image(kernel, modules, cache_dir, busybox, say, fetch)


def _build_image(kernel: KernelPackage | None, modules: Sequence[str], cache_dir: Path | None,
                 busybox: Path | None, say: Progress, fetch: KernelFetcher) -> GuestImage:
    kernel = kernel if kernel is not None else resolve_kernel_package()
    busybox_path = busybox if busybox is not None else find_busybox()
    busybox_bytes = busybox_path.read_bytes()
    init, tool = _resource("guest_init.sh"), _resource("guest_tool.sh")
    inputs = ImageInputs(kernel=kernel, busybox_sha256=_sha256(busybox_bytes),
                         init_sha256=_sha256(init), tool_sha256=_sha256(tool),
                         modules=tuple(modules))
    key = inputs.key()
    root = cache_dir if cache_dir is not None else cache_root()
    final = root / key
    if (final / "manifest.json").is_file():
        return _load(final)

    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=root))
    try:
        say(f"building {final} (kernel {kernel.name} {kernel.version})")
        tree = fetch(kernel, staging, say)
        vmlinuz, release, index = _kernel_tree(tree)
        ordered = _modules_in_order(index, modules)
        shutil.copyfile(vmlinuz, staging / "vmlinuz")
        (staging / "initrd.cpio").write_bytes(_initramfs(busybox_bytes, init, tool, ordered))
        shutil.rmtree(tree)
        manifest = {"key": key, "inputs": asdict(inputs), "kernel_release": release,
                    "modules": [m for m, _ in ordered], "busybox": str(busybox_path),
                    "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        staging.chmod(0o755)  # mkdtemp made it 0700
        try:
            staging.rename(final)
        except OSError:
            # Another process finished the same image first: theirs is as good as ours.
            if not (final / "manifest.json").is_file():
                raise
        else:
            say(f"built: insmod order {' '.join(m for m, _ in ordered)}")
    except ModuleError as e:
        raise ImageBuildError(f"kernel {kernel.name} {kernel.version}: {e}") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging)
    return _load(final)


def main() -> None:
    try:
        image = build_image()
    except ImageBuildError as e:
        raise SystemExit(f"pyvhost guest image: {e}") from e
    print(json.dumps({"kernel": str(image.kernel), "initrd": str(image.initrd),
                      "cmdline": image.cmdline(ip="10.99.0.1/24"),
                      "kernel_package": asdict(image.kernel_package),
                      "modules": list(image.modules)}, indent=2))


if __name__ == "__main__":
    main()
