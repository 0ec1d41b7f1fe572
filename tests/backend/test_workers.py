"""``--workers N``: kicks served on worker threads, and what must not race them.

The lock order (:mod:`pyvhost.backend.queuelock`) on its own; then a real server with two
workers and pyvhost's front-end on real sockets: queue pairs spread over the workers and
shown in status output; control messages that change a ring, the memory table or a call
fd answered only once the burst in flight is finished; a close a worker asks for (a
guest-memory fault) done on the main loop; and no thread or fd left behind once the
server is closed, nor by ``pyvhost net --workers 2`` stopped by SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvhost.backend import Server, queuelock
from pyvhost.backend.connection import Connection
from pyvhost.backend.control import fetch_status
from pyvhost.backend.device import QueueContext
from pyvhost.backend.queuelock import QueueLock
from pyvhost.devices.reflect import ReflectNet
from pyvhost.memory import MemoryFaultError
from pyvhost.protocol import messages as m
from pyvhost.protocol.constants import Request
from pyvhost.tools.process import pyvhost_argv
from support.procs import Procs, wait_for_socket
from support.ring import Buffer

from .conftest import MAC, start_loop
from .harness import HDR, NetPort, make_frames
from .rawclient import TIMEOUT, wait_until

# -- the lock order on its own ------------------------------------------------------------

def test_hold_takes_in_rank_order_and_reenters_for_free() -> None:
    a, b = QueueLock((0, 1, 1)), QueueLock((1, 1, 0))
    with queuelock.hold([b, a]) as ok:
        assert ok
        assert queuelock.held_by_this_thread(a) and queuelock.held_by_this_thread(b)
        with queuelock.hold([a]) as again:  # held already: nothing to take
            assert again
        assert queuelock.held_by_this_thread(a)
    assert not queuelock.held_by_this_thread(a) and not queuelock.held_by_this_thread(b)


def test_out_of_order_is_only_tried_and_never_deadlocks() -> None:
    """Thread 1 holds the high lock and wants the low one; thread 2 holds the low one and
    wants the high one (in order: it waits). Thread 1 must give up, not wait."""
    low, high = QueueLock((1, 1, 0)), QueueLock((1, 2, 0))
    got_low = threading.Event()
    results: dict[str, bool] = {}

    def second() -> None:
        with queuelock.hold([low]) as ok:
            assert ok
            got_low.set()
            with queuelock.hold([high]) as ok2:  # waits until thread 1 lets go
                results["second"] = ok2

    with queuelock.hold([high]) as ok:
        assert ok
        t = threading.Thread(target=second)
        t.start()
        assert got_low.wait(TIMEOUT)
        with queuelock.hold([low]) as tried:
            results["first"] = tried
    t.join(TIMEOUT)
    assert not t.is_alive(), "deadlock"
    assert results == {"first": False, "second": True}
    # Given up: nothing of that call stays held.
    assert not queuelock.held_by_this_thread(low)


# -- a server with two workers -------------------------------------------------------------

class GatedReflector(ReflectNet):
    """A reflector whose next burst, once armed, waits for the test (on its worker)."""

    def __init__(self) -> None:
        super().__init__(MAC)
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.finished = False
        self.threads: set[str] = set()

    def handle_kick(self, ctx: QueueContext, index: int) -> None:
        self.threads.add(threading.current_thread().name)
        if self.armed:
            self.armed = False
            self.entered.set()
            assert self.release.wait(TIMEOUT)
            super().handle_kick(ctx, index)
            self.finished = True
            return
        super().handle_kick(ctx, index)


class Served:
    def __init__(self, path: str, workers: int = 2) -> None:
        self.path = path
        self.devices: list[GatedReflector] = []
        self.errors: list[BaseException] = []
        self.server = Server(self.factory)
        self.server.use_workers(workers)
        self.server.listen(path)
        self.thread = start_loop(self.server, self.errors, "pyvhost-main")

    def factory(self) -> GatedReflector:
        dev = GatedReflector()
        self.devices.append(dev)
        return dev

    def close(self) -> None:
        self.server.stop()
        self.thread.join(TIMEOUT)
        self.server.close()


@pytest.fixture
def served(socket_dir: Path) -> Iterator[Served]:
    s = Served(str(socket_dir / "w.sock"))
    try:
        yield s
    finally:
        s.close()
    assert not s.errors


def _connections(s: Served) -> list[Connection]:
    return s.server.call_from_thread(lambda: list(s.server.connections), TIMEOUT)


def test_queue_pairs_spread_over_workers_and_status_says_which(served: Served) -> None:
    ports = [NetPort(served.path, tag=f"w{i}").start() for i in range(2)]
    try:
        for port in ports:
            port.check_traffic(40)
        state: Any = served.server.call_from_thread(served.server.describe, TIMEOUT)
        workers = [[q["worker"] for q in c["queues"]] for c in state["connections"]]
        assert workers == [["worker-0", "worker-0"], ["worker-1", "worker-1"]]
        assert [w["queue_pairs"] for w in state["workers"]] == [1, 1]
        # The bursts ran there, not on the main loop.
        assert served.devices[0].threads == {"pyvhost-worker-0"}
        assert served.devices[1].threads == {"pyvhost-worker-1"}
    finally:
        for port in ports:
            port.close()
    # Closed connections give their pairs back.
    pool = served.server.workers
    assert pool is not None
    wait_until(lambda: served.server.call_from_thread(
        lambda: [len(w.pairs) for w in pool.workers], TIMEOUT) == [0, 0], "pairs released")


def _same_table(port: NetPort) -> None:
    port.set_mem_table([port.ram, port.ring_mem])


def _get_tx_base(port: NetPort) -> None:
    reply = port.client.request(Request.GET_VRING_BASE, m.VringState(1, 0))
    assert reply == m.VringState(1, 1)  # the chain the burst took is counted


def _new_call_fd(port: NetPort) -> None:
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        port.ok(Request.SET_VRING_CALL, m.VringFd(0, False), fds=[fd])
    finally:
        os.close(fd)


@pytest.mark.parametrize("control", [_get_tx_base, _same_table, _new_call_fd],
                         ids=["GET_VRING_BASE", "SET_MEM_TABLE", "SET_VRING_CALL"])
def test_control_waits_for_the_burst_in_flight(served: Served,
                                               control: Callable[[NetPort], None]) -> None:
    port = NetPort(served.path, tag="gate").start()
    try:
        dev = served.devices[0]
        dev.armed = True
        gpa = port.pool.alloc()
        port.rx.add([Buffer(gpa, HDR + 1514, True)])
        frame = make_frames(1)[0]
        tx_gpa = port.pool.alloc()
        port.guest.write(tx_gpa, bytes(HDR) + frame)
        port.tx.add([Buffer(tx_gpa, HDR + len(frame))])
        port.tx.kick()
        assert dev.entered.wait(TIMEOUT), "the burst did not start"
        seen: list[bool] = []

        def send() -> None:
            control(port)
            seen.append(dev.finished)

        t = threading.Thread(target=send)
        t.start()
        # A window in which a reply that does not wait for the burst would come (the
        # test does not depend on its length: with the locks the reply can not come).
        t.join(0.3)
        dev.release.set()
        t.join(TIMEOUT)
        assert seen == [True], "the control message was answered during the burst"
        assert len(port.rx.wait_used(1)) == 1
    finally:
        dev.release.set()
        port.close()


class FaultingReflector(GatedReflector):
    def handle_kick(self, ctx: QueueContext, index: int) -> None:
        if self.armed:
            raise MemoryFaultError("SIGBUS (simulated) in guest memory")
        super().handle_kick(ctx, index)


def test_a_close_asked_on_a_worker_runs_on_the_main_loop(socket_dir: Path) -> None:
    s = Served(str(socket_dir / "f.sock"))
    s.server.factory = lambda: FaultingReflector()
    closed_on: list[str] = []
    s.server.on_disconnect.append(lambda c: closed_on.append(threading.current_thread().name))
    bad = good = None
    try:
        bad = NetPort(s.path, tag="bad").start()
        good = NetPort(s.path, tag="good").start()
        bad_conn, _ = _connections(s)
        assert isinstance(bad_conn.device, FaultingReflector)
        bad_conn.device.armed = True
        bad.tx.kick()
        wait_until(lambda: closed_on != [], "the faulted connection to close")
        assert closed_on == ["pyvhost-main"]
        assert bad_conn.close_reason is not None and "guest memory fault" in \
            bad_conn.close_reason
        good.check_traffic(40)  # the other connection, on the other worker, goes on
    finally:
        for port in (bad, good):
            if port is not None:
                port.close()
        s.close()
    assert not s.errors


def _fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def test_close_joins_the_workers_and_leaves_no_fd(socket_dir: Path) -> None:
    before_fds = _fds()
    before_threads = set(threading.enumerate())
    s = Served(str(socket_dir / "c.sock"))
    port = NetPort(s.path, tag="c").start()
    try:
        port.check_traffic(64)
    finally:
        port.close()
    s.close()
    assert not s.errors
    left = [t.name for t in threading.enumerate() if t not in before_threads]
    assert left == [], f"threads left behind: {left}"
    assert _fds() == before_fds


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_pyvhost_net_with_workers_stops_cleanly(procs: Procs, short_dir: Path,
                                                sig: signal.Signals) -> None:
    sock, ctl = short_dir / "n.sock", short_dir / "n.ctl"
    net = procs.pyvhost("net", "--reflect", "--workers", "2", "--socket", str(sock),
                        "--control", str(ctl))
    wait_for_socket(ctl, net.proc)
    port = NetPort(str(sock), tag="sig").start()
    try:
        port.check_traffic(32)
        state: Any = fetch_status(str(ctl))
        assert [q["worker"] for q in state["connections"][0]["queues"]] == \
            ["worker-0", "worker-0"]
        shown = subprocess.run(pyvhost_argv("status", str(ctl)), capture_output=True,
                               text=True, timeout=TIMEOUT, check=True).stdout
        assert "worker" in shown and "worker-0" in shown, shown
        tasks = os.listdir(f"/proc/{net.pid}/task")
        assert len(tasks) == 3  # the main thread and two workers
        net.proc.send_signal(sig)
        net.proc.wait(TIMEOUT)
    finally:
        port.close()
    assert net.proc.returncode == (0 if sig == signal.SIGTERM else 130), net.output()[-2000:]
    assert "stopping" in net.output()


def test_worker_count_must_be_positive() -> None:
    from pyvhost.backend.workers import WorkerPool

    with pytest.raises(ValueError):
        WorkerPool(0)
    pool = WorkerPool(2)  # never started: closing it waits for no thread
    pool.close()
    assert all(not w.thread.is_alive() for w in pool.workers)
