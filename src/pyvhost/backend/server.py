"""Serving many vhost-user sockets and their eventfds at once, on one :mod:`.loop`.

Listening sockets accept front-ends; each accepted socket becomes a
:class:`~pyvhost.backend.connection.Connection` with its own device instance. Kick eventfds
are watched by the same selector. Nothing a peer does blocks the loop: sockets are
non-blocking and partial messages wait in the connection's decoder. Connections are
independent: one that fails is closed alone.

The other way round, a :class:`ClientPort` (:meth:`Server.connect`) connects to a socket
the front-end listens on (QEMU ``-chardev socket,server=on``, DPDK virtio_user
``server=1``) and keeps doing so: when the socket is missing or refuses, and when a
connection hangs up, it retries on the loop's timers with a bounded backoff. Every
connection starts from nothing (a fresh device, no memory, no vrings); the old one was
closed, which unmapped its memory and closed its fds, before the retry is armed.

A socket file already at a listening path is replaced only when nothing listens on it,
which is read from /proc/net/unix, never found out by connecting: a probing connect looks
like a front-end to the back-end that serves it (DPDK logs a new connection and sets up a
device for it).

Every connection is logged when it starts (the front-end's pid) and when it ends (why);
:attr:`Server.on_connect` and :attr:`Server.on_disconnect` let the program that runs the
server follow them (fold a closed connection's counters into totals, tell the service
manager), and :attr:`Server.on_memory_update` sees every memory table change (metrics).
A closed connection is forgotten: nothing of it stays in the server.

This module owns the listening and the client sockets (the selector and the timers are
:mod:`.loop`'s); it never reads a vhost-user message (the connection does).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from enum import Enum

from pyvhost.errors import LocalError
from pyvhost.tools.procfs import unix_listening

from .connection import Connection
from .device import VirtioDevice
from .loop import SelectorLoop, Timer
from .workers import WorkerPool

log = logging.getLogger(__name__)

DeviceFactory = Callable[[], VirtioDevice]
ConnectionHook = Callable[[Connection], None]
MemoryUpdateHook = Callable[[Connection, dict[str, object]], None]

#: sun_path is 108 bytes, with the terminating NUL.
_SUN_PATH_MAX = 107
#: First retry of a client port after a failed connect or a hang-up, in seconds; each
#: further failure doubles it, up to the port's ``max_interval``.
RECONNECT_FIRST = 0.1
#: Default upper bound of the retry interval, in seconds.
RECONNECT_MAX = 1.0


class ClientState(Enum):
    """Where a :class:`ClientPort` stands (``state`` in ``pyvhost status``)."""

    WAITING = "waiting"  # no connection; a retry timer is armed
    CONNECTED = "connected"
    STOPPED = "stopped"  # the server closed


class ClientPort:
    """One socket the back-end connects to (client mode), and its retry state.

    Every state change is logged once; the retries in between are not (they are counted
    in :meth:`describe`). A failure reason that changes while waiting (socket missing,
    then present but refusing) is a state change.
    """

    def __init__(self, server: Server, path: str, factory: DeviceFactory,
                 first: float, max_interval: float) -> None:
        self.server = server
        self.path = path
        self.factory = factory
        self.first = first
        self.max_interval = max_interval
        self.state = ClientState.WAITING
        self.connection: Connection | None = None
        #: Successful connects so far, and failed attempts since the last change of state.
        self.connects = 0
        self.failures = 0
        self.reason: str | None = "not tried yet"
        self.delay = first
        self.timer: Timer | None = None
        self._connected_at = 0.0

    @property
    def name(self) -> str:
        return os.path.basename(self.path) or self.path

    def describe(self) -> dict[str, object]:
        retry_in = None
        if self.timer is not None and not self.timer.cancelled:
            retry_in = round(max(0.0, self.timer.when - time.monotonic()), 3)
        return {"path": self.path, "state": self.state.value,
                "connection": self.connection.name if self.connection else None,
                "connects": self.connects, "failed_attempts": self.failures,
                "reason": self.reason, "retry_in": retry_in}

    # -- transitions (called by the server) ----------------------------------------------
    def _wait(self, reason: str, delay: float, *, hung_up: bool = False) -> None:
        """No connection now: retry in ``delay`` s (then back off). ``hung_up``: a
        connection ended (already logged), no attempt failed."""
        if self.state is ClientState.STOPPED:
            return
        changed = self.state is not ClientState.WAITING or reason != self.reason
        self.state = ClientState.WAITING
        self.connection = None
        if changed:
            self.failures = 0
            if not hung_up:
                log.info("%s: waiting for the front-end (%s); retrying with backoff up "
                         "to every %g s", self.path, reason, self.max_interval)
        else:
            log.debug("%s: still waiting (%s)", self.path, reason)
        self.reason = reason
        if not hung_up:
            self.failures += 1
        self.timer = self.server.call_later(delay, lambda: self.server._dial(self))
        self.delay = min(max(delay, self.first) * 2, self.max_interval)

    def _connected(self, conn: Connection) -> None:
        self.state = ClientState.CONNECTED
        self.connection = conn
        self.connects += 1
        self.failures = 0
        self.reason = None
        self.timer = None
        self._connected_at = time.monotonic()
        log.info("%s: connected as %s (front-end pid %s)", self.path, conn.name,
                 conn.peer_pid)

    def _hung_up(self, conn: Connection) -> None:
        reason = conn.close_reason or "connection closed"
        log.warning("%s: %s lost: %s; reconnecting", self.path, conn.name, reason)
        # A connection that lived longer than the longest interval starts the backoff
        # afresh; one closed right after it was made (a front-end that accepts and hangs
        # up, or that we refused) keeps backing off, so it is not hammered.
        if time.monotonic() - self._connected_at >= self.max_interval:
            self.delay = self.first
        self._wait(f"hung up: {reason}", self.delay, hung_up=True)

    def _stop(self) -> None:
        self.state = ClientState.STOPPED
        self.connection = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Server(SelectorLoop):
    """Serves vhost-user sockets (server mode: we listen, the front-end connects)."""

    def __init__(self, factory: DeviceFactory) -> None:
        super().__init__()
        self.factory = factory
        self.listeners: dict[str, socket.socket] = {}
        self.connections: list[Connection] = []
        self._closed = False
        self._count = 0
        #: Busy-poll queues this many microseconds after work (Connection.poll_s).
        self.poll_us = 0
        #: Worker threads that serve the queues' kicks (:meth:`use_workers`); None: the
        #: kicks are served on this loop, as everything else.
        self.workers: WorkerPool | None = None
        #: Connections that ended (the others are in :attr:`connections`).
        self.closed_count = 0
        self._control: set[str] = set()
        #: Client-mode ports by path (:meth:`connect`).
        self.clients: dict[str, ClientPort] = {}
        #: Extra top-level keys of describe(): name -> function returning the value.
        self.describers: dict[str, Callable[[], object]] = {}
        #: Called on the loop's thread with each new connection (its device attached),
        #: and with each connection that ended (closed: memory unmapped, fds closed),
        #: also those :meth:`close` ends.
        self.on_connect: list[ConnectionHook] = []
        self.on_disconnect: list[ConnectionHook] = []
        #: Called with the connection and its ``last_memory_update`` record after every
        #: memory table change.
        self.on_memory_update: list[MemoryUpdateHook] = []

    def use_workers(self, count: int) -> None:
        """Serve the kicks of every connection made from now on on ``count`` worker
        threads (started here); 1: on this loop (no thread, no lock)."""
        if self.workers is not None:
            raise LocalError("the server already has workers")
        if count > 1:
            self.workers = WorkerPool(count)
            self.workers.start()
            log.info("serving queues on %d worker threads", count)

    @property
    def opened_count(self) -> int:
        """Front-end connections served since start (accepted and client-mode)."""
        return self._count

    # -- sockets -------------------------------------------------------------------------
    def listen(self, path: str, *, control: bool = False) -> None:
        """Listen on a Unix socket path. A stale socket file (nothing listens on it) is
        replaced; a socket another process listens on, and any other file at that path,
        are errors (we never delete what is not a socket, nor take a live one)."""
        if path in self.clients:
            raise LocalError(f"{path} is already a client port (--client); can not also "
                             "listen on it")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise LocalError(f"can not listen on {path}: {e.strerror or e}") from e
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise LocalError(f"{path} exists and is not a socket; refusing to replace it")
            try:
                in_use = unix_listening(path)
            except OSError as e:
                raise LocalError(f"{path} exists and whether a process listens on it can "
                                 f"not be told (/proc/net/unix: {e.strerror}); remove it "
                                 "if it is stale") from e
            if in_use:
                raise LocalError(f"{path} is in use: another process listens on it")
            try:
                os.unlink(path)
            except OSError as e:
                raise LocalError(f"can not replace the stale socket {path}: "
                                 f"{e.strerror}") from e
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            sock.listen(16)
        except OSError as e:
            sock.close()
            raise LocalError(f"can not listen on {path}: {e.strerror or e}") from e
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

    def adopt(self, sock: socket.socket, name: str, factory: DeviceFactory | None = None,
              *, owner_implied: bool = False) -> Connection:
        """Serve an already-connected socket (accepted, connected, or a socketpair in
        tests), with a device from ``factory`` (the server's by default). See
        :class:`Connection` for ``owner_implied``."""
        conn = Connection(sock, (factory or self.factory)(), self, name,
                          owner_implied=owner_implied, workers=self.workers)
        conn.poll_s = self.poll_us / 1e6
        conn.memory_observer = self._memory_updated
        fileno = sock.fileno()
        conn.close_observer = lambda closed: self._connection_closed(closed, fileno)
        self.connections.append(conn)
        self.watch(fileno, conn.on_readable)
        log.info("%s: front-end connected (pid %s)", name, conn.peer_pid)
        for hook in self.on_connect:
            hook(conn)
        return conn

    def _memory_updated(self, conn: Connection, record: dict[str, object]) -> None:
        for hook in self.on_memory_update:
            hook(conn, record)

    def _connection_closed(self, conn: Connection, fileno: int) -> None:
        """A connection closed, on whatever path; it leaves the server at once. Its
        socket's fd number is free again and the next accept may get it (in this very
        turn of the loop), so it must not stay watched: selectors key by fd number, and
        a close from a kick (a guest-memory fault) comes with no event on the socket."""
        if conn not in self.connections:
            return
        self._forget(conn, fileno)
        if self._closed:
            return
        # A client port dials again only after a delay (a timer, run after this turn's
        # callbacks): by then the old connection's memory is unmapped and its fds closed,
        # also when it closed under a memory hold.
        for client in self.clients.values():
            if client.connection is conn:
                client._hung_up(conn)

    def _forget(self, conn: Connection, fileno: int) -> None:
        """A closed connection leaves the server: logged, told to the hooks, dropped."""
        self.unwatch(fileno)
        self.connections.remove(conn)
        self.closed_count += 1
        log.info("%s: front-end disconnected (pid %s): %s", conn.name, conn.peer_pid,
                 conn.close_reason)
        for hook in self.on_disconnect:
            hook(conn)

    # -- client mode ---------------------------------------------------------------------
    def connect(self, path: str, *, factory: DeviceFactory | None = None,
                first: float = RECONNECT_FIRST,
                max_interval: float = RECONNECT_MAX) -> ClientPort:
        """Connect to a front-end listening on ``path`` (client mode), now and after every
        hang-up, until :meth:`close`. While the socket is missing or refuses, retry after
        ``first`` seconds, doubling up to ``max_interval``. The first attempt runs on the
        loop's next turn; a failure never raises, it is a state (see :meth:`describe`)."""
        if not 0 < first <= max_interval:
            raise LocalError(f"reconnect intervals must satisfy 0 < first ({first}) <= "
                             f"max ({max_interval})")
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            raise LocalError(f"{path} is longer than a Unix socket path may be "
                             f"({_SUN_PATH_MAX} bytes)")
        if path in self.clients or path in self.listeners:
            raise LocalError(f"{path} is given twice")
        client = ClientPort(self, path, factory or self.factory, first, max_interval)
        self.clients[path] = client
        client.timer = self.call_later(0, lambda: self._dial(client))
        return client

    def _dial(self, client: ClientPort) -> None:
        """One connect attempt. Unix stream sockets connect at once or fail at once (a
        full backlog is EAGAIN, not EINPROGRESS), so the loop is never blocked."""
        if client.state is ClientState.STOPPED or self._stopping:
            return
        sock = socket.socket(socket.AF_UNIX,
                             socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sock.connect(client.path)
        except OSError as e:
            sock.close()
            client._wait(_connect_failure(e), client.delay)
            return
        self._count += 1
        try:
            # The front-end may be resuming its session without a new SET_OWNER.
            conn = self.adopt(sock, f"{client.name}#{self._count}", client.factory,
                              owner_implied=True)
        except Exception as e:  # a device factory bug: keep the process, retry later
            log.exception("%s: can not serve the new connection", client.path)
            sock.close()
            client._wait(f"internal error: {e!r}", client.max_interval)
            return
        client._connected(conn)

    def close(self) -> None:
        """Close every connection and listener, unlink our socket files (never a client
        port's: the front-end owns that one). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.workers is not None:
            # No burst runs after this: the connections close with no worker in them.
            self.workers.stop()
        for client in self.clients.values():
            client._stop()
        self._timers.clear()
        for conn in list(self.connections):
            conn.close("back-end shutting down")  # forgotten by _connection_closed
        for path, sock in self.listeners.items():
            self.unwatch(sock.fileno())
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.listeners.clear()
        self.close_loop()
        if self.workers is not None:
            self.workers.close()

    def describe(self) -> dict[str, object]:
        state: dict[str, object] = {
            "pid": os.getpid(),
            "listening": sorted(p for p in self.listeners if p not in self._control),
            "clients": [c.describe() for c in self.clients.values()],
            "connections": [c.describe() for c in self.connections],
            "connections_opened": self._count, "connections_closed": self.closed_count,
            "workers": self.workers.describe() if self.workers is not None else []}
        for key, describe in self.describers.items():
            state[key] = describe()
        return state


def _connect_failure(e: OSError) -> str:
    """Why a connect to a front-end's socket failed, in words for the log and status."""
    if e.errno == errno.ENOENT:
        return "socket does not exist yet"
    if e.errno == errno.ECONNREFUSED:
        return "nothing listens on the socket"
    if e.errno == errno.EAGAIN:
        return "the front-end's listen backlog is full"
    return f"connect failed: {e.strerror or e}"

