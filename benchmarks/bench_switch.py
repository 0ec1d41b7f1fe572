"""Forwarding throughput: pyvhost's switch beside DPDK 22.11 testpmd's net_vhost, one run.

One command: ``python benchmarks/bench_switch.py`` (``--seconds N`` per measurement,
``--repeat N`` measurements of each back-end, alternating, ``--json FILE`` to keep the
figures). For each frame size (64 and 1500 bytes) and each back-end it starts:

- the back-end with two vhost-user ports: ``pyvhost net --socket A --socket B`` (the L2
  switch), or ``dpdk-testpmd --vdev net_vhost0,iface=A --vdev net_vhost1,iface=B`` in
  ``io`` mode (port 0 <-> port 1, the C peer doing the same forwarding without a MAC
  table);
- a sink: testpmd's virtio_user on B in ``rxonly`` mode;
- a source: testpmd's virtio_user on A in ``txonly`` mode, frames addressed to the sink's
  MAC. The sink never transmits, so the switch never learns its MAC: each frame is
  unknown unicast, flooded to the one other port (the same work as a known unicast
  here, one output port).

Cores (the machine has 2): the back-end runs on CPU 0 (pyvhost under ``taskset -c 0``;
the DPDK back-end forwards on lcore 0 with its main lcore on 1), and the source and the
sink both forward on CPU 1 (main lcore 0). Three busy processes on two cores: the source
and sink share CPU 1 and run in turns, which caps the rate the C back-end can show. Their
rings have 4096 entries (``--queue-size``; DPDK's default is 256) so that the back-end
still finds frames and buffers while one of them waits for its turn.

With ``--repeat`` it also gives each round's pyvhost frames/s over the DPDK run beside
it, and their median: on a VM whose two vCPUs the host moves between a shared cache and
none (``bench_cross_cpu.py`` shows it), both back-ends change speed from one run to the
next, so a ratio within a round, over ten rounds or more, says more than one run.

``--placement`` (loop topologies) goes further: it cuts each timed window into windows of
``--window`` seconds and, between two, measures the two CPUs' cache-line round trip with
``bench_cross_cpu.py``'s ping-pong (2,000 round trips, under SCHED_FIFO when root so that
it runs at once on both CPUs: about 1 ms, every window). A window whose round trips before
and after fall in the same level (two levels when the samples' 95th percentile is more
than twice their 5th, split at the geometric mean of the two) counts for that level; the
others are left out. It then gives each back-end's frames/s and CPU per frame at each
level, and pyvhost over DPDK at the same level: a comparison of two back-ends under the
same placement of the vCPUs, which rounds taken at different moments can not give.

``--profile`` (with ``--placement``, root, Debian's linux-perf) also runs ``perf record``
(cpu-clock, PROFILE_HZ samples a second, on the monotonic clock) on the back-end through
each timed run. Each sample goes to the window whose span holds its time, and each level's
windows give that level's profile: the shares of the back-end's samples per program or
library and per function (a Cython function under its own name). Where the back-end's
time goes at one placement, which a profile over the whole run mixes.

It reports frames/s and Gbit/s delivered to the sink (the median of the sink's per-second
``Rx-pps``; Gbit/s counts the Ethernet frame without FCS, preamble or gap), and the
back-end process's CPU seconds per million frames delivered (utime + stime from
/proc/PID/stat over the timed window, all threads). DPDK's back-end busy-polls, so its
CPU time is about one core-second per second whatever the rate.

pyvhost runs twice, on its compiled data path and forced onto the pure-Python one
(``PYVHOST_PURE=1``, kind ``pyvhost-pure``); ``--kinds`` picks back-ends.

testpmd's memory (the front-ends' guest memory, which the back-end maps, and DPDK's
back-end's own) is ``--no-huge`` (4 KiB pages of a memfd) unless ``--hugepages`` puts it
on 2 MiB hugepages, as DPDK and vhost-user VMs run in production (root: the pages are
reserved and a private hugetlbfs mounted for the run, both given back after).

``--topology loop`` measures the data path alone, with nothing sharing a CPU: one
testpmd virtio_user in ``io`` mode (``start tx_first 64``: 64 bursts circulate,
``--in-flight`` to change it) against a
back-end that sends every frame straight back, ``pyvhost net --reflect`` or testpmd
``net_vhost0`` in ``macswap`` mode; the back-end on CPU 0, the front-end on CPU 1. Its
frames/s is the front-end's ``Rx-pps`` over the timed window (``show port stats``). This
is the "what a C back-end reaches on this machine" figure the switch topology can not
show, because its source and sink share a CPU.

Before 2026-11-25 the source crashed within seconds against pyvhost (SIGSEGV in
librte_net_virtio): pyvhost published the used ring's index with ``struct.pack_into``,
which stores 0 first; see ``pyvhost.virtq.split.store_le16``.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import bench_cross_cpu as xcpu

from pyvhost import datapath
from pyvhost.tools.process import end_process, exit_on_sigterm, pyvhost_argv

CLK_TCK = os.sysconf("SC_CLK_TCK")
SINK_MAC = "02:00:00:00:00:02"
SOURCE_MAC = "02:00:00:00:00:01"
#: The back-end's CPU; the source and the sink forward on the other one.
BACKEND_CPU, TRAFFIC_CPU = 0, 1
_RX_PPS = re.compile(r"Rx-pps:\s+(\d+)")
#: pyvhost on its compiled data path, pyvhost forced onto the pure-Python one
#: (PYVHOST_PURE=1), and DPDK 22.11.
KINDS = ("pyvhost", "pyvhost-pure", "dpdk")
#: Loop topologies: bursts of 32 frames each front-end port starts with (``--in-flight``).
IN_FLIGHT = 64
#: ``--profile``: perf's samples per second of the back-end's CPU time, and the functions
#: shown per level.
PROFILE_HZ = 1000
PROFILE_TOP = 10
#: ``perf script -F time,ip,sym,dso --ns``: "  63707.256780428:  7f91068d8b5c pop (/x/y.so)".
_PERF_LINE = re.compile(r"^\s*(\d+\.\d+):\s+[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$")
#: A shared object's suffix: ".so.6", ".cpython-311-x86_64-linux-gnu.so".
_SO_SUFFIX = re.compile(r"(\.cpython-[\w-]+)?\.so(\.[\d.]+)?$")
#: A Cython function's C name: __pyx_f_ then the module path's parts, each after its length.
_PYX_NAME = re.compile(r"^__pyx_[a-z]+_((?:\d+)\w+)$")


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    log: Path
    prefix: str | None

    def text(self) -> str:
        return self.log.read_text(errors="replace")


class Run:
    """Processes of one measurement; all are ended by pid on exit. With ``huge_dir`` (a
    hugetlbfs mount) testpmd's memory is on 2 MiB hugepages there, else ``--no-huge``."""

    def __init__(self, work: Path, huge_dir: Path | None = None) -> None:
        self.work = work
        self.huge_dir = huge_dir
        self.procs: list[Proc] = []

    def start(self, argv: list[str], name: str, prefix: str | None = None,
              env: dict[str, str] | None = None) -> Proc:
        log = self.work / f"{name}.log"
        with open(log, "wb") as out:
            p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True, env=env)
        proc = Proc(p, log, prefix)
        self.procs.append(proc)
        return proc

    def testpmd(self, name: str, vdevs: list[str], app: list[str], forward_cpu: int) -> Proc:
        """testpmd on CPUs 0-1, forwarding on ``forward_cpu`` (its main lcore is the
        other CPU and mostly sleeps)."""
        binary = shutil.which("dpdk-testpmd")
        if binary is None:
            raise SystemExit("dpdk-testpmd not found (Debian package dpdk-dev)")
        prefix = f"pyvhost-bsw-{name}-{uuid.uuid4().hex[:6]}"
        # One file per process (--single-file-segments): its memory is one vhost-user
        # region, not one per 2 MiB page (a vhost-user table holds 8 without
        # CONFIGURE_MEM_SLOTS).
        memory = (["--huge-dir", str(self.huge_dir), "--single-file-segments"]
                  if self.huge_dir is not None else ["--no-huge"])
        argv = ["stdbuf", "-oL", binary, "-l", "0-1", "--main-lcore", str(1 - forward_cpu),
                *memory, "-m", "512", "--no-pci", "--file-prefix", prefix]
        for v in vdevs:
            argv += ["--vdev", v]
        argv += ["--", "--nb-cores=1", "--total-num-mbufs=16384", *app]
        return self.start(argv, name, prefix)

    def stop(self, proc: Proc, how: str = "enter") -> None:
        p = proc.popen
        asked = False
        if p.poll() is None and how == "enter" and p.stdin is not None:
            with contextlib.suppress(OSError):
                p.stdin.write(b"\n")  # testpmd's "Press enter to exit"
                p.stdin.flush()
                asked = True
        if not asked and p.stdin is not None:
            # testpmd signalled before its prompt runs (a benchmark ended during its
            # start) does not quit until the prompt reads its end of input.
            with contextlib.suppress(OSError):
                p.stdin.close()
        end_process(p, None if asked else signal.SIGINT, timeout=30)
        if proc.prefix:
            shutil.rmtree(Path("/var/run/dpdk") / proc.prefix, ignore_errors=True)
            if self.huge_dir is not None:
                # testpmd leaves its hugepage files behind: give their pages back.
                for f in self.huge_dir.glob(f"{proc.prefix}map_*"):
                    f.unlink(missing_ok=True)

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc, "signal")


