"""Run ``pyvhost`` commands as a user does: a child process (``pyvhost_argv``), stdout and
stderr kept apart, and Ctrl-C delivered as SIGINT.

The children start with SIGINT at its default, as they would from a terminal, even in a
test run started in the background by a non-interactive shell: tests/conftest.py gives
the test process Python's own handler in that case.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pyvhost.tools.process import pyvhost_argv

TIMEOUT = 120.0


def _env(extra: Mapping[str, str] | None) -> dict[str, str] | None:
    return None if extra is None else {**os.environ, **extra}


@dataclass
class Done:
    """A finished ``pyvhost`` run."""

    argv: list[str]
    code: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        """stdout as the one JSON object it must be."""
        lines = self.stdout.strip().splitlines()
        assert len(lines) == 1, f"not one JSON line on stdout:\n{self}"
        doc = json.loads(lines[0])
        assert isinstance(doc, dict), self
        return doc

    def __str__(self) -> str:
        return (f"{' '.join(self.argv[2:])}: exit {self.code}\n--- stdout ---\n"
                f"{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-4000:]}")


def run_pyvhost(*args: str, timeout: float = TIMEOUT,
                env: Mapping[str, str] | None = None) -> Done:
    """``pyvhost ARGS`` to the end, stdout a pipe (as under ``| cat``), stdin closed."""
    argv = pyvhost_argv(*args)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=_env(env))
    return Done(argv, done.returncode, done.stdout, done.stderr)


@dataclass
class Running:
    """A ``pyvhost`` command still running (see :func:`started`)."""

    argv: list[str]
    proc: subprocess.Popen[str]

    def interrupt(self, timeout: float = 60) -> Done:
        """Ctrl-C: SIGINT, then its exit and output."""
        assert self.proc.poll() is None, f"exited early with {self.proc.returncode}"
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=timeout)
        return Done(self.argv, self.proc.returncode, out, err)

    def wait(self, timeout: float = TIMEOUT) -> Done:
        out, err = self.proc.communicate(timeout=timeout)
        return Done(self.argv, self.proc.returncode, out, err)

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float = 60) -> None:
        """Poll ``ready`` until true; fails if the command exits first or at the deadline."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                raise AssertionError(f"exited with {self.proc.returncode} before {what}:\n"
                                     f"{out[-2000:]}\n{err[-2000:]}")
            assert time.monotonic() < deadline, f"no {what} after {timeout} s"
            time.sleep(0.05)


@contextlib.contextmanager
def started(*args: str, env: Mapping[str, str] | None = None) -> Iterator[Running]:
    """``pyvhost ARGS`` in the background; ended by pid (SIGKILL) if still running at the
    end of the block."""
    argv = pyvhost_argv(*args)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, env=_env(env))
    try:
        yield Running(argv, proc)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
            proc.communicate(timeout=5)


def assert_one_line_error(done: Done, code: int, *words: str) -> None:
    """The error contract: exit ``code``, the message on one stderr line (no traceback),
    each of ``words`` in it."""
    assert done.code == code, done
    assert "Traceback" not in done.stderr, done
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, done
    for word in words:
        assert word in lines[0], done
