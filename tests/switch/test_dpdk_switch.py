"""Two DPDK testpmd virtio_user front-ends (C) exchange traffic through ``pyvhost net``.

Both run ``macswap``: A injects a first burst addressed to B (``start tx_first``), B sends
each frame back to A, A back to B, and so on, so the frames go round through the switch
as known unicast in both directions, and both MAC addresses are learned. Both testpmds
are interactive (commands on stdin): ``stop`` prints their counts while their ports stay
up, the switch drains what is still in their transmit rings, and then its per-port
counters (from the control socket) must match testpmd's exactly on the way in, and within
the frames left in receive rings on the way out.

A one-way txonly -> rxonly run, which keeps the sender's transmit ring full, is in
tests/integration/test_dpdk_switch_txonly.py.
"""

from __future__ import annotations

import re
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from backend.harness import HDR, NET_FEATURES, NetPort
from pyvhost.backend.control import fetch_status
from support.procs import Procs, Started, wait_for_socket
from support.ring import Buffer
from support.testpmd import ForwardStats, accumulated_stats

from .test_offload import ACK, PSH, tcp_frame, verifies
from .test_vhost_ports import CSUM_TSO_TX, GUEST_TSO

pytestmark = pytest.mark.dpdk

MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
#: Ring sizes testpmd uses by default; bounds what can be in flight when both stop.
RING = 256


