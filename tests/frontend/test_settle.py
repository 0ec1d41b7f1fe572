"""``Witness.settle`` (:func:`pyvhost.frontend.hostile.witness.settle`): a leak is measured
only once the back-end's counts rest, and a leak seen is measured once more after settling
again. Measured here on this test process, whose eventfds are opened and closed the way a
back-end releasing a closed connection would."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

from pyvhost.frontend.hostile import runner
from pyvhost.frontend.hostile.witness import settle


def _churn(stop: threading.Event, done: threading.Event, steps: int | None) -> None:
    """Open an eventfd every 50 ms (``steps`` times, or until ``stop``), then close them."""
    fds: list[int] = []
    try:
        n = 0
        while not stop.is_set() and (steps is None or n < steps):
            fds.append(os.eventfd(0))
            n += 1
            time.sleep(0.05)
    finally:
        for fd in fds:
            os.close(fd)
        done.set()


def test_settle_waits_until_the_counts_stop_changing() -> None:
    stop, done = threading.Event(), threading.Event()
    t = threading.Thread(target=_churn, args=(stop, done, 12))
    t.start()
    try:
        assert settle(os.getpid(), quiet=0.3, timeout=30)
        # The fd count changed every 50 ms until the thread closed its fds: settling for
        # 0.3 s was possible only after that.
        assert done.is_set()
    finally:
        stop.set()
        t.join()


def test_settle_gives_up_on_counts_that_never_rest() -> None:
    stop, done = threading.Event(), threading.Event()
    t = threading.Thread(target=_churn, args=(stop, done, None))
    t.start()
    try:
        assert not settle(os.getpid(), quiet=0.3, timeout=1.0)
        assert not done.is_set()
    finally:
        stop.set()
        t.join()


def test_settle_on_a_process_that_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not settle(child.pid, timeout=1.0)


# --- the runner: a leak seen is measured once more after settling ---------------------------

def _held_eventfd(release_on_settle: int | None) -> tuple[list[int], Callable[[int], object]]:
    """An eventfd this process holds, and a settle function that, on its call number
    ``release_on_settle``, closes it (a back-end letting go late) before settling."""
    fds = [os.eventfd(0)]
    calls: list[int] = []

    def wait_settled(pid: int) -> object:
        calls.append(pid)
        if len(calls) == release_on_settle:
            os.close(fds.pop())
        return settle(pid, quiet=0.2, timeout=5)

    return fds, wait_settled


def test_a_late_release_is_not_reported_as_a_leak(caplog: pytest.LogCaptureFixture) -> None:
    pid = os.getpid()
    baseline, targets = runner._measure(pid), runner._targets(pid)
    fds, wait_settled = _held_eventfd(release_on_settle=2)
    try:
        with caplog.at_level(logging.INFO, logger="pyvhost.frontend.hostile.runner"):
            assert runner._settled_leak("case", wait_settled, pid, baseline, [], 0.1,
                                        targets) == ""
    finally:
        for fd in fds:
            os.close(fd)
    assert "1 more eventfd/memfd fd(s) than before the case" in caplog.text
    assert "released after settling: not a leak" in caplog.text


def test_a_leak_that_stays_is_reported() -> None:
    pid = os.getpid()
    baseline, targets = runner._measure(pid), runner._targets(pid)
    fds, wait_settled = _held_eventfd(release_on_settle=None)
    try:
        leak = runner._settled_leak("case", wait_settled, pid, baseline, [], 0.1, targets)
    finally:
        for fd in fds:
            os.close(fd)
    assert leak.startswith("1 more eventfd/memfd fd(s) than before the case")
