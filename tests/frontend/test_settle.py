"""``Witness.settle`` (:func:`pyvhost.frontend.hostile.witness.settle`): a leak is measured
only once the back-end's counts rest. Measured here on this test process, whose fds a
thread opens and closes the way a back-end releasing a closed connection would."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

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
