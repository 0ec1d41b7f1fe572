"""The typed records of a lab run: what was measured at each step, the checks, the verdict.

Frozen dataclasses, nothing else: :mod:`.measure` fills them, :mod:`.checks` judges them,
:mod:`.document` turns them into the ``pyvhost.lab/1`` JSON document (the only place that
does). VM numbers in records are indexes from 0 (``vm``) unless the name says ``vm_number``
(from 1, as people and the JSON count them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from pyvhost.hotplug.migrate import Code as MigrateCode
from pyvhost.hotplug.plan import Code, Refusal

from .accel import AccelChoice
from .config import HOTPLUG_VM, LabConfig
from .image import GuestImage

Action = Literal["baseline", "add", "add (forced past the planner)", "remove", "migrate"]


# -- the back-end ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Usage:
    """What the back-end process holds at one moment (``/proc/PID/fd`` and ``maps``)."""

    fds: int
    ram_fds: int  # fds on guest RAM files
    mappings: int
    ram_mappings: int

    @property
    def other_fds(self) -> int:
        return self.fds - self.ram_fds


@dataclass(frozen=True)
class Region:
    """One region of a back-end connection's memory table."""

    guest_phys_addr: int
    memory_size: int
    fds_held: int


@dataclass(frozen=True)
class MemoryUpdate:
    """The back-end's last memory table change on a connection (monotonic clock of the
    back-end's host: the same as the lab's)."""

    request: str
    generation: int
    received: float
    in_force: float


@dataclass(frozen=True)
class Connection:
    """One front-end connection of the back-end, as its control socket describes it."""

    name: str
    peer_pid: int
    protocol_features: tuple[str, ...]
    generation: int
    regions: tuple[Region, ...]
    last_update: MemoryUpdate | None


@dataclass(frozen=True)
class Backend:
    """The back-end at one moment: its connections by VM, and what its process holds."""

    usage: Usage
    connections: Mapping[int, Connection]

    def generation(self, vm: int) -> int | None:
        conn = self.connections.get(vm)
        return None if conn is None else conn.generation

    @property
    def hotplug_vm(self) -> Connection | None:
        return self.connections.get(HOTPLUG_VM)

    @property
    def regions_held(self) -> int:
        """Regions in all its tables."""
        return sum(len(c.regions) for c in self.connections.values())


@dataclass(frozen=True)
class PortCounters:
    """One switch port's frame counters; ``vm_number`` is the VM it serves (from 1)."""

    vm_number: int | None
    rx_frames: int
    tx_frames: int
    rx_drops: Mapping[str, int]
    tx_drops: Mapping[str, int]

    @property
    def drops(self) -> int:
        return sum(self.rx_drops.values()) + sum(self.tx_drops.values())


# -- QEMU and the guest ----------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryDevice:
    id: str | None
    memdev: str | None
    addr: int | None
    size: int
    slot: int | None


@dataclass(frozen=True)
class SentRegion:
    """A region QEMU sends every vhost-user back-end (its flat view)."""

    guest_phys_addr: int
    memory_size: int
    memdev: str


@dataclass(frozen=True)
class QemuMemory:
    """VM 1's memory as QEMU has it."""

    devices: tuple[MemoryDevice, ...]
    plugged_memory: int
    vhost_user_regions: tuple[SentRegion, ...]


@dataclass(frozen=True)
class PlannerVerdict:
    """What :mod:`pyvhost.hotplug.plan` said about the step (its refusals as it gave them:
    a code and a message that says what to change)."""

    refusals: tuple[Refusal[Code], ...]
    predicted_regions: int | None
    region_limit: int | None

    @property
    def refused(self) -> bool:
        return bool(self.refusals)


@dataclass(frozen=True)
class QemuOutcome:
    """What running the plan through QMP did (:class:`pyvhost.hotplug.execute.Outcome`)."""

    ok: bool
    done: tuple[str, ...]
    failed_step: str | None
    error: str | None
    rolled_back: tuple[str, ...]
    orphans: tuple[str, ...]
    acpi_ost: tuple[Mapping[str, object], ...]
    seconds: float


@dataclass(frozen=True)
class GuestMemory:
    """VM 1's MemTotal after the step; ``reached``: it changed by the DIMM in time (None
    when nothing was to change)."""

    mem_total_kib: int
    delta_kib: int
    reached: bool | None = None

    @property
    def before_kib(self) -> int:
        return self.mem_total_kib - self.delta_kib


@dataclass(frozen=True)
class Timing:
    """A step's time, split: QEMU's command (sent to answered), the back-end's table update
    inside it, the guest's ACPI _OST answer, and MemTotal. Seconds; None: not seen."""

    command: str
    qmp_seconds: float | None = None
    backend_request: str | None = None
    backend_received_after: float | None = None
    backend_seconds: float | None = None
    backend_inside_command: bool | None = None
    qemu_seconds: float | None = None
    acpi_ost_after: float | None = None
    mem_total_after: float | None = None


# -- traffic ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PingCounts:
    """Pings sent and answered so far; a ping not answered within its wait is lost."""

    sent: int
    received: int

    @property
    def lost(self) -> int:
        return self.sent - self.received


