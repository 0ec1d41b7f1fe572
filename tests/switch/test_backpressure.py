"""Backpressure in a real ``pyvhost net``: a guest that does not drain costs only itself.

The switch never queues a frame: a frame for a port whose receive ring has no buffer is
dropped at once and counted there as ``no_rx_buffer``. So

- a port that posts no receive buffer at all, or posted a few and never takes them back
  (its used ring full, its available ring empty), loses exactly the frames sent to it,
  while two other ports exchange sequenced frames at full speed without losing one;
- a port that floods is served at most ``TX_BUDGET`` frames per turn of the loop, so a
  port that transmits at the same moment gets its frames through before the flood ends;
- a guest sending from ever new source addresses fills the MAC table to its limit and
  no further, and a full table costs it no walk over every entry per frame;
- the switch's memory does not grow with the number of frames it had to drop.

The guests are pyvhost's own front-end plus a virtio-net driver (:mod:`support.netdriver`).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvhost.backend.control import fetch_status
from pyvhost.switch.table import DEFAULT_MAX_ENTRIES, MacTable
from pyvhost.switch.vhost import TX_BUDGET
from pyvhost.units import MiB
from support.netdriver import (
    BROADCAST,
    ETHERTYPE,
    TIMEOUT,
    Duplex,
    Flow,
    NetDriver,
    frame_tag,
    mac,
    make_frame,
    wait_any,
)
from support.procs import Procs, Started, wait_for_socket

DIMM = 4 * MiB


class SwitchProcess:
    """A ``pyvhost net`` process with one socket per named port, and its guests."""

    def __init__(self, procs: Procs, socket_dir: Path, names: list[str]) -> None:
        self.dir = socket_dir
        self.ctl = socket_dir / "ctl.sock"
        args = [a for n in names for a in ("--socket", str(socket_dir / f"{n}.sock"))]
        self.proc: Started = procs.pyvhost("net", *args, "--control", str(self.ctl),
                                           name="switch")
        wait_for_socket(self.ctl, self.proc.proc)
        self.guests: list[NetDriver] = []

    def guest(self, name: str, n: int, dimm: int = DIMM, **kwargs: Any) -> NetDriver:
        drv = NetDriver(str(self.dir / f"{name}.sock"), mac(n), **kwargs)
        self.guests.append(drv)
        drv.start()
        drv.plug(dimm)
        return drv

    def ports(self) -> dict[str, dict[str, Any]]:
        """The switch's per-port counters, by socket name."""
        state = fetch_status(str(self.ctl))["switch"]
        assert isinstance(state, dict)
        return {p["name"].split(".sock#")[0]: p for p in state["ports"]}

    def close(self) -> None:
        for drv in self.guests:
            drv.close()
        assert self.proc.proc.poll() is None, f"the switch died:\n{self.proc.output()[-3000:]}"


@pytest.fixture
def make_switch(procs: Procs, socket_dir: Path) -> Iterator[Callable[[list[str]], SwitchProcess]]:
    made: list[SwitchProcess] = []

    def make(names: list[str]) -> SwitchProcess:
        made.append(SwitchProcess(procs, socket_dir, names))
        return made[-1]

    try:
        yield make
    finally:
        for sw in made:
            sw.close()


