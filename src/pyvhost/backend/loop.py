"""The event loop a back-end runs on: watched fds, callbacks soon and timers, one thread.

:class:`Loop` is what a connection, a tap port or a client port needs from it (watch an fd,
run something on the next turn or later); :class:`SelectorLoop` is the one
implementation, a ``selectors`` loop with a self-pipe so that :meth:`SelectorLoop.stop`
works from a signal handler or another thread. Everything runs on the loop's one thread;
another thread (the metrics server's) asks it for something with
:meth:`SelectorLoop.call_from_thread`, which runs the function on the loop's thread between
two turns and waits for its result, so nothing the loop owns is ever read mid-change;
:meth:`SelectorLoop.call_soon_threadsafe` queues a callback without waiting (a worker
thread of :mod:`.workers` asking the main loop to close a connection).
Nothing here reads a vhost-user message or knows what a socket is for: :mod:`.server` does.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class LoopUnavailableError(RuntimeError):
    """The loop did not run a function asked of it from another thread: it is closed, or
    it did not get to it in time (it is not running, or stuck)."""


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

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """From any thread: run ``callback`` on the loop's thread soon."""
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
        # Callbacks from other threads (call_from_thread); the lock orders them against
        # close_loop, so that no thread writes to a wake-up pipe already closed.
        self._from_threads: deque[Callable[[], None]] = deque()
        self._threads_lock = threading.Lock()
        self._loop_closed = False
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

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """From any thread: run ``callback`` on the loop's thread, at the end of its next
        turn (the loop is woken). Does nothing once the loop is closed."""
        with self._threads_lock:
            if self._loop_closed:
                return
            self._from_threads.append(callback)
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")

    def call_from_thread(self, fn: Callable[[], T], timeout: float) -> T:
        """From another thread: run ``fn`` on the loop's thread (between two turns) and
        return its result, or raise what it raised. Raises :class:`LoopUnavailableError`
        if the loop is closed or has not run it within ``timeout`` seconds (a loop that
        is stopped or stuck). Never call it from the loop's own thread: it would wait for
        itself."""
        done = threading.Event()
        outcome: list[tuple[bool, object]] = []

        def run() -> None:
            try:
                outcome.append((True, fn()))
            except Exception as e:  # handed to the caller's thread
                outcome.append((False, e))
            done.set()

        with self._threads_lock:
            if self._loop_closed:
                raise LoopUnavailableError("the server loop is closed")
            self._from_threads.append(run)
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        if not done.wait(timeout):
            raise LoopUnavailableError(f"the server loop did not answer within {timeout:g} s")
        ok, value = outcome[0]
        if not ok:
            assert isinstance(value, Exception)
            raise value
        return value  # type: ignore[return-value]

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
        while self._from_threads:
            self._from_threads.popleft()()

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
        """Release the selector and the wake-up pipe (every other fd unwatched first).
        Callers waiting in :meth:`call_from_thread` time out."""
        with self._threads_lock:
            self._loop_closed = True
            self._from_threads.clear()
            self.unwatch(self._wake_r)
            os.close(self._wake_r)
            os.close(self._wake_w)
        self.sel.close()
