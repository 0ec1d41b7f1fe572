"""What the lab reads from ``pyvhost net``'s control socket, and how it splits a step's time.

The status is another process's JSON: a real ``pyvhost net`` answers it here (its
connections are empty without QEMU, so their shape is the one
:meth:`pyvhost.backend.connection.Connection.describe` writes), and malformed fields are
refused with :class:`LabError`, never taken on trust. The timing split is a pure function
over recorded QMP calls and the back-end's update times.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pyvhost.lab.config import LabError
from pyvhost.lab.measure import BackendMeter, Call, _connections, step_timing
from pyvhost.lab.records import MemoryUpdate, Region
from support.procs import Procs


def describe(pid: int = 4242, **changes: Any) -> dict[str, Any]:
    """One connection as pyvhost net's status describes it."""
    conn: dict[str, Any] = {
        "name": "vm1.sock#1", "peer_pid": pid, "phase": "running",
        "protocol_features": ["MQ", "REPLY_ACK"], "memory_generation": 3,
        "memory": [{"guest_phys_addr": 0, "memory_size": 1 << 28, "userspace_addr": 1 << 40,
                    "mmap_offset": 0, "fds_held": 1, "writes": 0, "bytes_written": 0}],
        "last_memory_update": {"request": "SET_MEM_TABLE", "generation": 3,
                               "received": 10.5, "in_force": 10.5003}}
    conn.update(changes)
    return conn


def test_connections_are_matched_to_vms_by_qemu_pid() -> None:
    state = {"connections": [describe(4242), describe(77), "junk"]}
    with pytest.raises(LabError):  # a connection that is not an object is not skipped
        _connections(state, {4242: 0})
    state["connections"] = [describe(4242), describe(77, name="other")]
    (vm,) = _connections(state, {4242: 0}).items()
    assert vm[0] == 0 and vm[1].name == "vm1.sock#1" and vm[1].generation == 3
    assert vm[1].regions == (Region(0, 1 << 28, 1),)
    assert vm[1].last_update == MemoryUpdate("SET_MEM_TABLE", 3, 10.5, 10.5003)


@pytest.mark.parametrize("bad", [
    {"memory_generation": "3"}, {"memory_generation": True}, {"memory": None},
    {"memory": [{"guest_phys_addr": 0, "memory_size": -0.5, "fds_held": 1}]},
    {"protocol_features": ["MQ", 4]}, {"last_memory_update": {"request": "X"}},
    {"name": None},
], ids=lambda bad: next(iter(bad)))
def test_a_malformed_status_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(LabError, match="pyvhost net's status has"):
        _connections({"connections": [describe(**bad)]}, {4242: 0})


def test_a_real_back_end(procs: Procs, short_dir: Path) -> None:
    ctl, sock = short_dir / "ctl.sock", short_dir / "vm1.sock"
    net = procs.pyvhost_net(sock, ctl, "--no-stats")
    meter = BackendMeter(str(ctl), net.pid, net.output)
    assert meter.connections({}) == {}
    usage = meter.usage()
    assert usage.fds > 0 and usage.ram_fds == usage.ram_mappings == 0
    assert usage.mappings > 0
    assert meter.switch({}) == ()  # a port is made for each connection
    gone = BackendMeter(str(short_dir / "nothing.sock"), net.pid, lambda: "its log")
    with pytest.raises(LabError, match=r"(?s)did not answer.*its log"):
        gone.status()


def test_a_step_is_split_into_qemu_and_the_back_end() -> None:
    calls = [Call("object-add", 1.0, 1.001, 100.0), Call("device_add", 2.0, 2.010, 101.0)]
    events = [{"event": "ACPI_DEVICE_OST", "timestamp": {"seconds": 101, "microseconds": 40000},
               "data": {"info": {"device": "pyvhost-dimm0", "status": 0}}}]
    before = MemoryUpdate("SET_MEM_TABLE", 1, 0.5, 0.5002)
    update = MemoryUpdate("SET_MEM_TABLE", 2, 2.004, 2.0043)
    t = step_timing("add", "pyvhost-dimm0", calls, events, update, before, 2.1)
    assert t.command == "device_add" and t.qmp_seconds == pytest.approx(0.010)
    assert t.backend_request == "SET_MEM_TABLE" and t.backend_inside_command is True
    assert t.backend_seconds == pytest.approx(0.0003)
    assert t.qemu_seconds == pytest.approx(0.0097)
    assert t.backend_received_after == pytest.approx(0.004)
    assert t.acpi_ost_after == pytest.approx(0.04)
    assert t.mem_total_after == pytest.approx(0.1)
    # No new table (the back-end did not update): no back-end part, no QEMU part.
    same = step_timing("add", "pyvhost-dimm0", calls, [], before, before, None)
    assert (same.backend_request, same.qemu_seconds, same.acpi_ost_after) == (None, None, None)
    # An update after the answer (device_del returns before the guest lets go).
    late = MemoryUpdate("SET_MEM_TABLE", 3, 3.5, 3.5002)
    removed = step_timing("remove", "pyvhost-dimm0", [Call("device_del", 3.0, 3.001, 0.0)],
                          [], late, before, None)
    assert removed.backend_inside_command is False and removed.qemu_seconds is None
    assert step_timing("remove", "x", calls, [], None, None, None).qmp_seconds is None
