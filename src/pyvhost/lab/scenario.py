"""The run behind ``pyvhost lab``: real VMs on a ``pyvhost net`` switch, memory hot-added
(and removed) one DIMM at a time under a continuous ping, measured after every step.

Owns one run (:class:`Lab`): a private run directory; one ``pyvhost net`` process (a
learning switch with one vhost-user socket per VM and a control socket); the QEMU guests
(:class:`~pyvhost.lab.qemu.Qemu`, started after the back-end listens: QEMU connects as a
client); the guests' ping loops; the hot-plug steps, which go through
:mod:`pyvhost.hotplug`'s planner and executor exactly as ``pyvhost mem add/remove`` does;
and the measurements: QEMU's memory devices and the regions it sends (QMP), the guest's
MemTotal (its console), the back-end's memory table per connection (its control socket)
and what the back-end process holds (``/proc/PID/fd`` and ``/proc/PID/maps``).
Everything it starts is ended by pid, and the run directory removed, by :meth:`Lab.close`:
after a failure and after Ctrl-C too.

The DIMMs all go into VM 1; the other VMs ping VM 1 the whole time, and their tables
must not move. It renders nothing (:mod:`.cli` does) and decides no hot-plug policy.

Checks after every step (a failed check is a finding, reported, not an exception):

- the back-end's table for VM 1 is exactly the regions QEMU's flat view says it sends;
- the back-end holds one fd and one mapping per region of all its tables, and no other
  fd than before the first hot-plug (QEMU re-sends every region with a fresh fd on each
  SET_MEM_TABLE: a back-end that keeps them leaks);
- the other VMs' tables did not change;
- a hot-add QEMU refused left the back-end untouched (same table generation, fds and
  mappings).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyvhost.backend.control import fetch_status
from pyvhost.errors import LocalError, PyvhostError
from pyvhost.hotplug.execute import Outcome, execute_add, execute_remove
from pyvhost.hotplug.host import page_sizes, read_host
from pyvhost.hotplug.plan import AddRequest, Plan, plan_add, plan_remove
from pyvhost.hotplug.qemu_rules import BASELINE_REGIONS
from pyvhost.hotplug.qmp import Qmp
from pyvhost.hotplug.state import VmState, read_state, vhost_regions
from pyvhost.protocol.constants import VHOST_USER_MAX_MEM_SLOTS
from pyvhost.tools import procfs
from pyvhost.tools.process import end_process, pyvhost_argv

from .accel import AccelRequest, choose_accel
from .guest import GuestConsole
from .image import GuestImage, build_image
from .qemu import BOOT_TIMEOUT, QBOOT, GiB, MiB, Qemu, VhostUserNet, guest_config

SCHEMA = "pyvhost.lab/1"
#: QEMU names the memfd of every memory-backend-memfd after its type, so this finds the
#: back-end's fds and mappings of guest RAM in /proc/PID/{fd,maps}.
GUEST_RAM_NEEDLE = "memory-backend-memfd"
BOOT_MEMORY = 256 * MiB
GUEST_BLOCK = 128 * MiB  # the guest's memory block size: DIMMs are whole blocks
PING_INTERVAL = 0.2
PING_WAIT = 5  # seconds a ping waits for its reply before it counts as lost
# The guest's ping loop: one `ping -c 1` at a time, so a stop never cuts a ping in flight
# and every ping sent is either answered within PING_WAIT seconds or counted lost.
PING_LOOP = f"""\
peer=$1; stop=/tmp/lab-ping.stop; out=/tmp/lab-ping.count
n=0; ok=0
while [ ! -e $stop ]; do
    n=$((n + 1))
    if ping -c 1 -W {PING_WAIT} "$peer" >/dev/null 2>&1; then ok=$((ok + 1)); fi
    echo "$n $ok" >$out
    sleep {PING_INTERVAL}
