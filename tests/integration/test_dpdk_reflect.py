"""DPDK testpmd's virtio_user front-end (C) exchanges traffic with ``pyvhost net --reflect``.

testpmd sends a first burst (``--tx-first``) and then forwards everything it receives
back out of the same port (``io`` mode), so frames circulate between the two; both sides
count, and the counts must agree.

In ``txonly`` mode testpmd transmits as fast as it can, so its transmit ring stays full
and every frame waits for pyvhost to return its chain through the used ring. That is the
regression test for the used ring's index being written in one store: with
``struct.pack_into`` the index went through 0 on its way to the new value, and testpmd,
reading 0, freed chains it had never given out and crashed within seconds (SIGSEGV in
librte_net_virtio).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from support.procs import Procs, wait_for_socket
from support.testpmd import accumulated_stats

pytestmark = pytest.mark.dpdk


#: How long testpmd transmits; it crashed within 1-10 s before the fix (not a speed limit).
TXONLY_SECONDS = 15
#: Largest ring testpmd may use; bounds the frames still in flight when it stops.
MAX_RING = 1024


def _pyvhost_stats(output: str) -> dict[str, int]:
    for line in reversed(output.splitlines()):
        if line.startswith("{") and '"stats"' in line:
            stats: dict[str, int] = json.loads(line)["stats"]
            return stats
    raise AssertionError(f"pyvhost printed no stats:\n{output[-2000:]}")


@pytest.mark.usefixtures("net_workers")
def test_testpmd_virtio_user_traffic_through_reflector(procs: Procs, tmp_path: Path) -> None:
    sock = tmp_path / "vh0.sock"
    backend = procs.pyvhost("net", "--socket", str(sock), "--reflect")
    wait_for_socket(sock, backend.proc)
    fe = procs.testpmd(f"net_virtio_user0,path={sock},queues=1",
                       "--forward-mode=io", "--tx-first", name="testpmd-fe")
    # Let frames circulate, then stop testpmd the way an operator does (Enter).
    fe.wait_output("Press enter to exit", timeout=60)
    time.sleep(4)
    fe.send("")
    assert fe.proc.wait(60) == 0, fe.output()
    stats = accumulated_stats(fe.output())
    assert procs.stop(backend) == 0, backend.output()
    ours = _pyvhost_stats(backend.output())

    # Frames really went round: many more than the first burst of 32.
    assert stats.rx_packets > 1000, fe.output()
    assert stats.rx_dropped == 0 and stats.tx_dropped == 0
    # Every frame testpmd got back was reflected by pyvhost, and pyvhost reflected only
    # frames testpmd sent: rx(testpmd) <= reflected <= received(pyvhost) <= tx(testpmd).
    assert stats.rx_packets <= ours["rx_frames"] <= ours["tx_frames"] <= stats.tx_packets
    # At most the frames in flight when testpmd stopped are unaccounted for (two rings).
    assert stats.tx_packets - stats.rx_packets <= 2 * 1024
    assert ours["drop_malformed"] == 0 and ours["drop_too_big"] == 0
    assert ours["tx_bytes"] == 64 * ours["tx_frames"]  # testpmd's default txonly/io frames



@pytest.mark.parametrize("segments", ["64", "32,32"], ids=["one-segment", "two-segments"])
def test_testpmd_txonly_against_a_slower_reflector(procs: Procs, tmp_path: Path,
                                                   segments: str) -> None:
    """testpmd transmits as fast as it can for a while and stays alive; every frame
    pyvhost took is one testpmd sent. Two-segment frames go through indirect
    descriptors (testpmd uses them when the header can not be pushed into the mbuf and
    RING_INDIRECT_DESC is negotiated, which the reflector offers)."""
    sock = tmp_path / "vh0.sock"
    backend = procs.pyvhost("net", "--socket", str(sock), "--reflect")
    wait_for_socket(sock, backend.proc)
    fe = procs.testpmd(f"net_virtio_user0,path={sock},queues=1",
                       "--forward-mode=txonly", f"--txpkts={segments}", name="testpmd-tx")
    fe.wait_output("Press enter to exit")
    for _ in range(TXONLY_SECONDS * 5):
        # A crash shows as an exit (SIGSEGV: -11) while it should still be sending.
        assert fe.proc.poll() is None, (f"testpmd exited with {fe.proc.returncode}:\n"
                                        + fe.output()[-3000:])
        time.sleep(0.2)
    fe.send("")
    assert fe.proc.wait(60) == 0, fe.output()[-3000:]
    stats = accumulated_stats(fe.output())
    assert procs.stop(backend) == 0, backend.output()
    ours = _pyvhost_stats(backend.output())

    # The transmit ring went round many times (the crash needed a few laps at most).
    assert ours["tx_frames"] > 20 * MAX_RING, ours
    # pyvhost took only frames testpmd sent, and all but those left in the ring.
    assert stats.tx_packets - MAX_RING <= ours["tx_frames"] <= stats.tx_packets
    assert ours["drop_malformed"] == 0 and ours["drop_too_big"] == 0
    assert ours["tx_bytes"] == 64 * ours["tx_frames"]
