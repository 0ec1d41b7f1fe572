"""Measurement: everything the lab reads, turned into :mod:`.records`.

- the back-end process's fds and mappings (``/proc/PID/fd`` and ``/proc/PID/maps``);
- the back-end's state from its control socket: each connection's memory table, matched
  to a VM by QEMU's pid, and the switch ports' counters (JSON from another process:
  every field is checked before use);
- VM 1's memory as QEMU has it (QMP), what the planner and the executor said;
- timings: :class:`TimedMonitor` records when each QMP command was sent and answered, and
  :func:`step_timing` splits a step's time into QEMU's part and the back-end's.

It decides nothing (:mod:`.checks` does) and starts nothing (:mod:`.machines` does).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyvhost.backend.control import fetch_status
from pyvhost.hotplug.execute import Outcome
from pyvhost.hotplug.host import page_sizes, read_host
from pyvhost.hotplug.plan import Plan
from pyvhost.hotplug.qmp import Qmp
from pyvhost.hotplug.state import VmState, vhost_regions
from pyvhost.tools import procfs

from .config import LabError
from .records import (
    Backend,
    Connection,
    MemoryDevice,
    MemoryUpdate,
    PlannerVerdict,
    PortCounters,
    QemuMemory,
    QemuOutcome,
    Region,
    SentRegion,
    Timing,
    Usage,
)

#: QEMU names the memfd of every memory-backend-memfd after its type, so this finds the
#: back-end's fds and mappings of guest RAM in /proc/PID/{fd,maps}.
GUEST_RAM_NEEDLE = "memory-backend-memfd"


# -- the back-end -----------------------------------------------------------------------------
class BackendMeter:
    """Reads one back-end: its control socket at ``control``, its process ``pid``.
    ``log`` returns the back-end's output so far, quoted when it does not answer."""

    def __init__(self, control: str, pid: int, log: Callable[[], str]) -> None:
        self.control = control
        self.pid = pid
        self.log = log

    def status(self) -> dict[str, Any]:
        try:
            return fetch_status(self.control)
        except (OSError, ValueError) as e:
            raise LabError(f"pyvhost net's control socket did not answer: {e}\n"
                           + self.log()) from e

    def usage(self) -> Usage:
        try:
            u = procfs.measure(self.pid, GUEST_RAM_NEEDLE)
            total = len(procfs.mappings(self.pid))
        except procfs.ProcfsError as e:
            raise LabError(f"cannot measure the back-end: {e}\n{self.log()}") from e
        return Usage(u.fds, u.matching_fds, total, u.mappings)

    def connections(self, vm_by_pid: Mapping[int, int]) -> dict[int, Connection]:
        """The connections of the VMs in ``vm_by_pid`` (QEMU's pid -> VM index)."""
        return _connections(self.status(), vm_by_pid)

    def backend(self, vm_by_pid: Mapping[int, int]) -> Backend:
        return Backend(self.usage(), _connections(self.status(), vm_by_pid))

    def switch(self, vm_by_pid: Mapping[int, int]) -> tuple[PortCounters, ...]:
        """Each switch port's frame counters, with the VM it serves."""
        state = self.status()
        vm_by_name = {c.name: vm for vm, c in _connections(state, vm_by_pid).items()}
        switch = state.get("switch", {})
        ports = switch.get("ports", []) if isinstance(switch, dict) else []
        return tuple(_port(p, vm_by_name) for p in _list(ports, "switch ports"))


def _connections(state: Mapping[str, Any], vm_by_pid: Mapping[int, int]) -> dict[int, Connection]:
    out = {}
    for conn in _list(state.get("connections", []), "connections"):
        if not isinstance(conn, dict):
            raise LabError(f"pyvhost net's status has a connection = {conn!r}")
        pid = conn.get("peer_pid")  # None until the peer is known
        vm = vm_by_pid.get(pid) if isinstance(pid, int) else None
        if vm is not None:
            out[vm] = _connection(conn)
    return out


def _connection(c: Mapping[str, Any]) -> Connection:
    update = c.get("last_memory_update")
    features = _list(c.get("protocol_features"), "protocol_features")
    if not all(isinstance(f, str) for f in features):
        raise LabError(f"pyvhost net's status has protocol_features = {features!r}")
    return Connection(
        name=_field(c, "name", str), peer_pid=_field(c, "peer_pid", int),
        protocol_features=tuple(features), generation=_field(c, "memory_generation", int),
        regions=tuple(Region(_field(r, "guest_phys_addr", int), _field(r, "memory_size", int),
                             _field(r, "fds_held", int))
                      for r in _list(c.get("memory"), "memory")),
        last_update=None if update is None else MemoryUpdate(
            _field(update, "request", str), _field(update, "generation", int),
            float(_field(update, "received", (int, float))),
            float(_field(update, "in_force", (int, float)))))


