"""How long a cache line takes to go from one CPU to another and back, sampled over time.

One command: ``python benchmarks/bench_cross_cpu.py`` (``--quick`` for 5 samples,
``--samples N``, ``--interval S``, ``--cpus A,B``, ``--json FILE`` to keep the figures).

Why. Every frame a vhost-user back-end forwards crosses between CPUs: the driver writes
the descriptor and the frame on its CPU, the back-end reads them on its own, writes the
receive buffer and the used ring, and the driver reads those back. On this project's
benchmark machine (a 2-vCPU KVM guest) the data-path figures of both pyvhost and DPDK
switch between two costs from one run to the next, and within a run (see BENCHMARKS.md).
This benchmark shows the machine's part in that: the round trip of one cache line between
the two CPUs, measured again and again, one sample every ``--interval`` seconds.

How. A small C program (its source is below; compiled with ``cc -O2`` into a temporary
directory on each run, so nothing compiled is kept) pins one thread to each CPU; the two
pass a counter back and forth through one cache line, ``--round-trips`` times, spinning;
it prints the mean time per round trip. A round trip is two transfers of the line, each
a cache miss on the CPU that waits for it. The host decides where the guest's vCPUs run,
so the figure is the host's placement of them at that moment, not a property of code.

Reported: every sample in order (ns per round trip), their minimum, median and maximum,
and, where the sorted samples fall into two groups (a jump of more than
:data:`LEVEL_JUMP` times between neighbours), each group's count and median. No
threshold is assumed: the split is wherever the samples themselves jump.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from pyvhost.tools.process import exit_on_sigterm

#: Sorted samples more than this factor apart are taken as two levels.
LEVEL_JUMP = 2.0

PINGPONG_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

/* One cache line, alone in its own 128 bytes (no neighbour shares it). */
static _Alignas(128) _Atomic uint64_t line;
static long rounds;
static int cpu_b;

static int pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static void *pong(void *unused) {
    (void)unused;
    if (pin(cpu_b)) { perror("pin"); exit(2); }
    for (long i = 0; i < rounds; i++) {
        while (atomic_load_explicit(&line, memory_order_acquire) != (uint64_t)(2 * i + 1)) {}
        atomic_store_explicit(&line, (uint64_t)(2 * i + 2), memory_order_release);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: pingpong CPU_A CPU_B ROUNDS\n"); return 2; }
    int cpu_a = atoi(argv[1]);
    cpu_b = atoi(argv[2]);
    rounds = atol(argv[3]);
    if (rounds <= 0) { fprintf(stderr, "ROUNDS must be positive\n"); return 2; }
    pthread_t t;
    if (pthread_create(&t, NULL, pong, NULL)) { perror("pthread_create"); return 2; }
    if (pin(cpu_a)) { perror("pin"); return 2; }
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < rounds; i++) {
        atomic_store_explicit(&line, (uint64_t)(2 * i + 1), memory_order_release);
        while (atomic_load_explicit(&line, memory_order_acquire) != (uint64_t)(2 * i + 2)) {}
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    pthread_join(t, NULL);
    double ns = (double)(b.tv_sec - a.tv_sec) * 1e9 + (double)(b.tv_nsec - a.tv_nsec);
    printf("%.1f\n", ns / (double)rounds);
    return 0;
}
"""


class BenchError(Exception):
    """The benchmark can not run here (no compiler, a CPU that does not exist)."""


