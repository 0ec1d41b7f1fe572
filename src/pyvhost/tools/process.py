"""Helper processes the lab, the demo, the benchmarks and the tests start: their launch
line, and ending them by pid. (Whether one listens on a Unix socket:
:func:`pyvhost.tools.procfs.unix_listening`.)

Only processes this program started are ever signalled, and only by pid (never by name).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys


def pyvhost_argv(*args: str) -> list[str]:
    """The argv that runs ``pyvhost ARGS`` in a child process: this interpreter with ``-m
    pyvhost``, so the child runs the same installation (venv or not, console script on
    PATH or not)."""
    return [sys.executable, "-m", "pyvhost", *args]


def end_process(proc: subprocess.Popen[bytes], sig: int | None = signal.SIGINT,
                timeout: float = 15) -> int:
    """End ``proc``: ``sig`` (None: it was already told to quit, e.g. over QMP or its
    stdin), up to ``timeout`` seconds to exit, then SIGKILL. Returns its exit code."""
    if proc.poll() is None:
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    return proc.returncode


def exit_on_sigterm() -> None:
    """Make SIGTERM end this program the way Ctrl-C does, through its ``finally`` blocks
    and context managers, so the helpers it started are ended and its temporary files
    removed. (Python's default for SIGTERM is to die at once and leave them behind: a
    benchmark killed by ``kill`` or a CI timeout left a ``pyvhost net`` running.)"""
    def raise_exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, raise_exit)
