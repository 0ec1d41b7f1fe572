"""``pyvhost net --workers 2`` under control-message fire while two workers forward.

Three guests (pyvhost's front-end plus a virtio-net driver, :mod:`support.netdriver`) on
one switch process with two worker threads: A and B both send to C (C's receive queue has
writers on both workers), C sends to A and to B. Meanwhile the test keeps changing what
the bursts read: memory table updates (a DIMM added and removed, by ADD/REM_MEM_REG and
by SET_MEM_TABLE), transmit rings stopped and set up again (GET_VRING_BASE, then
SET_VRING_NUM/BASE/ADDR/KICK/ENABLE where it stopped), receive rings likewise.

Every frame that arrives must be intact (crc over its payload), addressed as sent, and in
order without a duplicate. A frame may be lost only while its receiver's ring is stopped,
and then the switch counts it (``port_down`` on that port); so for every receiver, frames
sent = frames received + frames the switch counted as dropped, and no other drop reason
appears anywhere. Afterwards the process has its three threads and, once the guests hung
up, the fds it had before they came.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvhost.backend.control import fetch_status
from pyvhost.frontend import GuestRam
from pyvhost.protocol import messages as m
from pyvhost.protocol.constants import Request
from pyvhost.tools import procfs
from pyvhost.units import MiB
from support.netdriver import TIMEOUT, NetDriver, frame_tag, mac, make_frame, wait_any
from support.procs import Procs, settled_fd_count, wait_for_socket

#: Control actions in one run; frames each flow carries between two of them.
STEPS = 60
PER_STEP = 24
BROADCAST = b"\xff" * 6


class Flow:
    """Frames from ``src`` to ``dst``; a loss is allowed, a reorder or a duplicate not."""

    def __init__(self, flow: int, src: NetDriver, dst: NetDriver, seed: int) -> None:
        self.flow, self.src, self.dst = flow, src, dst
        self.rng = random.Random(seed)
        self.sent = 0
        self.received = 0
        self.last = -1

    def check(self, frame: bytes, seq: int) -> None:
        assert frame[:6] == self.dst.mac and frame[6:12] == self.src.mac, \
            f"flow {self.flow} seq {seq}: addresses changed: {frame[:12].hex()}"
        assert seq > self.last, (f"flow {self.flow}: seq {seq} after {self.last} "
                                 "(duplicated or reordered)")
        assert seq < self.sent, f"flow {self.flow}: seq {seq} was never sent"
        self.last = seq
        self.received += 1


class Traffic:
    def __init__(self, drivers: dict[str, NetDriver], ctl: Path) -> None:
        a, b, c = drivers["a"], drivers["b"], drivers["c"]
        self.drivers = drivers
        self.ctl = ctl
        self.flows = {1: Flow(1, a, c, 1), 2: Flow(2, b, c, 2), 3: Flow(3, c, a, 3),
                      4: Flow(4, c, b, 4)}
        #: Frames the switch dropped on the way to each driver (its port's tx_drops),
        #: as last read from the control socket.
        self.dropped: dict[str, int] = dict.fromkeys(drivers, 0)
        self.sending = True

    def port_of(self, key: str) -> str:
        return f"{key}.sock#"

    def refresh_drops(self) -> dict[str, Any]:
        state: Any = fetch_status(str(self.ctl))
        for port in state["switch"]["ports"]:
            assert port["rx_drops"] == {}, port
            assert set(port["tx_drops"]) <= {"port_down"}, port
            for key in self.drivers:
                if port["name"].startswith(self.port_of(key)):
                    self.dropped[key] = sum(port["tx_drops"].values())
        return dict(state)

    def in_flight(self, key: str) -> int:
        dst = self.drivers[key]
        into = [f for f in self.flows.values() if f.dst is dst]
        return sum(f.sent - f.received for f in into) - self.dropped[key]

    def pump(self) -> int:
        work = 0
        for drv in self.drivers.values():
            work += drv.reap_tx()
        for drv in self.drivers.values():
            for frame in drv.reap_rx():
                tag, seq = frame_tag(frame)  # the crc is checked here
                self.flows[tag].check(frame, seq)
                work += 1
        for drv in self.drivers.values():
            work += drv.post_rx()
        if self.sending:
            for key, dst in self.drivers.items():
                # Never more in flight to a driver than it has receive buffers: the
                # switch has no reason to drop but a stopped ring.
                credit = dst.rx_outstanding - self.in_flight(key)
                for flow in self.flows.values():
                    if flow.dst is not dst:
                        continue
                    n = 0
                    while n < credit // 2 and flow.src.can_send():
                        frame = make_frame(dst.mac, flow.src.mac, flow.flow, flow.sent,
                                           flow.rng)
                        if not flow.src.send(frame):
                            break
                        flow.sent += 1
                        n += 1
                    if n:
                        flow.src.flush_tx()
                        credit -= n
                        work += n
        return work

    def run_until(self, done: Any, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        fds = [fd for drv in self.drivers.values() for fd in drv.call_fds]
        while not done():
            if self.pump() == 0:
                wait_any(fds, 0.02)
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: " + ", ".join(
                    f"flow {f.flow} sent {f.sent} received {f.received}"
                    for f in self.flows.values()) + f"; dropped {self.dropped}")


def restart_ring(drv: NetDriver, index: int) -> None:
    """Stop vring ``index`` (GET_VRING_BASE) and set it up again where it stopped, as a
    front-end does around a reset of its device or a migration's switch-over."""
    fe = drv.fe
    base = fe.get_vring_base(index)
    vring = fe.vrings[index]
    fe.request(Request.SET_VRING_NUM, m.VringState(index, vring.size))
    fe.request(Request.SET_VRING_BASE, m.VringState(index, base))
    fe.request(Request.SET_VRING_ADDR, m.VringAddr(index, 0, vring.desc_addr,
                                                   vring.used_addr, vring.avail_addr, 0))
    fe.request(Request.SET_VRING_KICK, m.VringFd(index, nofd=False), [vring.kick_fd])
    fe.set_vring_enable(index, True)
    os.eventfd_write(vring.kick_fd, 1)  # chains made available meanwhile


