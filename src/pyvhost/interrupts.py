"""Ctrl-C (or SIGTERM) in the middle of a change: what was done is undone first.

Owns :class:`Interrupted`, the ``KeyboardInterrupt`` that says what the command did about
the interrupt ("undone: object-del d1-mem"; the CLI prints it as its one line and exits
130), and :func:`deferred_interrupts`, which holds SIGINT and SIGTERM while an undo runs:
a second Ctrl-C must not leave half an undo behind (a backend without its device, a
migration neither finished nor cancelled). What runs under it must be bounded by its own
timeout; the held signals are dropped, since the command ends on the first one anyway.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class Interrupted(KeyboardInterrupt):
    """An interrupt that was handled: ``message`` says what was undone or cancelled."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[list[int]]:
    """Hold SIGINT and SIGTERM for the block; yields the list of those that came.

    Only the main thread can set signal handlers; elsewhere the block runs unprotected
    (signals are delivered to the main thread anyway)."""
    came: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield came
        return

    def hold(signum: int, frame: FrameType | None) -> None:
        came.append(signum)

    old = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield came
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