def _wait(predicate: Callable[[], bool], what: str, fds: list[int],
          timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        wait_any(fds, 0.02)


def _hello(sender: NetDriver, listeners: list[NetDriver], flow: int) -> None:
    """``sender`` broadcasts one frame (the switch learns its address); every listener,
    which has receive buffers, gets it."""
    hello = make_frame(BROADCAST, sender.mac, flow, 0, random.Random(flow))
    assert sender.send(hello)
    sender.flush_tx()
    fds = [fd for d in (sender, *listeners) for fd in d.call_fds]
    got: dict[int, list[bytes]] = {id(d): [] for d in listeners}

    def arrived() -> bool:
        sender.reap_tx()
        for d in listeners:
            new = d.reap_rx()
            got[id(d)] += new
            if new:
                d.post_rx(len(new))  # as many buffers as before
        return sender.tx_outstanding == 0 and all(len(v) == 1 for v in got.values())

    _wait(arrived, f"hello from {sender.mac.hex(':')}", fds)
    assert all(v == [hello] for v in got.values())


class Flooder:
    """Keeps ``src``'s transmit ring full: ``each`` frames of every entry of ``frames``,
    taken in turns. :meth:`pump` returns the work done, like :meth:`Duplex.pump`."""

    def __init__(self, src: NetDriver, frames: list[bytes], each: int) -> None:
        self.src, self.frames = src, frames
        self.left = [each] * len(frames)

    @property
    def done(self) -> bool:
        return not any(self.left) and self.src.tx_outstanding == 0

    def pump(self) -> int:
        src = self.src
        work = src.reap_tx()
        share = src.tx_size // len(self.frames)
        for i, frame in enumerate(self.frames):
            if self.left[i]:
                n = src.flood(frame, min(self.left[i], max(0, share - src.tx_outstanding)))
                self.left[i] -= n
                work += n
        return work


class Spoofer:
    """Sends ``count`` minimal frames to ``dst``, each from a source address not used
    before (from ``mac(first)`` on): a guest filling the switch's MAC table."""

    def __init__(self, src: NetDriver, dst: bytes, count: int, first: int) -> None:
        self.src, self.dst = src, dst
        self.left, self.next = count, first

    def pump(self) -> int:
        src = self.src
        work = src.reap_tx()
        n = 0
        while self.left and src.send(self.dst + mac(self.next) + ETHERTYPE + bytes(46)):
            self.left -= 1
            self.next += 1
            n += 1
        if n:
            src.flush_tx()
        return work + n


def test_a_port_that_never_drains_loses_only_its_own_frames(
        make_switch: Callable[[list[str]], SwitchProcess]) -> None:
    sw = make_switch(["a", "b", "f", "p", "q"])
    a, b, f = (sw.guest(n, i) for n, i in (("a", 0xA), ("b", 0xB), ("f", 0xF)))
    # P never posts a receive buffer; Q posts a few later and never takes them back.
    p, q = sw.guest("p", 0x50), sw.guest("q", 0x51)
    listeners = [a, b, f]
    for d in listeners:
        d.post_rx()
    for n, d in enumerate((a, b, f, p, q)):
        _hello(d, [x for x in listeners if x is not d], 100 + n)
    q_buffers = 16
    assert q.post_rx(q_buffers) == q_buffers

    frames_each, flood_each = 4000, 15000
    to_p = make_frame(p.mac, f.mac, 200, 0, random.Random(1))
    to_q = make_frame(q.mac, f.mac, 201, 0, random.Random(2), size=1514)
    flood = Flooder(f, [to_p, to_q], flood_each)
    duplex = Duplex(a, b, seed=3, limit=frames_each)
    duplex.run_until(lambda: duplex.complete and flood.done, "the exchange and the flood",
                     also=flood.pump)

    # Q's buffers took the first frames sent to it, intact; nothing was truncated.
    got = q.reap_rx()
    assert len(got) == q_buffers and all(g == to_q for g in got)
    assert p.reap_rx() == []
    ports = sw.ports()
    hellos = 4  # every port heard the four others (P and Q dropped theirs)
    assert ports["p"]["tx_drops"] == {"no_rx_buffer": hellos + flood_each}
    assert ports["q"]["tx_drops"] == {"no_rx_buffer": hellos + flood_each - q_buffers}
    assert (ports["p"]["tx_frames"], ports["q"]["tx_frames"]) == (0, q_buffers)
    for name, rx, tx in (("a", 1 + frames_each, hellos + frames_each),
                         ("b", 1 + frames_each, hellos + frames_each),
                         ("f", 1 + 2 * flood_each, hellos)):
        port = ports[name]
        assert port["rx_drops"] == {} and port["tx_drops"] == {}, port
        assert (port["rx_frames"], port["tx_frames"]) == (rx, tx), port
    assert all(ports[n]["rx_drops"] == {} for n in "pq")


def test_a_flooding_port_does_not_stall_the_others(
        make_switch: Callable[[list[str]], SwitchProcess]) -> None:
    sw = make_switch(["a", "b", "f"])
    a = sw.guest("a", 0xA)
    b = sw.guest("b", 0xB, dimm=2 * DIMM, rx_size=4096)
    f = sw.guest("f", 0xF, tx_size=32768)
    for d in (a, b, f):
        d.post_rx(8)
    for n, d in enumerate((a, b, f)):
        _hello(d, [x for x in (a, b, f) if x is not d], 100 + n)
    # B has room for `room` frames; F's ring holds far more, A sends a few.
    room, burst = 1536, 64
    assert room >= TX_BUDGET + burst, "the test needs room for one turn of F and A's burst"
    assert b.reap_rx() == [] and b.rx_outstanding == 8
    assert b.post_rx(room - 8) == room - 8
    ahead = make_frame(b.mac, f.mac, 300, 0, random.Random(4))

    # Freeze the switch so that both rings are full before it looks at either: what it
    # does next depends on its scheduling only, not on ours.
    pid = sw.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        flooded = f.flood(ahead, f.tx_size)
        flow = Flow(1, a, b, seed=5)
        for _ in range(burst):
            assert a.send(make_frame(b.mac, a.mac, 1, flow.sent, flow.rng))
            flow.sent += 1
        a.flush_tx()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert flooded == f.tx_size

    def consumed() -> bool:
        f.reap_tx()
        a.reap_tx()
        return f.tx_outstanding == 0 and a.tx_outstanding == 0

    _wait(consumed, "the flood and the burst to be consumed",
          [fd for d in (a, b, f) for fd in d.call_fds])
    got = b.reap_rx()
    assert len(got) == room
    from_a = [g for g in got if frame_tag(g)[0] == 1]
    for frame in from_a:
        flow.check.check(frame)
    # Had the switch served F's ring to the end first, B's buffers would all hold F's
    # frames and A's would have been dropped.
    assert flow.check.received == burst, f"{burst - flow.check.received} of A's frames lost"
    assert all(g == ahead for g in got if frame_tag(g)[0] != 1)
    ports = sw.ports()
    assert ports["b"]["tx_drops"] == {"no_rx_buffer": flooded - (room - burst)}
    assert ports["b"]["tx_frames"] == 2 + room
    for name in ("a", "f"):
        assert ports[name]["tx_drops"] == {} and ports[name]["rx_drops"] == {}, ports[name]


class _Reading(float):
    """A clock reading that counts how often the MAC table computes an entry's age."""

    ages = 0

    def __sub__(self, other: float) -> float:
        _Reading.ages += 1
        return float(self) - other


def test_a_full_mac_table_is_no_lever_for_a_spoofing_guest() -> None:
    # Regression: with the table full, every frame from a new source address walked all
    # entries looking for aged ones (about a millisecond a frame at 8192 entries, in the
    # one thread that serves every port). Now the walk stops at the first live entry.
    table: MacTable[str] = MacTable(300, max_entries=DEFAULT_MAX_ENTRIES)
    for i in range(DEFAULT_MAX_ENTRIES):
        assert table.learn(mac(i), "f", _Reading(0.0))
    _Reading.ages = 0
    for i in range(1000):
        assert not table.learn(mac(0x1000_0000 + i), "f", _Reading(1.0))
    assert _Reading.ages <= 2 * 1000, f"{_Reading.ages} ages computed for 1000 frames"
    assert len(table) == DEFAULT_MAX_ENTRIES


def test_mac_table_ages_by_last_sighting() -> None:
    table: MacTable[str] = MacTable(300, max_entries=3)
    table.learn(mac(1), "a", 0.0)
    table.learn(mac(2), "b", 1.0)
    table.learn(mac(1), "a", 2.0)  # seen again: now younger than mac(2)
    table.learn(mac(3), "c", 3.0)
    table.learn(mac(2), "d", 4.0)  # moved to another port: a new sighting too
    assert not table.learn(mac(4), "e", 5.0)  # full, nothing aged
    assert table.expire(302.5) == 1  # mac(1) only (seen at 2.0)
    assert sorted(m for m, _, _ in table.entries(302.5)) == [mac(2), mac(3)]
    assert table.learn(mac(4), "e", 302.5) and table.lookup(mac(2), 302.5) == "d"
    assert table.expire(1000.0) == 3 and len(table) == 0


def _rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and its parts (RssAnon, RssFile, RssShmem) of ``pid``, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0])
    return out


