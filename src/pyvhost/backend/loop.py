"""The event loop a back-end runs on: watched fds, callbacks soon and timers, one thread.

:class:`Loop` is what a connection, a tap port or a client port needs from it (watch an fd,
run something on the next turn or later); :class:`SelectorLoop` is the one
implementation, a ``selectors`` loop with a self-pipe so that :meth:`SelectorLoop.stop`
works from a signal handler or another thread. Nothing here reads a vhost-user message or
knows what a socket is for: :mod:`.server` does.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import selectors
import time
from collections.abc import Callable


class Timer:
    """A callback the loop runs once, at or after ``when`` (monotonic seconds)."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    """What a connection (or a port) needs from its event loop."""

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever ``fd`` is readable, until :meth:`unwatch`."""
        raise NotImplementedError

    def unwatch(self, fd: int) -> None:
        raise NotImplementedError

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the next turn of the loop, after the fds ready now."""
        raise NotImplementedError

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` once, ``delay`` seconds from now (on the loop's thread)."""
        raise NotImplementedError


class SelectorLoop(Loop):
    """A single-threaded ``selectors`` loop with timers and a wake-up pipe."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._stopping = False
        self._soon: list[Callable[[], None]] = []
        self._timers: list[tuple[float, int, Timer]] = []
        self._timer_seq = itertools.count()
        # A self-pipe so that stop() from a signal handler or another thread wakes select.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.watch(self._wake_r, self._drain_wake)

    # -- Loop ----------------------------------------------------------------------------
    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        self._callbacks[fd] = callback
        self.sel.register(fd, selectors.EVENT_READ, fd)

    def unwatch(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(fd)

    def call_soon(self, callback: Callable[[], None]) -> None:
        self._soon.append(callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + max(0.0, delay), callback)
        heapq.heappush(self._timers, (timer.when, next(self._timer_seq), timer))
        return timer

    def _next_timeout(self, timeout: float | None) -> float | None:
        """``timeout`` shortened to the first live timer's deadline."""
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if not self._timers:
            return timeout
        wait = max(0.0, self._timers[0][0] - time.monotonic())
        return wait if timeout is None else min(timeout, wait)

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.cancelled = True  # ran: describe() shows no pending retry
                timer.callback()

    # -- running -------------------------------------------------------------------------
    def run_once(self, timeout: float | None = None) -> None:
        for key, _ in self.sel.select(0 if self._soon else self._next_timeout(timeout)):
            callback = self._callbacks.get(key.data)
            if callback is not None:
                callback()
        if self._timers:
            self._run_timers()
        if self._soon:
            soon, self._soon = self._soon, []
            for callback in soon:
                callback()

    def run(self, until: Callable[[], bool] | None = None, tick: float = 0.5) -> None:
        """Serve until stop() (or ``until()`` is true)."""
        while not self._stopping and not (until and until()):
            self.run_once(tick)

    def stop(self) -> None:
        """Ask run() to return. Safe from a signal handler."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            os.read(self._wake_r, 64)

    def close_loop(self) -> None:
        """Release the selector and the wake-up pipe (every other fd unwatched first)."""
        self.unwatch(self._wake_r)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.sel.close()
