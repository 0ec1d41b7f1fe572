"""Helper processes the lab, the demo, the benchmarks and the tests start: ending them by
pid, and telling when one listens on a Unix socket.

Only processes this program started are ever signalled, and only by pid (never by name).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

#: /proc/net/unix "Flags" bit of a listening socket (__SO_ACCEPTCON).
_SO_ACCEPTCON = 0x10000


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


def unix_listening(path: Path | str) -> bool:
    """Whether a Unix socket listens at ``path``, read from /proc/net/unix: a probing
    connect would look like a front-end to a vhost-user back-end such as DPDK's."""
    with open("/proc/net/unix", encoding="utf-8") as f:
        for line in f.read().splitlines()[1:]:
            fields = line.split()
            if (len(fields) >= 8 and fields[7] == str(path)
                    and int(fields[3], 16) & _SO_ACCEPTCON):
                return True
    return False
