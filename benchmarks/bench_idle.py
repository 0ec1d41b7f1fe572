"""An idle back-end's CPU use: ``pyvhost net`` with two connected front-ends beside DPDK 22.11.

One command: ``python benchmarks/bench_idle.py`` (``--seconds N`` idle, ``--repeat N``
alternating runs, ``--quick`` for 5 s once, ``--json FILE`` to keep the figures,
``--pyvhost-args "..."`` for extra ``pyvhost net`` options, e.g. ``--poll-us 50``;
options this ``pyvhost net`` lacks are skipped with a note).

What it measures: the CPU a back-end burns while its VMs send nothing. The target is
under 1% of one CPU for ``pyvhost net``; DPDK's PMD busy-polls, so its back-end takes a
whole CPU whether frames come or not.

How. The back-end serves two vhost-user ports: ``pyvhost net --socket A --socket B`` (the
switch; on its compiled data path as ``pyvhost``, forced onto the pure-Python one with
``PYVHOST_PURE=1`` as ``pyvhost-pure``), or ``dpdk-testpmd --vdev net_vhost0,iface=A
--vdev net_vhost1,iface=B --forward-mode=io`` (``dpdk``), on CPU 0. Two front-ends
connect, one per port: DPDK testpmd ``net_virtio_user`` in interactive mode (they stand
for two VMs; QEMU guests under TCG would cost more CPU than what is measured). Each
``start tx_first`` (so frames have flowed through the back-end and its queues are
started), after ``--traffic`` seconds each ``stop`` s, one second passes, and then the
back-end is watched for ``--seconds``: its CPU time from ``/proc/PID/task/*/schedstat``
(nanoseconds on CPU, every thread; utime+stime from ``/proc/PID/stat`` as a check), and
its context switches (voluntary + involuntary, every thread) as wake-ups per second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_switch import (
    BACKEND_CPU,
    TRAFFIC_CPU,
    Proc,
    Run,
    command,
    cpu_seconds,
    pyvhost_env,
    pyvhost_extra,
    wait_for,
)

from pyvhost import datapath
from pyvhost.tools.process import exit_on_sigterm, pyvhost_argv

KINDS = ("pyvhost", "pyvhost-pure", "dpdk")
MACS = ("02:00:00:00:00:01", "02:00:00:00:00:02")


def task_counters(pid: int) -> tuple[float, int]:
    """(seconds on CPU, context switches) summed over every thread of ``pid``."""
    run_ns = 0
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            run_ns += int((task / "schedstat").read_text().split()[0])
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    switches += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
    return run_ns / 1e9, switches


def summarize(before: tuple[float, int, float, float], after: tuple[float, int, float, float]
              ) -> dict[str, float]:
    """From (schedstat s, switches, stat s, monotonic s) before and after: the figures."""
    span = after[3] - before[3]
    if span <= 0:
        raise ValueError("empty window")
    return {"cpu_percent": (after[0] - before[0]) / span * 100,
            "cpu_percent_stat": (after[2] - before[2]) / span * 100,
            "wakeups_per_s": (after[1] - before[1]) / span,
            "seconds": span}


def prompt(proc: Proc) -> Callable[[], bool]:
    """Whether testpmd ``proc`` has shown its interactive prompt."""
    return lambda: "testpmd> " in proc.text()


def _sample(pid: int) -> tuple[float, int, float, float]:
    run_s, switches = task_counters(pid)
    return run_s, switches, cpu_seconds(pid), time.monotonic()


def measure(kind: str, seconds: float, traffic: float, extra: list[str],
            work: Path) -> dict[str, float]:
    run = Run(work)
    a, b = work / f"{kind}-a.sock", work / f"{kind}-b.sock"
    try:
        if kind.startswith("pyvhost"):
            be = run.start(["taskset", "-c", str(BACKEND_CPU),
                            *pyvhost_argv("net", "--socket", str(a), "--socket", str(b),
                                          "--no-stats", "-q", *extra)],
                           kind, env=pyvhost_env(kind))
        else:
            be = run.testpmd("dpdk-backend", [f"net_vhost0,iface={a},queues=1",
                                              f"net_vhost1,iface={b},queues=1"],
                             ["--forward-mode=io"], forward_cpu=BACKEND_CPU)
        wait_for(lambda: a.exists() and b.exists(), f"{kind}'s sockets", be)
        fes: list[Proc] = []
        for i, (sock, mac) in enumerate(zip((a, b), MACS, strict=True)):
            fe = run.testpmd(f"vm{i}", [f"net_virtio_user0,path={sock},queues=1,mac={mac}"],
                             ["-i", "--forward-mode=io"], forward_cpu=TRAFFIC_CPU)
            wait_for(prompt(fe), "a front-end's prompt", fe)
            fes.append(fe)
        for fe in fes:
            command(fe, "start tx_first")
        time.sleep(traffic)
        for fe in fes:
            command(fe, "stop")
        time.sleep(1.0)
        before = _sample(be.popen.pid)
        time.sleep(seconds)
        after = _sample(be.popen.pid)
        for p in (be, *fes):
            if p.popen.poll() is not None:
                raise SystemExit(f"{p.log.stem} exited ({p.popen.returncode}) during the "
                                 f"measurement:\n{p.text()[-2000:]}")
        for fe in fes:
            command(fe, "quit")
    finally:
        run.close()
    return summarize(before, after)


def table(results: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per back-end, with DPDK / this for CPU."""
    lines = ["| back-end | CPU % of one CPU (schedstat) | CPU % (utime+stime) | "
             "wake-ups/s | DPDK / this CPU |", "|---|---:|---:|---:|---:|"]
    dpdk = results.get("dpdk", {}).get("cpu_percent")
    for kind, r in results.items():
        ratio = (f"{dpdk / r['cpu_percent']:,.0f}x" if dpdk and kind != "dpdk"
                 and r["cpu_percent"] > 0 else "")
        lines.append(f"| {kind} | {r['cpu_percent']:.3f} | {r['cpu_percent_stat']:.2f} | "
                     f"{r['wakeups_per_s']:,.1f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="idle window per run")
    ap.add_argument("--traffic", type=float, default=2.0,
                    help="seconds of traffic before the front-ends stop")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs per back-end, alternating; medians shown")
    ap.add_argument("--kinds", default=",".join(KINDS),
                    help=f"back-ends, comma-separated (of {', '.join(KINDS)})")
    ap.add_argument("--pyvhost-args", default="",
                    help="extra pyvhost net options (those it lacks are skipped)")
    ap.add_argument("--quick", action="store_true", help="one run of 5 s")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.repeat = 5.0, 1
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or set(kinds) - set(KINDS):
        raise SystemExit(f"--kinds: some of {', '.join(KINDS)}")
    extra = pyvhost_extra(args.pyvhost_args)
    runs: dict[str, list[dict[str, float]]] = {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="pyvhost-bidle-") as tmp:
        for i in range(args.repeat):
            for kind in kinds:
                r = measure(kind, args.seconds, args.traffic, extra, Path(tmp))
                runs.setdefault(kind, []).append(r)
                print(f"  {kind} #{i + 1}: {r}", file=sys.stderr)
    load_after = os.getloadavg()[0]
    results = {k: {f: statistics.median(r[f] for r in rs) for f in rs[0]}
               for k, rs in runs.items()}
    print(f"\nMachine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, kernel {platform.release()}; "
          f"pyvhost's data path {datapath.name()} (pyvhost-pure: PYVHOST_PURE=1); date "
          f"{time.strftime('%Y-%m-%d %H:%M')}; 2 idle testpmd virtio_user front-ends; "
          f"medians of {args.repeat} alternating run(s) of {args.seconds:g} s; pyvhost net "
          f"extra args: {' '.join(extra) or 'none'}; 1-min load average "
          f"{load_before:.1f} before, {load_after:.1f} after\n")
    print(table(results))
    if args.json:
        doc: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args),
                               "pyvhost_args": extra, "loadavg": [load_before, load_after],
                               "results": results, "runs": runs}
        Path(args.json).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    exit_on_sigterm()
    main()