@pytest.fixture
def three_guests(procs: Procs, short_dir: Path) -> Iterator[tuple[int, Path, dict[str, NetDriver]]]:
    paths = {k: short_dir / f"{k}.sock" for k in "abc"}
    ctl = short_dir / "ctl.sock"
    args = ["net", "--workers", "2", "--control", str(ctl)]
    for p in paths.values():
        args += ["--socket", str(p)]
    sw = procs.pyvhost(*args, name="switch")
    wait_for_socket(ctl, sw.proc)
    drivers = {"a": NetDriver(str(paths["a"]), mac(0xA), mem_slots=True),
               "b": NetDriver(str(paths["b"]), mac(0xB), mem_slots=False),
               "c": NetDriver(str(paths["c"]), mac(0xC))}
    try:
        yield sw.pid, ctl, drivers
    finally:
        for drv in drivers.values():
            drv.close()
        assert sw.proc.poll() is None, f"the switch died:\n{sw.output()[-3000:]}"


def _learn(drivers: dict[str, NetDriver]) -> None:
    """Every guest floods one broadcast, so the switch knows every MAC (and the flows
    are unicast from the first frame)."""
    rng = random.Random(0)
    for drv in drivers.values():
        drv.post_rx()
    for seq, drv in enumerate(drivers.values()):
        assert drv.send(make_frame(BROADCAST, drv.mac, 9, seq, rng))
        drv.flush_tx()
        others = [d for d in drivers.values() if d is not drv]
        got = dict.fromkeys(map(id, others), 0)
        deadline = time.monotonic() + TIMEOUT
        while any(n == 0 for n in got.values()):
            assert time.monotonic() < deadline, "a broadcast did not arrive"
            drv.reap_tx()
            for d in others:
                frames = d.reap_rx()
                got[id(d)] += len(frames)
            wait_any([fd for d in others for fd in d.call_fds], 0.05)
        while drv.tx_outstanding:
            drv.reap_tx()


def test_control_messages_while_two_workers_forward(
        three_guests: tuple[int, Path, dict[str, NetDriver]]) -> None:
    pid, ctl, drivers = three_guests
    fds_before = settled_fd_count(pid)
    for drv in drivers.values():
        drv.start()
        drv.plug(4 * MiB)  # the buffers' DIMM
    state: Any = fetch_status(str(ctl))
    workers = {c["name"].split("#")[0]: {q["worker"] for q in c["queues"]}
               for c in state["connections"]}
    # A and B forward on different workers, into C.
    assert workers["a.sock"] != workers["b.sock"], workers
    assert all(len(w) == 1 and None not in w for w in workers.values()), workers
    _learn(drivers)

    traffic = Traffic(drivers, ctl)
    spare: dict[str, GuestRam] = {}
    keys = itertools.cycle("abc")
    for step in range(STEPS):
        marks = {n: f.sent for n, f in traffic.flows.items()}

        def moved(marks: dict[int, int] = marks) -> bool:
            return all(f.received >= marks[n] + PER_STEP // 2 and f.sent >= marks[n] + PER_STEP
                       for n, f in traffic.flows.items())

        traffic.run_until(moved, f"traffic before step {step}")
        key = next(keys)
        drv = drivers[key]
        action = step % 3
        if action == 0:  # a memory table update (frames in flight meanwhile)
            ram = spare.pop(key, None)
            if ram is None:
                spare[key] = drv.memory.add_dimm(2 * MiB)
                drv._update()
            else:
                drv.memory.detach(ram)
                drv._update()
                ram.close()
        elif action == 1:  # the transmit ring stopped and set up again
            restart_ring(drv, 1)
        else:  # the receive ring: frames to it are dropped (counted) while it is down
            restart_ring(drv, 0)
            traffic.refresh_drops()

    traffic.sending = False
    traffic.run_until(lambda: all(d.tx_outstanding == 0 for d in drivers.values()),
                      "every frame sent to be taken")
    traffic.refresh_drops()
    traffic.run_until(lambda: all(traffic.in_flight(k) == 0 for k in drivers),
                      "every frame taken to arrive or be counted as dropped")
    state = traffic.refresh_drops()
    sent = sum(f.sent for f in traffic.flows.values())
    received = sum(f.received for f in traffic.flows.values())
    assert received + sum(traffic.dropped.values()) == sent
    assert received >= STEPS * PER_STEP  # the forwarding went on throughout
    assert all(not c["queues"][0]["broken"] and not c["queues"][1]["broken"]
               for c in state["connections"]), state["connections"]
    assert len(os.listdir(f"/proc/{pid}/task")) == 3  # the main thread and two workers

    for drv in drivers.values():
        drv.close()
    deadline = time.monotonic() + TIMEOUT
    while procfs.count_fds(pid) != fds_before:
        assert time.monotonic() < deadline, \
            f"the switch holds {procfs.count_fds(pid)} fds, {fds_before} before the guests"
        time.sleep(0.05)
    state = fetch_status(str(ctl))
    assert state["connections"] == []
