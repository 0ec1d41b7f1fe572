"""A reflector whose driver keeps the transmit ring full gives the loop its turn back.

With a driver faster than the data path (the pure-Python one under full load), every
burst comes back full; serving until the ring is seen empty never returned, and the
connection's control messages waited: a memory table update got no reply within 30 s
(benchmarks/bench_hotplug_gap.py). A kick serves at most ``KICK_BURSTS`` full bursts, then
asks its host to serve the queue again on the loop's next turn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from pyvhost import datapath
from pyvhost.backend.device import DeviceHost, QueueContext
from pyvhost.devices import reflect
from pyvhost.devices.reflect import ReflectNet
from pyvhost.devices.virtio_net import TX


class _Queue:
    log = None
    notify_decided = None

    def __init__(self, index: int) -> None:
        self.index = index


class _AlwaysFull:
    """A data path that always takes a full burst: the ring never empties."""

    def __init__(self) -> None:
        self.calls = 0

    def burst(self, mem: object, tx: object, rx: object, hdr_len: int, mrg_rxbuf: bool,
              limit: int, stats: dict[str, int]) -> int:
        self.calls += 1
        if self.calls > 10_000:  # fail, rather than hang, when nothing bounds the kick
            raise AssertionError("the kick never gave the loop its turn back")
        stats["tx_frames"] += limit
        return limit


class _Host(DeviceHost):
    name = "test"

    def __init__(self) -> None:
        self.again: list[int] = []

    def run_device(self, index: int, fn: Callable[[QueueContext], None]) -> None:
        raise NotImplementedError

    def serve_again(self, index: int) -> None:
        self.again.append(index)


class _Ctx:
    mem = None

    def __init__(self) -> None:
        self.queues = {i: _Queue(i) for i in (0, 1)}
        self.accounted: list[tuple[int, int, int]] = []

    def queue(self, index: int) -> _Queue | None:
        return self.queues.get(index)

    def notify(self, index: int) -> None:
        pass

    def account(self, index: int, frames: int, nbytes: int) -> None:
        self.accounted.append((index, frames, nbytes))


def test_a_kick_on_a_ring_that_never_empties_returns_and_asks_to_be_served_again() -> None:
    dev = ReflectNet()
    path = _AlwaysFull()
    dev._path = path  # type: ignore[assignment]
    host = _Host()
    dev.attach(host)
    ctx: Any = _Ctx()
    dev.handle_kick(ctx, TX)
    assert path.calls == reflect.KICK_BURSTS
    assert host.again == [TX]
    # What the bursts took is still counted, once for the kick.
    assert (TX, reflect.KICK_BURSTS * datapath.BURST, 0) in ctx.accounted


@pytest.mark.parametrize("full", [0, 3])
def test_a_ring_seen_empty_ends_the_kick_without_asking_again(full: int) -> None:
    class _Short(_AlwaysFull):
        def burst(self, *args: Any) -> int:
            n = super().burst(*args)
            return n if self.calls <= full else 0

    dev = ReflectNet()
    path = _Short()
    dev._path = path  # type: ignore[assignment]
    host = _Host()
    dev.attach(host)
    dev.handle_kick(_Ctx(), TX)  # type: ignore[arg-type]
    assert path.calls == full + 1 and host.again == []
