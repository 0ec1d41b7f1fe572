"""Traffic through a real ``pyvhost net`` survives memory hot-plug on both front-ends.

Two guests (pyvhost's own front-end playing QEMU 7.2, plus a virtio-net driver from
:mod:`support.netdriver`) exchange sequenced, checksummed frames both ways through the
switch process while the memory table of each changes :data:`STEPS` times: DIMMs are
hot-added, unplugged, or swapped (one out and one in, in the same update), once as QEMU
sends it without CONFIGURE_MEM_SLOTS (the whole table again, SET_MEM_TABLE) and once with
it (ADD_MEM_REG / REM_MEM_REG).

Receive and transmit buffers live in the DIMMs only, preferably the newest, so frames
cross memory the back-end mapped moments before. A DIMM is unplugged only after the
driver stopped putting buffers there and got back every one it had (what a guest's
offlining guarantees before QEMU's device_del goes through); traffic keeps flowing in the
other DIMMs meanwhile and frames are in flight when each update is sent.

Senders are paced by their receiver's posted buffers, so the switch never has a reason to
drop (it drops only for want of a receive buffer): every frame must arrive exactly once,
in order, intact, and every drop counter must stay zero. Afterwards the switch process
must hold exactly one fd and one mapping per region still plugged, and none once the
guests hung up.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from pyvhost.backend.control import fetch_status
from pyvhost.frontend import GuestRam
from pyvhost.frontend.memory import name_prefix
from pyvhost.tools import procfs
from pyvhost.tools.process import pyvhost_argv
from pyvhost.units import MiB
from support.netdriver import TIMEOUT, Duplex, Flow, NetDriver, mac
from support.procs import Procs, settled_fd_count, wait_for_socket

#: Memory table changes per front-end and run.
STEPS = 100
#: DIMMs with buffers per guest: at least two, so one can drain while the other carries
#: traffic; at most five (boot RAM + 5 stays under SET_MEM_TABLE's 8 regions).
MIN_DIMMS, MAX_DIMMS = 2, 5
DIMM_SIZES = (2 * MiB, 4 * MiB)
#: Frames each flow must carry between two table changes (so traffic never stops).
PER_STEP = 48


def _wait(predicate: Callable[[], bool], what: str | Callable[[], str],
          timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            detail = what if isinstance(what, str) else what()
            raise AssertionError(f"timed out waiting for {detail}")
        time.sleep(0.05)


def _fd_targets(pid: int) -> list[str]:
    fd_dir = f"/proc/{pid}/fd"
    out = []
    for n in sorted(os.listdir(fd_dir), key=int):
        with contextlib.suppress(OSError):
            out.append(f"{n}->{os.readlink(f'{fd_dir}/{n}')}")
    return out


def _status_cli(ctl: Path) -> dict[str, Any]:
    """``pyvhost status --json`` as a user runs it."""
    out = subprocess.run(pyvhost_argv("status", "--json", str(ctl)),
                         capture_output=True, text=True, timeout=TIMEOUT, check=True)
    state = json.loads(out.stdout)
    assert isinstance(state, dict)
    return state


def _table(drv: NetDriver) -> list[tuple[int, int, int]]:
    return sorted((r.guest_phys_addr, r.memory_size, r.userspace_addr)
                  for r in drv.memory.regions)


def _reached(flows: list[Flow], marks: list[int]) -> bool:
    return all(f.check.received >= n for f, n in zip(flows, marks, strict=True))


def _drained(plan: list[tuple[NetDriver, str, GuestRam | None]]) -> bool:
    return all(victim is None or drv.drained(victim) for drv, _, victim in plan)


class Churn:
    """Chooses each guest's next memory change: add, remove or swap a DIMM."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        #: Changes made, per guest and kind.
        self.done: dict[NetDriver, Counter[str]] = defaultdict(Counter)

    def choose(self, drv: NetDriver) -> tuple[str, GuestRam | None]:
        dimms = drv.slots.regions
        if len(dimms) < MIN_DIMMS:
            kinds = ["add"]
        elif len(dimms) == MIN_DIMMS:
            kinds = ["add", "swap"]
        elif len(dimms) >= MAX_DIMMS:
            kinds = ["remove", "swap"]
        else:
            kinds = ["add", "remove", "swap"]
        kind = self.rng.choice(kinds)
        self.done[drv][kind] += 1
        # Any DIMM may go, the newest included: buffers then move back to older ones.
        return kind, (None if kind == "add" else self.rng.choice(dimms))

    def apply(self, drv: NetDriver, kind: str, victim: GuestRam | None) -> None:
        size = self.rng.choice(DIMM_SIZES)
        if kind == "add":
            drv.plug(size)
        else:
            assert victim is not None
            drv.unplug(victim, replace_with=size if kind == "swap" else None)


