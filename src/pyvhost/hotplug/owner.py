"""Who holds a QMP monitor socket: the QEMU process listening on it and, when libvirt
started that QEMU, the libvirt daemon and the domain's name. Read-only, from /proc.

A QMP monitor serves one client; when another one holds it, the useful answer is who,
and what to use instead. Two kinds of evidence, either is enough:

- the path: libvirt's QEMU driver keeps a domain's monitor at
  ``/var/lib/libvirt/qemu/domain-ID-NAME/monitor.sock`` (system) or under
  ``~/.config/libvirt/qemu/lib/`` (session);
- the process: the QEMU process that listens on the socket (``/proc/net/unix`` gives the
  inode, ``/proc/PID/fd`` the owner) was started by ``libvirtd`` or ``virtqemud``, and
  libvirt names the guest with ``-name guest=NAME``.

It must not touch the socket or the processes, only read.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path

LIBVIRT_DAEMONS = ("libvirtd", "virtqemud")
_LIBVIRT_DIR = re.compile(r"/libvirt/qemu/(?:lib/)?domain-(\d+)-([^/]+)/monitor\.sock$")
_GUEST_NAME = re.compile(r"(?:^|,)guest=((?:[^,]|,,)+)")


@dataclass(frozen=True)
class MonitorOwner:
    """What is known about the QEMU behind a monitor socket."""

    pid: int | None  # the process listening on the socket (QEMU, normally)
    comm: str | None  # its name
    parent: str | None  # the parent process's name (comm)
    libvirt: bool
    domain: str | None  # libvirt's name of the guest, when known


def _listener_inodes(path: str, proc: Path) -> set[int]:
    """Inodes of the listening Unix sockets bound to ``path`` (``/proc/net/unix``)."""
    inodes: set[int] = set()
    try:
        lines = (proc / "net/unix").read_text().splitlines()[1:]
    except OSError:
        return inodes
    for line in lines:
        fields = line.split(None, 7)
        # Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 = __SO_ACCEPTCON
        if len(fields) == 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
            inodes.add(int(fields[6]))
    return inodes


def _pid_holding(inodes: set[int], proc: Path) -> int | None:
    wanted = {f"socket:[{i}]" for i in inodes}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in wanted:
                    return int(entry.name)
        except OSError:
            continue
    return None


def _comm(pid: int, proc: Path) -> str | None:
    try:
        return (proc / str(pid) / "comm").read_text().strip()
    except OSError:
        return None


def _ppid(pid: int, proc: Path) -> int | None:
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _guest_name(pid: int, proc: Path) -> str | None:
    try:
        argv = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    for flag, value in itertools.pairwise(argv):
        if flag == b"-name":
            m = _GUEST_NAME.search(value.decode(errors="replace"))
            if m is not None:
                return m.group(1).replace(",,", ",")
    return None


def monitor_owner(path: str, proc: Path = Path("/proc")) -> MonitorOwner:
    """What /proc and the path say about the QEMU listening on ``path``."""
    real = os.path.realpath(path)
    by_path = _LIBVIRT_DIR.search(real) or _LIBVIRT_DIR.search(path)
    pid = _pid_holding(_listener_inodes(real, proc) | _listener_inodes(path, proc), proc)
    parent = comm = name = None
    if pid is not None:
        comm = _comm(pid, proc)
        ppid = _ppid(pid, proc)
        parent = _comm(ppid, proc) if ppid else None
        name = _guest_name(pid, proc)
    libvirt = bool(by_path) or parent in LIBVIRT_DAEMONS
    if name is None and by_path is not None:
        name = by_path.group(2)  # libvirt may shorten it in the directory name
    return MonitorOwner(pid, comm, parent, libvirt, name if libvirt else None)


def describe_owner(path: str, proc: Path = Path("/proc")) -> str:
    """One or two sentences for an error message: who holds ``path``, what to do."""
    owner = monitor_owner(path, proc)
    if owner.libvirt:
        daemon = owner.parent if owner.parent in LIBVIRT_DAEMONS else "libvirtd"
        domain = owner.domain or "DOMAIN"
        return (f"It is the monitor of libvirt domain {domain!r}, held by {daemon}: "
                f"use pyvhost mem ... --libvirt {domain} (add --connect URI for another "
                f"libvirt) instead of --qmp.")
    who = (f"{owner.comm or 'process'} (pid {owner.pid}"
           + (f", started by {owner.parent})" if owner.parent else ")")
           if owner.pid else "an unknown process")
    return (f"It is served by {who}: close the other client, or give QEMU a second "
            f"monitor for pyvhost (-qmp unix:PATH,server=on,wait=off).")
