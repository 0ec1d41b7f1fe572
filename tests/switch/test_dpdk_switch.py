"""Two DPDK testpmd virtio_user front-ends (C) exchange traffic through ``pyvhost net``.

Both run ``macswap``: A injects a first burst addressed to B (``start tx_first``), B sends
each frame back to A, A back to B, and so on, so the frames go round through the switch
as known unicast in both directions, and both MAC addresses are learned. Both testpmds
are interactive (commands on stdin): ``stop`` prints their counts while their ports stay
up, the switch drains what is still in their transmit rings, and then its per-port
counters (from the control socket) must match testpmd's exactly on the way in, and within
the frames left in receive rings on the way out.

Why not txonly -> rxonly: DPDK 22.11's virtio_user transmit path (split ring, without
IN_ORDER, which pyvhost does not offer) segfaults in librte_net_virtio once a back-end
slower than the generator keeps its transmit ring full (seen with txonly and flowgen, with
and without indirect descriptors; a closed loop never fills the ring).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from pyvhost.backend.status_cli import fetch_status
from support.procs import Procs, Started, wait_for_socket
from support.testpmd import accumulated_stats

pytestmark = pytest.mark.dpdk

MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
#: Ring sizes testpmd uses by default; bounds what can be in flight when both stop.
RING = 256


def _wait_output(p: Started, text: str, count: int = 1, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while p.output().count(text) < count:
        assert p.proc.poll() is None, p.output()[-3000:]
        assert time.monotonic() < deadline, f"no {text!r}:\n{p.output()[-3000:]}"
        time.sleep(0.2)


def _command(p: Started, line: str) -> None:
    assert p.proc.stdin is not None
    p.proc.stdin.write(line.encode() + b"\n")
    p.proc.stdin.flush()


def _switch_state(ctl: Path) -> dict[str, Any]:
    state = fetch_status(str(ctl))["switch"]
    assert isinstance(state, dict)
    return state


def test_two_testpmds_through_the_switch(procs: Procs, tmp_path: Path) -> None:
    sock_a, sock_b, ctl = tmp_path / "a.sock", tmp_path / "b.sock", tmp_path / "ctl.sock"
    sw = procs.pyvhost("net", "--socket", str(sock_a), "--socket", str(sock_b),
                       "--control", str(ctl))
    wait_for_socket(ctl, sw.proc)
    # B forwards on core 0 and A on core 1: two busy-polling loops, not one shared core.
    b = procs.testpmd(f"net_virtio_user0,path={sock_b},queues=1,mac={MAC_B}",
                      "-i", "--forward-mode=macswap", name="testpmd-b",
                      eal_args=("--main-lcore", "1"))
    a = procs.testpmd(f"net_virtio_user0,path={sock_a},queues=1,mac={MAC_A}",
                      "-i", "--forward-mode=macswap", f"--eth-peer=0,{MAC_B}",
                      name="testpmd-a")
    for p in (a, b):
        _wait_output(p, "testpmd> ")
    _command(b, "start")
    _command(a, "start tx_first 2")
    time.sleep(5)
    for p in (a, b):
        _command(p, "stop")
    for p in (a, b):
        _wait_output(p, "Accumulated forward statistics")
    stats_a, stats_b = accumulated_stats(a.output()), accumulated_stats(b.output())

    # The switch drains what testpmd queued before it stopped; then its counters settle.
    previous: object = None
    deadline = time.monotonic() + 60
    while True:
        state = _switch_state(ctl)
        if state["ports"] == previous:
            break
        assert time.monotonic() < deadline, state
        previous = state["ports"]
        time.sleep(0.5)
    ports = {str(p["name"]).split("#")[0]: p for p in state["ports"]}
    pa, pb = ports["a.sock"], ports["b.sock"]
    for p in (a, b):
        _command(p, "quit")
        assert p.proc.wait(60) == 0, p.output()[-3000:]

    assert stats_a.rx_packets > 1000, a.output()[-3000:]
    assert stats_a.tx_dropped == 0 and stats_b.tx_dropped == 0
    # In: every frame a testpmd queued entered the switch.
    assert pa["rx_frames"] == stats_a.tx_packets
    assert pb["rx_frames"] == stats_b.tx_packets
    assert pa["rx_bytes"] == 64 * stats_a.tx_packets  # testpmd's default 64-byte frames
    # Through: known unicast, nothing dropped anywhere.
    for p in (pa, pb):
        assert p["rx_drops"] == {} and p["tx_drops"] == {}, p
    assert pb["tx_frames"] == pa["rx_frames"] and pa["tx_frames"] == pb["rx_frames"]
    # Out: what testpmd counted, plus at most a ring of frames it had stopped polling for.
    assert 0 <= pa["tx_frames"] - stats_a.rx_packets <= RING
    assert 0 <= pb["tx_frames"] - stats_b.rx_packets <= RING
    learned = {e["mac"]: e["port"].split("#")[0]
               for e in state["mac_table"]}
    assert learned == {MAC_A: "a.sock", MAC_B: "b.sock"}
    assert procs.stop(sw) == 0, sw.output()
