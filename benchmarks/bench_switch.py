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

It reports frames/s and Gbit/s delivered to the sink (the median of the sink's per-second
``Rx-pps``; Gbit/s counts the Ethernet frame without FCS, preamble or gap), and the
back-end process's CPU seconds per million frames delivered (utime + stime from
/proc/PID/stat over the timed window, all threads). DPDK's back-end busy-polls, so its
CPU time is about one core-second per second whatever the rate.

pyvhost runs twice, on its compiled data path and forced onto the pure-Python one
(``PYVHOST_PURE=1``, kind ``pyvhost-pure``); ``--kinds`` picks back-ends.

``--topology loop`` measures the data path alone, with nothing sharing a CPU: one
testpmd virtio_user in ``io`` mode (``start tx_first 64``: 64 bursts circulate) against a
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyvhost.tools.process import end_process, pyvhost_argv

CLK_TCK = os.sysconf("SC_CLK_TCK")
SINK_MAC = "02:00:00:00:00:02"
SOURCE_MAC = "02:00:00:00:00:01"
#: The back-end's CPU; the source and the sink forward on the other one.
BACKEND_CPU, TRAFFIC_CPU = 0, 1
_RX_PPS = re.compile(r"Rx-pps:\s+(\d+)")
#: pyvhost on its compiled data path, pyvhost forced onto the pure-Python one
#: (PYVHOST_PURE=1), and DPDK 22.11.
KINDS = ("pyvhost", "pyvhost-pure", "dpdk")


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    log: Path
    prefix: str | None

    def text(self) -> str:
        return self.log.read_text(errors="replace")


class Run:
    """Processes of one measurement; all are ended by pid on exit."""

    def __init__(self, work: Path) -> None:
        self.work = work
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
        argv = ["stdbuf", "-oL", binary, "-l", "0-1", "--main-lcore", str(1 - forward_cpu),
                "--no-huge", "-m", "512", "--no-pci", "--file-prefix", prefix]
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
        end_process(p, None if asked else signal.SIGINT, timeout=30)
        if proc.prefix:
            shutil.rmtree(Path("/var/run/dpdk") / proc.prefix, ignore_errors=True)

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc, "signal")


