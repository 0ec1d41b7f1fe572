"""Worker threads that serve queues' kicks (``pyvhost net --workers N``).

A :class:`WorkerPool` runs N :class:`WorkerLoop` threads, each a selector loop of its own
watching the kick eventfds of the queues assigned to it. The compiled bursts release the
GIL, so two workers forward at once on two cores; control messages (the vhost-user
sockets), taps, timers and the control socket stay on the server's main loop.

Assignment: a queue pair (queues 2k and 2k+1 of one connection) is given to a worker when
its first kick eventfd arrives, the worker serving the fewest pairs (the lowest-numbered
among equals), and keeps it until the connection closes: a pair, not a queue, because
the reflector serves its transmit ring on a receive kick too, and a kick served where the
ring's other kicks are keeps one thread on one ring. Round robin over (connection, pair)
in practice: two switch ports of one pair each get one worker each.

A worker thread blocks SIGINT and SIGTERM (the main thread handles them and stops the
server, which stops and joins the workers: :meth:`WorkerPool.stop`), and survives an
exception in a callback (logged; that callback's queue may be broken by its connection,
the other queues go on). Locking between workers and the main loop: :mod:`.queuelock`.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

from .loop import SelectorLoop

log = logging.getLogger(__name__)


class WorkerLoop(SelectorLoop):
    """One worker: a selector loop on a thread of its own. :meth:`call_soon` may be called
    from any thread (it wakes the loop when called from another one)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
        self.name = f"worker-{index}"
        #: Queue pairs (connection order, pair) served here.
        self.pairs: set[tuple[int, int]] = set()
        self.thread = threading.Thread(target=self._main, name=f"pyvhost-{self.name}",
                                       daemon=True)

    def call_soon(self, callback: Callable[[], None]) -> None:
        if threading.current_thread() is self.thread:
            super().call_soon(callback)
        else:
            self.call_soon_threadsafe(callback)

    def _main(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        while not self._stopping:
            try:
                self.run_once(0.5)
            except Exception:  # a bug in a callback must not stop the other queues
                log.exception("%s: callback failed", self.name)


class WorkerPool:
    """N worker loops and the assignment of queue pairs to them."""

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError(f"worker count must be at least 1, not {count}")
        self.workers = [WorkerLoop(i) for i in range(count)]
        self._lock = threading.Lock()
        self._started = False
        self._stopped = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            for w in self.workers:
                w.thread.start()

    def assign(self, order: int, pair: int) -> WorkerLoop:
        """The worker of queue pair ``pair`` of the connection of ``order`` (stable
        until :meth:`release`)."""
        key = (order, pair)
        with self._lock:
            for w in self.workers:
                if key in w.pairs:
                    return w
            w = min(self.workers, key=lambda w: (len(w.pairs), w.index))
            w.pairs.add(key)
            return w

    def release(self, order: int) -> None:
        """The connection of ``order`` closed: its pairs leave their workers."""
        with self._lock:
            for w in self.workers:
                w.pairs = {k for k in w.pairs if k[0] != order}

    def stop(self) -> None:
        """Stop every worker and wait for it: no burst runs after this returns. The
        selectors stay open (:meth:`close`) so that connections can still unwatch."""
        if self._stopped:
            return
        self._stopped = True
        for w in self.workers:
            w.stop()
        for w in self.workers:
            if w.thread.is_alive():
                w.thread.join()

    def close(self) -> None:
        self.stop()
        for w in self.workers:
            w.close_loop()

    def on_worker_thread(self) -> bool:
        current = threading.current_thread()
        return any(w.thread is current for w in self.workers)

    def describe(self) -> list[dict[str, object]]:
        return [{"name": w.name, "queue_pairs": len(w.pairs)} for w in self.workers]