def build(work: Path) -> Path:
    """Compile the ping-pong program into ``work``; returns its path."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BenchError("no C compiler found (Debian package gcc)")
    src = work / "pingpong.c"
    src.write_text(PINGPONG_C)
    exe = work / "pingpong"
    done = subprocess.run([cc, "-O2", "-pthread", "-o", str(exe), str(src)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"cc failed:\n{done.stderr}")
    return exe


def sample(exe: Path, cpus: tuple[int, int], rounds: int, *, fifo: bool = False) -> float:
    """One sample: ns per round trip between ``cpus``. ``fifo``: under SCHED_FIFO (``chrt
    -f 1``, root), so that both threads run at once even where busy processes hold the
    CPUs (bench_switch.py samples between windows of a loaded run)."""
    argv = [str(exe), str(cpus[0]), str(cpus[1]), str(rounds)]
    if fifo:
        argv = ["chrt", "-f", "1", *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise BenchError(f"pingpong failed: {done.stderr.strip()}")
    return float(done.stdout)


def levels(samples: list[float], jump: float = LEVEL_JUMP) -> list[list[float]]:
    """The samples split at every place where the sorted values jump by more than
    ``jump`` times; one group when they never do."""
    if not samples:
        return []
    ordered = sorted(samples)
    groups = [[ordered[0]]]
    for prev, value in itertools.pairwise(ordered):
        if prev > 0 and value / prev > jump:
            groups.append([])
        groups[-1].append(value)
    return groups


def summary(samples: list[float]) -> dict[str, object]:
    """The figures reported for ``samples`` (ns per round trip, in time order)."""
    if not samples:
        raise BenchError("no samples")
    return {
        "samples_ns": samples,
        "min_ns": min(samples),
        "median_ns": statistics.median(samples),
        "max_ns": max(samples),
        "levels": [{"count": len(g), "median_ns": statistics.median(g),
                    "min_ns": g[0], "max_ns": g[-1]} for g in levels(samples)],
    }


def report(figures: dict[str, object]) -> str:
    """Human-readable lines for :func:`summary`'s figures."""
    samples = figures["samples_ns"]
    assert isinstance(samples, list)
    lines = ["samples (ns per round trip, in order): "
             + " ".join(f"{s:.0f}" for s in samples),
             f"min {figures['min_ns']:.1f} ns, median {figures['median_ns']:.1f} ns, "
             f"max {figures['max_ns']:.1f} ns"]
    groups = figures["levels"]
    assert isinstance(groups, list)
    if len(groups) > 1:
        lines.append(f"{len(groups)} levels (sorted samples jumping more than "
                     f"{LEVEL_JUMP:g}x):")
        for g in groups:
            lines.append(f"  {g['count']} samples, median {g['median_ns']:.1f} ns "
                         f"({g['min_ns']:.1f}-{g['max_ns']:.1f})")
    else:
        lines.append("one level (no jump of more than "
                     f"{LEVEL_JUMP:g}x between sorted samples)")
    return "\n".join(lines)


def parse_cpus(text: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"--cpus wants two CPU numbers, e.g. 0,1: {text!r}")
    a, b = int(parts[0]), int(parts[1])
    if a == b:
        raise argparse.ArgumentTypeError("--cpus wants two different CPUs")
    allowed = os.sched_getaffinity(0)
    for cpu in (a, b):
        if cpu not in allowed:
            raise argparse.ArgumentTypeError(
                f"CPU {cpu} is not one this process may run on ({sorted(allowed)})")
    return a, b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpus", type=parse_cpus, default=None,
                    help="the two CPUs, e.g. 0,1 (default: the first two this process "
                         "may run on)")
    ap.add_argument("--samples", type=int, default=40, help="samples to take")
    ap.add_argument("--interval", type=float, default=0.5,
                    help="seconds between samples")
    ap.add_argument("--round-trips", type=int, default=200_000,
                    help="round trips per sample (its mean is the sample)")
    ap.add_argument("--quick", action="store_true", help="5 samples, 0.2 s apart")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.interval = 5, 0.2
    if args.samples < 1 or args.round_trips < 1 or args.interval < 0:
        ap.error("--samples and --round-trips must be positive, --interval not negative")
    cpus = args.cpus
    if cpus is None:
        allowed = sorted(os.sched_getaffinity(0))
        if len(allowed) < 2:
            ap.error("this process may run on one CPU only: nothing to measure")
        cpus = (allowed[0], allowed[1])
    try:
        with tempfile.TemporaryDirectory(prefix="pyvhost-xcpu-") as tmp:
            exe = build(Path(tmp))
            samples: list[float] = []
            for i in range(args.samples):
                if i:
                    time.sleep(args.interval)
                samples.append(sample(exe, cpus, args.round_trips))
                print(f"  sample {i + 1}/{args.samples}: {samples[-1]:.1f} ns",
                      file=sys.stderr)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    figures = summary(samples)
    load = os.getloadavg()[0]
    head = (f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, kernel "
            f"{platform.release()}; CPUs {cpus[0]} and {cpus[1]}; "
            f"{args.round_trips} round trips per sample, {args.interval:g} s apart; "
            f"date {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; 1-min load average {load:.1f}")
    print(head)
    print(report(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"cpus": list(cpus), "round_trips": args.round_trips,
             "interval_s": args.interval, **figures}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    exit_on_sigterm()   # a kill removes the compiled program's directory, as Ctrl-C does
    sys.exit(main())
