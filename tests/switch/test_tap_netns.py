"""Two network namespaces, each holding one tap port of ``pyvhost net``, ping each other
and move TCP data (with the taps' checksum and segmentation offloads on) through the
switch. The namespaces are created here and removed in a finalizer; the taps go away with
the pyvhost process (they are not persistent)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.rawclient import wait_until
from pyvhost.backend.control import fetch_status
from support.procs import Procs, Started, need, wait_for_socket


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=60)


@pytest.fixture
def netns() -> Iterator[list[str]]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces and taps need root")
    need("ip", "iproute2")
    tag = uuid.uuid4().hex[:6]
    names = [f"pyvhost-{tag}-0", f"pyvhost-{tag}-1"]
    made: list[str] = []
    try:
        for name in names:
            _ip("netns", "add", name)
            made.append(name)
        yield names
    finally:
        for name in made:
            _ip("netns", "del", name, check=False)


def _switch_between(procs: Procs, tmp_path: Path,
                    netns: list[str]) -> tuple[Started, Path, list[str]]:
    """``pyvhost net`` with two tap ports, one moved into each namespace as 10.199.0.1
    and .2; returns the switch, its control socket and the taps' names."""
    tag = uuid.uuid4().hex[:4]
    taps = [f"pvt{tag}0", f"pvt{tag}1"]
    ctl = tmp_path / "ctl.sock"
    sw = procs.pyvhost("net", "--tap", taps[0], "--tap", taps[1], "--control", str(ctl))
    wait_for_socket(ctl, sw.proc)
    for i, (tap, ns) in enumerate(zip(taps, netns, strict=True)):
        _ip("link", "set", tap, "netns", ns)
        _ip("-n", ns, "addr", "add", f"10.199.0.{i + 1}/24", "dev", tap)
        _ip("-n", ns, "link", "set", tap, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
    return sw, ctl, taps


def test_two_namespaces_ping_through_the_switch(procs: Procs, tmp_path: Path,
                                                netns: list[str]) -> None:
    need("ping", "iputils-ping")
    sw, ctl, taps = _switch_between(procs, tmp_path, netns)
    ping = subprocess.run(["ip", "netns", "exec", netns[0], "ping", "-c", "3", "-W", "2",
                           "10.199.0.2"], capture_output=True, text=True, timeout=120)
    assert ping.returncode == 0, ping.stdout + ping.stderr + sw.output()

    state = fetch_status(str(ctl))
    switch = state["switch"]
    assert isinstance(switch, dict)
    ports = {p["name"]: p for p in switch["ports"]}
    assert set(ports) == set(taps)
    # Three echo requests one way, three replies back (plus ARP, maybe IPv6 noise).
    for tap in taps:
        assert ports[tap]["rx_frames"] >= 4 and ports[tap]["tx_frames"] >= 4, ports
    assert {e["port"] for e in switch["mac_table"]} == set(taps)

    assert procs.stop(sw) == 0, sw.output()
    final = json.loads(sw.output().strip().splitlines()[-1])
    assert len(final["switch"]["departed"]) == 2
    # Not persistent: the taps went with the process (in whichever namespace they were).
    for tap, ns in zip(taps, netns, strict=True):
        def gone(tap: str = tap, ns: str = ns) -> bool:
            return _ip("-n", ns, "link", "show", tap, check=False).returncode != 0

        wait_until(gone, f"tap {tap} removed")


_SERVER = """
import hashlib, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.199.0.2", 5001))
s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
h, n = hashlib.sha256(), 0
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    h.update(b)
    n += len(b)
print(n, h.hexdigest(), flush=True)
"""

_CLIENT = """
import random, socket, sys
data = random.Random(7).randbytes(int(sys.argv[1]))
c = socket.create_connection(("10.199.0.2", 5001), timeout=120)
c.sendall(data)
c.shutdown(socket.SHUT_WR)
c.recv(1)
"""


def test_tcp_through_the_switch_with_tso(procs: Procs, tmp_path: Path,
                                         netns: list[str]) -> None:
    """Some MiB of TCP between the namespaces, with the taps' offloads on: the kernel
    hands the switch GSO frames larger than the MTU, they cross as one frame each (header
    kept) and the receiving stack gets every byte."""
    import hashlib
    import random

    size = 8 << 20
    sw, ctl, taps = _switch_between(procs, tmp_path, netns)
    server = procs.start(["ip", "netns", "exec", netns[1], sys.executable, "-c", _SERVER],
                         "tcp-server")
    wait_until(lambda: "listening" in server.output(), "server listening", timeout=60)
    client = subprocess.run(["ip", "netns", "exec", netns[0], sys.executable, "-c", _CLIENT,
                             str(size)], capture_output=True, text=True, timeout=300)
    assert client.returncode == 0, client.stderr + sw.output()
    wait_until(lambda: len(server.output().split()) >= 3, "server done", timeout=120)
    got = server.output().split()
    expected = hashlib.sha256(random.Random(7).randbytes(size)).hexdigest()
    assert got[1:3] == [str(size), expected], server.output()

    switch = fetch_status(str(ctl))["switch"]
    assert isinstance(switch, dict)
    ports = {p["name"]: p for p in switch["ports"]}
    sender, receiver = ports[taps[0]], ports[taps[1]]
    for p in (sender, receiver):
        # port_down: a frame (IPv6 noise) sent while the other tap moved namespace.
        assert p["rx_drops"] == {} and set(p["tx_drops"]) <= {"port_down"}, p
    # GSO frames crossed whole: on average far larger than an MTU-sized frame.
    assert sender["rx_bytes"] >= size
    assert sender["rx_bytes"] / sender["rx_frames"] > 1514, sender
    # Every frame the sender's tap gave went out of the receiver's, as it came.
    assert receiver["tx_frames"] + sum(receiver["tx_drops"].values()) == sender["rx_frames"]
    print(f"TCP {size} bytes: {sender['rx_frames']} frames from the sender's tap, "
          f"{sender['rx_bytes'] / sender['rx_frames']:.0f} bytes on average")
    assert procs.stop(sw) == 0, sw.output()