done
echo "done $n $ok" >$out
"""

Say = Callable[[str], None]
StepHook = Callable[[dict[str, Any]], None]


class LabError(LocalError):
    """The lab could not be set up or run (a program missing, a guest that did not boot)."""


@dataclass(frozen=True)
class LabConfig:
    """One run. ``slots`` and ``maxmem`` default to what the DIMMs (and the probe past the
    limit) need."""

    vms: int = 2
    dimms: int = 6
    dimm_size: int = 128 * MiB
    unplug: bool = False
    mem_slots: bool = False
    #: After the DIMMs: keep hot-adding until the planner refuses, then force that DIMM
    #: through to show QEMU's own refusal (and that the back-end was not touched).
    probe_limit: bool = False
    slots: int | None = None
    maxmem: int | None = None
    subnet: str = "10.99.0"
    #: After each step, wait for this many more answered pings: traffic through the new
    #: table (and time for a late loss to show).
    pings_per_step: int = 3
    boot_timeout: float = BOOT_TIMEOUT
    step_timeout: float = 60.0
    #: ``auto``: KVM where a guest really boots with it (a trial once per host kernel,
    #: cached), else TCG (:mod:`.accel`).
    accel: AccelRequest = "auto"

    def __post_init__(self) -> None:
        if not 2 <= self.vms <= 8:
            raise ValueError("vms must be 2..8: VM 1 is hot-plugged, the others ping it")
        if self.dimms < 0 or self.dimm_size <= 0 or self.dimm_size % GUEST_BLOCK:
            raise ValueError("DIMMs must be whole multiples of 128 MiB (the guest's "
                             "memory block size)")
        if not re.fullmatch(r"\d{1,3}\.\d{1,3}\.\d{1,3}", self.subnet):
            raise ValueError(f"subnet {self.subnet!r} is not like 10.99.0")

    @property
    def slot_count(self) -> int:
        return self.slots if self.slots is not None else max(8, self.dimms + 2)

    @property
    def maxmem_bytes(self) -> int:
        if self.maxmem is not None:
            return self.maxmem
        need = BOOT_MEMORY + self.slot_count * self.dimm_size
        return -(-need // GiB) * GiB

    def ip(self, vm: int) -> str:
        return f"{self.subnet}.{vm + 1}"

    def mac(self, vm: int) -> str:
        return f"52:54:00:1a:b0:{vm + 1:02x}"

    def to_json(self) -> dict[str, Any]:
        return {"vms": self.vms, "dimms": self.dimms, "dimm_size": self.dimm_size,
                "unplug": self.unplug, "mem_slots": self.mem_slots,
                "probe_limit": self.probe_limit, "slots": self.slot_count,
                "maxmem": self.maxmem_bytes, "boot_memory": BOOT_MEMORY,
                "addresses": [self.ip(i) for i in range(self.vms)], "hotplug_vm": 1,
                "accel": self.accel}


@dataclass
class Usage:
    """What the back-end process holds at one moment."""

    fds: int
    ram_fds: int  # fds on guest RAM files
    mappings: int
    ram_mappings: int

    def to_json(self) -> dict[str, int]:
        return {"fds": self.fds, "guest_ram_fds": self.ram_fds, "mappings": self.mappings,
                "guest_ram_mappings": self.ram_mappings}


@dataclass
class _TimedMonitor:
    """A :class:`~pyvhost.hotplug.qmp.Monitor` that records when each command was sent and
    answered (monotonic and wall clock) and every event that passed through it."""

    inner: Qmp
    calls: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        sent, wall = time.monotonic(), time.time()
        try:
            return self.inner.execute(command, arguments)
        finally:
            self.calls.append({"command": command, "sent": sent, "answered": time.monotonic(),
                               "wall": wall})

    def hmp(self, command_line: str) -> str:
        return str(self.execute("human-monitor-command", {"command-line": command_line}))

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        event = self.inner.next_event(timeout)
        if event is not None:
            self.events.append(event)
        return event

    def last(self, command: str) -> dict[str, Any] | None:
        return next((c for c in reversed(self.calls) if c["command"] == command), None)


@dataclass
class _Vm:
    index: int
    qemu: Qemu
    console: GuestConsole | None = None
    pinging: bool = False


class Lab:
    """One lab run; use as a context manager (:meth:`close` ends everything)."""

    def __init__(self, config: LabConfig, *, say: Say | None = None,
                 on_step: StepHook | None = None, image: GuestImage | None = None) -> None:
        self.config = config
        self.say: Say = say or (lambda _msg: None)
        self.on_step: StepHook = on_step or (lambda _step: None)
        self.image = image
        self.rundir = Path(tempfile.mkdtemp(prefix="pyvhost-lab-"))
        self.control = str(self.rundir / "net.ctl")
        self.net: subprocess.Popen[bytes] | None = None
        self.vms: list[_Vm] = []
        self.qmp: _TimedMonitor | None = None
        self.steps: list[dict[str, Any]] = []
        self.report: dict[str, Any] = {"schema": SCHEMA, "config": config.to_json()}
        self._baseline_other_fds = 0
        self._added: list[str] = []
        self._mem_total = 0
        # What the last step left: the back-end's connections by VM, and its usage.
        self._prev_conns: dict[int, dict[str, Any]] = {}
        self._prev_usage = Usage(0, 0, 0, 0)
        self._threads: list[threading.Thread] = []

    # -- lifetime --------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End QEMU (by pid), then the back-end (by pid), then remove the run directory.
        A second Ctrl-C (or SIGTERM) meanwhile is ignored, so the teardown finishes."""
        with _signals_ignored():
            self._close()

    def _close(self) -> None:
        # Every stage runs whatever the one before raised: a KeyboardInterrupt that hit
        # inside qemu.qmp's event loop can come out again from the next QMP call (Qemu.stop
        # sends `quit`), and must not leave a QEMU, pyvhost net or the run directory.
        try:
            if self.qmp is not None:
                qmp, self.qmp = self.qmp, None
                qmp.inner.close()
        finally:
            try:
                for _ in range(2):
                    for vm in reversed(self.vms):
                        with contextlib.suppress(BaseException):
                            vm.qemu.stop()
                    # A boot thread still starting its QEMU ends soon after the others are
                    # gone (Ctrl-C during boot); its process is stopped on the second pass.
                    for t in self._threads:
                        t.join(10)
            finally:
                try:
                    self._stop_net()
                finally:
                    shutil.rmtree(self.rundir, ignore_errors=True)

    def _stop_net(self) -> None:
        proc, self.net = self.net, None
        if proc is not None:
            end_process(proc, timeout=10)

    # -- set-up ----------------------------------------------------------------------------
    def socket(self, vm: int) -> str:
        return str(self.rundir / f"vm{vm + 1}.sock")

    def load_image(self) -> GuestImage:
        if self.image is None:
            self.say("guest image: loading from the cache, or building it (downloads the "
                     "Debian cloud kernel the first time)")
            try:
                self.image = build_image(progress=self.say,
                                         update_lists=os.geteuid() == 0)
            except PyvhostError as e:
                raise LabError(f"cannot build the guest image: {e}") from e
        self.report["image"] = {"directory": str(self.image.directory),
                                "kernel_release": self.image.kernel_release}
        return self.image

    def start_net(self) -> None:
        """``pyvhost net``: one socket per VM and a control socket, listening before any
        QEMU starts (QEMU connects as a client and gives up if nothing listens)."""
        argv = pyvhost_argv("net", "--control", self.control, "--no-stats",
                "--mem-slots" if self.config.mem_slots else "--no-mem-slots")
        for i in range(self.config.vms):
            argv += ["--socket", self.socket(i)]
        with open(self.rundir / "net.log", "wb") as log:
            self.net = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            if self.net.poll() is not None:
                raise LabError(f"pyvhost net exited with {self.net.returncode}:\n"
                               + self._net_log())
            with contextlib.suppress(OSError, ValueError):
                state = fetch_status(self.control, timeout=2)
                if len(state.get("listening", [])) == self.config.vms:  # type: ignore[arg-type]
                    break
            if time.monotonic() > deadline:
                raise LabError("pyvhost net did not listen within 30 s:\n" + self._net_log())
            time.sleep(0.05)
        offered = "offered" if self.config.mem_slots else "not offered"
        self.report["run_directory"] = str(self.rundir)
        self.report["pids"] = {"pyvhost_net": self.net.pid}
        self.say(f"run directory {self.rundir}")
        self.say(f"pyvhost net (pid {self.net.pid}) listens on {self.config.vms} vhost-user "
                 f"sockets, CONFIGURE_MEM_SLOTS {offered}")
        self._measure_into("before_vms")

    def status(self) -> dict[str, Any]:
        """The back-end's state from its control socket."""
        try:
            return fetch_status(self.control)
        except (OSError, ValueError) as e:
            raise LabError(f"pyvhost net's control socket did not answer: {e}\n"
                           + self._net_log()) from e

    def _net_log(self) -> str:
        try:
            return (self.rundir / "net.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def boot(self) -> None:
        """Start and boot every QEMU side by side, one thread each: qemu.qmp's synchronous
        client runs an asyncio loop of the thread that made it, so each QEMU's monitor is
        made and used in its own thread (:meth:`close` waits for them)."""
        image = self.load_image() if self.image is None else self.image
        c = self.config
        if not QBOOT.is_file():
            raise LabError(f"{QBOOT} is missing (Debian package qemu-system-data)")
        choice = choose_accel(c.accel, image, say=self.say)
        self.report["accel"] = {"requested": c.accel, "used": choice.accel,
                                "reason": choice.reason,
                                "trial_seconds": choice.trial_seconds}
        for i in range(c.vms):
            # The command channel on virtio-serial, not the UART: the lab sends many
            # commands (ping counters, MemTotal) and, on a loaded host, lines sent to the
            # emulated 16550 were seen losing their first bytes.
            cfg = guest_config(image, ip=f"{c.ip(i)}/24", channel="virtio",
                               vhost_user_net=(VhostUserNet(Path(self.socket(i)),
                                                            mac=c.mac(i)),),
                               slots=c.slot_count, maxmem=c.maxmem_bytes,
                               accel=choice.accel)
            qemu = Qemu(cfg, log=self.rundir / f"qemu{i + 1}.log",
                        console_log=self.rundir / f"console{i + 1}.log")
            self.vms.append(_Vm(i, qemu))
        self.say(f"booting {c.vms} VMs (QEMU 7.2, {choice.accel.upper()}: "
                 f"{choice.reason})")
        errors: list[BaseException] = []

        def boot_one(vm: _Vm) -> None:
            try:
                vm.qemu.start()
                vm.console = vm.qemu.boot(c.boot_timeout)
            except BaseException as e:
                errors.append(e)

        self._threads = [threading.Thread(target=boot_one, args=(vm,), daemon=True)
                         for vm in self.vms]
        for t in self._threads:
            t.start()
        for t in self._threads:
            while t.is_alive():
                t.join(0.5)
        if errors:
            raise LabError(f"a guest did not boot: {errors[0]}") from errors[0]
        pids = [vm.qemu.pid for vm in self.vms]
        self.report.setdefault("pids", {})["qemu"] = pids
        self.say(f"QEMU pids {', '.join(map(str, pids))}")
        self.qmp = _TimedMonitor(Qmp(str(self.vms[0].qemu.qmp_path),
                                     timeout=c.step_timeout).connect())
        self._wait_tables()
        self.say("all VMs booted; their NICs are started and the back-end has their "
                 "memory tables")

    def _connections(self) -> dict[int, dict[str, Any]]:
        """The back-end's connections by VM index (matched on QEMU's pid)."""
        state = self.status()
        by_pid = {vm.qemu.pid: vm.index for vm in self.vms}
        out = {}
        connections = state.get("connections", [])
        assert isinstance(connections, list)
        for conn in connections:
            vm = by_pid.get(conn.get("peer_pid"))
            if vm is not None:
                out[vm] = conn
        return out

    def _wait_tables(self) -> None:
        """QEMU sends the memory table once the guest driver starts the NIC."""
        deadline = time.monotonic() + 60
        while True:
            conns = self._connections()
            if len(conns) == self.config.vms and all(c["memory"] for c in conns.values()):
                return
            if time.monotonic() > deadline:
                raise LabError("the back-end did not get every VM's memory table within "
                               f"60 s: {sorted(conns)} connected\n{self._net_log()}")
            time.sleep(0.1)

    def console(self, vm: int) -> GuestConsole:
        console = self.vms[vm].console
        if console is None:
            raise LabError(f"VM {vm + 1} is not booted")
        return console

    # -- traffic ---------------------------------------------------------------------------
    def ping(self, src: int, dst: int, count: int = 3) -> dict[str, Any]:
        """``count`` pings from VM ``src`` to VM ``dst`` (indexes from 0), one at a time
        like the ping loop's: each is lost only without a reply within PING_WAIT s."""
        code, out = self.console(src).run(
            f"ok=0; for i in $(seq {int(count)}); do ping -c 1 -W {PING_WAIT} "
            f"{self.config.ip(dst)} >/dev/null 2>&1 && ok=$((ok + 1)); done; "
            f"echo \"answered $ok\"; [ $ok -eq {int(count)} ]",
            timeout=30 + PING_WAIT * count)
        m = re.search(r"answered (\d+)", out)
        return {"from": src + 1, "to": dst + 1, "sent": count,
                "received": int(m.group(1)) if m else 0, "exit_code": code}

    def ping_all(self) -> list[dict[str, Any]]:
        """VM 1 pings every other VM and every other VM pings VM 1."""
        results = []
        for other in range(1, self.config.vms):
            results.append(self.ping(0, other))
            results.append(self.ping(other, 0))
        self.report["pings"] = results
        ok = sum(r["received"] for r in results)
        self.say(f"pings between VMs: {ok}/{sum(r['sent'] for r in results)} answered")
        return results

    def start_ping_loops(self) -> None:
        """Every VM but VM 1 pings VM 1 until :meth:`stop_ping_loops`."""
        for vm in self.vms[1:]:
            con = self.console(vm.index)
            con.check(f"rm -f /tmp/lab-ping.*; cat >/tmp/lab-ping.sh <<'EOF'\n{PING_LOOP}EOF")
            con.check(f"setsid sh /tmp/lab-ping.sh {self.config.ip(0)} </dev/null "
                      ">/dev/null 2>&1 &")
            vm.pinging = True
        pingers = ", ".join(str(v.index + 1) for v in self.vms[1:])
        self.say(f"continuous ping to VM 1 from VM {pingers} "
                 f"(every {PING_INTERVAL} s, lost after {PING_WAIT} s without reply)")

    def ping_counts(self, final: bool = False) -> dict[str, int]:
        sent = got = 0
        for vm in self.vms[1:]:
            if not vm.pinging:
                continue
            words = self.console(vm.index).check("cat /tmp/lab-ping.count 2>/dev/null "
                                                 "|| echo 0 0").split()
            if final and words[:1] != ["done"]:
                raise LabError(f"VM {vm.index + 1}'s ping loop did not stop")
            nums = [int(w) for w in words if w.isdigit()]
            if len(nums) == 2:
                sent, got = sent + nums[0], got + nums[1]
        return {"sent": sent, "received": got, "lost": sent - got}

    @property
    def _pinging(self) -> bool:
        return any(vm.pinging for vm in self.vms)

    def _traffic_check(self) -> dict[str, Any]:
        """Wait until :attr:`LabConfig.pings_per_step` more pings were answered."""
        want = self.ping_counts()["received"] + self.config.pings_per_step
        deadline = time.monotonic() + PING_WAIT + 30 + 2 * self.config.pings_per_step
        while True:
            counts = self.ping_counts()
            if counts["received"] >= want or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        return _check("traffic flows after the step", counts["received"] >= want,
                      f"{counts['received']}/{counts['sent']} pings answered so far")

    def stop_ping_loops(self) -> dict[str, int]:
        for vm in self.vms[1:]:
            if vm.pinging:
                self.console(vm.index).check("touch /tmp/lab-ping.stop")
        deadline = time.monotonic() + PING_WAIT + 30
        while True:
            try:
                counts = self.ping_counts(final=True)
                break
            except LabError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        for vm in self.vms[1:]:
            vm.pinging = False
        self.report["continuous_ping"] = counts
        return counts

    # -- measuring -------------------------------------------------------------------------
    def usage(self) -> Usage:
        assert self.net is not None
        pid = self.net.pid
        try:
            u = procfs.measure(pid, GUEST_RAM_NEEDLE)
            total = len(procfs.mappings(pid))
        except procfs.ProcfsError as e:
            raise LabError(f"cannot measure the back-end: {e}\n{self._net_log()}") from e
        return Usage(u.fds, u.matching_fds, total, u.mappings)

    def _measure_into(self, key: str) -> Usage:
        u = self.usage()
        self.report.setdefault("backend", {})[key] = u.to_json()
        return u

    def mem_total(self) -> int:
        """VM 1's MemTotal in KiB."""
        return self.console(0).meminfo()["MemTotal"]

    def _wait_mem_total(self, want_kib: int, grow: bool) -> tuple[int, float | None]:
        """Poll VM 1's MemTotal until it reaches ``want_kib``: (the last value, when it
        was seen (time.monotonic()), or None if it did not within the step timeout)."""
        return self.console(0).wait_mem_total(
            (lambda kb: kb >= want_kib) if grow else (lambda kb: kb <= want_kib),
            timeout=self.config.step_timeout, interval=0.1)

    def baseline(self) -> None:
        """What the back-end holds with every VM up, before the first hot-plug."""
        conns = self._connections()
        regions = sum(len(c["memory"]) for c in conns.values())
        u = self._measure_into("baseline")
        self._baseline_other_fds = u.fds - u.ram_fds
        self._mem_total = self.mem_total()
        self._prev_conns, self._prev_usage = conns, u
        self.report["protocol_features"] = {str(i + 1): c["protocol_features"]
                                            for i, c in sorted(conns.items())}
        # Frames flooded to a guest whose NIC is not started yet (at boot) are dropped
        # ("port_down"); what counts is what is dropped from here on.
        self.report["switch_at_baseline"] = self.switch_counters()
        step = self._snapshot({"index": 0, "action": "baseline", "device": None}, conns, u,
                              self._state())
        step["guest"] = {"mem_total_kib": self._mem_total, "mem_total_delta_kib": 0}
        step["checks"] = self._leak_checks(u, regions)
        self._emit(step)

    # -- hot-plug --------------------------------------------------------------------------
    def _state(self) -> VmState:
        assert self.qmp is not None
        return read_state(self.qmp)

    def add_dimm(self, force: bool = False) -> dict[str, Any]:
        """Plan one DIMM for VM 1; run it unless refused (or refused and ``force``)."""
        assert self.qmp is not None
        state = self._state()
        host = read_host()
        # The lab's back-end is pyvhost: with --mem-slots its GET_MAX_MEM_SLOTS answer
        # (which QEMU does not show) is known here.
        limit = VHOST_USER_MAX_MEM_SLOTS if self.config.mem_slots else BASELINE_REGIONS
        plan = plan_add(AddRequest(size=self.config.dimm_size, assume_region_limit=limit),
                        state, host, page_sizes(state, host))
        step: dict[str, Any] = {"index": len(self.steps), "device": plan.device_id,
                                "action": "add (forced past the planner)" if force else "add",
                                "planner": _plan_json(plan)}
        if plan.refused and not force:
            step["qemu"] = None
            step["checks"] = []
            self._emit(step)
            return step
        self._run(step, plan, lambda: execute_add(
            self.qmp, plan, timeout=self.config.step_timeout,  # type: ignore[arg-type]
            ost_timeout=5.0, force=force))
        if step["qemu"]["ok"]:
            self._added.append(plan.device_id)
        return step

    def remove_dimm(self, device_id: str) -> dict[str, Any]:
        state = self._state()
        plan = plan_remove(device_id, state)
        step: dict[str, Any] = {"index": len(self.steps), "device": device_id,
                                "action": "remove", "planner": _plan_json(plan)}
        if plan.refused:
            step["qemu"] = None
            step["checks"] = []
            self._emit(step)
            return step
        self._run(step, plan, lambda: execute_remove(
            self.qmp, plan, timeout=self.config.step_timeout))  # type: ignore[arg-type]
        if step["qemu"]["ok"]:
            self._added.remove(device_id)
        return step

    def _run(self, step: dict[str, Any], plan: Plan, run: Callable[[], Outcome]) -> None:
        assert self.qmp is not None
        adding = plan.action == "add"
        before_conns, before_usage = self._prev_conns, self._prev_usage
        self.qmp.calls.clear()
        self.qmp.events.clear()
        outcome = run()
        step["qemu"] = {"ok": outcome.ok, "done": outcome.done,
                        "failed_step": outcome.failed_step, "error": outcome.error,
                        "rolled_back": outcome.rolled_back, "orphans": outcome.orphans,
                        "acpi_ost": outcome.acpi_ost, "seconds": round(outcome.seconds, 4)}
        # The guest: MemTotal grows (shrinks) by the DIMM once it onlined (offlined) it.
        size_kib = self.config.dimm_size // 1024
        mem_seen: float | None = None
        if outcome.ok:
            want = self._mem_total + (size_kib if adding else -size_kib)
            total, mem_seen = self._wait_mem_total(want, adding)
        else:
            total = self.mem_total()
        conns = self._connections()
        usage = self.usage()
        state = self._state()
        self._snapshot(step, conns, usage, state)
        step["guest"] = {"mem_total_kib": total, "mem_total_delta_kib": total - self._mem_total}
        step["timing"] = self._timing(plan, conns.get(0), before_conns.get(0), mem_seen)
        checks = self._leak_checks(usage, sum(len(c["memory"]) for c in conns.values()))
        checks += self._table_checks(state, conns, before_conns)
        if outcome.ok:
            checks.append(_check("guest sees the DIMM" if adding else "guest let it go",
                                 mem_seen is not None,
                                 f"MemTotal {self._mem_total} -> {total} KiB"))
        else:
            same = (conns.get(0, {}).get("memory_generation")
                    == before_conns.get(0, {}).get("memory_generation")
                    and usage == before_usage)
            checks.append(_check("refused hot-plug left the back-end untouched", same,
                                 f"QEMU: {outcome.error}; the back-end's table generation, "
                                 f"fds and mappings {'as before' if same else 'changed'}"))
            checks.append(_check("nothing left behind in QEMU", not outcome.orphans,
                                 f"orphans: {outcome.orphans}"))
        if self._pinging:
            checks.append(self._traffic_check())
        step["checks"] = checks
        self._mem_total = total
        self._prev_conns, self._prev_usage = conns, usage
        self._emit(step)

    def _snapshot(self, step: dict[str, Any], conns: dict[int, dict[str, Any]], usage: Usage,
                  state: VmState | None) -> dict[str, Any]:
        vm1 = conns.get(0, {})
        step["backend"] = {
            **usage.to_json(),
            "table_generation": vm1.get("memory_generation"),
            "regions": [{k: r[k] for k in ("guest_phys_addr", "memory_size", "fds_held")}
                        for r in vm1.get("memory", [])],
            "other_vms_regions": {str(i + 1): len(c["memory"]) for i, c in conns.items()
                                  if i != 0}}
        if state is not None:
            step["qemu_memory"] = {
                "devices": [{"id": d.id, "memdev": d.memdev, "addr": d.addr, "size": d.size,
                             "slot": d.slot} for d in state.memory_devices],
                "plugged_memory": state.plugged_memory,
                "vhost_user_regions": [
                    {"guest_phys_addr": r.guest_phys_addr, "memory_size": r.memory_size,
                     "memdev": r.name} for r in vhost_regions(state, _page_sizes(state))]}
        return step

    def _leak_checks(self, u: Usage, regions: int) -> list[dict[str, Any]]:
        return [
            _check("one mapping per region", u.ram_mappings == regions,
                   f"{u.ram_mappings} guest RAM mappings for {regions} regions"),
            _check("one fd per region", u.ram_fds == regions,
                   f"{u.ram_fds} guest RAM fds for {regions} regions"),
            _check("no other fd", u.fds - u.ram_fds == self._baseline_other_fds,
                   f"{u.fds - u.ram_fds} other fds, {self._baseline_other_fds} at baseline"),
        ]

    def _table_checks(self, state: VmState, conns: dict[int, dict[str, Any]],
                      before: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
        sent = sorted((r.guest_phys_addr, r.memory_size)
                      for r in vhost_regions(state, _page_sizes(state)))
        held = sorted((r["guest_phys_addr"], r["memory_size"])
                      for r in conns.get(0, {}).get("memory", []))
        others_same = all(conns.get(i, {}).get("memory_generation")
                          == before.get(i, {}).get("memory_generation")
                          for i in range(1, self.config.vms))
        return [_check("table is what QEMU sends", sent == held,
                       f"back-end {len(held)} regions, QEMU's flat view {len(sent)}"),
                _check("other VMs' tables unchanged", others_same, "")]

    def _timing(self, plan: Plan, conn: dict[str, Any] | None, prev: dict[str, Any] | None,
                mem_seen: float | None) -> dict[str, Any]:
        """Split the step's time: QEMU's command, the back-end's update inside it (QEMU
        waits for the back-end's REPLY_ACK before it answers device_add / device_del), the
        guest's ACPI _OST answer, and MemTotal."""
        assert self.qmp is not None
        command = "device_add" if plan.action == "add" else "device_del"
        call = self.qmp.last(command)
        out: dict[str, Any] = {"command": command}
        if call is None:
            return out
        out["qmp_seconds"] = round(call["answered"] - call["sent"], 6)
        update = (conn or {}).get("last_memory_update")
        prev_update = (prev or {}).get("last_memory_update")
        if update and update != prev_update:
            out["backend_request"] = update["request"]
            out["backend_received_after"] = round(update["received"] - call["sent"], 6)
            out["backend_seconds"] = round(update["in_force"] - update["received"], 6)
            inside = call["sent"] <= update["received"] <= call["answered"]
            out["backend_inside_command"] = inside
            if inside:
                out["qemu_seconds"] = round(out["qmp_seconds"] - out["backend_seconds"], 6)
        for ev in self.qmp.events:
            if ev.get("event") == "ACPI_DEVICE_OST" and \
                    ev.get("data", {}).get("info", {}).get("device") == plan.device_id:
                ts = ev.get("timestamp", {})
                at = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
                out["acpi_ost_after"] = round(at - call["wall"], 6)
                break
        if mem_seen is not None:
            out["mem_total_after"] = round(mem_seen - call["sent"], 6)
        return out

    def _emit(self, step: dict[str, Any]) -> None:
        step["ok"] = all(c["ok"] for c in step.get("checks", []))
        step["pings"] = self.ping_counts() if self._pinging else None
        self.steps.append(step)
        self.on_step(step)

    # -- the whole run ---------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Set up, ping, hot-plug, (unplug), tear the VMs down, and judge. Returns the
        report (also :attr:`report`); :attr:`report` ``["ok"]`` is the verdict."""
        c = self.config
        t0 = time.monotonic()
        self.load_image()
        self.start_net()
        self.boot()
        self.ping_all()
        self.baseline()
        self.start_ping_loops()
        for i in range(c.dimms):
            self.say(f"hot-adding DIMM {i + 1}/{c.dimms} ({c.dimm_size // MiB} MiB) into VM 1")
            step = self.add_dimm()
            if not (step["qemu"] or {}).get("ok"):
                break
        if c.probe_limit:
            self.probe_limit()
        if c.unplug:
            for device_id in reversed(list(self._added)):
                self.say(f"removing {device_id} from VM 1")
                self.remove_dimm(device_id)
        counts = self.stop_ping_loops()
        self.say(f"continuous ping: {counts['received']}/{counts['sent']} answered")
        self._measure_into("after")
        self.report["switch"] = self.switch_counters()
        self.quit_vms()
        self.report["seconds"] = round(time.monotonic() - t0, 3)
        return self.judge()

    def probe_limit(self) -> None:
        """Hot-add until the planner refuses, then force that DIMM through."""
        for _ in range(self.config.slot_count + 1):
            self.say("probing the limit: one more DIMM")
            step = self.add_dimm()
            if step["qemu"] is None:
                refusals = ", ".join(r["code"] for r in step["planner"]["refusals"])
                self.say(f"the planner refused ({refusals}); forcing it to see QEMU's answer")
                self.add_dimm(force=True)
                return
            if not step["qemu"]["ok"]:
                return

    def switch_counters(self) -> list[dict[str, Any]]:
        """Each switch port's frame counters, with the VM it serves (1-based)."""
        state = self.status()
        switch = state.get("switch", {})
        ports = switch.get("ports", []) if isinstance(switch, dict) else []
        by_name = {c["name"]: i for i, c in self._connections().items()}
        return [{"vm": by_name[p["name"]] + 1 if p["name"] in by_name else None,
                 **{k: p[k] for k in ("rx_frames", "tx_frames", "rx_drops", "tx_drops")}}
                for p in ports]

    def quit_vms(self) -> None:
        """Stop every QEMU; the back-end must then hold no guest RAM and be back to the fd
        count it had before the VMs."""
        if self.qmp is not None:
            self.qmp.inner.close()
            self.qmp = None
        for vm in self.vms:
            vm.qemu.stop()
        deadline = time.monotonic() + 30
        while self._connections() and time.monotonic() < deadline:
            time.sleep(0.1)
        self._measure_into("after_vms")

    def judge(self) -> dict[str, Any]:
        r = self.report
        r["steps"] = self.steps
        b = r["backend"]
        problems = [f"step {s['index']} ({s['action']} {s['device'] or ''}): {c['name']}: "
                    f"{c['detail']}" for s in self.steps for c in s.get("checks", [])
                    if not c["ok"]]
        ping = r.get("continuous_ping", {"lost": 0})
        lost = ping["lost"] + sum(p["sent"] - p["received"] for p in r.get("pings", []))
        if lost:
            problems.append(f"{lost} pings lost")
        dropped = _drops(r.get("switch", [])) - _drops(r.get("switch_at_baseline", []))
        if dropped:
            problems.append(f"the switch dropped {dropped} frames after the VMs were up")
        if any(p["exit_code"] for p in r.get("pings", [])):
            problems.append("a ping between VMs failed")
        released = (b["after_vms"]["fds"] == b["before_vms"]["fds"]
                    and b["after_vms"]["guest_ram_mappings"] == 0)
        if not released:
            problems.append(f"after the VMs quit the back-end holds {b['after_vms']['fds']} "
                            f"fds ({b['before_vms']['fds']} before they started) and "
                            f"{b['after_vms']['guest_ram_mappings']} guest RAM mappings")
        adds = [s for s in self.steps if s["action"] == "add" and s.get("qemu")
                and s["qemu"]["ok"]]
        if len(adds) < self.config.dimms:
            problems.append(f"only {len(adds)} of {self.config.dimms} DIMMs were hot-added")
        r["summary"] = {
            "dimms_added": len(adds),
            "dimms_removed": sum(1 for s in self.steps if s["action"] == "remove"
                                 and s.get("qemu") and s["qemu"]["ok"]),
            "pings_sent": ping.get("sent", 0) + sum(p["sent"] for p in r.get("pings", [])),
            "pings_lost": lost,
            "frames_dropped": _drops(r.get("switch", []))
                              - _drops(r.get("switch_at_baseline", [])),
            "released_after_vms": released,
        }
        r["problems"] = problems
        r["ok"] = not problems
        return r


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM ignored inside (main thread only: handlers live there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _drops(ports: list[dict[str, Any]]) -> int:
    return sum(sum(p["rx_drops"].values()) + sum(p["tx_drops"].values()) for p in ports)


def _check(name: str, ok: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "ok": bool(ok), "detail": detail}


def _page_sizes(state: VmState) -> dict[str, int]:
    return page_sizes(state, read_host())


def _plan_json(plan: Plan) -> dict[str, Any]:
    p = plan.prediction
    return {"refused": plan.refused,
            "refusals": [{"code": str(r.code), "message": r.message} for r in plan.refusals],
            "predicted_regions": None if p is None else p.vhost_user_regions,
            "region_limit": None if p is None else p.vhost_user_region_limit}


def run_lab(config: LabConfig, *, say: Say | None = None, on_step: StepHook | None = None,
            image: GuestImage | None = None) -> dict[str, Any]:
    """Run the whole lab; everything is torn down before it returns or raises."""
    with Lab(config, say=say, on_step=on_step, image=image) as lab:
        return lab.run()
