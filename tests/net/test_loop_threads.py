"""Another thread (the metrics server's) asks the server loop for something: it runs on
the loop's thread, between two turns, and the caller gets the result or the error; a loop
that is closed, or that does not answer in time, fails the call instead of hanging it."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from backend.conftest import Backend
from pyvhost.backend import Server
from pyvhost.backend.loop import LoopUnavailableError
from pyvhost.backend.metrics import BackendCollector
from pyvhost.devices.reflect import ReflectNet


@pytest.fixture
def running() -> Iterator[tuple[Server, threading.Thread]]:
    """A server loop running in a thread of its own (no sockets needed)."""
    backend = Backend("(no socket)")
    backend.start()
    assert backend.thread is not None
    try:
        yield backend.server, backend.thread
        backend.stop()
    finally:
        backend.server.stop()
        backend.thread.join(10)
        backend.server.close()


def test_runs_on_the_loop_thread_and_returns(running: tuple[Server, threading.Thread]) -> None:
    server, thread = running
    assert server.call_from_thread(threading.get_ident, timeout=10) == thread.ident
    assert server.call_from_thread(server.describe, timeout=10)["connections"] == []


def test_an_error_reaches_the_caller_and_the_loop_goes_on(
        running: tuple[Server, threading.Thread]) -> None:
    server, thread = running

    def fail() -> None:
        raise ValueError("from the loop")

    with pytest.raises(ValueError, match="from the loop"):
        server.call_from_thread(fail, timeout=10)
    assert thread.is_alive()
    assert server.call_from_thread(lambda: 42, timeout=10) == 42


def test_many_threads_at_once(running: tuple[Server, threading.Thread]) -> None:
    server, thread = running
    got: list[int] = []

    def ask() -> None:
        for _ in range(50):
            got.append(server.call_from_thread(threading.get_ident, timeout=10))

    askers = [threading.Thread(target=ask) for _ in range(4)]
    for t in askers:
        t.start()
    for t in askers:
        t.join(30)
    assert got == [thread.ident] * 200


def test_a_loop_that_does_not_run_times_out_and_a_closed_one_refuses() -> None:
    server = Server(ReflectNet)
    try:
        with pytest.raises(LoopUnavailableError, match="did not answer"):
            server.call_from_thread(lambda: 1, timeout=0.2)
        # A scrape of such a loop fails (HTTP 500 from prometheus-client) instead of
        # hanging or reading the loop's objects from the wrong thread.
        with pytest.raises(LoopUnavailableError):
            list(BackendCollector(server, timeout=0.2).collect())
    finally:
        server.close()
    with pytest.raises(LoopUnavailableError, match="closed"):
        server.call_from_thread(lambda: 1, timeout=0.2)
