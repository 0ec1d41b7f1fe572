"""A single-threaded loop that serves many vhost-user sockets and their eventfds at once.

Listening sockets accept front-ends; each accepted socket becomes a
:class:`~pyvhost.backend.connection.Connection` with its own device instance. Kick eventfds
are watched by the same selector. Nothing a peer does blocks the loop: sockets are
non-blocking and partial messages wait in the connection's decoder. Connections are
independent: one that fails is closed alone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import selectors
import socket
import stat
from collections.abc import Callable

from pyvhost.errors import LocalError

from .connection import Connection, Loop, Phase
from .device import VirtioDevice

log = logging.getLogger(__name__)

DeviceFactory = Callable[[], VirtioDevice]


class Server(Loop):
    """Serves vhost-user sockets (server mode: we listen, the front-end connects)."""

    def __init__(self, factory: DeviceFactory) -> None:
        self.factory = factory
        self.sel = selectors.DefaultSelector()
        self.listeners: dict[str, socket.socket] = {}
        self.connections: list[Connection] = []
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._stopping = False
        self._count = 0
        self._control: set[str] = set()
        self._soon: list[Callable[[], None]] = []
        #: Extra top-level keys of describe(): name -> function returning the value.
        self.describers: dict[str, Callable[[], object]] = {}
        # A self-pipe so that stop() from a signal handler or another thread wakes select.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.watch(self._wake_r, self._drain_wake)

    # -- Loop ----------------------------------------------------------------------------
    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        self._callbacks[fd] = callback
        self.sel.register(fd, selectors.EVENT_READ, fd)

    def unwatch(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(fd)

    def call_soon(self, callback: Callable[[], None]) -> None:
        self._soon.append(callback)

    # -- sockets -------------------------------------------------------------------------
    def listen(self, path: str, *, control: bool = False) -> None:
        """Listen on a Unix socket path. A stale socket file is replaced; any other file
        at that path is an error (we never delete what is not a socket)."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise LocalError(f"{path} exists and is not a socket; refusing to replace it")
            if _socket_in_use(path):
                raise LocalError(f"{path} is in use by another listening process")
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            sock.listen(16)
        except OSError as e:
            sock.close()
            raise LocalError(f"can not listen on {path}: {e.strerror}") from e
        sock.setblocking(False)
        self.listeners[path] = sock
        if control:
            self._control.add(path)
            self.watch(sock.fileno(), lambda: self._answer_control(path))
        else:
            self.watch(sock.fileno(), lambda: self._accept(path))
        log.info("listening on %s%s", path, " (control)" if control else "")

    def listen_control(self, path: str) -> None:
        """A Unix socket that answers every connection with the server's state as one line
        of JSON (listeners, connections, their memory tables and counters), then closes.
        Try it from a shell: ``socat - UNIX-CONNECT:PATH`` or ``pyvhost status PATH``."""
        self.listen(path, control=True)

    def _accept_one(self, path: str) -> socket.socket | None:
        """Accept one pending connection on a listener; None if there was none."""
        try:
            conn, _ = self.listeners[path].accept()
        except BlockingIOError:
            return None
        except OSError as e:
            log.warning("accept on %s failed: %s", path, e)
            return None
        return conn

    def _answer_control(self, path: str) -> None:
        conn = self._accept_one(path)
        if conn is None:
            return
        with conn:
            conn.settimeout(2)
            try:
                conn.sendall(json.dumps(self.describe()).encode() + b"\n")
            except OSError as e:
                log.info("control client on %s went away: %s", path, e)

    def _accept(self, path: str) -> None:
        conn_sock = self._accept_one(path)
        if conn_sock is None:
            return
        self._count += 1
        self.adopt(conn_sock, f"{os.path.basename(path)}#{self._count}")

    def adopt(self, sock: socket.socket, name: str) -> Connection:
        """Serve an already-connected socket (accepted, or a socketpair in tests)."""
        conn = Connection(sock, self.factory(), self, name)
        self.connections.append(conn)
        self.watch(sock.fileno(), lambda: self._readable(conn))
        log.info("%s: front-end connected (pid %s)", name, conn.peer_pid)
        return conn

    def _readable(self, conn: Connection) -> None:
        fileno = conn.sock.fileno()
        conn.on_readable()
        if conn.phase is Phase.CLOSED:
            self.unwatch(fileno)
            self.connections.remove(conn)
            log.info("%s: gone: %s", conn.name, conn.close_reason)

    # -- running -------------------------------------------------------------------------
    def run_once(self, timeout: float | None = None) -> None:
        for key, _ in self.sel.select(0 if self._soon else timeout):
            callback = self._callbacks.get(key.data)
            if callback is not None:
                callback()
        if self._soon:
            soon, self._soon = self._soon, []
            for callback in soon:
                callback()

    def run(self, until: Callable[[], bool] | None = None, tick: float = 0.5) -> None:
        """Serve until stop() (or ``until()`` is true)."""
        while not self._stopping and not (until and until()):
            self.run_once(tick)

    def stop(self) -> None:
        """Ask run() to return. Safe from a signal handler."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            os.read(self._wake_r, 64)

    def close(self) -> None:
        """Close every connection and listener, unlink our socket files."""
        for conn in list(self.connections):
            fileno = conn.sock.fileno()
            conn.close("back-end shutting down")
            self.unwatch(fileno)
        self.connections.clear()
        for path, sock in self.listeners.items():
            self.unwatch(sock.fileno())
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.listeners.clear()
        self.unwatch(self._wake_r)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.sel.close()

    def describe(self) -> dict[str, object]:
        state: dict[str, object] = {
            "pid": os.getpid(),
            "listening": sorted(p for p in self.listeners if p not in self._control),
            "connections": [c.describe() for c in self.connections]}
        for key, describe in self.describers.items():
            state[key] = describe()
        return state


def _socket_in_use(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except OSError as e:
        return e.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    else:
        return True
    finally:
        probe.close()
