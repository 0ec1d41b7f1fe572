"""DPDK testpmd ``txonly`` -> ``pyvhost net`` (the switch) -> testpmd ``rxonly``.

The source transmits as fast as it can, far faster than the switch forwards, so its
transmit ring stays full: each of its frames waits for the switch to return the chain.
That is where DPDK 22.11's virtio_user crashed while pyvhost wrote the used ring's index
with ``struct.pack_into`` (which stores 0 first); the test keeps the source sending for a
while, then checks that every count agrees along the path: source -> port A -> port B ->
sink.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from support.procs import Procs, Started, wait_for_socket
from support.testpmd import accumulated_stats

pytestmark = pytest.mark.dpdk

SOURCE_MAC, SINK_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"
#: How long the source transmits (the crash came within 1-10 s; not a speed limit).
SECONDS = 15
#: Largest ring testpmd may use; bounds the frames in flight when a side stops.
MAX_RING = 1024



def _enter(p: Started) -> None:
    p.send("")
    assert p.proc.wait(60) == 0, p.output()[-3000:]


def _departed_ports(output: str) -> dict[str, dict[str, Any]]:
    """The switch's per-port counters from the JSON line ``pyvhost net`` prints at exit."""
    for line in reversed(output.splitlines()):
        if line.startswith("{") and '"switch"' in line:
            switch = json.loads(line)["switch"]
            ports = [*switch.get("ports", []), *switch.get("departed", [])]
            return {str(p["name"]).split("#")[0]: p for p in ports}
    raise AssertionError(f"pyvhost printed no switch counters:\n{output[-3000:]}")


def test_txonly_through_the_switch_to_rxonly(procs: Procs, tmp_path: Path) -> None:
    sock_a, sock_b = tmp_path / "a.sock", tmp_path / "b.sock"
    sw = procs.pyvhost("net", "--socket", str(sock_a), "--socket", str(sock_b))
    wait_for_socket(sock_b, sw.proc)
    # The sink polls on core 0, the source on core 1.
    sink = procs.testpmd(f"net_virtio_user0,path={sock_b},queues=1,mac={SINK_MAC}",
                         "--forward-mode=rxonly", name="sink",
                         eal_args=("--main-lcore", "1"))
    sink.wait_output("Press enter to exit")
    source = procs.testpmd(f"net_virtio_user0,path={sock_a},queues=1,mac={SOURCE_MAC}",
                           "--forward-mode=txonly", f"--eth-peer=0,{SINK_MAC}",
                           name="source")
    source.wait_output("Press enter to exit")
    for _ in range(SECONDS * 5):
        for p in (source, sink):
            assert p.proc.poll() is None, (f"{p.log.name} exited with {p.proc.returncode}"
                                           f":\n{p.output()[-3000:]}")
        time.sleep(0.2)
    _enter(source)
    time.sleep(2)  # the switch forwards what the source left in its ring
    _enter(sink)
    tx = accumulated_stats(source.output())
    rx = accumulated_stats(sink.output())
    assert procs.stop(sw) == 0, sw.output()[-3000:]
    ports = _departed_ports(sw.output())
    a, b = ports["a.sock"], ports["b.sock"]

    assert rx.rx_packets > 20 * MAX_RING, sink.output()[-3000:]
    # Into the switch: frames the source sent, all but those left in its ring.
    assert tx.tx_packets - MAX_RING <= a["rx_frames"] <= tx.tx_packets
    assert a["rx_drops"] == {}, a
    assert a["rx_bytes"] == 64 * a["rx_frames"]
    # Through it: the sink's MAC is never learned (rxonly sends nothing), so each frame
    # is flooded to the one other port, and either written there or dropped for lack
    # of receive buffers when the sink fell behind.
    assert b["tx_frames"] + sum(b["tx_drops"].values()) == a["rx_frames"], b
    assert set(b["tx_drops"]) <= {"no_rx_buffer"}, b
    # Out of it: what the sink counted, plus at most a ring it no longer polled.
    assert 0 <= b["tx_frames"] - rx.rx_packets <= MAX_RING