#: Frames pushed at a port that never drains, and how much the switch may grow meanwhile
#: (a leak check, not a measure of efficiency: a frame kept would cost a kilobyte).
FLOOD_FRAMES = 200_000
WARM_UP = 20_000
RSS_BOUND_KIB = 4096


def test_switch_memory_stays_bounded_while_a_port_never_drains(
        make_switch: Callable[[list[str]], SwitchProcess]) -> None:
    sw = make_switch(["f", "p"])
    f = sw.guest("f", 0xF, tx_size=4096)
    p = sw.guest("p", 0x50)
    # Frames from F's own address, in four sizes; and some from addresses never seen
    # before, so that the MAC table fills up too (it must stop at its limit).
    frames = [make_frame(p.mac, f.mac, 400 + i, 0, random.Random(i), size=size)
              for i, size in enumerate((60, 512, 1024, 1514))]
    spoofer = Spoofer(f, p.mac, 0, 0x1000_0000)

    def push(total: int, spoofed: int) -> None:
        flood = Flooder(f, frames, (total - spoofed) // len(frames))
        spoofer.left = spoofed
        _wait(lambda: flood.pump() + spoofer.pump() == 0 and flood.done and not spoofer.left,
              f"{total} frames pushed", f.call_fds, timeout=5 * TIMEOUT)

    # Warm-up: every page the switch will touch is touched, the MAC table is full.
    push(WARM_UP, DEFAULT_MAX_ENTRIES + 1000)
    before = _rss_kib(sw.proc.pid)
    push(FLOOD_FRAMES, FLOOD_FRAMES // 10)
    after = _rss_kib(sw.proc.pid)
    state = fetch_status(str(sw.ctl))["switch"]
    assert isinstance(state, dict)
    ports = {port["name"].split(".sock#")[0]: port for port in state["ports"]}
    # Every frame was taken in and dropped for want of a buffer: none is kept anywhere.
    assert ports["p"]["tx_drops"] == {"no_rx_buffer": WARM_UP + FLOOD_FRAMES}
    assert ports["f"]["rx_frames"] == WARM_UP + FLOOD_FRAMES
    assert len(state["mac_table"]) == DEFAULT_MAX_ENTRIES
    growth = after["VmRSS"] - before["VmRSS"]
    assert growth <= RSS_BOUND_KIB, f"the switch grew by {growth} KiB: {before} -> {after}"


def test_a_mac_that_moves_between_long_bursts_takes_its_frames_along(
        make_switch: Callable[[list[str]], SwitchProcess]) -> None:
    # Bursts longer than a turn's budget make the switch forward inside its step: the
    # bursts after a turn's first (again), and the turns after the first (which start
    # there while the routes hold). B's address then moves to C's port: the next long
    # burst to it must go to C, none to B, as the MAC table now says.
    sw = make_switch(["a", "b", "c"])
    a = sw.guest("a", 0xA, dimm=4 * DIMM, tx_size=8192)
    b = sw.guest("b", 0xB, dimm=2 * DIMM, rx_size=4096)
    c = sw.guest("c", 0xC, dimm=2 * DIMM, rx_size=4096)
    for d in (a, b, c):
        d.post_rx(8)
    for n, d in enumerate((a, b, c)):
        _hello(d, [x for x in (a, b, c) if x is not d], 100 + n)
    count = 2 * TX_BUDGET + 100       # three turns, of several full bursts
    fds = [fd for d in (a, b, c) for fd in d.call_fds]
    pid = sw.proc.pid

    def burst(flow: Flow) -> None:
        # Frozen, so that the whole burst is in A's ring before the switch looks at it.
        os.kill(pid, signal.SIGSTOP)
        try:
            for _ in range(count):
                assert a.send(make_frame(b.mac, a.mac, flow.check.flow, flow.sent, flow.rng))
                flow.sent += 1
            a.flush_tx()
        finally:
            os.kill(pid, signal.SIGCONT)

    def receive(d: NetDriver, flow: Flow) -> None:
        def done() -> bool:
            a.reap_tx()
            for frame in d.reap_rx():
                flow.check.check(frame)
            return flow.check.received == count
        _wait(done, f"{count} frames of flow {flow.check.flow}", fds)

    assert b.post_rx(count) == count and c.post_rx(count) == count
    to_b = Flow(1, a, b, seed=11)
    burst(to_b)
    receive(b, to_b)
    assert c.reap_rx() == []

    # B's address now speaks from C's port.
    moved = make_frame(a.mac, b.mac, 7, 0, random.Random(7))
    assert c.send(moved)
    c.flush_tx()
    _wait(lambda: any(g == moved for g in a.reap_rx()), "A to hear B's address from C", fds)

    to_c = Flow(2, a, b, seed=12)     # addressed to B's MAC, which is C's port's now
    burst(to_c)
    receive(c, to_c)
    assert b.reap_rx() == []
    ports = sw.ports()
    assert ports["b"]["tx_frames"] == 2 + count and ports["c"]["tx_frames"] == 2 + count
    assert all(ports[n]["tx_drops"] == {} and ports[n]["rx_drops"] == {} for n in "abc")
