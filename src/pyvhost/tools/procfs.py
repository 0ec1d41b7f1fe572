"""Read what /proc tells about processes: the fds and mappings of our files a process
holds (by pid), and which Unix sockets listen (/proc/net/unix).

The leak probe runs this on the back-end before and after hot-plug cycles. An fd the
back-end still holds of a region file links to ``/memfd:NAME (deleted)`` (or to the
unlinked file's path, with `` (deleted)``); a mapping of it shows the same path in
``/proc/PID/maps``. So searching both for the prefix every region name starts with
(:func:`pyvhost.frontend.memory.name_prefix`) finds exactly what the back-end kept of ours,
and, because every region has a file of its own, the back-end's holdings are also counted
per region file (:attr:`ProcessUsage.files`): a process that serves many sockets (Open
vSwitch) changes its whole-process totals for reasons of its own, but it has no business
holding a region file the front-end has removed.

It also finds which processes hold a given socket (:func:`socket_holders`, by the inode
that ``/proc/PID/fd`` links show as ``socket:[INODE]``): the leak probe measures the process
at the other end of its connection, which is not always the one SO_PEERCRED names (a
back-end that forks after accept, like virtiofsd in its default sandbox).

:func:`unix_listening` tells whether a socket file is served without connecting to it: a
probing connect looks like a front-end to a vhost-user back-end such as DPDK's (it logs a
new connection and sets up a device for it). The back-end's ``listen`` uses it before it
replaces a socket file.

Read-only: this module never changes the process it looks at. Reading another user's
``/proc/PID/fd`` needs the right to ptrace it (same user and Yama's ptrace_scope allows it,
or root).
"""

from __future__ import annotations

import os
from collections.abc import Mapping as MappingType
from dataclasses import dataclass, field
from pathlib import Path

from pyvhost.errors import LocalError


class ProcfsError(LocalError):
    """/proc of the measured process can not be read."""


class ProcessGoneError(ProcfsError):
    """The process does not exist (any more)."""


class ProcfsPermissionError(ProcfsError):
    """This process may not look at that process's fds or mappings."""


@dataclass(frozen=True, slots=True)
class Mapping:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class FileUsage:
    """What a process held of one file: fds open on it, mappings of it, bytes mapped."""

    fds: int = 0
    mappings: int = 0
    mapped_bytes: int = 0

    @property
    def held(self) -> bool:
        return bool(self.fds or self.mappings)


@dataclass(frozen=True, slots=True)
class ProcessUsage:
    """What a process held at one moment, overall and of files whose name has ``needle``.

    ``files`` breaks the matching fds and mappings down by file name (see
    :func:`file_name`), so that one file's fate can be told apart from another's.
    """

    pid: int
    needle: str
    fds: int
    matching_fds: int
    mappings: int
    mapped_bytes: int
    files: MappingType[str, FileUsage] = field(default_factory=dict)

    def holds(self, name: str) -> bool:
        """Whether the process holds (an fd on, or a mapping of) the file ``name``."""
        usage = self.files.get(name)
        return usage is not None and usage.held

    def held_files(self) -> list[str]:
        """The names of every matching file the process holds, sorted."""
        return sorted(name for name, usage in self.files.items() if usage.held)


def _error(pid: int, what: str, e: OSError) -> ProcfsError:
    if isinstance(e, FileNotFoundError | ProcessLookupError):
        return ProcessGoneError(f"process {pid} is gone (no /proc/{pid}/{what})")
    if isinstance(e, PermissionError):
        return ProcfsPermissionError(
            f"permission denied reading /proc/{pid}/{what}: run as the back-end's user or "
            "as root (reading another process's fds needs ptrace access)")
    return ProcfsError(f"can not read /proc/{pid}/{what}: {e.strerror or e}")


def fd_targets(pid: int) -> dict[int, str]:
    """Every open fd of ``pid`` and what it links to. Fds closed while reading are skipped."""
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError as e:
        raise _error(pid, "fd", e) from e
    targets: dict[int, str] = {}
    for name in names:
        try:
            targets[int(name)] = os.readlink(f"{base}/{name}")
        except FileNotFoundError:
            # The fd was closed between listdir and readlink; or the process exited.
            if not os.path.exists(base):
                raise ProcessGoneError(f"process {pid} exited while being measured") from None
        except OSError as e:
            raise _error(pid, f"fd/{name}", e) from e
    return targets


