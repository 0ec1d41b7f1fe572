"""Two network namespaces, each holding one tap port of ``pyvhost net``, ping each other
through the switch. The namespaces are created here and removed in a finalizer; the taps
go away with the pyvhost process (they are not persistent)."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.rawclient import wait_until
from pyvhost.backend.status_cli import fetch_status
from support.procs import Procs, need, wait_for_socket


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


def test_two_namespaces_ping_through_the_switch(procs: Procs, tmp_path: Path,
                                                netns: list[str]) -> None:
    need("ping", "iputils-ping")
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