def wait_for(cond: Callable[[], bool], what: str, proc: Proc, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.popen.poll() is not None:
            raise SystemExit(f"{proc.log.stem} exited ({proc.popen.returncode}) while "
                             f"waiting for {what}:\n{proc.text()[-2000:]}")
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
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


def backend(run: Run, kind: str, a: Path, b: Path) -> Proc:
    if kind.startswith("pyvhost"):
        proc = run.start(["taskset", "-c", str(BACKEND_CPU),
                          *pyvhost_argv("net", "--socket", str(a), "--socket", str(b),
                                        "--no-stats")], kind, env=pyvhost_env(kind))
    else:
        proc = run.testpmd("dpdk-backend", [f"net_vhost0,iface={a},queues=1",
                                            f"net_vhost1,iface={b},queues=1"],
                           ["--forward-mode=io"], forward_cpu=BACKEND_CPU)
    wait_for(lambda: a.exists() and b.exists(), f"{kind} sockets", proc)
    return proc


def measure(kind: str, size: int, seconds: float, work: Path,
            queue_size: int) -> dict[str, float]:
    run = Run(work)
    a, b = work / f"{kind}-a.sock", work / f"{kind}-b.sock"
    try:
        be = backend(run, kind, a, b)
        sink = run.testpmd(
            "sink",
            [f"net_virtio_user0,path={b},queues=1,queue_size={queue_size},mac={SINK_MAC}"],
            ["--forward-mode=rxonly", "--stats-period=1"], forward_cpu=TRAFFIC_CPU)
        wait_for(lambda: "Rx-pps" in sink.text(), "the sink", sink)
        source = run.testpmd(
            "source",
            [f"net_virtio_user0,path={a},queues=1,queue_size={queue_size},mac={SOURCE_MAC}"],
            ["--forward-mode=txonly", f"--txpkts={size}", f"--eth-peer=0,{SINK_MAC}"],
            forward_cpu=TRAFFIC_CPU)
        wait_for(lambda: "Press enter to exit" in source.text(), "the source", source)
        time.sleep(2)  # let the flow settle
        cpu0, t0, off0 = cpu_seconds(be.popen.pid), time.monotonic(), len(sink.text())
        time.sleep(seconds)
        cpu1, t1, off1 = cpu_seconds(be.popen.pid), time.monotonic(), len(sink.text())
        for p in (source, sink, be):
            if p.popen.poll() is not None:
                raise SystemExit(f"{p.log.stem} exited ({p.popen.returncode}) during the "
                                 f"measurement:\n{p.text()[-2000:]}")
        run.stop(source)
        run.stop(sink, "signal")
        # The sink prints its receive rate every second (--stats-period=1): take the
        # samples printed inside the timed window.
        samples = [int(v) for v in _RX_PPS.findall(sink.text()[off0:off1])]
        if not samples:
            raise SystemExit(f"the sink printed no rates:\n{sink.text()[-2000:]}")
    finally:
        run.close()
    fps = statistics.median(samples)
    frames = fps * (t1 - t0)
    return {"samples": len(samples), "frames_per_s": fps,
            "gbit_per_s": fps * size * 8 / 1e9,
            "cpu_s_per_mframe": (cpu1 - cpu0) / max(frames, 1) * 1e6,
            "cpu_s_per_s": (cpu1 - cpu0) / (t1 - t0)}


def command(proc: Proc, line: str) -> int:
    """Send one interactive command; returns the output offset before it."""
    offset = len(proc.text())
    assert proc.popen.stdin is not None
    proc.popen.stdin.write(line.encode() + b"\n")
    proc.popen.stdin.flush()
    return offset


def measure_loop(kind: str, size: int, seconds: float, work: Path,
                 queue_size: int) -> dict[str, float]:
    """One front-end and a reflecting back-end, each on its own CPU (``--topology loop``)."""
    run = Run(work)
    a = work / f"{kind}-loop.sock"
    try:
        if kind.startswith("pyvhost"):
            be = run.start(["taskset", "-c", str(BACKEND_CPU),
                            *pyvhost_argv("net", "--socket", str(a), "--reflect",
                                          "--no-stats")], f"{kind}-loop",
                           env=pyvhost_env(kind))
        else:
            be = run.testpmd("dpdk-loop", [f"net_vhost0,iface={a},queues=1"],
                             ["--forward-mode=macswap"], forward_cpu=BACKEND_CPU)
        wait_for(a.exists, f"{kind} socket", be)
        fe = run.testpmd(
            "frontend",
            [f"net_virtio_user0,path={a},queues=1,queue_size={queue_size},mac={SOURCE_MAC}"],
            ["-i", "--forward-mode=io", f"--txpkts={size}"], forward_cpu=TRAFFIC_CPU)
        wait_for(lambda: "testpmd> " in fe.text(), "the front-end's prompt", fe)
        command(fe, "start tx_first 64")
        time.sleep(2)  # let the loop fill
        command(fe, "show port stats 0")  # "Throughput (since last show)" starts here
        cpu0, t0 = cpu_seconds(be.popen.pid), time.monotonic()
        time.sleep(seconds)
        off = command(fe, "show port stats 0")
        cpu1, t1 = cpu_seconds(be.popen.pid), time.monotonic()
        wait_for(lambda: bool(_RX_PPS.search(fe.text()[off:])), "the front-end's stats", fe)
        fps = int(_RX_PPS.findall(fe.text()[off:])[0])
        for p in (fe, be):
            if p.popen.poll() is not None:
                raise SystemExit(f"{p.log.stem} exited ({p.popen.returncode}) during the "
                                 f"measurement:\n{p.text()[-2000:]}")
        command(fe, "stop")
        command(fe, "quit")
    finally:
        run.close()
    frames = fps * (t1 - t0)
    return {"samples": 1, "frames_per_s": fps, "gbit_per_s": fps * size * 8 / 1e9,
            "cpu_s_per_mframe": (cpu1 - cpu0) / max(frames, 1) * 1e6,
            "cpu_s_per_s": (cpu1 - cpu0) / (t1 - t0)}


def _median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per figure, the median over repeated measurements."""
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measurements per back-end and size (alternating); medians shown")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--sizes", default="64,1500", help="frame sizes, comma-separated")
    ap.add_argument("--queue-size", type=int, default=4096,
                    help="virtio_user ring size of source and sink (DPDK's default is 256)")
    ap.add_argument("--kinds", default=",".join(KINDS),
                    help=f"back-ends to measure, comma-separated (of {', '.join(KINDS)})")
    ap.add_argument("--topology", choices=("switch", "loop"), default="switch",
                    help="switch: txonly -> back-end (2 ports) -> rxonly; loop: one "
                         "front-end and a reflecting back-end, each on its own CPU")
    args = ap.parse_args()
    measure_one = measure if args.topology == "switch" else measure_loop
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs 2 CPUs (one for the back-end, one for source and sink)")
    kinds = [k for k in args.kinds.split(",") if k]
    if "dpdk" not in kinds or set(kinds) - set(KINDS):
        raise SystemExit(f"--kinds: some of {', '.join(KINDS)}, dpdk included (the ratios)")
    runs: dict[str, dict[str, list[dict[str, float]]]] = {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="pyvhost-bsw-") as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            for i in range(args.repeat):
                for kind in kinds:
                    r = measure_one(kind, size, args.seconds, Path(tmp), args.queue_size)
                    runs.setdefault(str(size), {}).setdefault(kind, []).append(r)
                    print(f"  {size} B {kind} #{i + 1}: {r}", file=sys.stderr)
    load_after = os.getloadavg()[0]
    results = {size: {kind: {**_median_of(rs), "runs": len(rs)} for kind, rs in row.items()}
               for size, row in runs.items()}
    print(f"\nMachine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, kernel {platform.release()}; "
          f"date {time.strftime('%Y-%m-%d')}; topology {args.topology}; "
          f"{args.repeat} x {args.seconds:g} s each; "
          f"1-min load average {load_before:.1f} before, {load_after:.1f} after (other "
          "processes on the machine compete for the same 2 CPUs)\n")
    print("| frame | back-end | frames/s | Gbit/s | back-end CPU s / M frames "
          "| back-end CPU s / s | DPDK / this frames/s | this / DPDK CPU per frame |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for label, row in results.items():
        c = row["dpdk"]
        for kind in kinds:
            r = row[kind]
            extra = " | "
            if kind != "dpdk":
                extra = (f"{c['frames_per_s'] / max(r['frames_per_s'], 1e-9):.1f}x | "
                         f"{r['cpu_s_per_mframe'] / max(c['cpu_s_per_mframe'], 1e-9):.1f}x")
            print(f"| {label} B | {kind} | {r['frames_per_s']:,.0f} | "
                  f"{r['gbit_per_s']:.3f} | {r['cpu_s_per_mframe']:.2f} | "
                  f"{r['cpu_s_per_s']:.2f} | {extra} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"),
                                               "topology": args.topology,
                                               "seconds": args.seconds,
                                               "loadavg": [load_before, load_after],
                                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
