"""The run behind ``pyvhost lab``: real VMs on a ``pyvhost net`` switch, memory hot-added
(and removed) one DIMM at a time under a continuous ping, measured after every step.

Owns the order of one run (:class:`Lab`): the guest image, ``pyvhost net`` and the VMs
(:mod:`.machines`), pings between the VMs and the continuous ping to VM 1 (:mod:`.traffic`),
the baseline, then the hot-plug steps, which go through :mod:`pyvhost.hotplug`'s planner
and executor exactly as ``pyvhost mem add/remove`` does. After each step it measures
(:mod:`.measure`) into a typed :class:`~.records.Step`, has it judged (:mod:`.checks`) and
hands it to ``on_step``; at the end it returns a :class:`~.records.Report` with the verdict.

The DIMMs all go into VM 1; the other VMs ping VM 1 the whole time, and their tables
must not move. With ``--migrate`` VM 1 is then live-migrated (:meth:`Lab.migrate`) to a
second QEMU on another socket of the same ``pyvhost net``, through
:mod:`pyvhost.hotplug.migrate` as ``pyvhost mem migrate`` does, while the back-end writes
a TCP stream from VM 2 into buffers in the hot-added DIMMs. It renders nothing
(:mod:`pyvhost.cli.lab` does; the JSON document is :mod:`.document`'s) and decides no
hot-plug policy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace

from pyvhost.closing import Closing
from pyvhost.errors import PyvhostError
from pyvhost.hotplug.execute import Outcome, execute_add, execute_remove
from pyvhost.hotplug.host import page_sizes, read_host
from pyvhost.hotplug.migrate import destination_args, preflight
from pyvhost.hotplug.migrate_run import read_facts, run_migration
from pyvhost.hotplug.plan import AddRequest, Plan, plan_add, plan_remove
from pyvhost.hotplug.qemu_rules import BASELINE_REGIONS
from pyvhost.hotplug.qmp import Qmp
from pyvhost.hotplug.state import read_state
from pyvhost.protocol.constants import VHOST_USER_MAX_MEM_SLOTS
from pyvhost.tools import procfs
from pyvhost.units import MiB

from . import checks, traffic
from .accel import AccelChoice, choose_accel
from .config import HOTPLUG_VM, LabConfig, LabError
from .guest import GuestConsole
from .image import GuestImage, build_image
from .machines import Machines, Vm, signals_ignored
from .measure import (
    BackendMeter,
    TimedMonitor,
    planner_verdict,
    qemu_memory,
    qemu_outcome,
    step_timing,
)
from .qemu import QBOOT, QemuError, qemu_binary, qemu_version
from .records import (
    Action,
    Backend,
    BackendUsage,
    GuestMemory,
    MemoryUpdate,
    Migration,
    PingCounts,
    PingResult,
    PortCounters,
    Report,
    Step,
    Usage,
)
from .traffic import PING_INTERVAL, PING_WAIT, PingLoops, Stream

#: How long the stream runs before the migration: until the guest's receive buffers are
#: in the DIMMs (the ones posted before they were onlined in ZONE_NORMAL are used up).
WARMUP_FRAMES = 300
#: Seconds before the end of the migration's command (as the pinging guest's clock saw
#: it) in which a ping may meet the switchover: the source stops, its queues with it, and
#: until the destination runs, frames for VM 1 have no ring to go to (the switch drops
#: them as port_down, as any back-end must). The command's end is seen late: the progress
#: poll, the destination's resume, and a console round trip to read the clock.
SWITCHOVER_SPAN = 2.0

Say = Callable[[str], None]
StepHook = Callable[[Step], None]


class Lab(Closing):
    """One lab run; use as a context manager (:meth:`close` ends everything)."""

    def __init__(self, config: LabConfig, *, say: Say | None = None,
                 on_step: StepHook | None = None, image: GuestImage | None = None) -> None:
        self.config = config
        self.say: Say = say or (lambda _msg: None)
        self.on_step: StepHook = on_step or (lambda _step: None)
        self.image = image
        self.machines = Machines(config, self.say)
        self.qmp: TimedMonitor | None = None
        self.accel: AccelChoice | None = None
        self.steps: list[Step] = []
        self.pings: tuple[PingResult, ...] = ()
        self.usage: dict[str, Usage] = {}
        self.protocol_features: dict[int, tuple[str, ...]] = {}
        self.switch_at_baseline: tuple[PortCounters, ...] = ()
        self._meter: BackendMeter | None = None
        self._loops: PingLoops | None = None
        self._vm_by_pid: dict[int, int] = {}
        self._added: list[str] = []
        self._mem_total = 0
        self._last: Step | None = None  # the last step measured: what the next one is held to

    @property
    def control(self) -> str:
        """``pyvhost net``'s control socket."""
        return self.machines.control

    @property
    def vms(self) -> list[Vm]:
        return self.machines.vms

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Close the QMP monitor, then end QEMU, ``pyvhost net`` and the run directory
        (:meth:`.Machines.close`). A second Ctrl-C (or SIGTERM) meanwhile is ignored."""
        with signals_ignored():
            try:
                if self.qmp is not None:
                    qmp, self.qmp = self.qmp, None
                    qmp.inner.close()
            finally:
                self.machines.close()

    # -- set-up ----------------------------------------------------------------------------
    @property
    def meter(self) -> BackendMeter:
        if self._meter is None:
            raise LabError("pyvhost net is not started")
        return self._meter

    def load_image(self) -> GuestImage:
        if self.image is None:
            self.say("guest image: loading from the cache, or building it (downloads the "
                     "Debian cloud kernel the first time)")
            try:
                self.image = build_image(progress=self.say, update_lists=os.geteuid() == 0)
            except PyvhostError as e:
                raise LabError(f"cannot build the guest image: {e}") from e
        return self.image

    def start_net(self) -> None:
        """``pyvhost net``: one socket per VM and a control socket, listening before any
        QEMU starts."""
        m = self.machines
        m.start_net()
        self._meter = BackendMeter(m.control, m.net_pid, m.net_log)
        offered = "offered" if self.config.mem_slots else "not offered"
        self.say(f"run directory {m.rundir}")
        self.say(f"pyvhost net (pid {m.net_pid}) listens on {self.config.vms} vhost-user "
                 f"sockets, CONFIGURE_MEM_SLOTS {offered}")
        self.usage["before_vms"] = self.meter.usage()

    def boot(self) -> None:
        """Boot every VM, connect VM 1's QMP monitor, and wait until the back-end has
        every VM's memory table."""
        image = self.load_image()
        c = self.config
        if not QBOOT.is_file():
            raise LabError(f"{QBOOT} is missing (Debian package qemu-system-data)")
        self.accel = choice = choose_accel(c.accel, image, say=self.say)
        binary = qemu_binary()
        try:
            version = "QEMU " + ".".join(map(str, qemu_version(binary)))
        except QemuError:
            version = binary  # QEMU itself will say what is wrong when it starts
        self.say(f"booting {c.vms} VMs ({version}, {choice.accel.upper()}: {choice.reason})")
        self.machines.boot(image, choice.accel)
        self._vm_by_pid = self.machines.vm_by_pid
        self.say(f"QEMU pids {', '.join(map(str, self.machines.qemu_pids))}")
        self.qmp = TimedMonitor(Qmp(str(self.vms[HOTPLUG_VM].qemu.qmp_path),
                                    timeout=c.step_timeout).connect())
        self._wait_tables()
        self.say("all VMs booted; their NICs are started and the back-end has their "
                 "memory tables")

    def _wait_tables(self) -> None:
        """QEMU sends the memory table once the guest driver starts the NIC."""
        deadline = time.monotonic() + 60
        while True:
            conns = self.meter.connections(self._vm_by_pid)
            if len(conns) == self.config.vms and all(c.regions for c in conns.values()):
                return
            if time.monotonic() > deadline:
                raise LabError("the back-end did not get every VM's memory table within "
                               f"60 s: {sorted(conns)} connected\n{self.machines.net_log()}")
            time.sleep(0.1)

    def console(self, vm: int) -> GuestConsole:
        return self.machines.console(vm)

    # -- traffic ---------------------------------------------------------------------------
    def ping(self, src: int, dst: int, count: int = 3) -> PingResult:
        """``count`` pings from VM ``src`` to VM ``dst`` (indexes from 0)."""
        received, code = traffic.ping(self.console(src), self.config.ip(dst), count)
        return PingResult(src + 1, dst + 1, count, received, code)

    def ping_all(self) -> tuple[PingResult, ...]:
        """VM 1 pings every other VM and every other VM pings VM 1."""
        results = []
        for other in range(1, self.config.vms):
            results.append(self.ping(HOTPLUG_VM, other))
            results.append(self.ping(other, HOTPLUG_VM))
        self.pings = tuple(results)
        ok = sum(r.received for r in results)
        self.say(f"pings between VMs: {ok}/{sum(r.sent for r in results)} answered")
        return self.pings

    def start_ping_loops(self) -> None:
        """Every VM but VM 1 pings VM 1 until the end of the hot-plug steps."""
        pingers = {vm.index: self.console(vm.index) for vm in self.vms
                   if vm.index != HOTPLUG_VM}
        self._loops = PingLoops(pingers, self.config.ip(HOTPLUG_VM))
        self._loops.start()
        self.say(f"continuous ping to VM 1 from VM {', '.join(str(i + 1) for i in pingers)} "
                 f"(every {PING_INTERVAL} s, lost after {PING_WAIT} s without reply)")

    def _ping_counts(self) -> PingCounts | None:
        """The continuous ping so far; None while it does not run."""
        return self._loops.counts() if self._loops is not None and self._loops.running \
            else None

    def switch_counters(self) -> tuple[PortCounters, ...]:
        return self.meter.switch(self._vm_by_pid)

    # -- the steps -------------------------------------------------------------------------
    def mem_total(self) -> int:
        """VM 1's MemTotal in KiB."""
        return self.console(HOTPLUG_VM).meminfo()["MemTotal"]

    def baseline(self) -> Step:
        """What the back-end holds with every VM up, before the first hot-plug."""
        assert self.qmp is not None
        backend = self.meter.backend(self._vm_by_pid)
        self.usage["baseline"] = backend.usage
        self._mem_total = self.mem_total()
        self.protocol_features = {vm + 1: c.protocol_features
                                  for vm, c in sorted(backend.connections.items())}
        # Frames flooded to a guest whose NIC is not started yet (at boot) are dropped
        # ("port_down"); what counts is what is dropped from here on.
        self.switch_at_baseline = self.switch_counters()
        step = Step(0, "baseline", None, backend=backend,
                    qemu_memory=qemu_memory(read_state(self.qmp)),
                    guest=GuestMemory(self._mem_total, 0), pings=self._ping_counts(),
                    checks=tuple(checks.leak_checks(backend, backend.usage)))
        self._last = step
        return self._emit(step)

    def add_dimm(self, force: bool = False) -> Step:
        """Plan one DIMM for VM 1; run it unless refused (or refused and ``force``)."""
        assert self.qmp is not None
        state = read_state(self.qmp)
        host = read_host()
        # The lab's back-end is pyvhost: with --mem-slots its GET_MAX_MEM_SLOTS answer
        # (which QEMU does not show) is known here.
        limit = VHOST_USER_MAX_MEM_SLOTS if self.config.mem_slots else BASELINE_REGIONS
        plan = plan_add(AddRequest(size=self.config.dimm_size, assume_region_limit=limit),
                        state, host, page_sizes(state, host))
        action: Action = "add (forced past the planner)" if force else "add"
        if plan.refused and not force:
            return self._refused(action, plan)
        qmp = self.qmp
        step = self._hotplug(action, plan, lambda: execute_add(
            qmp, plan, timeout=self.config.step_timeout, ost_timeout=5.0, force=force))
        if step.done:
            self._added.append(plan.device_id)
        return step

    def remove_dimm(self, device_id: str) -> Step:
        assert self.qmp is not None
        plan = plan_remove(device_id, read_state(self.qmp))
        if plan.refused:
            return self._refused("remove", plan)
        qmp = self.qmp
        step = self._hotplug("remove", plan, lambda: execute_remove(
            qmp, plan, timeout=self.config.step_timeout))
        if step.done:
            self._added.remove(device_id)
        return step

    def _refused(self, action: Action, plan: Plan) -> Step:
        """A step the planner refused: nothing ran, nothing to measure."""
        return self._emit(Step(len(self.steps), action, plan.device_id,
                               planner=planner_verdict(plan), pings=self._ping_counts()))

    def _hotplug(self, action: Action, plan: Plan, run: Callable[[], Outcome]) -> Step:
        """Run one planned hot-plug, measure what it did, check it."""
        assert self.qmp is not None and self._last is not None
        before = self._last
        self.qmp.clear()
        outcome = run()
        # The guest: MemTotal grows (shrinks) by the DIMM once it onlined (offlined) it.
        guest, mem_seen = self._guest_after(outcome.ok, grow=plan.action == "add")
        backend = self.meter.backend(self._vm_by_pid)
        memory = qemu_memory(read_state(self.qmp))
        timing = step_timing(plan.action, plan.device_id, self.qmp.calls, self.qmp.events,
                             _update(backend), _update(before.backend), mem_seen)
        wait = (self._loops.wait_for_more(self.config.pings_per_step)
                if self._loops is not None and self._loops.running else None)
        step = Step(len(self.steps), action, plan.device_id, planner=planner_verdict(plan),
                    qemu=qemu_outcome(outcome), backend=backend, qemu_memory=memory,
                    guest=guest, timing=timing, traffic=wait,
                    pings=wait.counts if wait else None)
        step = replace(step, checks=checks.step_checks(step, before, self.usage["baseline"]))
        self._mem_total = guest.mem_total_kib
        self._last = step
        return self._emit(step)

    def _guest_after(self, done: bool, grow: bool) -> tuple[GuestMemory, float | None]:
        """VM 1's MemTotal after a step, and when it changed by the DIMM (monotonic; None
        if it did not within the step timeout, or nothing was to change)."""
        before = self._mem_total
        if not done:
            total = self.mem_total()
            return GuestMemory(total, total - before), None
        size_kib = self.config.dimm_size // 1024
        want = before + size_kib if grow else before - size_kib
        total, seen = self.console(HOTPLUG_VM).wait_mem_total(
            (lambda kb: kb >= want) if grow else (lambda kb: kb <= want),
            timeout=self.config.step_timeout, interval=0.1)
        return GuestMemory(total, total - before, reached=seen is not None), seen

    def _emit(self, step: Step) -> Step:
        self.steps.append(step)
        self.on_step(step)
        return step

    def probe_limit(self) -> None:
        """Hot-add until the planner refuses, then force that DIMM through."""
        for _ in range(self.config.slot_count + 1):
            self.say("probing the limit: one more DIMM")
            step = self.add_dimm()
            if step.qemu is None:
                refusals = ", ".join(str(r.code) for r in (step.planner.refusals
                                                           if step.planner else ()))
                self.say(f"the planner refused ({refusals}); forcing it to see QEMU's answer")
                self.add_dimm(force=True)
                return
            if not step.qemu.ok:
                return

    # -- live migration ---------------------------------------------------------------------
    def _dimm_writes(self) -> tuple[int, int]:
        """Frames and bytes the back-end wrote so far into VM 1's hot-added DIMMs (the
        regions of its table at the DIMMs' addresses)."""
        assert self.qmp is not None
        dimms = {d.addr for d in read_state(self.qmp).memory_devices if d.addr is not None}
        memory = self._vm1_status().get("memory")
        regions = [r for r in (memory if isinstance(memory, list) else [])
                   if isinstance(r, dict) and r.get("guest_phys_addr") in dimms]
        return (sum(int(r.get("writes", 0)) for r in regions),
                sum(int(r.get("bytes_written", 0)) for r in regions))

    def _vm1_status(self, pid: int | None = None) -> dict[str, object]:
        """VM 1's connection (or the one of QEMU ``pid``) as the back-end describes it."""
        want = self.vms[HOTPLUG_VM].qemu.pid if pid is None else pid
        conns = self.meter.status().get("connections", [])
        for conn in conns if isinstance(conns, list) else []:
            if isinstance(conn, dict) and conn.get("peer_pid") == want:
                return conn
        return {}

    def _departed_drops(self, name: str) -> dict[str, int]:
        """The frames the switch dropped on its way out of port ``name``, which left
        (the final counters it keeps of departed ports), by reason; {} when it is not
        among them."""
        switch = self.meter.status().get("switch")
        departed = switch.get("departed") if isinstance(switch, dict) else None
        for port in departed if isinstance(departed, list) else []:
            if isinstance(port, dict) and port.get("name") == name:
                drops = port.get("tx_drops")
                if isinstance(drops, dict):
                    return {str(k): v for k, v in drops.items() if isinstance(v, int)}
        return {}

    def _online_dimms_in_kernel_zone(self) -> None:
        """Move the hot-added DIMMs' memory blocks to ZONE_NORMAL, where the guest's
        receive buffers (kernel allocations) come from: frames then land in the DIMMs."""
        assert self.qmp is not None
        console = self.console(HOTPLUG_VM)
        block_size, blocks = console.memory_blocks()
        starts = [(d.addr, d.size) for d in read_state(self.qmp).memory_devices
                  if d.addr is not None and d.id in self._added]
        for blk in blocks:
            at = blk.index * block_size
            if any(a <= at < a + n for a, n in starts) and "Normal" not in blk.zones:
                console.offline_block(blk.index)
                console.online_block(blk.index, "online_kernel")

    def migrate(self) -> Step:
        """Live-migrate VM 1 to a second QEMU on the switch's destination socket while
        VM 2 streams into it; measure, check, and make the destination VM 1."""
        assert self.qmp is not None and self._last is not None and self._loops is not None
        before = self._last
        c, vm1 = self.config, self.vms[HOTPLUG_VM]
        source = vm1.qemu
        self._online_dimms_in_kernel_zone()
        stream = Stream(self.console(1), self.console(HOTPLUG_VM), c.ip(HOTPLUG_VM))
        stream.start()
        deadline = time.monotonic() + c.step_timeout
        start_writes = self._dimm_writes()[0]
        while self._dimm_writes()[0] < start_writes + WARMUP_FRAMES:
            if time.monotonic() > deadline:
                raise LabError("the stream did not reach the hot-added DIMMs within "
                               f"{c.step_timeout} s")
            time.sleep(0.5)
        args = (*destination_args(read_state(self.qmp)).argv, "-incoming", "defer")
        drops_before = sum(p.drops for p in self.switch_counters())
        self.say(f"starting VM 1's destination ({len(args) // 4} DIMMs on its command "
                 "line) on the switch's socket vm1-dest.sock")
        dest = self.machines.start_destination(args)
        uri = f"unix:{self.machines.rundir}/migrate.sock"
        with Qmp(str(dest.qmp_path), timeout=c.step_timeout) as dst:
            src_state, dst_state = read_state(self.qmp), read_state(dst)
            pre = preflight(src_state, read_facts(self.qmp, src_state), dst_state,
                            read_facts(dst, dst_state))
            since = self._loops.uptimes()
            writes = self._dimm_writes()
            if pre.refused:
                raise LabError("the migration preflight refused: " + "; ".join(
                    f"{r.code}: {r.message}" for r in pre.refusals))
            stream.pause_receiver()
            self.say(f"migrating VM 1 to QEMU pid {dest.pid} over {uri}")
            # The pingers' clocks around the migration's command: a ping sent in its last
            # SWITCHOVER_SPAN s can meet the switchover (see checks.migration_checks).
            migrating_from = self._loops.uptimes()
            outcome = run_migration(self.qmp, dst, uri, timeout=c.step_timeout,
                                    on_progress=lambda p: self.say(
                                        f"  {p.status}: {p.transferred >> 20} MiB sent, "
                                        f"{p.remaining >> 20} MiB left"))
            migrating_to = self._loops.uptimes()
        src_conn = self._vm1_status(source.pid)
        written = self._dimm_writes() if src_conn else writes
        log = src_conn.get("dirty_log")
        log = log if isinstance(log, dict) else {}
        if not outcome.ok:
            raise LabError(f"the migration failed: {outcome.error}")
        console = GuestConsole.connect(dest.console_path, name=f"guest-{dest.pid}",
                                  log=self.machines.rundir / "console1-dest.log")
        self.machines.take_over(dest, console)
        self._vm_by_pid = self.machines.vm_by_pid
        self.qmp.inner.close()
        self.qmp = TimedMonitor(Qmp(str(dest.qmp_path), timeout=c.step_timeout).connect())
        stream.resume_receiver(console)
        result = stream.finish(console)
        window = self._loops.window(since, {
            vm: (max(migrating_from[vm], migrating_to[vm] - SWITCHOVER_SPAN), to)
            for vm, to in migrating_to.items()})
        self.say(f"stream: {result.received} bytes, "
                 f"{'intact' if result.intact else 'CORRUPTED'}; pings across the "
                 f"migration: {window.sent} sent, {window.lost} lost "
                 f"({window.lost_during} sent at the switchover), longest gap "
                 f"{window.longest_gap} s; stopping the source QEMU")
        source_port = str(src_conn.get("name", "")) if src_conn else ""
        self.machines.stop_retired()
        deadline = time.monotonic() + 30
        while self._vm1_status(source.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        gone = not self._vm1_status(source.pid)
        source_drops = self._departed_drops(source_port)
        try:
            held_log = procfs.measure(self.machines.net_pid, "vhost-log")
            log_held = held_log.matching_fds + held_log.mappings
        except procfs.ProcfsError as e:
            raise LabError(f"cannot measure the back-end: {e}") from e
        migration = Migration(
            uri=uri, refusals=pre.refusals, ok=outcome.ok, status=outcome.status,
            error=outcome.error, total_time=outcome.total_time, downtime=outcome.downtime,
            setup_time=outcome.setup_time, seconds=outcome.seconds,
            transferred=outcome.transferred, dirty_sync_count=outcome.dirty_sync_count,
            resumed_after=outcome.resumed_after, source_pid=source.pid,
            destination_pid=dest.pid, dimm_frames=written[0] - writes[0],
            dimm_bytes=written[1] - writes[1], log_size=int(log.get("mmap_size", 0)),
            log_marks=int(log.get("marks", 0)), log_overflows=int(log.get("overflows", 0)),
            pings_sent=window.sent, pings_lost=window.lost, longest_gap=window.longest_gap,
            pings_lost_switchover=window.lost_during,
            pings_answered_after=window.answered_after, source_drops=source_drops,
            stream_bytes=result.received, stream_md5=result.md5,
            stream_expected_md5=result.expected_md5, source_gone=gone, log_held=log_held,
            drops_before=drops_before,
            drops_after=sum(p.drops for p in self.switch_counters()))
        backend = self.meter.backend(self._vm_by_pid)
        step = Step(len(self.steps), "migrate", f"qemu-{dest.pid}", backend=backend,
                    qemu_memory=qemu_memory(read_state(self.qmp)),
                    guest=GuestMemory(self.mem_total(), 0), pings=self._ping_counts(),
                    migration=migration)
        step = replace(step, checks=checks.migration_checks(step, before,
                                                            self.usage["baseline"]))
        self._last = step
        return self._emit(step)

    # -- the whole run ---------------------------------------------------------------------
    def quit_vms(self) -> None:
        """Stop every QEMU; the back-end must then hold no guest RAM and be back to the fd
        count it had before the VMs."""
        if self.qmp is not None:
            self.qmp.inner.close()
            self.qmp = None
        self.machines.stop_vms()
        deadline = time.monotonic() + 30
        while self.meter.connections(self._vm_by_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.usage["after_vms"] = self.meter.usage()

    def run(self) -> Report:
        """Set up, ping, hot-plug, (unplug), tear the VMs down, and judge."""
        c = self.config
        t0 = time.monotonic()
        image = self.load_image()
        self.start_net()
        self.boot()
        self.ping_all()
        self.baseline()
        self.start_ping_loops()
        assert self._loops is not None and self.accel is not None
        for i in range(c.dimms):
            self.say(f"hot-adding DIMM {i + 1}/{c.dimms} ({c.dimm_size // MiB} MiB) into VM 1")
            if not self.add_dimm().done:
                break
        if c.probe_limit:
            self.probe_limit()
        if c.migrate:
            self.migrate()
        if c.unplug:
            for device_id in reversed(list(self._added)):
                self.say(f"removing {device_id} from VM 1")
                self.remove_dimm(device_id)
        continuous = self._loops.stop()
        self.say(f"continuous ping: {continuous.received}/{continuous.sent} answered")
        self.usage["after"] = self.meter.usage()
        switch = self.switch_counters()
        self.quit_vms()
        u = self.usage
        usage = BackendUsage(u["before_vms"], u["baseline"], u["after"], u["after_vms"])
        steps = tuple(self.steps)
        return Report(
            config=c, image=image, run_directory=str(self.machines.rundir),
            net_pid=self.machines.net_pid, qemu_pids=self.machines.qemu_pids,
            accel=self.accel, backend=usage, pings=self.pings,
            protocol_features=self.protocol_features,
            switch_at_baseline=self.switch_at_baseline, continuous_ping=continuous,
            switch=switch, seconds=round(time.monotonic() - t0, 3), steps=steps,
            verdict=checks.judge(steps, self.pings, continuous, switch,
                                 self.switch_at_baseline, usage, c.dimms))


def _update(backend: Backend | None) -> MemoryUpdate | None:
    """The last memory table change on VM 1's connection."""
    vm1 = backend.hotplug_vm if backend is not None else None
    return vm1.last_update if vm1 is not None else None


def run_lab(config: LabConfig, *, say: Say | None = None, on_step: StepHook | None = None,
            image: GuestImage | None = None) -> Report:
    """Run the whole lab; everything is torn down before it returns or raises."""
    with Lab(config, say=say, on_step=on_step, image=image) as lab:
        return lab.run()