@pytest.fixture
def two_guests(procs: Procs, socket_dir: Path,
               request: pytest.FixtureRequest) -> Iterator[tuple[int, Path, NetDriver, NetDriver]]:
    mem_slots = bool(request.param)
    paths = [socket_dir / "a.sock", socket_dir / "b.sock"]
    ctl = socket_dir / "ctl.sock"
    sw = procs.pyvhost("net", "--socket", str(paths[0]), "--socket", str(paths[1]),
                       "--control", str(ctl), name="switch")
    # The control socket is listened on last; probing a vhost-user socket would make a port.
    wait_for_socket(ctl, sw.proc)
    a = NetDriver(str(paths[0]), mac(0xA), mem_slots=mem_slots)
    b = NetDriver(str(paths[1]), mac(0xB), mem_slots=mem_slots)
    try:
        yield sw.pid, ctl, a, b
    finally:
        a.close()
        b.close()
        assert sw.proc.poll() is None, f"the switch died:\n{sw.output()[-3000:]}"


@pytest.mark.parametrize("two_guests", [False, True], ids=["set_mem_table", "mem_slots"],
                         indirect=True)
@pytest.mark.usefixtures("net_workers")
def test_traffic_survives_memory_hotplug(
        two_guests: tuple[int, Path, NetDriver, NetDriver]) -> None:
    pid, ctl, a, b = two_guests
    needle = name_prefix()
    fds_before = settled_fd_count(pid)
    assert procfs.measure(pid, needle).matching_fds == 0

    for drv in (a, b):
        drv.start()
        drv.plug(DIMM_SIZES[0])
    duplex = Duplex(a, b, seed=7)
    churn = Churn(seed=11)
    in_flight = 0  # updates sent while the transmit rings held frames

    for step in range(STEPS):
        # Traffic first, so the DIMM plugged last carries frames before it may go.
        marks = [f.check.received + PER_STEP for f in duplex.flows]
        duplex.run_until(partial(_reached, duplex.flows, marks), f"step {step}: traffic")
        plan = [(drv, *churn.choose(drv)) for drv in (a, b)]
        for drv, _, victim in plan:
            if victim is not None:
                drv.drain(victim)
        # Traffic goes on in the other DIMMs until the ones to unplug hold no buffer.
        duplex.run_until(partial(_drained, plan), f"step {step}: the DIMMs to unplug drained")
        for drv, kind, victim in plan:
            duplex.pump()  # frames in both rings while the update goes out
            in_flight += a.tx_outstanding + b.tx_outstanding > 0
            churn.apply(drv, kind, victim)
        # One fd (CPython's mmap keeps a dup) and one mapping per plugged region. Acked
        # means applied: a region gone from a table is unmapped and its fd closed
        # by then (nobody reads the old snapshot), not at hang-up.
        usage = procfs.measure(pid, needle)
        plugged = len(a.memory) + len(b.memory)
        assert (usage.matching_fds, usage.mappings) == (plugged, plugged), (step, usage)
    duplex.finish()
    # The updates really went out under traffic (the rings are typically full: the
    # switch has not caught up with a pump made just before).
    assert in_flight >= STEPS, f"only {in_flight} of {2 * STEPS} updates had frames in flight"

    # Every change was one update of the table, sent the way QEMU 7.2 sends it.
    for drv in (a, b):
        done = churn.done[drv]
        assert done.total() == STEPS and all(done[k] for k in ("add", "remove", "swap")), done
        if drv.fe.uses_mem_slots:
            # One ADD_MEM_REG each for boot RAM and the first DIMM, then one per DIMM added.
            assert drv.memory_requests == {
                "ADD_MEM_REG": 2 + done["add"] + done["swap"],
                "REM_MEM_REG": done["remove"] + done["swap"]}
        else:
            # The boot table, the first DIMM, then the whole table again for each change.
            assert drv.memory_requests == {"SET_MEM_TABLE": 2 + STEPS}
        # Each unplugged DIMM had carried frames: traffic really moved through new memory.
        assert drv.unplugged_served and min(drv.unplugged_served) > 0, drv.unplugged_served

    state = _status_cli(ctl)
    ports = state["switch"]["ports"]
    assert len(ports) == 2 and not state["switch"]["departed"], state["switch"]
    by_name = {p["name"].split("#")[0]: p for p in ports}
    sent_ab, sent_ba = (f.sent for f in duplex.flows)
    assert sent_ab >= STEPS * PER_STEP and sent_ba >= STEPS * PER_STEP
    for sock, sent, received in (("a.sock", sent_ab, sent_ba), ("b.sock", sent_ba, sent_ab)):
        port = by_name[sock]
        assert port["rx_drops"] == {} and port["tx_drops"] == {}, port
        assert (port["rx_frames"], port["tx_frames"]) == (sent, received), port
    # The back-end's tables are exactly the guests', and no queue broke on the way.
    tables = sorted(sorted((r["guest_phys_addr"], r["memory_size"], r["userspace_addr"])
                           for r in conn["memory"]) for conn in state["connections"])
    assert tables == sorted([_table(a), _table(b)])
    for conn in state["connections"]:
        assert all(q["broken"] is None for q in conn["queues"]), conn["queues"]

    a.close()
    b.close()
    _wait(lambda: procfs.measure(pid, needle).matching_fds == 0
          and procfs.measure(pid, needle).mappings == 0,
          lambda: f"the switch to drop guest memory: {procfs.measure(pid, needle)}")
    _wait(lambda: procfs.count_fds(pid) == fds_before,
          lambda: f"the switch's fds back to {fds_before}: now {_fd_targets(pid)}")
    assert fetch_status(str(ctl))["connections"] == []
