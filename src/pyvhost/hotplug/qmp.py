"""The one place ``pyvhost mem`` talks QMP: a thin layer over ``qemu.qmp``'s sync client.

It turns QMP error responses into :class:`QmpCommandError` (with QEMU's error class and
description kept), gives HMP text for ``info mtree -f``, and hands out events with a
timeout. It must not decide anything about hot-plug: :mod:`.state` reads, :mod:`.execute`
acts. No hand-written QMP here: the wire protocol is ``qemu.qmp``'s.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

from qemu.qmp.legacy import QEMUMonitorProtocol

from pyvhost.errors import LocalError, PeerError


class QmpConnectError(LocalError):
    """Nothing answers QMP on that socket (wrong path, QEMU gone, another client holds it)."""


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


class Qmp:
    """A connected QMP monitor (``with Qmp(path) as qmp: ...``)."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self._qmp: QEMUMonitorProtocol | None = None

    def connect(self) -> Qmp:
        qmp = QEMUMonitorProtocol(self.path)
        try:
            # qemu.qmp's connect has no timeout of its own; QEMU answers the greeting
            # at once unless another client holds the monitor.
            qmp.connect()
        except Exception as e:  # qemu.qmp.ConnectError (wraps OSError)
            raise QmpConnectError(f"cannot connect to QMP at {self.path}: {e}") from e
        qmp.settimeout(self.timeout)
        self._qmp = qmp
        return self

    def close(self) -> None:
        qmp, self._qmp = self._qmp, None
        if qmp is not None:
            # QEMU may already be gone: nothing is left to release then.
            with contextlib.suppress(Exception):
                qmp.close()

    def __enter__(self) -> Qmp:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _client(self) -> QEMUMonitorProtocol:
        if self._qmp is None:
            raise QmpConnectError("QMP is not connected")
        return self._qmp

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        try:
            response = self._client.cmd_raw(command, arguments)
        except TimeoutError as e:
            raise QmpConnectError(f"{command}: QEMU did not answer within "
                                  f"{self.timeout} s") from e
        except EOFError as e:
            raise QmpConnectError(f"{command}: QEMU closed the QMP connection") from e
        if "error" in response:
            err = response["error"]
            raise QmpCommandError(command, str(err.get("class", "")), str(err.get("desc", "")))
        return response.get("return")

    def hmp(self, command_line: str) -> str:
        return str(self.execute("human-monitor-command", {"command-line": command_line}))

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        """The next QMP event, or None when none came within ``timeout`` seconds."""
        try:
            event = self._client.pull_event(wait=float(timeout))
        except TimeoutError:
            return None
        return dict(event) if event is not None else None
