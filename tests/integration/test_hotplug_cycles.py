"""The core promise, end to end: 1,000 hot-add/remove cycles against a real ``pyvhost net``
process leave its fds and mappings exactly where they were.

The front-end replays QEMU 7.2's messages: whole-table SET_MEM_TABLE re-sends (fresh fds
each time) without CONFIGURE_MEM_SLOTS, ADD_MEM_REG / REM_MEM_REG with it. The back-end is
measured from outside, through /proc/<pid>, like any other back-end would be.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvhost.frontend.probe import ProbeConfig, run_probe
from support.procs import Procs, wait_for_socket


@pytest.mark.parametrize("mem_slots", [False, True], ids=["set-mem-table", "mem-slots"])
def test_thousand_hotplug_cycles_leave_no_trace(procs: Procs, tmp_path: Path,
                                               mem_slots: bool) -> None:
    sock = tmp_path / "vh.sock"
    backend = procs.pyvhost("net", "--socket", str(sock), "--reflect")
    wait_for_socket(sock, backend.proc)
    report = run_probe(ProbeConfig(str(sock), cycles=1000, regions=2, region_size=2 << 20,
                                   boot_size=16 << 20, pid=backend.pid, mem_slots=mem_slots,
                                   settle=0.05))
    assert report.pid == backend.pid
    assert report.mem_slots is mem_slots
    expected = "ADD_MEM_REG" if mem_slots else "SET_MEM_TABLE"
    assert report.requests_sent.get(expected, 0) >= 2000
    # The probe sees the back-end's mappings at all: with both regions plugged there were
    # two more fds and mappings of our region files than with boot RAM alone.
    assert report.peak.matching_fds == report.before.matching_fds + 2
    assert report.peak.mappings == report.before.mappings + 2
    # Exactly one fd and one mapping per region (CPython's mmap keeps a dup of the fd).
    assert report.before.matching_fds == 1 and report.before.mappings == 1
    # And after 1,000 cycles: nothing grew.
    assert report.after.fds == report.before.fds
    assert report.after.matching_fds == report.before.matching_fds
    assert report.after.mappings == report.before.mappings
    assert report.after.mapped_bytes == report.before.mapped_bytes
    assert not report.leak
    # Hanging up releases the rest.
    assert report.disconnected is not None
    assert report.disconnected.matching_fds == 0 and report.disconnected.mappings == 0
    assert procs.stop(backend) == 0, backend.output()
