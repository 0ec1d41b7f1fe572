"""What ``pyvhost lab`` relies on in ``pyvhost net``, without VMs (fast): ``--no-mem-slots``
withholds CONFIGURE_MEM_SLOTS, and the control socket reports when the last memory-table
update was taken off the socket and when it was in force, on the shared monotonic clock,
the CPU time and the wait for bursts it took, and the slowest update so far.

A real ``pyvhost net`` process, driven by pyvhost's own front-end the way QEMU 7.2 does.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from pyvhost.backend.control import fetch_status
from pyvhost.frontend.frontend import Frontend
from pyvhost.frontend.memory import FrontendMemory, MiB
from pyvhost.protocol.constants import ProtocolFeature
from support.procs import Procs


@pytest.mark.parametrize(("mem_slots", "workers"), [(True, 1), (False, 1), (True, 2)],
                         ids=["mem-slots", "no-mem-slots", "mem-slots-workers"])
def test_net_mem_slots_option_and_memory_update_times(procs: Procs, tmp_path: Path,
                                                      mem_slots: bool, workers: int) -> None:
    sock, ctl = tmp_path / "vh.sock", tmp_path / "ctl.sock"
    procs.pyvhost_net(sock, ctl, "--no-stats", "--mem-slots" if mem_slots else "--no-mem-slots",
                      "--workers", str(workers))
    memory = FrontendMemory()
    fe = Frontend()
    try:
        fe.connect(sock)
        negotiated = fe.negotiate()
        offered = bool(negotiated.protocol_features_offered
                       & ProtocolFeature.CONFIGURE_MEM_SLOTS)
        assert offered is mem_slots
        # The rest of the library's protocol features are still offered.
        for feature in (ProtocolFeature.REPLY_ACK, ProtocolFeature.STATUS):
            assert negotiated.protocol_features_offered & feature
        state: dict[str, Any] = fetch_status(str(ctl))
        assert state["connections"][0]["last_memory_update"] is None
        assert state["connections"][0]["slowest_memory_update"] is None
        seen: list[dict[str, Any]] = []
        memory.add_boot_ram(256 * MiB)
        for n in range(1, 4):
            if n > 1:
                memory.add_dimm(128 * MiB)
            before = time.monotonic()
            sent = fe.update_memory(memory.regions)
            after = time.monotonic()
            status: dict[str, Any] = fetch_status(str(ctl))
            conn = status["connections"][0]
            update = conn["last_memory_update"]
            expected = "ADD_MEM_REG" if mem_slots else "SET_MEM_TABLE"
            assert sent[-1].startswith(expected) and update["request"] == expected
            assert update["generation"] == conn["memory_generation"]
            assert len(conn["memory"]) == n
            # Both timestamps are on CLOCK_MONOTONIC, which every process shares: the
            # update lies inside the front-end's request-to-ack window.
            assert before <= update["received"] <= update["in_force"] <= after
            # What its time went to: this thread's CPU time (within the wall time it
            # took, give or take the clocks' reading) and the wait for the bursts (none
            # without workers).
            took = update["in_force"] - update["received"]
            assert 0 <= update["cpu_s"] <= took + 1e-3
            assert update["waited_s"] == 0 if workers == 1 else update["waited_s"] >= 0
            seen.append(update)
            slowest = max(seen, key=lambda u: u["in_force"] - u["received"])
            assert conn["slowest_memory_update"] == slowest
    finally:
        fe.close()
        memory.close()
