"""Forwarding throughput: pyvhost's switch beside DPDK 22.11 testpmd's net_vhost, one run.

One command: ``python benchmarks/bench_switch.py`` (``--seconds N`` per measurement,
``--json FILE`` to keep the figures). For each frame size (64 and 1500 bytes) and each
back-end it starts:

- the back-end with two vhost-user ports: ``pyvhost net --socket A --socket B`` (the L2
  switch), or ``dpdk-testpmd --vdev net_vhost0,iface=A --vdev net_vhost1,iface=B`` in
  ``io`` mode (port 0 <-> port 1, the C peer doing the same forwarding);
- a sink: testpmd's virtio_user on B in ``rxonly`` mode;
- a source: testpmd's virtio_user on A in ``txonly`` mode, frames addressed to the sink's
  MAC (so the switch forwards, not floods).

Known problem (2026-11-25): testpmd's txonly source segfaults inside librte_net_virtio
within seconds when the back-end is slower than it and keeps its transmit ring full (seen
against pyvhost, not against testpmd's own net_vhost); whose bug it is has not been
settled, so this benchmark has no figures in BENCHMARKS.md yet. The switch's tests use a
closed macswap loop instead (tests/switch).

It reports frames/s and Gbit/s delivered to the sink, and the back-end's CPU seconds per
million frames (from /proc/PID/stat). The machine has 2 cores for three busy-polling
processes: absolute figures are low and noisy; the ratio is the point.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
SINK_MAC = "02:00:00:00:00:02"
SOURCE_MAC = "02:00:00:00:00:01"
_RX_PPS = re.compile(r"Rx-pps:\s+(\d+)")


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

    def start(self, argv: list[str], name: str, prefix: str | None = None) -> Proc:
        log = self.work / f"{name}.log"
        with open(log, "wb") as out:
            p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        proc = Proc(p, log, prefix)
        self.procs.append(proc)
        return proc

    def testpmd(self, name: str, vdevs: list[str], app: list[str],
                main_lcore: int = 0) -> Proc:
        binary = shutil.which("dpdk-testpmd")
        if binary is None:
            raise SystemExit("dpdk-testpmd not found (Debian package dpdk-dev)")
        prefix = f"pyvhost-bsw-{name}-{uuid.uuid4().hex[:6]}"
        argv = ["stdbuf", "-oL", binary, "-l", "0-1", "--main-lcore", str(main_lcore),
                "--no-huge", "-m", "512", "--no-pci", "--file-prefix", prefix]
        for v in vdevs:
            argv += ["--vdev", v]
        argv += ["--", "--nb-cores=1", "--total-num-mbufs=4096", *app]
        return self.start(argv, name, prefix)

    def stop(self, proc: Proc, how: str = "enter") -> None:
        p = proc.popen
        if p.poll() is None:
            if how == "enter" and p.stdin is not None:
                with contextlib.suppress(OSError):
                    p.stdin.write(b"\n")
                    p.stdin.flush()
            else:
                os.kill(p.pid, signal.SIGINT)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
        if proc.prefix:
            shutil.rmtree(Path("/var/run/dpdk") / proc.prefix, ignore_errors=True)

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc, "signal")


def _wait(cond: object, what: str, timeout: float = 60) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


@contextlib.contextmanager
def backend(run: Run, kind: str, a: Path, b: Path) -> Iterator[Proc]:
    if kind == "pyvhost":
        proc = run.start([sys.executable, "-c", "from pyvhost.cli import main; main()", "net",
                          "--socket", str(a), "--socket", str(b), "--no-stats"], "pyvhost")
    else:
        proc = run.testpmd("dpdk-backend", [f"net_vhost0,iface={a},queues=1",
                                            f"net_vhost1,iface={b},queues=1"],
                           ["--forward-mode=io"])
    _wait(lambda: a.exists() and b.exists(), f"{kind} sockets")
    yield proc


def measure(kind: str, size: int, seconds: float, work: Path) -> dict[str, float]:
    run = Run(work)
    a, b = work / f"{kind}-a.sock", work / f"{kind}-b.sock"
    try:
        with backend(run, kind, a, b) as be:
            sink = run.testpmd("sink", [f"net_virtio_user0,path={b},queues=1,mac={SINK_MAC}"],
                               ["--forward-mode=rxonly", "--stats-period=1"], main_lcore=1)
            _wait(lambda: "Rx-pps" in sink.text(), "the sink")
            source = run.testpmd(
                "source", [f"net_virtio_user0,path={a},queues=1,mac={SOURCE_MAC}"],
                ["--forward-mode=txonly", f"--txpkts={size}", f"--eth-peer=0,{SINK_MAC}"])
            _wait(lambda: "Press enter to exit" in source.text(), "the source")
            time.sleep(2)  # let the flow settle
            cpu0, t0, off0 = _cpu_seconds(be.popen.pid), time.monotonic(), len(sink.text())
            time.sleep(seconds)
            cpu1, t1, off1 = _cpu_seconds(be.popen.pid), time.monotonic(), len(sink.text())
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
            "cpu_s_per_mframe": (cpu1 - cpu0) / max(frames, 1) * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--sizes", default="64,1500", help="frame sizes, comma-separated")
    args = ap.parse_args()
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="pyvhost-bsw-") as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            for kind in ("pyvhost", "dpdk"):
                r = measure(kind, size, args.seconds, Path(tmp))
                results.setdefault(str(size), {})[kind] = r
                print(f"  {size} B {kind}: {r}", file=sys.stderr)
    print(f"\nMachine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, kernel {platform.release()}; "
          f"date {time.strftime('%Y-%m-%d')}\n")
    print("| frame | back-end | frames/s | Gbit/s | CPU s / M frames | DPDK / pyvhost (frames/s) |")
    print("|---:|---|---:|---:|---:|---:|")
    for label, row in results.items():
        ratio = row["dpdk"]["frames_per_s"] / max(row["pyvhost"]["frames_per_s"], 1e-9)
        for kind in ("pyvhost", "dpdk"):
            r = row[kind]
            print(f"| {label} B | {kind} | {r['frames_per_s']:,.0f} | {r['gbit_per_s']:.3f} | "
                  f"{r['cpu_s_per_mframe']:.1f} | {f'{ratio:.1f}x' if kind == 'dpdk' else ''} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
