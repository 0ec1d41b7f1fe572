"""Per-connection state is freed when the connection ends: ``pyvhost net``'s resident
memory stays flat over thousands of connect / handshake / close cycles.

Each cycle is what QEMU 7.2 does at VM start (features, protocol features, owner, two
ADD_MEM_REG, both rings with their eventfds, DRIVER_OK) and then a hang-up; the back-end
maps the regions, creates the device (a reflector, or a switch port that joins and leaves
the switch), and must drop all of it. Before the fix the reflector's devices were kept
for the exit statistics: about 0.4 KiB per connection, 2 MiB per 5,000.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from backend.harness import NetPort
from backend.rawclient import RawClient
from pyvhost.backend.control import fetch_status
from support.procs import Procs

from .conftest import TIMEOUT, start_net, wait_listening

WARM_UP = 500
CYCLES = 5000
#: The bound on growth over CYCLES after the warm-up: half of what the old leak took
#: (0.4 KiB x 5,000), and far above the noise of a steady process (a few pages).
BOUND = 1 << 20


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _settled(ctl: Path, closed: int) -> None:
    """Until the back-end has ended all ``closed`` connections (its own count)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        state = fetch_status(str(ctl))
        if state["connections_closed"] == closed and not state["connections"]:
            return
        assert time.monotonic() < deadline, f"back-end still has connections: {state}"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["reflect", "switch"])
def test_rss_stays_flat_over_connect_close_cycles(procs: Procs, short_dir: Path,
                                                  mode: str) -> None:
    path, ctl = short_dir / "net.sock", short_dir / "ctl.sock"
    args = ["--socket", str(path), "--control", str(ctl)]
    net = start_net(procs, *args, *(["--reflect"] if mode == "reflect" else []),
                    name=f"net-{mode}")
    wait_listening(net, path, ctl)
    port = NetPort(str(path), tag=f"rss-{mode}")  # its memory and rings serve every cycle
    done = 0

    def cycles(n: int) -> None:
        nonlocal done
        for _ in range(n):
            if done:
                port.client = RawClient.connect(str(path))
            port.start()
            port.client.close()
            done += 1
        _settled(ctl, done)

    try:
        cycles(WARM_UP)
        before = _rss(net.pid)
        cycles(CYCLES)
        after = _rss(net.pid)
    finally:
        port.close()
    growth = after - before
    print(f"\n{mode}: RSS {before / 1024:.0f} KiB after {WARM_UP} warm-up cycles, "
          f"{after / 1024:.0f} KiB after {CYCLES} more: {growth / 1024:+.0f} KiB "
          f"({growth / CYCLES:+.1f} B per connection; bound {BOUND / 1024:.0f} KiB)")
    assert growth < BOUND, net.output()[-2000:]
    assert procs.stop(net) == 0, net.output()[-3000:]
    if mode == "reflect":
        # The exit statistics still count every connection (folded in as each closed).
        assert f'"connections": {WARM_UP + CYCLES}' in net.output(), net.output()[-2000:]
