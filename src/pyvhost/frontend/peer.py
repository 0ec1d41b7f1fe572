"""Which process is the back-end: the one that holds the other end of our connection.

The kernel's SO_PEERCRED names the process that created the peer socket (or called
``listen()`` on it), not the one that serves it: virtiofsd in its default sandbox forks
after accepting a connection, and the CHILD maps guest memory while SO_PEERCRED still
names the parent, which maps nothing. A leak probe that measures that parent passes a
process it never saw. So the measured process is found the way ``ss -xp`` finds it:

1. the inode of the peer socket, from the kernel's sock_diag netlink interface
   (``UNIX_DIAG_PEER`` of our own socket's inode, :func:`peer_inode`);
2. every process with an fd on that inode (:func:`pyvhost.tools.procfs.socket_holders`);
3. of those (then of the SO_PEERCRED process and its descendants, in case sock_diag is
   not available), the one that maps the boot region once the back-end acknowledged the
   memory table (:func:`choose`). If none does, the probe cannot measure: it says so
   (:class:`CannotMeasureError`) and never reports "no leak".

Read-only: it never signals or changes a process.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass

from pyvhost.errors import LocalError
from pyvhost.protocol.transport import peer_pid
from pyvhost.tools import procfs

# linux/netlink.h, linux/sock_diag.h, linux/unix_diag.h
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x1
_NLMSG_ERROR = 0x2
_UDIAG_SHOW_PEER = 0x4
_UNIX_DIAG_PEER = 2
#: INET_DIAG_NOCOOKIE: an exact lookup by inode that does not check the socket cookie.
_NO_COOKIE = 0xFFFFFFFF
_NLMSGHDR = struct.Struct("=IHHII")
_UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")
_UNIX_DIAG_MSG = struct.Struct("=BBBBIII")
_RTATTR = struct.Struct("=HH")


class CannotMeasureError(LocalError):
    """No process that can be measured maps the back-end's copy of guest memory."""


def socket_inode(sock: socket.socket) -> int:
    """The inode of one of our sockets (what ``/proc/PID/fd`` links call it)."""
    return os.fstat(sock.fileno()).st_ino


def peer_inode(sock: socket.socket) -> int | None:
    """The inode of the socket at the other end of ``sock`` (a connected Unix stream
    socket), from sock_diag; None if the kernel does not tell (no unix_diag)."""
    ino = socket_inode(sock)
    try:
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                           _NETLINK_SOCK_DIAG)
    except OSError:
        return None
    with nl:
        nl.settimeout(2.0)
        req = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, ino, _UDIAG_SHOW_PEER,
                                  _NO_COOKIE, _NO_COOKIE)
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(req), _SOCK_DIAG_BY_FAMILY,
                                _NLM_F_REQUEST, 1, 0)
        try:
            nl.send(header + req)
            data = nl.recv(65536)
        except OSError:
            return None
    return _parse_peer(data, ino)


def _parse_peer(data: bytes, ino: int) -> int | None:
    """UNIX_DIAG_PEER from one sock_diag answer about socket ``ino``."""
    if len(data) < _NLMSGHDR.size:
        return None
    length, kind, _, _, _ = _NLMSGHDR.unpack_from(data)
    if kind == _NLMSG_ERROR or kind != _SOCK_DIAG_BY_FAMILY:
        return None
    end = min(length, len(data))
    at = _NLMSGHDR.size
    if at + _UNIX_DIAG_MSG.size > end:
        return None
    _family, _type, _state, _pad, got, _c0, _c1 = _UNIX_DIAG_MSG.unpack_from(data, at)
    if got != ino:
        return None
    at += _UNIX_DIAG_MSG.size
    while at + _RTATTR.size <= end:
        alen, atype = _RTATTR.unpack_from(data, at)
        if alen < _RTATTR.size:
            return None
        if atype == _UNIX_DIAG_PEER and alen >= _RTATTR.size + 4:
            peer = int(struct.unpack_from("=I", data, at + _RTATTR.size)[0])
            return peer or None
        at += (alen + 3) & ~3
    return None