@dataclass(frozen=True)
class PingResult:
    """``sent`` pings from one VM to another (numbers from 1), one at a time."""

    from_vm_number: int
    to_vm_number: int
    sent: int
    received: int
    exit_code: int


@dataclass(frozen=True)
class TrafficWait:
    """After a step: were ``wanted`` pings answered in all (``counts`` when it stopped)?"""

    wanted: int
    counts: PingCounts


# -- a live migration ------------------------------------------------------------------------
@dataclass(frozen=True)
class Migration:
    """VM 1's live migration to a second QEMU on another socket of the same back-end
    (``pyvhost lab --migrate``): what QEMU said, what the back-end wrote and logged while
    QEMU copied the VM, the traffic across it, and what the source left behind.

    Times are seconds: ``total_time``, ``downtime`` and ``setup_time`` QEMU's own,
    ``seconds`` from ``migrate`` to completed as the lab saw it, ``resumed_after`` from
    then to the destination running. ``dimm_frames``/``dimm_bytes``: what the back-end
    wrote into the hot-added DIMMs' regions of the source's table meanwhile (its write
    counters); ``log_*``: the source connection's dirty log. ``stream_*``: a TCP stream
    from VM 2 to VM 1 throughout, its receiver stopped for the migration, counted and
    hashed by the migrated guest (``stream_expected_md5``: the sender's). ``pings``: the
    continuous ping from the migration's start to the stream's end. After the source
    quit: ``source_gone`` (its connection closed), ``log_held`` (fds and mappings of any
    dirty log the back-end still holds)."""

    uri: str
    refusals: tuple[Refusal[MigrateCode], ...]
    ok: bool
    status: str
    error: str | None
    total_time: float | None
    downtime: float | None
    setup_time: float | None
    seconds: float
    transferred: int | None
    dirty_sync_count: int | None
    resumed_after: float | None
    source_pid: int
    destination_pid: int
    dimm_frames: int
    dimm_bytes: int
    log_size: int
    log_marks: int
    log_overflows: int
    pings_sent: int
    pings_lost: int
    longest_gap: float
    #: Of ``pings_lost``, those sent while the migration's command ran: frames for VM 1
    #: between the source's stop and the destination's start have no ring to go to.
    pings_lost_switchover: int
    #: Pings sent after the migration's command ended and answered (by the destination).
    pings_answered_after: int
    #: What the switch dropped on its way out of the source's port until it left, by
    #: reason (``port_down``: its queues stopped for the switchover).
    source_drops: dict[str, int]
    stream_bytes: int
    stream_md5: str
    stream_expected_md5: str
    source_gone: bool
    log_held: int
    #: The switch's dropped frames (all ports) just before the destination started and
    #: once the source quit: what was dropped between is the migration's (frames for a
    #: stopped source, floods to a destination not started yet), not a problem.
    drops_before: int
    drops_after: int

    @property
    def stream_intact(self) -> bool:
        return self.stream_bytes > 0 and self.stream_md5 == self.stream_expected_md5


# -- steps and the run ----------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """One check of a step (:mod:`.checks`); ``detail`` says what was measured."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Step:
    """One step: the baseline (every VM up), or one hot-add or removal in VM 1.

    A step the planner refused without ``force`` ran nothing: it has no measurements.
    """

    index: int
    action: Action
    device: str | None
    planner: PlannerVerdict | None = None  # None for the baseline
    qemu: QemuOutcome | None = None  # None: not run (baseline, or refused by the planner)
    backend: Backend | None = None
    qemu_memory: QemuMemory | None = None
    guest: GuestMemory | None = None
    timing: Timing | None = None
    traffic: TrafficWait | None = None  # None while no ping loop runs
    pings: PingCounts | None = None  # the continuous ping so far, None while none runs
    migration: Migration | None = None  # a "migrate" step's
    checks: tuple[Check, ...] = ()

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def done(self) -> bool:
        """QEMU carried the hot-plug out."""
        return self.qemu is not None and self.qemu.ok


@dataclass(frozen=True)
class Summary:
    dimms_added: int
    dimms_removed: int
    pings_sent: int
    pings_lost: int
    frames_dropped: int
    released_after_vms: bool
    migrated: bool = False
    #: Of ``pings_lost``, those a migration's check put down to its switchover.
    pings_lost_switchover: int = 0


@dataclass(frozen=True)
class Verdict:
    summary: Summary
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class BackendUsage:
    """The back-end process before the VMs, with them up, after the hot-plug steps, and
    once they quit."""

    before_vms: Usage
    baseline: Usage
    after: Usage
    after_vms: Usage


@dataclass(frozen=True)
class Report:
    """A whole run: what :func:`pyvhost.lab.scenario.run_lab` returns."""

    config: LabConfig
    image: GuestImage
    run_directory: str
    net_pid: int
    qemu_pids: tuple[int, ...]
    accel: AccelChoice
    backend: BackendUsage
    pings: tuple[PingResult, ...]
    protocol_features: Mapping[int, tuple[str, ...]]  # by VM number (from 1)
    switch_at_baseline: tuple[PortCounters, ...]
    continuous_ping: PingCounts
    switch: tuple[PortCounters, ...]
    seconds: float
    steps: tuple[Step, ...]
    verdict: Verdict

    @property
    def ok(self) -> bool:
        return self.verdict.ok
