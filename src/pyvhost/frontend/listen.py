"""The front-end as the listening side: a back-end that connects to us.

QEMU's ``-chardev socket,...,server=on`` listens and the back-end connects: Open vSwitch's
``dpdkvhostuserclient`` ports, DPDK's ``client=1``, ``pyvhost net --client``. Such a
back-end reconnects when the connection drops, so a probe can also look at the next
connection (:meth:`Listener.accept` again).

:class:`Listener` owns the listening socket and its path (it removes a stale socket file
before binding, never anything that is not a socket, and unlinks its own at close).
Accepted connections go to the caller (:meth:`~pyvhost.frontend.frontend.Frontend.adopt`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import time

from pyvhost.closing import Closing
from pyvhost.tools.procfs import unix_listening

from .errors import FrontendConnectError


class Listener(Closing):
    """A Unix stream socket at ``path`` that back-ends connect to."""

    def __init__(self, path: str | os.PathLike[str], backlog: int = 4) -> None:
        self.path = os.fspath(path)
        _remove_stale(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)
            sock.listen(backlog)
        except OSError as e:
            sock.close()
            raise FrontendConnectError(f"can not listen on {self.path}: "
                                       f"{e.strerror or e}") from e
        self._sock: socket.socket | None = sock
        #: Seconds each accept waited (the first: the back-end's start; later ones: how
        #: long the back-end took to reconnect).
        self.waits: list[float] = []

    def accept(self, timeout: float) -> socket.socket:
        """The next back-end that connects, within ``timeout`` seconds."""
        if self._sock is None:
            raise FrontendConnectError(f"listener on {self.path} is closed")
        self._sock.settimeout(timeout)
        start = time.monotonic()
        try:
            conn, _ = self._sock.accept()
        except TimeoutError as e:
            raise FrontendConnectError(
                f"no back-end connected to {self.path} within {timeout:g} s (is it "
                "started in client mode with this path?)") from e
        self.waits.append(time.monotonic() - start)
        conn.setblocking(True)
        return conn

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)



def _remove_stale(path: str) -> None:
    """Remove a socket file nobody listens on; refuse anything else at ``path``.

    Whether something listens is read from /proc/net/unix, not tried with a connect: a
    probing connect to a vhost-user back-end's socket is a front-end to it."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FrontendConnectError(f"{path} exists and is not a socket; not removing it")
    try:
        in_use = unix_listening(path)
    except OSError as e:
        raise FrontendConnectError(f"can not tell whether something listens on {path}: "
                                   f"{e.strerror or e}") from e
    if in_use:
        raise FrontendConnectError(f"something already listens on {path}")
    os.unlink(path)


__all__ = ["Listener"]
