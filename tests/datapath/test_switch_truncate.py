"""A front-end shrinks guest memory under the switch's live rings: real processes.

``pyvhost net`` switches three guests (pyvhost's own front-end and virtio-net driver,
:mod:`support.netdriver`); B and C exchange sequenced frames both ways. Guest A then
truncates the memfd of its boot RAM, where its rings live, and either kicks its transmit
queue (the fault comes while its frames are pulled: the ingress port's memory) or stays
quiet while B floods a broadcast, which the switch must write into A's receive ring
(the fault comes while the frame is pushed: an egress port's memory, in the middle of a
burst that also serves C). On the compiled data path the process survives either way: A
alone is closed and its fds and mappings released, C gets the broadcast, and B and C keep
forwarding. On the pure-Python path nothing can catch the SIGBUS: the process dies of it
(as DPDK 22.11 does; see pyvhost.datapath).
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import time
from pathlib import Path

import pytest

from pyvhost.tools.process import pyvhost_argv
from support.netdriver import TIMEOUT, Duplex, NetDriver, mac, make_frame, wait_any
from support.procs import Procs, Started, wait_for_socket

from .rings import boot_ram_fd, kick_tx, reflected_guest, region_names
from .test_truncate import held, wait_held

BROADCAST = b"\xff" * 6


def start_switch(procs: Procs, paths: list[Path], *, pure: bool) -> Started:
    env = {k: v for k, v in os.environ.items() if k != "PYVHOST_PURE"}
    if pure:
        env["PYVHOST_PURE"] = "1"
    argv = ["net", "--no-stats"]
    for p in paths:
        argv += ["--socket", str(p)]
    s = procs.start(pyvhost_argv(*argv), "pyvhost", env=env, stop_signal=signal.SIGINT)
    wait_for_socket(paths[-1], s.proc)
    return s


def broadcast_reaches(src: NetDriver, dst: NetDriver, seq: int) -> None:
    """``src`` floods one broadcast; wait until ``dst`` has it."""
    dst.post_rx()
    assert src.send(make_frame(BROADCAST, src.mac, 9, seq, random.Random(seq)))
    src.flush_tx()
    deadline = time.monotonic() + TIMEOUT
    got: list[bytes] = []
    while not got:
        assert time.monotonic() < deadline, "the broadcast did not arrive"
        src.reap_tx()
        got = dst.reap_rx()
        if not got:
            wait_any(dst.call_fds, 0.05)
    assert len(got) == 1 and got[0][:6] == BROADCAST and got[0][6:12] == src.mac


@pytest.mark.skipif(importlib.util.find_spec("pyvhost.datapath._native") is None,
                    reason="the compiled data path is not built")
@pytest.mark.parametrize("side", ["ingress", "egress"])
@pytest.mark.usefixtures("net_workers")
def test_switch_survives_a_shrunken_region(procs: Procs, short_dir: Path, side: str) -> None:
    paths = [short_dir / f"{n}.sock" for n in "abc"]
    be = start_switch(procs, paths, pure=False)
    be.wait_output("data path: compiled")
    a, b, c = (reflected_guest(str(p), mac(i + 1)) for i, p in enumerate(paths))
    try:
        # A talks too: the switch knows its MAC and has written into its ring.
        broadcast_reaches(a, b, 0)
        c.reap_rx()
        duplex = Duplex(b, c, seed=3, limit=200)
        duplex.run_until(lambda: duplex.complete, "B and C to exchange 200 frames each")
        a_names = region_names(a)
        assert held(be.pid, a_names) == (2, 2)  # boot RAM and DIMM: one fd, one mapping each
        a.post_rx()
        os.ftruncate(boot_ram_fd(a), 0)
        if side == "ingress":
            kick_tx(a)                 # the switch pulls from A's ring: gone
        else:
            broadcast_reaches(b, c, 1)  # to A and C: A's ring is gone, C gets it
        be.wait_output("SIGBUS at host address", timeout=TIMEOUT)
        assert be.proc.poll() is None, f"the back-end died:\n{be.output()[-3000:]}"
        wait_held(be.pid, a_names, (0, 0))   # A's connection closed, its memory let go
        # B and C go on, through the same process; a flood now reaches C (A has left).
        duplex.limit = 600
        duplex.run_until(lambda: duplex.complete, "B and C to go on after A's fault")
        broadcast_reaches(b, c, 2)
        assert be.proc.poll() is None, be.output()[-3000:]
    finally:
        for drv in (a, b, c):
            drv.close()


def test_pure_switch_dies_of_a_shrunken_region(procs: Procs, short_dir: Path) -> None:
    """What the fallback does (documented in pyvhost.datapath): SIGBUS kills it."""
    paths = [short_dir / f"{n}.sock" for n in "ab"]
    be = start_switch(procs, paths, pure=True)
    be.wait_output("data path: python")
    a, b = (reflected_guest(str(p), mac(i + 1)) for i, p in enumerate(paths))
    try:
        broadcast_reaches(a, b, 0)
        os.ftruncate(boot_ram_fd(a), 0)
        kick_tx(a)
        be.proc.wait(TIMEOUT)
        assert be.proc.returncode == -signal.SIGBUS, be.output()[-3000:]
    finally:
        a.close()
        b.close()