def count_fds(pid: int) -> int:
    """How many fds ``pid`` has open."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError as e:
        raise _error(pid, "fd", e) from e


def matching_fds(pid: int, needle: str) -> dict[int, str]:
    """The fds of ``pid`` whose link target contains ``needle``."""
    return {fd: target for fd, target in fd_targets(pid).items() if needle in target}


def parse_maps_line(line: str) -> Mapping:
    """One /proc/PID/maps line: ``start-end perms offset dev inode [path]``.

    The path may contain spaces (`` (deleted)``), so only the first five fields split.
    """
    parts = line.rstrip("\n").split(maxsplit=5)
    if len(parts) < 5:
        raise ProcfsError(f"unexpected /proc maps line: {line!r}")
    start, _, end = parts[0].partition("-")
    return Mapping(int(start, 16), int(end, 16), parts[1], int(parts[2], 16), int(parts[4]),
                   parts[5] if len(parts) == 6 else "")


def mappings(pid: int) -> list[Mapping]:
    """Every mapping of ``pid``."""
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.readlines()
    except OSError as e:
        raise _error(pid, "maps", e) from e
    return [parse_maps_line(line) for line in lines if line.strip()]


def matching_mappings(pid: int, needle: str) -> list[Mapping]:
    """The mappings of ``pid`` whose path contains ``needle``."""
    return [mp for mp in mappings(pid) if needle in mp.path]


def file_name(path: str, needle: str) -> str:
    """The name of the file in a link target or maps path, from ``needle`` on: the word
    that starts with it (``/memfd:pyvhost-fe-12-3 (deleted)`` -> ``pyvhost-fe-12-3``).
    A path without ``needle`` gives the path itself."""
    at = path.find(needle)
    if at < 0:
        return path
    return path[at:].split(" ", 1)[0]


def measure(pid: int, needle: str) -> ProcessUsage:
    """Count ``pid``'s fds, its fds on files named with ``needle``, and its mappings of them,
    in total and per file."""
    targets = fd_targets(pid)
    maps = matching_mappings(pid, needle)
    per_file: dict[str, list[int]] = {}
    matching = 0
    for target in targets.values():
        if needle in target:
            matching += 1
            per_file.setdefault(file_name(target, needle), [0, 0, 0])[0] += 1
    for mp in maps:
        counts = per_file.setdefault(file_name(mp.path, needle), [0, 0, 0])
        counts[1] += 1
        counts[2] += mp.size
    return ProcessUsage(
        pid=pid, needle=needle, fds=len(targets), matching_fds=matching,
        mappings=len(maps), mapped_bytes=sum(mp.size for mp in maps),
        files={name: FileUsage(*c) for name, c in sorted(per_file.items())})


# -- who holds a socket ---------------------------------------------------------------------
def socket_holders(inode: int) -> list[int]:
    """Every process with an fd on the socket of ``inode`` (``socket:[INODE]`` in its fd
    links), by ascending pid. Processes that exit while being looked at, or that this
    process may not look at, are left out."""
    wanted = f"socket:[{inode}]"
    holders: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        base = f"/proc/{entry}/fd"
        try:
            names = os.listdir(base)
        except OSError:
            continue  # gone, or not ours to read
        for name in names:
            try:
                if os.readlink(f"{base}/{name}") == wanted:
                    holders.append(int(entry))
                    break
            except OSError:
                continue
    return sorted(holders)


#: /proc/net/unix "Flags" bit of a listening socket (__SO_ACCEPTCON).
_SO_ACCEPTCON = 0x10000
PROC_NET_UNIX = "/proc/net/unix"


def unix_listening(path: Path | str, *, table: str = PROC_NET_UNIX) -> bool:
    """Whether a Unix socket listens at ``path``, read from /proc/net/unix (the sockets of
    this network namespace), without connecting to it.

    The kernel shows the path as the listener gave it to bind(). An absolute one is
    compared with ``path`` made absolute; a relative one (bound from another working
    directory) can not be resolved, so it counts as listening here when ``path`` ends
    with it: a false "in use" is an error message, a false "free" would let the caller
    replace a live socket. Raises OSError when the table can not be read.
    """
    want = os.path.abspath(path)
    with open(table, encoding="utf-8", errors="surrogateescape") as f:
        lines = f.read().splitlines()[1:]
    for line in lines:
        # Num RefCount Protocol Flags Type St Inode Path (the path may hold spaces)
        fields = line.split(None, 7)
        if len(fields) < 8 or not int(fields[3], 16) & _SO_ACCEPTCON:
            continue
        bound = fields[7]
        if bound.startswith("@"):
            continue  # abstract: no file
        if bound.startswith("/"):
            if os.path.normpath(bound) == want:
                return True
        elif want.endswith("/" + os.path.normpath(bound)):
            return True
    return False
