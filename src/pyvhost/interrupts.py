"""Ctrl-C (or SIGTERM) in the middle of a change: what was done is undone first.

Owns :class:`Interrupted`, the ``KeyboardInterrupt`` that says what the command did about
the interrupt ("undone: object-del d1-mem"; the CLI prints it as its one line and exits
130), and :func:`deferred_interrupts`, which holds SIGINT and SIGTERM while an undo runs:
a second Ctrl-C must not leave half an undo behind (a backend without its device, a
migration neither finished nor cancelled). What runs under it must be bounded by its own
timeout; the held signals are dropped, since the command ends on the first one anyway.

Also owns :func:`raise_interrupt` (SIGTERM's handler in the CLI: it ends a command as
Ctrl-C does) and :func:`loop_interrupts`, which turns those two signals into a
cancellation while an asyncio loop runs a task in the main thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any


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


def raise_interrupt(signum: int, frame: FrameType | None) -> None:
    """A signal handler that ends the command as Ctrl-C does (SIGTERM's, in the CLI)."""
    raise KeyboardInterrupt


#: The handlers that raise KeyboardInterrupt where Python happens to be running.
_RAISING: tuple[Callable[..., Any], ...] = (signal.default_int_handler, raise_interrupt)


@contextlib.contextmanager
def loop_interrupts(loop: asyncio.AbstractEventLoop,
                    task: asyncio.Future[Any]) -> Iterator[list[int]]:
    """While ``loop`` runs ``task`` in the block, SIGINT and SIGTERM cancel the task
    instead of raising KeyboardInterrupt; yields the list of those that came (the caller
    raises KeyboardInterrupt after the loop stopped when it is not empty).

    Why: a handler that raises does so in whatever Python code runs next, and inside the
    loop that can be a weakref or ``__del__`` callback (asyncio keeps its tasks in a
    WeakSet), where Python prints "Exception ignored" and drops the exception: the
    interrupt is lost and the command goes on waiting (seen once in CI: Ctrl-C during a
    held device_add, swallowed in ``_weakrefset._remove``). The loop's own signal
    handling only writes the signal number to its wakeup fd, and runs the callback below
    as an ordinary loop callback.

    Only signals whose handler raises are taken over (not the ``hold`` of
    :func:`deferred_interrupts`: an undo stays uninterruptible), and only in the main
    thread; the previous handlers are put back on the way out."""
    came: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield came
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    taken = [s for s, h in old.items() if h in _RAISING]

    def cancel(signum: int) -> None:
        came.append(signum)
        task.cancel()

    try:
        for s in taken:
            loop.add_signal_handler(s, cancel, s)
        yield came
    finally:
        for s in taken:
            loop.remove_signal_handler(s)
            signal.signal(s, old[s])
