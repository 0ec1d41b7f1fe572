"""The leak probe: play a real front-end's memory hot-plug against a back-end and count what
the back-end keeps.

:func:`run_probe` gets a connection (connects to the back-end's socket, or with ``listen``
waits for a back-end to connect to ours), plays a front-end profile
(:mod:`.profiles`: QEMU 7.2 by default) up to a started device with one boot region at
GPA 0, finds the process that really serves the connection and maps that region
(:mod:`.peer`; "cannot measure" if none does), measures it, then runs hot-plug cycles:
hot-add ``regions`` DIMM-like regions one at a time, then remove them one at a time, each
step the messages that front-end sends. It measures after every cycle (the series and its
slope, :mod:`.slope`) and at the end.

A leak is any growth in the process's fd count, in its fds on our region files or in its
mappings of them, or any region file it still holds after the front-end removed it
(per file, so that a process serving other sockets at the same time is judged on ours).
With ``reconnect`` the next connection is probed too (a client-mode back-end reconnects
by itself; a server-mode one is connected to again).

It measures, it does not judge the output format: :mod:`pyvhost.cli.probe` prints.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvhost.errors import LocalError, PyvhostError
from pyvhost.protocol.constants import ProtocolFeature
from pyvhost.tools import procfs
from pyvhost.units import MiB

from . import profiles
from .frontend import MEMORY_REQUESTS, Frontend, describe_protocol_features
from .listen import Listener
from .memory import FrontendMemory, GuestRam
from .peer import Candidates, CannotMeasureError, PeerProcess, choose
from .slope import Series

PF = ProtocolFeature


class ProbeError(LocalError):
    """The probe can not run as configured (limits, features, unknown back-end pid)."""


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    """What to probe and how hard."""

    socket_path: str
    cycles: int = 10
    regions: int = 3
    region_size: int = 2 * MiB
    boot_size: int = 64 * MiB
    #: The back-end's pid; None: the process holding the other end of the connection.
    pid: int | None = None
    #: Use CONFIGURE_MEM_SLOTS: True = require it, False = refuse it, None = when offered.
    mem_slots: bool | None = None
    #: Seconds for connecting and for each reply.
    timeout: float = 5.0
    #: Seconds to wait before each measurement, for a back-end that works asynchronously.
    settle: float = 0.2
    #: Allocate regions as files in this directory (hugetlbfs, /dev/shm), not memfds.
    directory: str | None = None
    #: The front-end whose messages are played (:data:`profiles.PROFILES`).
    profile: str = "qemu-7.2"
    #: The device the front-end drives: net, blk or fs (rings, GET_CONFIG).
    device: str = "net"
    queue_pairs: int = 1
    #: Listen on ``socket_path`` and wait (``accept_timeout``) for the back-end to connect.
    listen: bool = False
    accept_timeout: float = 30.0
    #: After the run, probe the next connection too.
    reconnect: bool = False

    def check(self) -> None:
        if self.cycles < 0:
            raise ProbeError(f"cycles must be >= 0, got {self.cycles}")
        if self.regions < 1:
            raise ProbeError(f"regions must be >= 1, got {self.regions}")
        if self.region_size <= 0 or self.boot_size <= 0:
            raise ProbeError("region and boot sizes must be positive")
        if self.settle < 0 or self.timeout <= 0 or self.accept_timeout <= 0:
            raise ProbeError("settle must be >= 0 and timeouts > 0")
        profiles.get(self.profile)
        if self.device not in profiles.DEVICES:
            raise ProbeError(f"device must be one of {', '.join(profiles.DEVICES)}")


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """Round-trip times of a set of requests, in milliseconds."""

    count: int
    median: float
    p99: float
    max: float

    @classmethod
    def of(cls, samples_ns: list[int]) -> LatencyStats:
        if not samples_ns:
            return cls(0, 0.0, 0.0, 0.0)
        ordered = sorted(samples_ns)
        # Nearest-rank percentile: the smallest sample >= 99 % of all samples.
        p99 = ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]
        return cls(len(ordered), _ms(statistics.median(ordered)), _ms(p99), _ms(ordered[-1]))

    def as_dict(self) -> dict[str, float | int]:
        return {"median": self.median, "p99": self.p99, "max": self.max, "count": self.count}


def _ms(ns: float) -> float:
    return round(ns / 1e6, 4)


@dataclass(frozen=True, slots=True)
class Reconnect:
    """The next connection: how long the back-end took to come back and what it kept."""

    seconds: float
    pid: int
    before: procfs.ProcessUsage
    after: procfs.ProcessUsage
    stale_files: tuple[str, ...]
    disconnected: procfs.ProcessUsage | None

    @property
    def leak(self) -> bool:
        return _grew(self.before, self.after) or bool(self.stale_files) or _kept(
            self.disconnected)

    def to_json(self) -> dict[str, object]:
        gone = self.disconnected
        return {"seconds": round(self.seconds, 3), "pid": self.pid,
                "fds_before": self.before.fds, "fds_after": self.after.fds,
                "region_fds_after": self.after.matching_fds,
                "mappings_after": self.after.mappings,
                "stale_files": list(self.stale_files),
                "region_fds_after_disconnect": None if gone is None else gone.matching_fds,
                "mappings_after_disconnect": None if gone is None else gone.mappings,
                "leak": self.leak}


def _grew(b: procfs.ProcessUsage, a: procfs.ProcessUsage) -> bool:
    return (a.fds > b.fds or a.matching_fds > b.matching_fds or a.mappings > b.mappings
            or a.mapped_bytes > b.mapped_bytes)


def _kept(gone: procfs.ProcessUsage | None) -> bool:
    return gone is not None and bool(gone.matching_fds or gone.mappings)


@dataclass(frozen=True, slots=True)
class ProbeReport:
    """What the probe saw. ``before``/``after`` bracket the cycles; ``peak`` is taken with
    all regions of the first cycle plugged (it shows the probe sees the back-end's
    mappings at all); ``disconnected`` after the front-end hung up."""

    socket: str
    pid: int
    cycles: int
    regions: int
    region_size: int
    boot_size: int
    mem_slots: bool
    reply_ack: bool
    protocol_features: tuple[str, ...]
    before: procfs.ProcessUsage
    peak: procfs.ProcessUsage
    after: procfs.ProcessUsage
    disconnected: procfs.ProcessUsage | None
    latency: LatencyStats
    latency_by_request: dict[str, LatencyStats] = field(default_factory=dict)
    requests_sent: dict[str, int] = field(default_factory=dict)
    profile: str = "qemu-7.2"
    device: str = "net"
    listen: bool = False
    measured: PeerProcess | None = None
    max_mem_slots: int | None = None
    #: The most regions the back-end's table held at once.
    peak_table: int = 0
    #: Region files the back-end still held after the cycles though they were removed.
    stale_files: tuple[str, ...] = ()
    series: Series = field(default_factory=Series)
    reconnect: Reconnect | None = None

    @property
    def leak(self) -> bool:
        """Any growth in fds or mappings between before and after, a removed region the
        back-end still holds, or a leak on the next connection."""
        return (_grew(self.before, self.after) or bool(self.stale_files)
                or (self.reconnect is not None and self.reconnect.leak))

    @property
    def verdict(self) -> str:
        return "leak" if self.leak else "no leak"

    def to_json(self) -> dict[str, object]:
        """The report as one JSON-ready object (the schema of ``pyvhost probe --json``)."""
        lat: dict[str, object] = dict(self.latency.as_dict())
        lat["by_request"] = {k: v.as_dict() for k, v in self.latency_by_request.items()}
        gone = self.disconnected
        return {
            "socket": self.socket,
            "listen": self.listen,
            "profile": self.profile,
            "device": self.device,
            "pid": self.pid,
            "measured_process": None if self.measured is None else self.measured.as_dict(),
            "cycles": self.cycles,
            "regions": self.regions,
            "region_size": self.region_size,
            "boot_size": self.boot_size,
            "mem_slots": self.mem_slots,
            "max_mem_slots": self.max_mem_slots,
            "peak_table": self.peak_table,
            "reply_ack": self.reply_ack,
            "protocol_features": list(self.protocol_features),
            "fds_before": self.before.fds,
            "fds_after": self.after.fds,
            "region_fds_before": self.before.matching_fds,
            "region_fds_peak": self.peak.matching_fds,
            "region_fds_after": self.after.matching_fds,
            "mappings_before": self.before.mappings,
            "mappings_peak": self.peak.mappings,
            "mappings_after": self.after.mappings,
            "mapped_bytes_before": self.before.mapped_bytes,
            "mapped_bytes_after": self.after.mapped_bytes,
            "stale_files": list(self.stale_files),
            "region_fds_after_disconnect": None if gone is None else gone.matching_fds,
            "mappings_after_disconnect": None if gone is None else gone.mappings,
            "requests_sent": dict(self.requests_sent),
            "latency_ms": lat,
            "growth_per_1000_cycles": self.series.per_1000(),
            "series": self.series.to_json(),
            "reconnect": None if self.reconnect is None else self.reconnect.to_json(),
            "verdict": self.verdict,
            "leak": self.leak,
        }


Progress = Callable[[int, int], None]


class _Connection:
    """Gets connections for the probe: connects, or accepts on a listener."""

    def __init__(self, config: ProbeConfig) -> None:
        self.config = config
        self.listener = Listener(config.socket_path) if config.listen else None

    def open(self, fe: Frontend) -> float:
        """Connect ``fe``; returns the seconds waited for a back-end that connects."""
        c = self.config
        if self.listener is None:
            fe.connect(c.socket_path, timeout=c.timeout)
            return 0.0
        fe.adopt(self.listener.accept(c.accept_timeout), c.socket_path, c.timeout)
        return self.listener.waits[-1]

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()


def run_probe(config: ProbeConfig, *, progress: Progress | None = None) -> ProbeReport:
    """Run the probe; ``progress(done, total)`` is called after each cycle.

    Raises :class:`ProbeError` for a configuration the back-end can not take,
    :class:`~pyvhost.frontend.peer.CannotMeasureError` when no process that maps the
    back-end's memory can be found, and the front-end's errors (connect, NACK, a broken
    reply) as they come. Everything it allocated is released on every path, Ctrl-C
    included.
    """
    config.check()
    conn = _Connection(config)
    try:
        report = _probe_once(config, conn, progress)
        if config.reconnect:
            report = _with_reconnect(config, conn, report)
        return report
    finally:
        conn.close()


class _Run:
    """One connection's session: the front-end, its memory and the profile played."""

    def __init__(self, config: ProbeConfig) -> None:
        self.config = config
        self.memory = FrontendMemory(directory=config.directory)
        self.fe = Frontend()
        self.session = profiles.Session(profiles.get(config.profile), self.fe, self.memory,
                                        device=config.device,
                                        queue_pairs=config.queue_pairs)
        self.pid = 0
        self.peak_table = 0
        #: Measured once, with every region of the first cycle plugged.
        self.peak: procfs.ProcessUsage | None = None

    def close(self) -> None:
        self.session.close()
        self.fe.close()
        self.memory.close()

    def start(self, conn: _Connection) -> tuple[float, PeerProcess]:
        """Connect, negotiate, start the device with boot RAM; find the measured process."""
        c, fe = self.config, self.fe
        waited = conn.open(fe)
        mask = -1 if c.mem_slots is not False else ~int(PF.CONFIGURE_MEM_SLOTS)
        negotiated = self.session.negotiate(mask)
        if c.mem_slots and not negotiated.mem_slots:
            offered = ", ".join(describe_protocol_features(fe.protocol_features_offered))
            raise ProbeError(f"the back-end does not offer CONFIGURE_MEM_SLOTS (it offers: "
                             f"{offered or 'none'}); run without --mem-slots to use "
                             "SET_MEM_TABLE")
        # GET_MAX_MEM_SLOTS: "The back-end should return the message with a u64 payload
        # containing the maximum number of memory slots for QEMU to expose to the guest."
        # Honoured: the table never holds more (Frontend.update_memory refuses it too).
        if c.regions + 1 > fe.memory_limit:
            raise ProbeError(
                f"boot RAM + {c.regions} regions need {c.regions + 1} memory slots, the "
                f"back-end takes {fe.memory_limit}"
                + ("" if fe.uses_mem_slots else " (SET_MEM_TABLE carries at most 8 regions)"))
        boot = self.session.add_region(c.boot_size, boot=True)
        self.session.start(boot)
        self.sync()
        if c.settle:
            time.sleep(c.settle)
        measured = choose(Candidates.of(fe.sock), self.memory.name_prefix, boot.name, c.pid)
        self.pid = measured.pid
        self.peak_table = len(self.memory)
        return waited, measured

    @property
    def reply_ack(self) -> bool:
        return bool(self.fe.protocol_features & PF.REPLY_ACK)

    def sync(self) -> None:
        if not self.reply_ack:
            self.fe.sync()  # without acks, a GET_FEATURES round trip orders us after them

    def measure(self, settle: bool = True) -> procfs.ProcessUsage:
        self.sync()
        if settle and self.config.settle:
            time.sleep(self.config.settle)
        return procfs.measure(self.pid, self.memory.name_prefix)

    def cycle(self) -> None:
        """Hot-add ``regions`` regions one at a time, then remove them one at a time."""
        added: list[GuestRam] = []
        for _ in range(self.config.regions):
            added.append(self.session.add_region(self.config.region_size))
            self.session.update_memory()
            self.peak_table = max(self.peak_table, len(self.memory))
        if self.peak is None:
            self.peak = self.measure()
        for ram in added:
            self.memory.detach(ram)
            try:
                self.session.update_memory()
            finally:
                ram.close()

    def stale(self, usage: procfs.ProcessUsage) -> tuple[str, ...]:
        """Our region files the process holds that are not in the table any more."""
        current = {r.name for r in self.memory.regions}
        return tuple(name for name in usage.held_files() if name not in current)

    def hang_up(self) -> procfs.ProcessUsage | None:
        """Stop the device, close, free our memory, and see what the back-end lets go."""
        needle = self.memory.name_prefix
        # A back-end that hangs up on the stop messages is judged by what it holds after.
        with contextlib.suppress(PyvhostError):
            self.session.stop()
        self.close()  # so that only what the back-end holds is left to see
        return _wait_released(self.pid, needle, self.config.timeout)