def _children() -> dict[int, list[int]]:
    """parent pid -> child pids, from /proc/PID/stat."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) >= 2 and fields[1].isdigit():
            out.setdefault(int(fields[1]), []).append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` in the process tree, breadth first."""
    tree = _children()
    out: list[int] = []
    queue = list(tree.get(pid, []))
    while queue:
        child = queue.pop(0)
        out.append(child)
        queue.extend(tree.get(child, []))
    return out


@dataclass(frozen=True, slots=True)
class PeerProcess:
    """The process the probe measures, and how it was found.

    ``how``: ``"peer socket"`` (it holds the other end of our connection and maps the boot
    region), ``"--pid"`` (the caller named it), ``"SO_PEERCRED"`` (the kernel's peer
    credentials; only when the peer socket's holders could not be told), ``"descendant"``
    (a child of the SO_PEERCRED process; only when sock_diag is missing).
    """

    pid: int
    how: str
    peercred_pid: int | None
    peer_inode: int | None
    holders: tuple[int, ...]

    def as_dict(self) -> dict[str, object]:
        return {"pid": self.pid, "how": self.how, "peercred_pid": self.peercred_pid,
                "peer_socket_inode": self.peer_inode, "socket_holders": list(self.holders)}


@dataclass(frozen=True, slots=True)
class Candidates:
    """Who might be the back-end, known right after connecting."""

    peercred_pid: int | None
    peer_inode: int | None
    holders: tuple[int, ...]

    @classmethod
    def of(cls, sock: socket.socket) -> Candidates:
        inode = peer_inode(sock)
        holders = tuple(procfs.socket_holders(inode)) if inode is not None else ()
        return cls(peer_pid(sock), inode, holders)

    def ordered(self) -> list[tuple[int, str]]:
        """Candidates to try, best first, each with how it was found."""
        out: list[tuple[int, str]] = [(pid, "peer socket") for pid in self.holders]
        if not self.holders and self.peercred_pid is not None:
            out.append((self.peercred_pid, "SO_PEERCRED"))
            out.extend((pid, "descendant") for pid in descendants(self.peercred_pid))
        return out


def _maps_file(pid: int, needle: str, name: str) -> bool:
    try:
        return procfs.measure(pid, needle).holds(name)
    except procfs.ProcfsError as e:
        if isinstance(e, procfs.ProcfsPermissionError):
            raise CannotMeasureError(str(e)) from e
        return False


def choose(candidates: Candidates, needle: str, boot_name: str,
           override: int | None = None) -> PeerProcess:
    """The process to measure: the one that holds ``boot_name`` (the boot region's file,
    acknowledged by the back-end a moment ago). ``override`` (``--pid``) is checked the
    same way. Raises :class:`CannotMeasureError` when nobody holds it."""
    c = candidates
    if override is not None:
        if _maps_file(override, needle, boot_name):
            return PeerProcess(override, "--pid", c.peercred_pid, c.peer_inode, c.holders)
        raise CannotMeasureError(
            f"process {override} (--pid) does not map the boot region {boot_name} after "
            "the back-end acknowledged the memory table: it is not the process that "
            "serves this connection (or it maps nothing), so a leak there cannot be seen")
    tried = c.ordered()
    for pid, how in tried:
        if pid == os.getpid() and how != "peer socket":
            continue
        if _maps_file(pid, needle, boot_name):
            return PeerProcess(pid, how, c.peercred_pid, c.peer_inode, c.holders)
    who = ", ".join(f"{pid} ({how})" for pid, how in tried) or "none found"
    raise CannotMeasureError(
        f"no process at the other end of the connection maps the boot region {boot_name} "
        f"after the back-end acknowledged the memory table (looked at: {who}); the "
        "back-end's copy of guest memory cannot be measured. If it runs in another pid "
        "namespace or hands connections to another process, pass --pid")


def gone(pid: int) -> bool:
    """Whether ``pid`` no longer exists (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            stat = f.read()
    except OSError as e:
        return e.errno in (errno.ENOENT, errno.ESRCH)
    return stat[stat.rfind(")") + 2:].startswith("Z")


__all__ = ["Candidates", "CannotMeasureError", "PeerProcess", "choose", "descendants",
           "gone", "peer_inode", "socket_inode"]