class BenchError(Exception):
    """A measurement that could not be made (a process exited, a wait timed out)."""


def wait_for(cond: Callable[[], bool], what: str, proc: Proc, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.popen.poll() is not None:
            raise BenchError(f"{proc.log.stem} exited ({proc.popen.returncode}) while "
                             f"waiting for {what}:\n{proc.text()[-2000:]}")
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(0.1)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def net_options(help_text: str) -> dict[str, bool]:
    """The options ``pyvhost net --help`` lists: name -> whether it takes a value."""
    found: dict[str, bool] = {}
    options = help_text.split("\nOptions:", 1)[-1]  # not the examples above it
    for m in re.finditer(r"^\s+(?:-\w, )?(--[\w-]+)(?: / --[\w-]+)?( [A-Z][\w:]*)?",
                         options, re.M):
        found[m.group(1)] = bool(m.group(2))
    return found


def split_pyvhost_args(extra: list[str], options: dict[str, bool]) -> tuple[
        list[str], list[str]]:
    """(the args ``pyvhost net`` has, the options it lacks): an option it does not list is
    dropped with the value after it (a token not starting with ``-``)."""
    kept: list[str] = []
    dropped: list[str] = []
    i = 0
    while i < len(extra):
        arg = extra[i]
        name = arg.split("=", 1)[0]
        takes = options.get(name)
        has_value = "=" not in arg and i + 1 < len(extra) and not extra[i + 1].startswith("-")
        if takes is None:
            dropped.append(name)
            i += 2 if has_value else 1
            continue
        kept.append(arg)
        if takes and "=" not in arg and i + 1 < len(extra):
            kept.append(extra[i + 1])
            i += 1
        i += 1
    return kept, dropped


def pyvhost_extra(spec: str) -> list[str]:
    """``--pyvhost-args`` reduced to what this ``pyvhost net`` has; says what it skips."""
    if not spec.strip():
        return []
    help_text = subprocess.run(pyvhost_argv("net", "--help"), capture_output=True,
                               text=True, check=True).stdout
    kept, dropped = split_pyvhost_args(shlex.split(spec), net_options(help_text))
    for name in dropped:
        print(f"note: this pyvhost net has no {name} option (see pyvhost net --help): "
              "skipped", file=sys.stderr)
    return kept


def pyvhost_env(kind: str) -> dict[str, str]:
    """The environment of a pyvhost back-end: PYVHOST_PURE=1 for ``pyvhost-pure``."""
    env = {k: v for k, v in os.environ.items() if k != "PYVHOST_PURE"}
    if kind == "pyvhost-pure":
        env["PYVHOST_PURE"] = "1"
    return env


def command(proc: Proc, line: str) -> int:
    """Send one interactive command to testpmd; returns the output offset before it."""
    offset = len(proc.text())
    assert proc.popen.stdin is not None
    proc.popen.stdin.write(line.encode() + b"\n")
    proc.popen.stdin.flush()
    return offset


def queue_options(queue_pairs: int) -> list[str]:
    """testpmd's application options for ``queue_pairs`` receive/transmit queues a port."""
    return [f"--rxq={queue_pairs}", f"--txq={queue_pairs}"] if queue_pairs > 1 else []


@dataclass(frozen=True)
class Setup:
    """One measurement: which back-end, frame size, queue pairs, window, ring size and
    extra ``pyvhost net`` options."""

    kind: str
    size: int
    queue_pairs: int = 1
    seconds: float = 10.0
    queue_size: int = 4096
    extra: tuple[str, ...] = ()
    #: The CPUs pyvhost may run on (taskset -c); DPDK's back-end always forwards on
    #: BACKEND_CPU.
    pyvhost_cpus: str = str(BACKEND_CPU)
    #: testpmd's memory (front-ends and DPDK's back-end) on 2 MiB hugepages there
    #: (``--hugepages``), else ``--no-huge``.
    huge_dir: Path | None = None
    #: ``--placement``: sample the CPUs' round trip between windows of the timed run.
    placement: Placement | None = None
    #: Loop topologies: bursts each front-end port starts with (``--in-flight``).
    in_flight: int = IN_FLIGHT


@dataclass
class Placement:
    """``--placement``: the ping-pong program, the window, and the windows measured by the
    last :func:`measure_loop` (each: seconds, frames/s, back-end CPU seconds, the round
    trip in ns before and after it, and its start and end on the monotonic clock)."""

    exe: Path
    window: float = 0.5
    rounds: int = 2000
    #: Run the ping-pong under SCHED_FIFO (root): both its threads run at once, ahead of
    #: the busy back-end and front-end, so the sample is the placement, not the queueing.
    fifo: bool = False
    windows: list[dict[str, float]] = field(default_factory=list)
    #: ``--profile``: perf, and per window (in the order of ``windows``) the back-end's
    #: samples per "function (object)".
    perf: str | None = None
    profiles: list[dict[str, int]] = field(default_factory=list)

    def sample(self) -> float:
        try:
            return xcpu.sample(self.exe, (BACKEND_CPU, TRAFFIC_CPU), self.rounds,
                               fifo=self.fifo)
        except xcpu.BenchError as e:
            raise BenchError(str(e)) from None


def start_backend(run: Run, setup: Setup, sockets: list[Path], *, reflect: bool) -> Proc:
    """The back-end on BACKEND_CPU serving ``sockets``: pyvhost's switch (or ``--reflect``),
    or DPDK's net_vhost ports in io (or macswap) mode."""
    qp = setup.queue_pairs
    if setup.kind.startswith("pyvhost"):
        args = ["net"]
        for sock in sockets:
            args += ["--socket", str(sock)]
        if reflect:
            args.append("--reflect")
        if qp > 1:
            args += ["--queue-pairs", str(qp)]
        proc = run.start(["taskset", "-c", setup.pyvhost_cpus,
                          *pyvhost_argv(*args, "--no-stats", "-q", *setup.extra)],
                         setup.kind, env=pyvhost_env(setup.kind))
    else:
        proc = run.testpmd(
            "dpdk-backend",
            [f"net_vhost{i},iface={sock},queues={qp}" for i, sock in enumerate(sockets)],
            [f"--forward-mode={'macswap' if reflect else 'io'}", *queue_options(qp)],
            forward_cpu=BACKEND_CPU)
    wait_for(lambda: all(sock.exists() for sock in sockets), f"{setup.kind}'s sockets", proc)
    return proc


def _alive(*procs: Proc) -> None:
    for p in procs:
        if p.popen.poll() is not None:
            raise BenchError(f"{p.log.stem} exited ({p.popen.returncode}) during the "
                             f"measurement:\n{p.text()[-2000:]}")


def figures(fps: float, size: int, cpu_s: float, span: float, samples: int) -> dict[str, float]:
    """The row of one measurement from the frames/s and the back-end's CPU seconds."""
    return {"samples": samples, "frames_per_s": fps, "gbit_per_s": fps * size * 8 / 1e9,
            "cpu_s_per_mframe": cpu_s / max(fps * span, 1) * 1e6,
            "cpu_s_per_s": cpu_s / span}


def measure_switch(setup: Setup, work: Path) -> dict[str, float]:
    """txonly source -> back-end (two ports) -> rxonly sink (``--topology switch``)."""
    run = Run(work, setup.huge_dir)
    qp, qs = setup.queue_pairs, setup.queue_size
    a, b = work / f"{setup.kind}-a.sock", work / f"{setup.kind}-b.sock"
    try:
        be = start_backend(run, setup, [a, b], reflect=False)
        sink = run.testpmd(
            "sink", [f"net_virtio_user0,path={b},queues={qp},queue_size={qs},mac={SINK_MAC}"],
            ["--forward-mode=rxonly", "--stats-period=1", *queue_options(qp)],
            forward_cpu=TRAFFIC_CPU)
        wait_for(lambda: "Rx-pps" in sink.text(), "the sink", sink)
        source = run.testpmd(
            "source",
            [f"net_virtio_user0,path={a},queues={qp},queue_size={qs},mac={SOURCE_MAC}"],
            ["--forward-mode=txonly", f"--txpkts={setup.size}", f"--eth-peer=0,{SINK_MAC}",
             *queue_options(qp)], forward_cpu=TRAFFIC_CPU)
        wait_for(lambda: "Press enter to exit" in source.text(), "the source", source)
        time.sleep(2)  # let the flow settle
        cpu0, t0, off0 = cpu_seconds(be.popen.pid), time.monotonic(), len(sink.text())
        time.sleep(setup.seconds)
        cpu1, t1, off1 = cpu_seconds(be.popen.pid), time.monotonic(), len(sink.text())
        _alive(source, sink, be)
        run.stop(source)
        run.stop(sink, "signal")
        # The sink prints its receive rate every second (--stats-period=1): take the
        # samples printed inside the timed window.
        samples = [int(v) for v in _RX_PPS.findall(sink.text()[off0:off1])]
        if not samples:
            raise BenchError(f"the sink printed no rates:\n{sink.text()[-2000:]}")
    finally:
        run.close()
    return figures(statistics.median(samples), setup.size, cpu1 - cpu0, t1 - t0, len(samples))


def port_rates(text: str, ports: int) -> float:
    """The sum of the first ``ports`` ``Rx-pps`` figures in testpmd's ``show port stats``."""
    rates = _RX_PPS.findall(text)
    if len(rates) < ports:
        raise BenchError(f"expected {ports} Rx-pps figures, found {len(rates)}")
    return float(sum(int(v) for v in rates[:ports]))


def measure_loop(setup: Setup, work: Path, ports: int = 1) -> dict[str, float]:
    """One testpmd front-end in io mode on TRAFFIC_CPU, the back-end on BACKEND_CPU.

    ``ports=1`` (``--topology loop``): one virtio_user port, a back-end that sends every
    frame back. ``ports=2`` (``switch-loop``): two virtio_user ports of the same testpmd,
    io forwarding between them (what arrives on one leaves by the other), through the
    back-end's switch / DPDK's io forwarding between two net_vhost ports: MAC A's frames
    always enter by port A's socket and MAC B's by B's, so the switch forwards known
    unicast both ways. Frames/s is the sum of the ports' Rx-pps over the timed window.
    """
    run = Run(work, setup.huge_dir)
    qp, qs, kind = setup.queue_pairs, setup.queue_size, setup.kind
    socks = [work / f"{kind}-loop{i}.sock" for i in range(ports)]
    macs = (SOURCE_MAC, SINK_MAC)
    try:
        be = start_backend(run, setup, socks, reflect=ports == 1)
        app = ["-i", "--forward-mode=io", f"--txpkts={setup.size}", *queue_options(qp)]
        if ports == 2:
            app += [f"--eth-peer=0,{macs[1]}", f"--eth-peer=1,{macs[0]}"]
        fe = run.testpmd(
            "frontend",
            [f"net_virtio_user{i},path={sock},queues={qp},queue_size={qs},mac={macs[i]}"
             for i, sock in enumerate(socks)], app, forward_cpu=TRAFFIC_CPU)
        wait_for(lambda: "testpmd> " in fe.text(), "the front-end's prompt", fe)
        command(fe, f"start tx_first {setup.in_flight}")
        time.sleep(2)  # let the loop fill
        if setup.placement is not None:
            fps, cpu_s, span = _windows(setup.placement, setup.seconds, fe, be, ports)
        else:
            command(fe, "show port stats all")  # "Throughput (since last show)" starts here
            cpu0, t0 = cpu_seconds(be.popen.pid), time.monotonic()
            time.sleep(setup.seconds)
            off = command(fe, "show port stats all")
            cpu1, t1 = cpu_seconds(be.popen.pid), time.monotonic()
            _wait_stats(fe, off, ports)
            fps, cpu_s, span = port_rates(fe.text()[off:], ports), cpu1 - cpu0, t1 - t0
        _alive(fe, be)
        command(fe, "stop")
        command(fe, "quit")
    finally:
        run.close()
    return figures(fps, setup.size, cpu_s, span, 1)


def _windows(placement: Placement, seconds: float, fe: Proc, be: Proc,
             ports: int) -> tuple[float, float, float]:
    """The timed run cut into ``placement.window``-second windows, the CPUs' round trip
    sampled between them (:class:`Placement`); returns the whole run's frames/s, back-end
    CPU seconds and span. ``show port stats`` gives the rate since the last one."""
    placement.windows = []
    placement.profiles = []
    command(fe, "show port stats all")
    before = placement.sample()
    data = be.log.with_suffix(".perf")
    rec = _perf_record(placement.perf, be.popen.pid, data) if placement.perf else None
    try:
        cpu0, t0 = cpu_seconds(be.popen.pid), time.monotonic()
        cpu, t = cpu0, t0
        frames = 0.0
        while t - t0 < seconds:
            time.sleep(max(0.0, min(placement.window, seconds - (t - t0))))
            off = command(fe, "show port stats all")
            cpu1, t1 = cpu_seconds(be.popen.pid), time.monotonic()
            after = placement.sample()
            _wait_stats(fe, off, ports)
            fps = port_rates(fe.text()[off:], ports)
            placement.windows.append({"seconds": t1 - t, "frames_per_s": fps,
                                      "cpu_s": cpu1 - cpu, "rt_before_ns": before,
                                      "rt_after_ns": after, "start": t, "end": t1})
            frames += fps * (t1 - t)
            before, cpu, t = after, cpu1, t1
    finally:
        if rec is not None:
            _perf_stop(rec)
    if placement.perf:
        placement.profiles = window_profiles(perf_samples(_perf_script(placement.perf, data)),
                                             placement.windows)
    span = t - t0
    return frames / max(span, 1e-9), cpu - cpu0, span


def _perf_record(perf: str, pid: int, data: Path) -> subprocess.Popen[bytes]:
    """``perf record`` on ``pid``, its samples stamped with the monotonic clock (the
    windows' clock), until :func:`_perf_stop`."""
    rec = subprocess.Popen([perf, "record", "-q", "-e", "cpu-clock", "-F", str(PROFILE_HZ),
                            "-k", "CLOCK_MONOTONIC", "-p", str(pid), "-o", str(data)],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, start_new_session=True)
    time.sleep(0.3)  # attached before the first window starts
    if rec.poll() is not None:
        err = rec.stderr.read().decode(errors="replace").strip() if rec.stderr else ""
        raise BenchError(f"perf record failed ({rec.returncode}): {err}")
    return rec


def _perf_stop(rec: subprocess.Popen[bytes]) -> None:
    """End ``perf record`` as Ctrl-C does (it writes its file and exits)."""
    if rec.poll() is None:
        rec.send_signal(signal.SIGINT)
    try:
        rec.wait(timeout=60)
    except subprocess.TimeoutExpired:
        rec.kill()
        rec.wait()
    if rec.stderr:
        rec.stderr.close()


def _perf_script(perf: str, data: Path) -> str:
    done = subprocess.run([perf, "script", "-i", str(data), "-F", "time,ip,sym,dso", "--ns"],
                          capture_output=True, text=True, timeout=300)
    data.unlink(missing_ok=True)
    if done.returncode != 0:
        raise BenchError(f"perf script failed: {done.stderr.strip()}")
    return done.stdout


def perf_samples(text: str) -> list[tuple[float, str]]:
    """``perf script -F time,ip,sym,dso --ns``'s lines as (time in seconds, "function
    (object)"): the object by its file name, a Cython function by its own name
    (:func:`pyx_name`), a shared object without its suffix (``libc.so.6`` -> ``libc``,
    ``_native.cpython-311-x86_64-linux-gnu.so`` -> ``_native``). Lines of another shape
    are skipped."""
    out: list[tuple[float, str]] = []
    for line in text.splitlines():
        m = _PERF_LINE.match(line)
        if m is None:
            continue
        sym = pyx_name(m.group(2)) or "[unknown]"
        obj = _SO_SUFFIX.sub("", Path(m.group(3)).name)
        out.append((float(m.group(1)), f"{sym} ({obj})"))
    return out


def pyx_name(c_name: str) -> str:
    """The Python-side name of a Cython function's C name (``__pyx_f_7pyvhost_8datapath_
    7_native_pop`` -> ``pop``): the module path's parts (and a class's), each after its
    length, are dropped, and a method wrapper's number. Other names as they are."""
    m = _PYX_NAME.match(c_name)
    if m is None:
        return c_name
    rest = m.group(1)
    while (d := re.match(r"(\d+)", rest)) is not None:
        n = int(d.group(1))
        start = d.end()
        if len(rest) < start + n + 2 or rest[start + n] != "_":
            break
        rest = rest[start + n + 1:]
    return re.sub(r"^\d+(?=\D)", "", rest)   # a method's number (__pyx_pw_...): dropped


def window_profiles(samples: list[tuple[float, str]], windows: list[dict[str, float]]
                    ) -> list[dict[str, int]]:
    """Per window, its samples per function: a sample counts for the window whose
    [start, end) holds its time (the windows are consecutive; a sample outside all is
    left out)."""
    starts = [w["start"] for w in windows]
    out: list[dict[str, int]] = [{} for _ in windows]
    for t, sym in samples:
        i = bisect.bisect_right(starts, t) - 1
        if i >= 0 and t < windows[i]["end"]:
            out[i][sym] = out[i].get(sym, 0) + 1
    return out


def level_profiles(windows: dict[str, dict[str, list[dict[str, float]]]],
                   profiles: dict[str, dict[str, list[dict[str, int]]]],
                   groups: list[list[float]]) -> list[dict[str, object]]:
    """Per frame size and queue pairs, level and back-end: the samples of the windows
    counted for that level (:func:`by_level`'s rule), per object and the PROFILE_TOP
    functions, as shares."""
    rows: list[dict[str, object]] = []
    for label, per_kind in windows.items():
        for kind, ws in per_kind.items():
            # Each window's profile, by the window (by_level hands back the same dicts).
            prof_of = {id(w): prof for w, prof in zip(
                ws, profiles.get(label, {}).get(kind, []), strict=True)}
            for lv, lws in sorted(by_level(ws, groups).items()):
                acc: dict[str, int] = {}
                for w in lws:
                    for sym, n in prof_of[id(w)].items():
                        acc[sym] = acc.get(sym, 0) + n
                total = sum(acc.values())
                if not total:
                    continue
                objects: dict[str, int] = {}
                for sym, n in acc.items():
                    obj = sym.rsplit(" (", 1)[-1].rstrip(")")
                    objects[obj] = objects.get(obj, 0) + n
                top = sorted(acc.items(), key=lambda kv: (-kv[1], kv[0]))[:PROFILE_TOP]
                rows.append({"label": label, "level": lv, "kind": kind, "samples": total,
                             "objects": {o: n / total for o, n in sorted(
                                 objects.items(), key=lambda kv: (-kv[1], kv[0]))},
                             "functions": {s: n / total for s, n in top}})
    return rows


def profile_lines(rows: list[dict[str, object]]) -> str:
    """Markdown for :func:`level_profiles`."""
    lines = ["| frame, queue pairs | level | back-end | samples | by object | "
             "by function |", "|---|---:|---|---:|---|---|"]
    for r in rows:
        objects = r["objects"]
        functions = r["functions"]
        assert isinstance(objects, dict) and isinstance(functions, dict)
        lines.append(f"| {r['label']} | {r['level']} | {r['kind']} | {r['samples']:,} | "
                     + ", ".join(f"{o} {100 * v:.0f}%" for o, v in objects.items()
                                 if v >= 0.01)
                     + " | " + ", ".join(f"{s} {100 * v:.1f}%" for s, v in functions.items())
                     + " |")
    return "\n".join(lines)


def _wait_stats(fe: Proc, off: int, ports: int) -> None:
    wait_for(lambda: len(_RX_PPS.findall(fe.text()[off:])) >= ports, "the front-end's stats",
             fe)


def split_levels(samples: list[float], jump: float = xcpu.LEVEL_JUMP) -> list[list[float]]:
    """The round trips sampled over a benchmark as one level or two (sorted lists).

    Two when the 95th percentile is more than ``jump`` times the 5th; the line between
    them is their geometric mean. Over hundreds of samples a few fall between the levels
    (a sample taken while the host moves a vCPU), so the sorted samples need not jump
    anywhere (bench_cross_cpu.levels' test): the percentiles leave those few out."""
    ordered = sorted(samples)
    if not ordered:
        return []
    k = len(ordered) // 20
    lo, hi = ordered[k], ordered[-1 - k]
    if lo <= 0 or hi / lo <= jump:
        return [ordered]
    line = (lo * hi) ** 0.5
    return [[x for x in ordered if x <= line], [x for x in ordered if x > line]]


def level_of(rt: float, groups: list[list[float]]) -> int:
    """The level (index into ``groups``, from :func:`split_levels`) ``rt`` is in."""
    for i, g in enumerate(groups):
        if rt <= g[-1]:
            return i
    return len(groups) - 1


def by_level(windows: list[dict[str, float]], groups: list[list[float]]
             ) -> dict[int, list[dict[str, float]]]:
    """The windows whose round trips before and after are of the same level, per level."""
    out: dict[int, list[dict[str, float]]] = {}
    for w in windows:
        a, b = level_of(w["rt_before_ns"], groups), level_of(w["rt_after_ns"], groups)
        if a == b:
            out.setdefault(a, []).append(w)
    return out


def level_rows(windows: dict[str, dict[str, list[dict[str, float]]]],
               groups: list[list[float]]) -> list[dict[str, object]]:
    """Per frame size and queue pairs, level and back-end: the windows counted, their
    median frames/s and CPU µs per frame, and the median frames/s over DPDK's at the
    same level."""
    rows: list[dict[str, object]] = []
    for label, per_kind in windows.items():
        levelled = {kind: by_level(ws, groups) for kind, ws in per_kind.items()}
        for lv, g in enumerate(groups):
            dpdk = levelled.get("dpdk", {}).get(lv, [])
            dpdk_fps = statistics.median(w["frames_per_s"] for w in dpdk) if dpdk else None
            for kind, lvs in levelled.items():
                ws = lvs.get(lv, [])
                if not ws:
                    continue
                fps = statistics.median(w["frames_per_s"] for w in ws)
                us = statistics.median(w["cpu_s"] / max(w["frames_per_s"] * w["seconds"], 1)
                                       * 1e6 for w in ws)
                rows.append({"label": label, "level": lv,
                             "round_trip_ns": statistics.median(g), "kind": kind,
                             "windows": len(ws), "frames_per_s": fps, "cpu_us_per_frame": us,
                             "over_dpdk": (fps / dpdk_fps if dpdk_fps and kind != "dpdk"
                                           else None)})
    return rows


def level_lines(rows: list[dict[str, object]]) -> str:
    """Markdown for :func:`level_rows`."""
    lines = ["| frame, queue pairs | CPUs' round trip (level) | back-end | windows "
             "| frames/s (median) | CPU µs / frame (median) | this / DPDK, same level |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["over_dpdk"]
        lines.append(f"| {r['label']} | {r['round_trip_ns']:.0f} ns ({r['level']}) | "
                     f"{r['kind']} | {r['windows']} | {r['frames_per_s']:,.0f} | "
                     f"{r['cpu_us_per_frame']:.3f} | "
                     + (f"{100 * ratio:.0f}%" if isinstance(ratio, float) else "") + " |")
    return "\n".join(lines)


TOPOLOGIES: dict[str, Callable[[Setup, Path], dict[str, float]]] = {
    "switch": measure_switch,
    "loop": measure_loop,
    "switch-loop": lambda setup, work: measure_loop(setup, work, ports=2),
}


def _median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per figure, the median over repeated measurements."""
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def pair_ratios(rounds: dict[int, dict[str, dict[str, float]]], kind: str) -> list[float]:
    """Each round's ``kind`` frames/s over the DPDK run of the same round, in round order
    (rounds where either failed are left out). The machine's speed moves between rounds
    (see bench_cross_cpu.py), so a ratio within a round, over many rounds, is steadier
    than the ratio of two medians taken from different rounds."""
    out = []
    for i in sorted(rounds):
        r, c = rounds[i].get(kind), rounds[i].get("dpdk")
        if r is not None and c is not None and c["frames_per_s"] > 0:
            out.append(r["frames_per_s"] / c["frames_per_s"])
    return out


def pair_lines(pairs: dict[str, dict[int, dict[str, dict[str, float]]]],
               kinds: list[str]) -> str:
    """Markdown: per row and back-end, the median of the per-round ratios and each."""
    lines = ["| frame, queue pairs | back-end | this / DPDK frames/s, same round: median "
             "| each round |", "|---|---|---:|---|"]
    for label, rounds in pairs.items():
        for kind in kinds:
            if kind == "dpdk":
                continue
            ratios = pair_ratios(rounds, kind)
            if not ratios:
                lines.append(f"| {label} | {kind} | no round with both | |")
                continue
            lines.append(f"| {label} | {kind} | {100 * statistics.median(ratios):.0f}% | "
                         + ", ".join(f"{100 * x:.0f}%" for x in ratios) + " |")
    return "\n".join(lines)


def table(results: dict[str, dict[str, dict[str, float]]], kinds: list[str]) -> str:
    """Markdown: a row per (frame size and queue pairs, back-end), ratios to DPDK's row.
    A back-end whose measurements all failed shows as such."""
    lines = ["| frame, queue pairs | back-end | frames/s | Gbit/s | back-end CPU s / M frames "
             "| back-end CPU s / s | DPDK / this frames/s | this / DPDK CPU per frame |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for label, row in results.items():
        c = row.get("dpdk")
        for kind in kinds:
            r = row.get(kind)
            if r is None:
                lines.append(f"| {label} | {kind} | failed | | | | | |")
                continue
            extra = " | "
            if kind != "dpdk" and c is not None:
                extra = (f"{c['frames_per_s'] / max(r['frames_per_s'], 1e-9):.1f}x | "
                         f"{r['cpu_s_per_mframe'] / max(c['cpu_s_per_mframe'], 1e-9):.1f}x")
            lines.append(f"| {label} | {kind} | {r['frames_per_s']:,.0f} | "
                         f"{r['gbit_per_s']:.3f} | {r['cpu_s_per_mframe']:.2f} | "
                         f"{r['cpu_s_per_s']:.2f} | {extra} |")
    return "\n".join(lines)


#: 2 MiB pages ``--hugepages`` adds to the pool: 512 MiB for each testpmd (at most three
#: at a time: the source, the sink and DPDK's back-end), and some to spare.
HUGEPAGES_NEEDED = 3 * 256 + 64
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


@contextlib.contextmanager
def hugetlbfs(work: Path, pages: int = HUGEPAGES_NEEDED) -> Iterator[Path]:
    """``pages`` more 2 MiB hugepages in the pool and a private hugetlbfs mount for
    testpmd; both given back on the way out (the pool to its size before). Root only."""
    if os.geteuid() != 0:
        raise SystemExit("--hugepages: run as root (it reserves 2 MiB hugepages and "
                         "mounts hugetlbfs)")
    before = int(NR_HUGEPAGES.read_text())
    mount = work / "huge"
    mount.mkdir()
    mounted = False
    try:
        NR_HUGEPAGES.write_text(str(before + pages))
        got = int(NR_HUGEPAGES.read_text()) - before
        if got < pages:
            raise SystemExit(f"--hugepages: the kernel gave {got} of {pages} 2 MiB pages "
                             "(memory too fragmented or too small)")
        subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", str(mount)],
                       check=True, capture_output=True)
        mounted = True
        yield mount
    finally:
        if mounted:
            for f in mount.iterdir():
                f.unlink(missing_ok=True)
            subprocess.run(["umount", str(mount)], check=False, capture_output=True)
        NR_HUGEPAGES.write_text(str(before))
        mount.rmdir()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measurements per back-end and size (alternating); medians shown")
    ap.add_argument("--quick", action="store_true", help="one measurement of 3 s each")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--sizes", default="64,1500", help="frame sizes, comma-separated")
    ap.add_argument("--queue-pairs", default="1",
                    help="queue pairs per port, comma-separated (e.g. 1,2)")
    ap.add_argument("--queue-size", type=int, default=4096,
                    help="virtio_user ring size of the front-ends (DPDK's default is 256)")
    ap.add_argument("--kinds", default=",".join(KINDS),
                    help=f"back-ends to measure, comma-separated (of {', '.join(KINDS)})")
    ap.add_argument("--topology", choices=tuple(TOPOLOGIES), default="switch",
                    help="switch: txonly -> back-end (2 ports) -> rxonly; loop: one "
                         "front-end and a reflecting back-end, each on its own CPU; "
                         "switch-loop: one front-end with two ports in io mode, looped "
                         "through the back-end's two ports")
    ap.add_argument("--pyvhost-cpus", default=str(BACKEND_CPU),
                    help="CPUs pyvhost runs on (taskset -c), e.g. 0-1 for --workers 2 "
                         "on both cores (then it shares CPU 1 with the front-end); DPDK's "
                         f"back-end forwards on CPU {BACKEND_CPU} either way")
    ap.add_argument("--pyvhost-args", default="",
                    help="extra pyvhost net options, e.g. \"--workers 2 --poll-us 50\" "
                         "(those this pyvhost net lacks are skipped with a note)")
    ap.add_argument("--hugepages", action="store_true",
                    help="testpmd's memory (the front-ends' guest memory and DPDK's "
                         "back-end) on 2 MiB hugepages, as DPDK runs in production, "
                         "instead of --no-huge; root: reserves the pages and mounts a "
                         "private hugetlbfs, both given back after")
    ap.add_argument("--placement", action="store_true",
                    help="loop topologies: sample the two CPUs' cache-line round trip "
                         "between windows of each run and compare the back-ends at the "
                         "same level (the docstring of this script says how); root runs the "
                         "sampler under SCHED_FIFO")
    ap.add_argument("--profile", action="store_true",
                    help="with --placement: perf record on the back-end through each timed "
                         "run, and its profile per level (root, Debian package linux-perf)")
    ap.add_argument("--window", type=float, default=0.5,
                    help="--placement: seconds per window (default 0.5)")
    ap.add_argument("--in-flight", type=int, metavar="BURSTS",
                    help="loop topologies: bursts of 32 frames each front-end port starts "
                         f"with (testpmd's 'start tx_first BURSTS'; default {IN_FLIGHT}). "
                         "Few bursts make the loop's rate its round trip's: a back-end's "
                         "latency per turn, not its throughput")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.repeat = 3.0, 1
    measure_one = TOPOLOGIES[args.topology]
    if args.placement and args.topology == "switch":
        raise SystemExit("--placement: for --topology loop or switch-loop (the switch "
                         "topology's rate is its source's)")
    perf = shutil.which("perf") if args.profile else None
    if args.profile and not args.placement:
        raise SystemExit("--profile: with --placement (the levels come from its windows)")
    if args.profile and perf is None:
        raise SystemExit("--profile: perf not found (Debian package linux-perf)")
    if args.in_flight is not None and args.topology == "switch":
        raise SystemExit("--in-flight: for --topology loop or switch-loop (the switch "
                         "topology's source sends without pause)")
    in_flight = IN_FLIGHT if args.in_flight is None else args.in_flight
    if not 1 <= in_flight <= 1024:
        raise SystemExit("--in-flight: 1 to 1024 bursts")
    if not 0.1 <= args.window <= 60:
        raise SystemExit("--window: between 0.1 and 60 seconds")
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs 2 CPUs (one for the back-end, one for the front-ends)")
    kinds = [k for k in args.kinds.split(",") if k]
    if "dpdk" not in kinds or set(kinds) - set(KINDS):
        raise SystemExit(f"--kinds: some of {', '.join(KINDS)}, dpdk included (the ratios)")
    extra = tuple(pyvhost_extra(args.pyvhost_args))
    runs: dict[str, dict[str, list[dict[str, float]]]] = {}
    #: label -> round -> kind -> figures: which runs were taken side by side.
    pairs: dict[str, dict[int, dict[str, dict[str, float]]]] = {}
    failures: list[str] = []
    #: --placement: label -> kind -> every window of its runs.
    windows: dict[str, dict[str, list[dict[str, float]]]] = {}
    #: --profile: label -> kind -> per window of its runs, its samples per function.
    profiles: dict[str, dict[str, list[dict[str, int]]]] = {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="pyvhost-bsw-") as tmp, \
            (hugetlbfs(Path(tmp)) if args.hugepages else contextlib.nullcontext()) as huge:
        placement = None
        if args.placement:
            try:
                exe = xcpu.build(Path(tmp))
            except xcpu.BenchError as e:
                raise SystemExit(f"--placement: {e}") from None
            placement = Placement(exe, args.window,
                                  fifo=os.geteuid() == 0 and shutil.which("chrt") is not None,
                                  perf=perf)
            if placement.fifo:
                try:
                    placement.sample()       # SCHED_FIFO may be refused (a container)
                except BenchError as e:
                    placement.fifo = False
                    print(f"note: {e}", file=sys.stderr)
            if not placement.fifo:
                print("note: the round trip is sampled without SCHED_FIFO (not root, no "
                      "chrt, or refused), so a sample may wait for a busy CPU",
                      file=sys.stderr)
        for size in (int(s) for s in args.sizes.split(",")):
            for qp in (int(q) for q in args.queue_pairs.split(",")):
                label = f"{size} B, {qp} qp"
                row = runs.setdefault(label, {})
                for i in range(args.repeat):
                    for kind in kinds:
                        setup = Setup(kind, size, qp, args.seconds, args.queue_size, extra,
                                      args.pyvhost_cpus, huge, placement,
                                      in_flight)
                        try:
                            r = measure_one(setup, Path(tmp))
                        except BenchError as e:
                            first = str(e).splitlines()[0]
                            if (kind.startswith("pyvhost") and args.topology == "loop"
                                    and qp > 1):
                                first += (" (pyvhost net --reflect serves one queue pair: "
                                          "its --queue-pairs is the switch ports')")
                            failures.append(f"{label} {kind} #{i + 1}: {first}")
                            print(f"  {label} {kind} #{i + 1}: FAILED {e}", file=sys.stderr)
                            continue
                        row.setdefault(kind, []).append(r)
                        pairs.setdefault(label, {}).setdefault(i, {})[kind] = r
                        if placement is not None:
                            windows.setdefault(label, {}).setdefault(kind, []).extend(
                                placement.windows)
                            if perf:
                                profiles.setdefault(label, {}).setdefault(kind, []).extend(
                                    placement.profiles)
                        print(f"  {label} {kind} #{i + 1}: {r}", file=sys.stderr)
    load_after = os.getloadavg()[0]
    results = {label: {kind: {**_median_of(rs), "runs": len(rs)} for kind, rs in row.items()}
               for label, row in runs.items()}
    print(f"\nMachine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, kernel {platform.release()}; "
          f"pyvhost's data path {datapath.name()} (pyvhost-pure: PYVHOST_PURE=1); "
          f"date {time.strftime('%Y-%m-%d %H:%M')}; topology {args.topology}; "
          f"{args.repeat} x {args.seconds:g} s each; pyvhost net extra args: "
          f"{' '.join(extra) or 'none'}; pyvhost on CPUs {args.pyvhost_cpus}; "
          f"testpmd memory {'2 MiB hugepages' if args.hugepages else '--no-huge'}; "
          + (f"{in_flight} bursts of 32 frames in flight per front-end "
             "port; " if args.topology != "switch" else "")
          + f"1-min load average {load_before:.1f} before, "
          f"{load_after:.1f} after (other processes on the machine compete for the same "
          "2 CPUs)\n")
    print(table(results, kinds))
    if args.repeat > 1:
        print("\nEach round's pyvhost run over the DPDK run beside it:\n")
        print(pair_lines(pairs, kinds))
    levels: list[list[float]] = []
    rows: list[dict[str, object]] = []
    prows: list[dict[str, object]] = []
    if args.placement:
        samples = [w[k] for per in windows.values() for ws in per.values() for w in ws
                   for k in ("rt_before_ns", "rt_after_ns")]
        levels = split_levels(samples)
        rows = level_rows(windows, levels)
        print("\nThe two CPUs' round trip between windows: "
              + ("; ".join(f"level {i}: {len(g)} samples, median {statistics.median(g):.0f} "
                           f"ns ({g[0]:.0f}-{g[-1]:.0f})" for i, g in enumerate(levels))
                 or "no samples")
              + ". Per level, the windows with that level before and after them:\n")
        print(level_lines(rows))
        if perf:
            prows = level_profiles(windows, profiles, levels)
            print(f"\nWhere each back-end's CPU time went, per level (perf, cpu-clock at "
                  f"{PROFILE_HZ} Hz, the windows of that level; a share of its samples):\n")
            print(profile_lines(prows))
    for f in failures:
        print(f"failed: {f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"),
                                               "topology": args.topology,
                                               "seconds": args.seconds,
                                               "pyvhost_args": list(extra),
                                               "pyvhost_cpus": args.pyvhost_cpus,
                                               "hugepages": args.hugepages,
                                               "in_flight": (in_flight
                                                             if args.topology != "switch"
                                                             else None),
                                               "loadavg": [load_before, load_after],
                                               "failures": failures,
                                               "results": results,
                                               "ratios_per_round": {
                                                   label: {k: pair_ratios(rounds, k)
                                                           for k in kinds if k != "dpdk"}
                                                   for label, rounds in pairs.items()},
                                               "placement": {
                                                   "window": args.window,
                                                   "levels_ns": levels,
                                                   "by_level": rows,
                                                   "profile_by_level": prows if perf else None,
                                                   "windows": windows,
                                               } if args.placement else None,
                                               }, indent=2))


if __name__ == "__main__":
    exit_on_sigterm()
    main()