def _port(p: Any, vm_by_name: Mapping[str, int]) -> PortCounters:
    vm = vm_by_name.get(_field(p, "name", str))

    def drops(key: str) -> dict[str, int]:
        d = _field(p, key, dict)
        return {str(k): _field(d, k, int) for k in d}

    return PortCounters(None if vm is None else vm + 1, _field(p, "rx_frames", int),
                        _field(p, "tx_frames", int), drops("rx_drops"), drops("tx_drops"))


def _field(obj: Any, key: str, kind: type[Any] | tuple[type[Any], ...]) -> Any:
    """``obj[key]``, which must be a ``kind`` (not a bool where a number is wanted): the
    status comes from another process and is checked before the lab relies on it."""
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise LabError(f"pyvhost net's status has {key} = {value!r}, not {kind!r}")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise LabError(f"pyvhost net's status has {what} = {value!r}, not a list")
    return value


# -- QEMU, the planner, the executor -------------------------------------------------------
def qemu_memory(state: VmState) -> QemuMemory:
    return QemuMemory(
        devices=tuple(MemoryDevice(d.id, d.memdev, d.addr, d.size, d.slot)
                      for d in state.memory_devices),
        plugged_memory=state.plugged_memory,
        vhost_user_regions=tuple(
            SentRegion(r.guest_phys_addr, r.memory_size, r.name)
            for r in vhost_regions(state, page_sizes(state, read_host()))))


def planner_verdict(plan: Plan) -> PlannerVerdict:
    p = plan.prediction
    return PlannerVerdict(
        refusals=plan.refusals,
        predicted_regions=None if p is None else p.vhost_user_regions,
        region_limit=None if p is None else p.vhost_user_region_limit)


def qemu_outcome(o: Outcome) -> QemuOutcome:
    return QemuOutcome(ok=o.ok, done=tuple(o.done), failed_step=o.failed_step, error=o.error,
                       rolled_back=tuple(o.rolled_back), orphans=tuple(o.orphans),
                       acpi_ost=tuple(o.acpi_ost), seconds=round(o.seconds, 4))


# -- timings ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    """One QMP command: when it was sent and answered (monotonic), and sent (wall clock,
    which QMP's event timestamps use)."""

    command: str
    sent: float
    answered: float
    wall: float


@dataclass
class TimedMonitor:
    """A :class:`~pyvhost.hotplug.qmp.Monitor` that records each command's times and every
    event that passed through it, since the last :meth:`clear`."""

    inner: Qmp
    calls: list[Call] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        sent, wall = time.monotonic(), time.time()
        try:
            return self.inner.execute(command, arguments)
        finally:
            self.calls.append(Call(command, sent, time.monotonic(), wall))

    def hmp(self, command_line: str) -> str:
        return str(self.execute("human-monitor-command", {"command-line": command_line}))

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        event = self.inner.next_event(timeout)
        if event is not None:
            self.events.append(event)
        return event

    def time_limit(self, seconds: float) -> contextlib.AbstractContextManager[None]:
        return self.inner.time_limit(seconds)

    def reconnect(self, timeout: float) -> None:
        self.inner.reconnect(timeout)

    def clear(self) -> None:
        self.calls.clear()
        self.events.clear()


def step_timing(action: str, device_id: str, calls: Sequence[Call],
                events: Sequence[dict[str, Any]], update: MemoryUpdate | None,
                previous: MemoryUpdate | None, mem_seen: float | None) -> Timing:
    """Split a step's time: QEMU's command (the last in ``calls``), the back-end's table
    update inside it (QEMU waits for the back-end's REPLY_ACK before it answers device_add /
    device_del; ``update`` is the connection's last one, ``previous`` the one before the
    step), the guest's ACPI _OST answer (``events``), and MemTotal (``mem_seen``,
    monotonic, when it changed)."""
    command = "device_add" if action == "add" else "device_del"
    call = next((c for c in reversed(calls) if c.command == command), None)
    if call is None:
        return Timing(command)
    qmp_seconds = round(call.answered - call.sent, 6)
    request: str | None = None
    received_after = seconds = qemu_seconds = None
    inside: bool | None = None
    if update is not None and update != previous:
        request = update.request
        received_after = round(update.received - call.sent, 6)
        seconds = round(update.in_force - update.received, 6)
        inside = call.sent <= update.received <= call.answered
        if inside:
            qemu_seconds = round(qmp_seconds - seconds, 6)
    return Timing(command, qmp_seconds, request, received_after, seconds, inside, qemu_seconds,
                  acpi_ost_after=_ost_after(events, device_id, call.wall),
                  mem_total_after=None if mem_seen is None else round(mem_seen - call.sent, 6))


def _ost_after(events: Sequence[dict[str, Any]], device_id: str,
               wall: float) -> float | None:
    """Seconds from ``wall`` to the guest's first ACPI _OST answer about ``device_id``."""
    for ev in events:
        data = ev.get("data")
        info = data.get("info") if isinstance(data, dict) else None
        if ev.get("event") == "ACPI_DEVICE_OST" and isinstance(info, dict) \
                and info.get("device") == device_id:
            ts = ev.get("timestamp", {})
            at = float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6
            return round(at - wall, 6)
    return None
