"""Waiting for a condition in tests: polling with a deadline that is a bound, never a measure."""

from __future__ import annotations

import time
from collections.abc import Callable

#: The default deadline of a wait (seconds): generous for a busy 2-core machine, and never
#: asserted as a speed.
TIMEOUT = 10.0


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)