def _probe_once(config: ProbeConfig, conn: _Connection,
                progress: Progress | None) -> ProbeReport:
    run = _Run(config)
    try:
        _, measured = run.start(conn)
        fe = run.fe
        before = run.measure()
        series = Series()
        series.add(0, before)
        start = {name: len(fe.timings.get(name, ())) for name in MEMORY_REQUESTS}
        for cycle in range(config.cycles):
            run.cycle()
            series.add(cycle + 1, run.measure(settle=False))
            if progress is not None:
                progress(cycle + 1, config.cycles)
        after = run.measure()
        stale = run.stale(after)
        samples = {name: fe.timings.get(name, [])[start[name]:] for name in MEMORY_REQUESTS}
        samples = {name: s for name, s in samples.items() if s}
        everything = [ns for s in samples.values() for ns in s]
        negotiated = run.session.negotiated
        assert negotiated is not None
        mem_slots, reply_ack = fe.uses_mem_slots, run.reply_ack
        max_slots = fe.max_mem_slots
        disconnected = run.hang_up()
        return ProbeReport(
            socket=config.socket_path, pid=run.pid, cycles=config.cycles,
            regions=config.regions, region_size=config.region_size,
            boot_size=config.boot_size, mem_slots=mem_slots, reply_ack=reply_ack,
            protocol_features=tuple(negotiated.protocol_feature_names),
            before=before, peak=run.peak or before, after=after, disconnected=disconnected,
            latency=LatencyStats.of(everything),
            latency_by_request={name: LatencyStats.of(s) for name, s in samples.items()},
            requests_sent={name: len(s) for name, s in samples.items()},
            profile=config.profile, device=config.device, listen=config.listen,
            measured=measured, max_mem_slots=max_slots, peak_table=run.peak_table,
            stale_files=stale, series=series)
    finally:
        run.close()


def _with_reconnect(config: ProbeConfig, conn: _Connection,
                    report: ProbeReport) -> ProbeReport:
    """Probe the next connection: one cycle, measured before and after."""
    run = _Run(config)
    try:
        waited, _measured = run.start(conn)
        before = run.measure()
        run.cycle()
        after = run.measure()
        stale = run.stale(after)
        disconnected = run.hang_up()
        again = Reconnect(waited, run.pid, before, after, stale, disconnected)
    finally:
        run.close()
    fields = {name: getattr(report, name) for name in report.__dataclass_fields__}
    fields["reconnect"] = again
    return ProbeReport(**fields)


def _wait_released(pid: int, needle: str, timeout: float) -> procfs.ProcessUsage | None:
    """Measure after hang-up, waiting (up to ``timeout``) for the back-end to let go."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            usage = procfs.measure(pid, needle)
        except procfs.ProcessGoneError:
            return None
        if (usage.matching_fds == 0 and usage.mappings == 0) or time.monotonic() > deadline:
            return usage
        time.sleep(0.02)


__all__ = ["CannotMeasureError", "LatencyStats", "ProbeConfig", "ProbeError", "ProbeReport",
           "Reconnect", "run_probe"]