def _settled(ctl: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The back-end's status once the switch's port counters stop moving (it drains what
    testpmd queued before it stopped), and the switch's part of it."""
    previous: object = None
    deadline = time.monotonic() + 60
    while True:
        state = fetch_status(str(ctl))
        switch = state["switch"]
        assert isinstance(switch, dict)
        if switch["ports"] == previous:
            return state, switch
        assert time.monotonic() < deadline, state
        previous = switch["ports"]
        time.sleep(0.5)


def _quit(*pmds: Started) -> None:
    for p in pmds:
        p.send("quit")
        assert p.proc.wait(60) == 0, p.output()[-3000:]


def _check_port_counters(switch: dict[str, Any], stats_a: ForwardStats,
                         stats_b: ForwardStats, in_rings: int) -> tuple[Any, Any]:
    """Ports a.sock and b.sock against testpmd A's and B's counts: every frame queued
    entered the switch, none was dropped, and what went out is what testpmd counted plus
    at most ``in_rings`` frames it had stopped polling for. Returns both ports."""
    ports = {str(p["name"]).split("#")[0]: p for p in switch["ports"]}
    pa, pb = ports["a.sock"], ports["b.sock"]
    assert stats_a.tx_dropped == 0 and stats_b.tx_dropped == 0
    # In: every frame a testpmd queued entered the switch.
    assert pa["rx_frames"] == stats_a.tx_packets
    assert pb["rx_frames"] == stats_b.tx_packets
    # Through: known unicast, nothing dropped anywhere.
    for p in (pa, pb):
        assert p["rx_drops"] == {} and p["tx_drops"] == {}, p
    assert pb["tx_frames"] == pa["rx_frames"] and pa["tx_frames"] == pb["rx_frames"]
    # Out: what testpmd counted, plus at most the frames left in its receive rings.
    assert 0 <= pa["tx_frames"] - stats_a.rx_packets <= in_rings
    assert 0 <= pb["tx_frames"] - stats_b.rx_packets <= in_rings
    return pa, pb


def _macswap_for_5s(a: Started, b: Started) -> tuple[ForwardStats, ForwardStats]:
    """B forwards, A sends two bursts first: frames circulate A -> switch -> B -> switch
    -> A for 5 s. Returns both testpmds' accumulated statistics after ``stop``."""
    for p in (a, b):
        p.wait_output("testpmd> ")
    b.send("start")
    a.send("start tx_first 2")
    time.sleep(5)
    for p in (a, b):
        p.send("stop")
    for p in (a, b):
        p.wait_output("Accumulated forward statistics")
    return accumulated_stats(a.output()), accumulated_stats(b.output())


@pytest.mark.usefixtures("net_workers")
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
    stats_a, stats_b = _macswap_for_5s(a, b)

    # The switch drains what testpmd queued before it stopped; then its counters settle.
    _, switch = _settled(ctl)
    _quit(a, b)

    assert stats_a.rx_packets > 1000, a.output()[-3000:]
    pa, _ = _check_port_counters(switch, stats_a, stats_b, RING)
    assert pa["rx_bytes"] == 64 * stats_a.tx_packets  # testpmd's default 64-byte frames
    learned = {e["mac"]: e["port"].split("#")[0]
               for e in switch["mac_table"]}
    assert learned == {MAC_A: "a.sock", MAC_B: "b.sock"}
    assert procs.stop(sw) == 0, sw.output()


_STREAM = re.compile(r"Forward Stats for RX Port=\s*(\d+)/Queue=\s*(\d+) -> TX Port=\s*\d+/"
                     r"Queue=\s*\d+ -+\s*RX-packets:\s*(\d+)")


def _rx_per_queue(output: str) -> dict[int, int]:
    """RX packets per queue from testpmd's per-stream statistics (printed at ``stop`` when
    there are more streams than ports)."""
    found: dict[int, int] = {}
    for _port, queue, rx in _STREAM.findall(output):
        found[int(queue)] = int(rx)
    return found


@pytest.mark.usefixtures("net_workers")
def test_two_testpmds_with_two_queue_pairs(procs: Procs, tmp_path: Path) -> None:
    """Both front-ends with queues=2: DPDK's virtio_user serves the control queue itself
    and enables both pairs with SET_VRING_ENABLE; the switch serves both transmit queues
    and spreads flows over both receive queues (A sends many flows)."""
    sock_a, sock_b, ctl = tmp_path / "a.sock", tmp_path / "b.sock", tmp_path / "ctl.sock"
    sw = procs.pyvhost("net", "--socket", str(sock_a), "--socket", str(sock_b),
                       "--queue-pairs", "2", "--control", str(ctl))
    wait_for_socket(ctl, sw.proc)
    queues = ("--rxq=2", "--txq=2")
    b = procs.testpmd(f"net_virtio_user0,path={sock_b},queues=2,mac={MAC_B}",
                      "-i", "--forward-mode=macswap", *queues, name="testpmd-b",
                      eal_args=("--main-lcore", "1"))
    a = procs.testpmd(f"net_virtio_user0,path={sock_a},queues=2,mac={MAC_A}",
                      "-i", "--forward-mode=macswap", *queues, "--txonly-multi-flow",
                      f"--eth-peer=0,{MAC_B}", name="testpmd-a")
    stats_a, stats_b = _macswap_for_5s(a, b)
    per_queue_b = _rx_per_queue(b.output())

    state, switch = _settled(ctl)
    conns = state.get("connections")
    _quit(a, b)

    assert stats_a.rx_packets > 1000, a.output()[-3000:]
    _check_port_counters(switch, stats_a, stats_b, 2 * RING)
    # Both of B's receive queues got traffic: the flows were spread.
    assert set(per_queue_b) == {0, 1} and min(per_queue_b.values()) > 0, \
        (per_queue_b, b.output()[-3000:], conns)
    assert procs.stop(sw) == 0, sw.output()


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _tcp4(frame: bytes) -> tuple[int, int, bytes]:
    """Sequence number, flags and payload of a no-offload IPv4/TCP frame (no options)
    whose IP and TCP checksums must verify."""
    assert frame[:10] == bytes(10), frame[:HDR].hex()
    eth = frame[HDR:]
    ip, tcp = eth[14:34], eth[34:]
    assert verifies(ip), "IPv4 header checksum"
    pseudo = ip[12:20] + struct.pack(">xBH", 6, len(tcp))
    assert verifies(pseudo + tcp), "TCP checksum"
    return struct.unpack_from(">I", tcp, 4)[0], tcp[13], tcp[20:]


def test_testpmd_offload_headers_are_carried(procs: Procs, tmp_path: Path) -> None:
    """A real front-end's offload headers: testpmd's ``csum`` engine with TCP checksum
    offload and TSO (segment size 800) sends what it receives back, broadcast. An
    in-process guest T (GUEST_CSUM, GUEST_TSO4) sends it a 2048-byte TCP payload as one
    GSO frame (gso_size 1400): the switch segments it for testpmd (which did not
    negotiate GUEST_TSO4), testpmd returns the 1400-byte segment as a GSO frame of its own
    (NEEDS_CSUM, gso_size 800) and the 648-byte one with NEEDS_CSUM only. T gets both
    with testpmd's headers; P (no offload) gets them segmented and checksummed."""
    sock_a, sock_t, sock_p = tmp_path / "a.sock", tmp_path / "t.sock", tmp_path / "p.sock"
    ctl = tmp_path / "ctl.sock"
    sw = procs.pyvhost("net", "--socket", str(sock_a), "--socket", str(sock_t),
                       "--socket", str(sock_p), "--control", str(ctl))
    wait_for_socket(ctl, sw.proc)
    a = procs.testpmd(f"net_virtio_user0,path={sock_a},queues=1,mac={MAC_A}",
                      "-i", "--forward-mode=csum", "--eth-peer=0,ff:ff:ff:ff:ff:ff",
                      name="testpmd-csum")
    a.wait_output("testpmd> ")
    # Offloads change only on a stopped port; testpmd then renegotiates the features.
    for line in ("port stop 0", "csum set ip sw 0", "csum set tcp hw 0", "tso set 800 0",
                 "port start 0", "start"):
        a.send(line)
    a.wait_output("csum packet forwarding")
    a.wait_output("Tx offloads=0x28")  # TCP_CKSUM | TCP_TSO
    t = NetPort(str(sock_t), tag="t", features=GUEST_TSO | CSUM_TSO_TX).start()
    p = NetPort(str(sock_p), tag="p", features=NET_FEATURES).start()
    try:
        rx: dict[tuple[str, int], int] = {}
        for tag, port in (("t", t), ("p", p)):
            for _ in range(8):
                gpa = port.pool.alloc()
                rx[tag, port.rx.add([Buffer(gpa, 4096, True)])] = gpa
            port.rx.kick()
        payload = bytes(i * 13 & 0xFF for i in range(2048))
        built = tcp_frame(payload, mss=1400, flags=ACK | PSH, seq=5000, ip_id=100)
        sent = bytearray(built.frame)
        sent[HDR:HDR + 12] = _mac(MAC_A) + _mac("02:00:00:00:00:0b")
        gpa = t.pool.alloc()
        t.guest.write(gpa, bytes(sent))
        t.tx.add([Buffer(gpa, len(sent))])
        t.tx.kick()
        t.tx.wait_used(1)

        got_t = [t.guest.read(rx["t", h], n) for h, n in t.rx.wait_used(2, timeout=60)]
        got_p = [p.guest.read(rx["p", h], n) for h, n in p.rx.wait_used(5, timeout=60)]
        a.send("stop")
        a.wait_output("Accumulated forward statistics")
        state = fetch_status(str(ctl))
    finally:
        t.close()
        p.close()
    a.send("quit")
    assert a.proc.wait(60) == 0, a.output()[-3000:]
    assert procs.stop(sw) == 0, sw.output()

    # T: testpmd's own headers (virtio_net_hdr as DPDK's virtio PMD writes them).
    first, second = got_t
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = \
        struct.unpack_from("<BBHHHH", first)
    assert (flags, gso_type, gso_size, csum_start, csum_offset) == (1, 1, 800, 34, 16)
    assert len(first) == HDR + 54 + 1400
    assert second[0:2] == b"\x01\x00" and len(second) == HDR + 54 + 648
    assert first[HDR:HDR + 6] == b"\xff" * 6 and first[HDR + 6:HDR + 12] == _mac(MAC_A)
    assert first[HDR + 54:] + second[HDR + 54:] == payload
    # P: no offload negotiated. First T's own frame (flooded: testpmd's MAC is not
    # learned yet) cut at 1400; then testpmd's, cut at 800, and the 648-byte one; each
    # with complete IP and TCP checksums, sequence numbers following on, payload intact.
    assert [len(f) - HDR - 54 for f in got_p] == [1400, 648, 800, 600, 648]
    segments = [_tcp4(f) for f in got_p]
    assert [seq for seq, _, _ in segments] == [5000, 6400, 5000, 5800, 6400]
    assert [flags for _, flags, _ in segments] == [ACK, ACK | PSH, ACK, ACK, ACK | PSH]
    assert b"".join(data for _, _, data in segments[:2]) == payload
    assert b"".join(data for _, _, data in segments[2:]) == payload
    assert [f[HDR + 6:HDR + 12] for f in got_p] == [_mac("02:00:00:00:00:0b")] * 2 \
        + [_mac(MAC_A)] * 3
    switch = state["switch"]
    assert isinstance(switch, dict)
    for port in switch["ports"]:
        assert port["rx_drops"] == {} and port["tx_drops"] == {}, port
