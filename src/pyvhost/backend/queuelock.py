"""Queue locks: who may touch a vring while bursts run on worker threads, and in which
order the locks are taken.

With ``pyvhost net --workers N`` (N > 1) the kicks of each queue are served on a worker
thread, and a burst runs with the GIL released, while the main loop handles control
messages and other workers serve other queues. Every vring of a connection then has one
:class:`QueueLock`, held by

- a burst, for the queues its kick serves (the device's ``kick_queues``: the switch's
  transmit queue; the reflector's transmit and receive queue, which its burst writes),
  from before it reads the kick eventfd until it has published and notified;
- another connection's burst that writes frames into this connection (the switch's
  egress): every queue of the device's ``receive_queues``, for as long as it holds this
  connection's memory (:meth:`~.connection.Connection.run_device`, or
  :meth:`~.connection.Connection.enter_device` to :meth:`~.connection.Connection.leave_device`
  for the switch's egress ports, once per burst);
- a control handler that changes a vring, the memory table or the dirty log (and
  ``close``): every queue of the connection. So GET_VRING_BASE answers once the ring's
  burst is finished, and SET_VRING_*, SET_MEM_TABLE, REM_MEM_REG, SET_LOG_BASE,
  RESET_OWNER and close never change what a burst is reading. ADD_MEM_REG maps its
  region and swaps the new snapshot in without them (it changes no mapping a burst
  uses) and holds them only to re-attach the rings.

The order (deadlock freedom): every lock has a rank ``(tier, connection order, queue
index)``, tier 0 for queues a burst holds as its own (transmit queues), tier 1 for
queues others write into (receive queues). A thread takes locks only in increasing rank:
a burst holds its transmit queue's lock and then takes egress receive queue locks,
never the reverse; several egress ports are taken in connection order; a control handler
holds no other lock. :func:`hold` takes a set of locks sorted by rank. A lock that would
come out of order (one ranked below a lock the thread already holds: the switch's Python
path finding a port its burst did not plan for) is only tried; if it is busy,
:func:`hold` gives up and says so, and the caller counts the frames as dropped. Re-taking
a lock the thread holds is free (a burst delivering to a port it already holds).

The switch's MAC table and port list have a lock of their own
(:attr:`pyvhost.switch.core.Switch.lock`), and a tap its own: both are leaves, held for a
few dictionary operations or one write, while no queue lock is taken.

With one thread (``--workers 1``, the default) nothing is locked: a connection's
:attr:`~.connection.Connection.threaded` is false and it never calls :func:`hold`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

Rank = tuple[int, int, int]


class QueueLock:
    """The lock of one vring of one connection, with its rank in the lock order."""

    __slots__ = ("_lock", "rank")

    def __init__(self, rank: Rank) -> None:
        self.rank = rank
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"QueueLock{self.rank}"


class _Held(threading.local):
    def __init__(self) -> None:
        self.locks: list[QueueLock] = []


_held = _Held()


def held_by_this_thread(lock: QueueLock) -> bool:
    return lock in _held.locks


def holding_any() -> bool:
    """Whether this thread holds a queue lock (it is inside a burst or a control handler)."""
    return bool(_held.locks)


@contextmanager
def hold(locks: Iterable[QueueLock]) -> Iterator[bool]:
    """Take ``locks`` (those this thread does not hold yet) in rank order; yield True.

    A lock ranked below one this thread already holds is only tried: if it is busy,
    what this call took is released and it yields False (the caller must not touch the
    queues). Released on exit, newest first.
    """
    taken = take(locks)
    try:
        yield taken is not None
    finally:
        if taken:
            release(taken)


def take(locks: Iterable[QueueLock]) -> list[QueueLock] | None:
    """:func:`hold` without a ``with``: take ``locks`` by the same rules and return what
    was taken, to be given to :func:`release` (newest released first); or None, holding
    nothing, if a lock out of order was busy."""
    mine = _held.locks
    top = max((lock.rank for lock in mine), default=None)
    todo = sorted({lock for lock in locks if lock not in mine}, key=_rank)
    taken: list[QueueLock] = []
    try:
        for lock in todo:
            # In order: wait. Out of order: only try, never wait (a thread holding it may
            # wait for one of ours).
            if not lock._lock.acquire(top is None or lock.rank > top):
                _release(taken)
                return None
            taken.append(lock)
            mine.append(lock)
    except BaseException:
        _release(taken)
        raise
    return taken


def release(taken: list[QueueLock]) -> None:
    """Release what :func:`take` took, newest first."""
    _release(taken)


def _release(taken: list[QueueLock]) -> None:
    mine = _held.locks
    for lock in reversed(taken):
        mine.remove(lock)
        lock._lock.release()
    taken.clear()


def _rank(lock: QueueLock) -> Rank:
    return lock.rank
