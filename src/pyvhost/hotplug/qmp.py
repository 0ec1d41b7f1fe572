"""The one place ``pyvhost mem`` talks QMP: a thin sync layer over ``qemu.qmp``'s client.

Every exchange is bounded by the connection's timeout, the connect included: the Unix
``connect()``, QEMU's greeting and the capabilities negotiation. (``qemu.qmp``'s own sync
wrapper waits for the greeting without a limit, and a monitor that another client holds
never sends one: QEMU's chardev accepts one client, the next waits in the listen backlog.)
Its errors are translated into what they mean for the user:

- :class:`QmpConnectError` nothing to talk to: no such socket, nothing listening (QEMU is
  not running), not a QMP socket, or QEMU closed the connection;
- :class:`QmpMonitorHeldError` the socket answers but no QMP session starts within the
  timeout: another client holds the monitor (:mod:`.owner` says who, libvirtd included);
- :class:`QmpTimeoutError` a command was not answered in time;
- :class:`QmpCommandError` QEMU answered a command with an error (class and text kept).

It gives HMP text for ``info mtree -f`` and hands out events with a timeout. It must not
decide anything about hot-plug: :mod:`.state` reads, :mod:`.execute` acts. No hand-written
QMP here: the wire protocol is ``qemu.qmp``'s. ``qemu.qmp`` logs its own errors (with
tracebacks); they are not for the user, so its logger gets a NullHandler here and the
commands keep it quiet (``pyvhost.cli.common.configure_logging``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Coroutine, Iterator
from typing import Any, Protocol, TypeVar

from qemu.qmp import ExecuteError, QMPClient, QMPError
from qemu.qmp.protocol import ConnectError

from pyvhost.errors import LocalError, PeerError
from pyvhost.interrupts import loop_interrupts

from .owner import describe_owner

# A library does not print: whoever configures logging decides (Python logging HOWTO,
# "Configuring Logging for a Library").
logging.getLogger("qemu.qmp").addHandler(logging.NullHandler())

T = TypeVar("T")


class QmpConnectError(LocalError):
    """Nothing answers QMP on that socket (wrong path, QEMU gone, not a QMP socket).
    ``command``: the command whose answer was lost, when it was lost during one."""

    command: str | None = None


class QmpMonitorHeldError(QmpConnectError):
    """The socket accepted the connection but no QMP session started: the monitor is
    held by another client (libvirtd, another tool)."""


class QmpTimeoutError(QmpConnectError):
    """QEMU did not answer ``command`` within ``seconds``."""

    def __init__(self, command: str, seconds: float) -> None:
        super().__init__(f"{command}: QEMU did not answer within {seconds:g} s")
        self.command = command
        self.seconds = seconds


class QmpCommandError(PeerError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class Monitor(Protocol):
    """What the state reader and the executor need from a QMP connection."""

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any: ...

    def hmp(self, command_line: str) -> str: ...

    def next_event(self, timeout: float) -> dict[str, Any] | None: ...


def _socket_error(path: str, e: OSError) -> QmpConnectError:
    if isinstance(e, FileNotFoundError):
        return QmpConnectError(f"cannot connect to QMP at {path}: no such socket (is QEMU "
                               f"running, and is this its -qmp unix: path?)")
    if isinstance(e, ConnectionRefusedError):
        return QmpConnectError(f"cannot connect to QMP at {path}: nothing listens there; "
                               f"QEMU is not running (a socket file left behind)")
    if isinstance(e, PermissionError):
        return QmpConnectError(f"cannot connect to QMP at {path}: permission denied "
                               f"(run as the user QEMU runs as, or root)")
    if e.errno in (errno.ENOTSOCK, errno.EPROTOTYPE):
        return QmpConnectError(f"cannot connect to QMP at {path}: not a Unix stream socket")
    return QmpConnectError(f"cannot connect to QMP at {path}: {e.strerror or e}")


def parse_version(version: Any) -> tuple[int, int, int] | None:
    """(major, minor, micro) from QMP's VersionInfo (``query-version``, the greeting);
    None when it is not one (a hostile or broken peer)."""
    try:
        q = version["qemu"]
        return (int(q["major"]), int(q["minor"]), int(q["micro"]))
    except (KeyError, TypeError, ValueError):
        return None


class Qmp:
    """A connected QMP monitor (``with Qmp(path, timeout) as qmp: ...``).

    ``timeout`` bounds every exchange: the connect with its greeting, and each command.
    Runs its own asyncio loop, so it is for synchronous callers only.
    """

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        if timeout <= 0:
            raise ValueError("the QMP timeout must be positive")
        self.path = path
        self.timeout = timeout
        self.greeting_version: tuple[int, int, int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: QMPClient | None = None

    # -- the loop -----------------------------------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` to its end or ``timeout`` (TimeoutError). Whatever interrupts it
        (Ctrl-C included) cancels it first, so no task is left pending in the loop."""
        loop = self._loop
        if loop is None:
            coro.close()
            raise QmpConnectError("QMP is not connected")
        task = loop.create_task(asyncio.wait_for(coro, timeout))
        try:
            with loop_interrupts(loop, task) as came:
                try:
                    result = loop.run_until_complete(task)
                except asyncio.CancelledError:
                    if not came:
                        raise
            if came:
                # The task was cancelled (or had just finished): the interrupt goes on
                # from here, as if it had come between two commands.
                raise KeyboardInterrupt
            return result
        except BaseException:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(task)
            raise

    def connect(self) -> Qmp:
        with contextlib.suppress(OSError):
            if not stat.S_ISSOCK(os.stat(self.path).st_mode):
                raise QmpConnectError(f"cannot connect to QMP at {self.path}: not a socket "
                                      f"(QEMU's -qmp unix:PATH is a Unix socket)")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
            except TimeoutError:
                raise self._held() from None
            except OSError as e:
                raise _socket_error(self.path, e) from e
            sock.setblocking(False)
            self._loop = asyncio.new_event_loop()
            client = QMPClient(f"pyvhost:{self.path}")
            try:
                self._run(client.connect(sock), self.timeout)
            except TimeoutError:
                raise self._held() from None
            except ConnectError as e:
                raise self._session_error(e) from e
            except QMPError as e:
                detail = " ".join(str(e).split())
                raise QmpConnectError(f"{self.path} is not a QMP socket: {detail}") from e
            self._client = client
            greeting = client.greeting
            if greeting is not None:
                self.greeting_version = parse_version(greeting.QMP.version)
        except BaseException:
            sock.close()
            self.close()
            raise
        return self

    def _held(self) -> QmpMonitorHeldError:
        return QmpMonitorHeldError(
            f"QMP at {self.path} accepted the connection but started no session within "
            f"{self.timeout:g} s: another client holds this monitor (QEMU serves one QMP "
            f"client per monitor). {describe_owner(self.path)}")

    def _session_error(self, e: ConnectError) -> QmpConnectError:
        cause = e.exc
        if isinstance(cause, EOFError | ConnectionResetError | BrokenPipeError):
            return QmpConnectError(f"{self.path} closed the connection before a QMP "
                                   f"greeting: not a QMP monitor, or QEMU is quitting")
        if isinstance(cause, QMPError | ValueError | UnicodeDecodeError):
            detail = " ".join(str(cause).split())
            return QmpConnectError(f"{self.path} is not a QMP socket: what it sent is not "
                                   f"a QMP greeting ({detail})")
        if isinstance(cause, OSError):
            return _socket_error(self.path, cause)
        return QmpConnectError(f"{self.path}: no QMP session: {e}")

    def close(self) -> None:
        client, self._client = self._client, None
        loop = self._loop
        if client is not None and loop is not None:
            # QEMU may already be gone: nothing is left to release then.
            with contextlib.suppress(BaseException):
                self._run(client.disconnect(), min(self.timeout, 5.0))
        self._loop = None
        if loop is not None:
            with contextlib.suppress(BaseException):
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in pending:
                    t.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    def reconnect(self, timeout: float) -> None:
        """Drop this connection and open a new one to the same monitor, the connect
        bounded by ``timeout`` (after QEMU closed the old one in the middle of a change:
        what QEMU has must be looked up)."""
        self.close()
        with self.time_limit(timeout):
            self.connect()

    @contextlib.contextmanager
    def time_limit(self, seconds: float) -> Iterator[None]:
        """Bound each exchange of the block by ``seconds`` instead of the timeout (a
        look-up after a command that was not answered in time gets a fresh, short one)."""
        if seconds <= 0:
            raise ValueError("a QMP time limit must be positive")
        old, self.timeout = self.timeout, seconds
        try:
            yield
        finally:
            self.timeout = old

    def __enter__(self) -> Qmp:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands and events --------------------------------------------------------
    @property
    def _qmp(self) -> QMPClient:
        if self._client is None:
            raise QmpConnectError("QMP is not connected")
        return self._client

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        client = self._qmp
        try:
            return self._run(client.execute(command, arguments), self.timeout)
        except ExecuteError as e:
            raise QmpCommandError(command, str(e.error_class), str(e)) from e
        except TimeoutError as e:
            raise QmpTimeoutError(command, self.timeout) from e
        except (QMPError, EOFError, OSError) as e:
            closed = QmpConnectError(f"{command}: QEMU closed the QMP connection "
                                     f"(QEMU quit or crashed?)")
            closed.command = command
            raise closed from e

    def hmp(self, command_line: str) -> str:
        return str(self.execute("human-monitor-command", {"command-line": command_line}))

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        """The next QMP event, or None when none came within ``timeout`` seconds."""
        client = self._qmp
        try:
            event = self._run(client.events.get(), max(timeout, 0.001))
        except TimeoutError:
            return None
        return dict(event)
