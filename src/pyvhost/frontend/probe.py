"""The leak probe: play QEMU's memory hot-plug against a back-end and count what it keeps.

:func:`run_probe` connects a :class:`~pyvhost.frontend.frontend.Frontend`, negotiates,
sets a boot memory table (one memfd region at GPA 0), measures the back-end's process,
then runs hot-plug cycles: hot-add ``regions`` DIMM-like regions one at a time, then
remove them one at a time, each step through ``Frontend.update_memory`` (exactly the
messages QEMU 7.2 sends), and measures again. A leak is any growth in the back-end's fd
count, in its fds on our region files, or in its mappings of them.

It measures, it does not judge the output format: :mod:`pyvhost.cli.probe` prints.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvhost.errors import LocalError
from pyvhost.protocol.constants import ProtocolFeature
from pyvhost.tools import procfs
from pyvhost.units import MiB

from .frontend import (
    MEMORY_REQUESTS,
    SUPPORTED_PROTOCOL_FEATURES,
    Frontend,
    describe_protocol_features,
)
from .memory import FrontendMemory, GuestRam

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
    #: The back-end's pid; None: ask the kernel (SO_PEERCRED of the connection).
    pid: int | None = None
    #: Use CONFIGURE_MEM_SLOTS: True = require it, False = refuse it, None = when offered.
    mem_slots: bool | None = None
    #: Seconds for connecting and for each reply.
    timeout: float = 5.0
    #: Seconds to wait before each measurement, for a back-end that works asynchronously.
    settle: float = 0.2
    #: Allocate regions as files in this directory (hugetlbfs, /dev/shm), not memfds.
    directory: str | None = None

    def check(self) -> None:
        if self.cycles < 0:
            raise ProbeError(f"cycles must be >= 0, got {self.cycles}")
        if self.regions < 1:
            raise ProbeError(f"regions must be >= 1, got {self.regions}")
        if self.region_size <= 0 or self.boot_size <= 0:
            raise ProbeError("region and boot sizes must be positive")
        if self.settle < 0 or self.timeout <= 0:
            raise ProbeError("settle must be >= 0 and timeout > 0")


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

    @property
    def leak(self) -> bool:
        """Any growth in fds or mappings between before and after."""
        b, a = self.before, self.after
        return (a.fds > b.fds or a.matching_fds > b.matching_fds or a.mappings > b.mappings
                or a.mapped_bytes > b.mapped_bytes)

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
            "pid": self.pid,
            "cycles": self.cycles,
            "regions": self.regions,
            "region_size": self.region_size,
            "boot_size": self.boot_size,
            "mem_slots": self.mem_slots,
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
            "region_fds_after_disconnect": None if gone is None else gone.matching_fds,
            "mappings_after_disconnect": None if gone is None else gone.mappings,
            "requests_sent": dict(self.requests_sent),
            "latency_ms": lat,
            "verdict": self.verdict,
            "leak": self.leak,
        }


Progress = Callable[[int, int], None]


def run_probe(config: ProbeConfig, *, progress: Progress | None = None) -> ProbeReport:
    """Run the probe; ``progress(done, total)`` is called after each cycle.

    Raises :class:`ProbeError` for a configuration the back-end can not take, and the
    front-end's errors (connect, NACK, a broken reply) as they come. Everything it
    allocated is released on every path, Ctrl-C included.
    """
    config.check()
    memory = FrontendMemory(directory=config.directory)
    frontend = Frontend()
    try:
        return _run(config, frontend, memory, progress)
    finally:
        frontend.close()
        memory.close()


def _run(config: ProbeConfig, fe: Frontend, memory: FrontendMemory,
         progress: Progress | None) -> ProbeReport:
    fe.connect(config.socket_path, timeout=config.timeout)
    wanted = SUPPORTED_PROTOCOL_FEATURES
    if config.mem_slots is False:
        wanted &= ~PF.CONFIGURE_MEM_SLOTS
    negotiated = fe.negotiate(protocol_features=wanted)
    if config.mem_slots and not negotiated.mem_slots:
        offered = ", ".join(describe_protocol_features(fe.protocol_features_offered))
        raise ProbeError(f"the back-end does not offer CONFIGURE_MEM_SLOTS (it offers: "
                         f"{offered or 'none'}); run without --mem-slots to use SET_MEM_TABLE")
    if config.regions + 1 > fe.memory_limit:
        raise ProbeError(
            f"boot RAM + {config.regions} regions need {config.regions + 1} memory slots, the "
            f"back-end takes {fe.memory_limit}"
            + ("" if fe.uses_mem_slots else " (SET_MEM_TABLE carries at most 8 regions)"))
    pid = config.pid if config.pid is not None else fe.peer_pid
    if pid is None:
        raise ProbeError("can not tell the back-end's pid from the socket; pass --pid")
    needle = memory.name_prefix
    reply_ack = bool(fe.protocol_features & PF.REPLY_ACK)

    def settle_and_measure() -> procfs.ProcessUsage:
        if not reply_ack:
            fe.sync()  # without acks, a GET_FEATURES round trip orders us after the updates
        if config.settle:
            time.sleep(config.settle)
        return procfs.measure(pid, needle)

    memory.add_boot_ram(config.boot_size)
    fe.update_memory(memory.regions)
    before = settle_and_measure()
    start = {name: len(fe.timings.get(name, ())) for name in MEMORY_REQUESTS}
    peak = before
    for cycle in range(config.cycles):
        added: list[GuestRam] = []
        for _ in range(config.regions):
            added.append(memory.add_dimm(config.region_size))
            fe.update_memory(memory.regions)
        if cycle == 0:
            peak = settle_and_measure()
        for ram in added:
            memory.detach(ram)
            try:
                fe.update_memory(memory.regions)
            finally:
                ram.close()
        if progress is not None:
            progress(cycle + 1, config.cycles)
    after = settle_and_measure()

    samples = {name: fe.timings.get(name, [])[start[name]:] for name in MEMORY_REQUESTS}
    samples = {name: s for name, s in samples.items() if s}
    everything = [ns for s in samples.values() for ns in s]
    fe.close()
    memory.close()  # so that only what the back-end holds is left to see
    disconnected = _wait_released(pid, needle, config.timeout)
    return ProbeReport(
        socket=config.socket_path, pid=pid, cycles=config.cycles, regions=config.regions,
        region_size=config.region_size, boot_size=config.boot_size,
        mem_slots=fe.uses_mem_slots, reply_ack=reply_ack,
        protocol_features=tuple(negotiated.protocol_feature_names),
        before=before, peak=peak, after=after, disconnected=disconnected,
        latency=LatencyStats.of(everything),
        latency_by_request={name: LatencyStats.of(s) for name, s in samples.items()},
        requests_sent={name: len(s) for name, s in samples.items()})


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


__all__ = ["LatencyStats", "ProbeConfig", "ProbeError", "ProbeReport", "run_probe"]
