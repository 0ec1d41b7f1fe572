"""The pure pieces of the guest image: a newc cpio writer, module ``depends=`` parsing, load order.

Owns bytes in, bytes out; it never runs a program, never touches the network and never writes a
file. :mod:`pyvhost.lab.image` does the fetching, the caching and the files.

Why write the newc archive here instead of ``busybox cpio -o -H newc``: the archive must hold
``/dev/console`` (char 5,1, or ``/init`` has no stdout), and creating that node in a staging
directory needs ``mknod``, i.e. root. Writing the 110-byte ASCII headers ourselves needs neither,
and gives a reproducible archive (fixed mtimes, owners and inode numbers), so the same inputs give
the same bytes.
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from pyvhost.errors import LocalError

NEWC_MAGIC = b"070701"
NEWC_HEADER_SIZE = 110
NEWC_TRAILER = "TRAILER!!!"


class ModuleError(LocalError):
    """A kernel module is missing, unreadable, or its dependencies cannot be ordered."""


@dataclass(frozen=True)
class CpioEntry:
    """One file of the archive. ``data`` is the content of a regular file or a symlink's target."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if not self.path or self.path.startswith("/") or self.path == NEWC_TRAILER:
            raise ValueError(f"cpio path {self.path!r} must be relative (like 'bin/sh')")
        kind = stat.S_IFMT(self.mode)
        if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK):
            raise ValueError(f"cpio entry {self.path!r}: unsupported file type {kind:#o}")
        if self.data and kind not in (stat.S_IFREG, stat.S_IFLNK):
            raise ValueError(f"cpio entry {self.path!r}: only files and symlinks carry data")

    @classmethod
    def directory(cls, path: str, perm: int = 0o755) -> CpioEntry:
        return cls(path, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, path: str, data: bytes, perm: int = 0o644) -> CpioEntry:
        return cls(path, stat.S_IFREG | perm, data)

    @classmethod
    def symlink(cls, path: str, target: str) -> CpioEntry:
        return cls(path, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def char_device(cls, path: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
        return cls(path, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _newc_record(ino: int, mode: int, nlink: int, name: str, data: bytes,
                 rdev: tuple[int, int]) -> bytes:
    name_bytes = name.encode() + b"\0"
    # Fields, all 8 hex digits: ino mode uid gid nlink mtime filesize devmajor devminor
    # rdevmajor rdevminor namesize check. uid/gid 0 (root), mtime 0: reproducible.
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_bytes), 0)
    header = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
    assert len(header) == NEWC_HEADER_SIZE
    # "The pathname is followed by NUL bytes so that the total size of the fixed header plus
    # pathname is a multiple of four. Likewise, the file data is padded to a multiple of four
    # bytes." (cpio(5), New ASCII Format)
    return header + name_bytes + _pad4(NEWC_HEADER_SIZE + len(name_bytes)) + data + \
        _pad4(len(data))


def write_newc(entries: Iterable[CpioEntry]) -> bytes:
    """A newc ("070701") cpio archive of ``entries``, in order, ending with the trailer.

    Parents must come before their children: the kernel's initramfs unpacker does not create
    missing directories.
    """
    out = bytearray()
    seen: set[str] = set()
    for ino, e in enumerate(entries, start=1):
        if e.path in seen:
            raise ValueError(f"cpio entry {e.path!r} appears twice")
        parent = e.path.rpartition("/")[0]
        if parent and parent not in seen:
            raise ValueError(f"cpio entry {e.path!r} comes before its directory {parent!r}")
        seen.add(e.path)
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        out += _newc_record(ino, e.mode, nlink, e.path, e.data, e.rdev)
    out += _newc_record(0, 0, 1, NEWC_TRAILER, b"", (0, 0))
    return bytes(out)


# --- kernel modules -------------------------------------------------------------------------

@dataclass(frozen=True)
class ModuleInfo:
    """What a ``.ko`` says about itself in its ``.modinfo`` section."""

    name: str
    depends: tuple[str, ...]


def _elf_section(image: bytes, wanted: str) -> bytes:
    """The contents of the ELF64 little-endian section named ``wanted``."""
    if image[:4] != b"\x7fELF" or image[4] != 2 or image[5] != 1:
        raise ModuleError("not a 64-bit little-endian ELF file")
    e_shoff, = struct.unpack_from("<Q", image, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", image, 0x3A)
    if e_shentsize < 64 or e_shoff + e_shnum * e_shentsize > len(image):
        raise ModuleError("ELF section header table is out of the file")

    def header(i: int) -> tuple[int, int, int]:
        # sh_name, sh_offset, sh_size of section i (Elf64_Shdr).
        base = e_shoff + i * e_shentsize
        sh_name, = struct.unpack_from("<I", image, base)
        sh_offset, sh_size = struct.unpack_from("<QQ", image, base + 0x18)
        if sh_offset + sh_size > len(image):
            raise ModuleError(f"ELF section {i} is out of the file")
        return sh_name, sh_offset, sh_size

    _, str_off, str_size = header(e_shstrndx)
    names = image[str_off:str_off + str_size]
    for i in range(e_shnum):
        sh_name, off, size = header(i)
        end = names.find(b"\0", sh_name)
        if names[sh_name:end].decode(errors="replace") == wanted:
            return image[off:off + size]
    raise ModuleError(f"no {wanted} section")


def parse_modinfo(ko: bytes) -> ModuleInfo:
    """Name and ``depends=`` of a kernel module (what ``modinfo`` prints; it is not installed).

    The Debian kernel package ships no ``modules.dep``: each module's ``.modinfo`` section
    holds NUL-separated ``key=value`` strings, ``depends=virtio_ring,virtio`` among them.
    """
    fields: dict[str, str] = {}
    for raw in _elf_section(ko, ".modinfo").split(b"\0"):
        key, sep, value = raw.decode(errors="replace").partition("=")
        if sep and key not in fields:
            fields[key] = value
    if "name" not in fields:
        raise ModuleError(".modinfo has no name= field")
    depends = tuple(d for d in fields.get("depends", "").split(",") if d)
    return ModuleInfo(fields["name"], depends)


def needed_modules(wanted: Sequence[str], known: Callable[[str], bool],
                   depends_of: Callable[[str], Sequence[str]]) -> list[str]:
    """``wanted`` and every module they depend on, each once; ``known(name)`` says whether
    the kernel package has a module, ``depends_of(name)`` gives its ``depends=`` list
    (called once per module, so it may read the module)."""
    needed: list[str] = []
    stack = list(reversed(wanted))
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        if not known(name):
            raise ModuleError(f"module {name} is not in the kernel package")
        needed.append(name)
        stack.extend(sorted(depends_of(name), reverse=True))
    return needed


def load_order(depends: Mapping[str, Sequence[str]], wanted: Sequence[str]) -> list[str]:
    """The modules to ``insmod``, each after everything it depends on.

    ``depends`` maps a module name to its ``depends=`` list; ``wanted`` are the modules asked
    for. Dependencies not asked for are added. Among modules free to go, the order of
    ``wanted`` is kept (then name order for added dependencies), so the result is stable.
    """
    needed = needed_modules(wanted, depends.__contains__, depends.__getitem__)
    rank = {n: i for i, n in enumerate(wanted)}
    order: list[str] = []
    placed: set[str] = set()
    while len(order) < len(needed):
        ready = [n for n in needed if n not in placed and all(d in placed for d in depends[n])]
        if not ready:
            stuck = sorted(n for n in needed if n not in placed)
            raise ModuleError(f"circular module dependencies among {', '.join(stuck)}")
        first = min(ready, key=lambda n: (rank.get(n, len(rank)), n))
        order.append(first)
        placed.add(first)
    return order
