"""Live migration with pyvhost beside DPDK 22.11, and what dirty logging costs the data path.

One command: ``python benchmarks/bench_migration.py`` (``--repeat N`` migrations per
back-end, alternating; ``--json FILE`` keeps the figures; ``--skip-migration`` or
``--skip-datapath`` for one half). Needs root, QEMU 7.2, DPDK 22.11's dpdk-testpmd and the
lab's guest image (built on first use).

1. Migration, same guests, same run. For each back-end in turn: the back-end with three
   sockets' worth of ports, guest A (256 MiB boot RAM, TCG) and guest B, a 128 MiB DIMM
   hot-added into A, a TCP stream from B to A and a ping loop, then A live-migrated (QMP
   ``migrate`` over a unix socket, no bandwidth limit) to a second QEMU started with
   ``pyvhost mem migrate-args``' arguments. pyvhost: ``pyvhost net`` (the switch), A's
   destination on its own socket. DPDK: ``dpdk-testpmd`` with ``net_vhost`` ports 0 (A,
   and A's destination on the same socket) and 1 (B) in ``io`` mode. Reported: QEMU's
   total time and downtime (query-migrate), the time from ``migrate`` to completed as
   seen here, and from then to the destination running. The guests run under TCG: the
   times are QEMU's more than the back-end's, which answers a handful of messages.

2. Data path, in this process, no VM: a reflector's burst over rings in a memfd (256
   chains of one frame each, 64 and 1500 bytes), the driver's side re-posting the same
   chains each round: frames per second of each path (pure-Python, compiled) without a
   log and with a dirty log on both queues (``+log``: what serves a migrating VM,
   docs/dirty-log.md), in one run.

The machine is shared: the figures are indicative. The median of the repeats is shown
(the data path's paths alternate, 3 rounds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import platform
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from pyvhost import datapath
from pyvhost.datapath import reference
from pyvhost.hotplug.execute import execute_add
from pyvhost.hotplug.host import read_host
from pyvhost.hotplug.migrate import destination_args
from pyvhost.hotplug.migrate_run import run_migration
from pyvhost.hotplug.plan import AddRequest, plan_add
from pyvhost.hotplug.qmp import Qmp
from pyvhost.hotplug.state import read_state
from pyvhost.lab.image import build_image
from pyvhost.lab.qemu import Qemu, VhostUserNet, guest_config
from pyvhost.lab.traffic import Stream
from pyvhost.memory import DirtyLog, MemoryManager
from pyvhost.protocol.fds import FdBag
from pyvhost.protocol.messages import LogDescription, MemoryRegion
from pyvhost.tools.process import end_process, exit_on_sigterm, pyvhost_argv
from pyvhost.virtq import SplitQueue

MAC_A, MAC_B = "52:54:00:00:91:01", "52:54:00:00:91:02"


# -- 1. migration ---------------------------------------------------------------------------
@contextlib.contextmanager
def backend(kind: str, rundir: Path) -> Iterator[tuple[Path, Path, Path]]:
    """The back-end: (A's socket, A's destination's socket, B's socket)."""
    a, a2, b = rundir / "a.sock", rundir / "a2.sock", rundir / "b.sock"
    prefix = None
    if kind == "dpdk":
        prefix = f"bench-mig-{uuid.uuid4().hex[:8]}"
        argv = ["dpdk-testpmd", "-l", "0-1", "--no-huge", "-m", "512", "--no-pci",
                "--file-prefix", prefix, "--vdev", f"net_vhost0,iface={a},queues=1",
                "--vdev", f"net_vhost1,iface={b},queues=1", "--", "--nb-cores=1",
                "--total-num-mbufs=4096", "--forward-mode=io"]
        a2 = a  # DPDK's server binds port 0 to the device that starts last
    else:
        argv = pyvhost_argv("net", "--socket", str(a), "--socket", str(a2), "--socket",
                            str(b), "--no-stats")
    with open(rundir / f"{kind}.log", "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (a.exists() and b.exists()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} did not listen:\n"
                                   + (rundir / f"{kind}.log").read_text()[-2000:])
            time.sleep(0.1)
        yield a, a2, b
    finally:
        end_process(proc, signal.SIGINT if kind == "dpdk" else signal.SIGTERM, 15)
        if prefix:
            shutil.rmtree(f"/var/run/dpdk/{prefix}", ignore_errors=True)


def migrate_once(kind: str) -> dict[str, Any]:
    image = build_image()
    rundir = Path(tempfile.mkdtemp(prefix="bench-mig-"))
    started: list[Qemu] = []
    try:
        with backend(kind, rundir) as (a_sock, a2_sock, b_sock):
            def vm(ip: str, sock: Path, mac: str, name: str) -> Qemu:
                q = Qemu(guest_config(image, ip=ip, channel="virtio",
                                      vhost_user_net=(VhostUserNet(sock, mac=mac),)),
                         log=rundir / f"{name}.log")
                started.append(q)
                q.boot()
                return q
            a = vm("10.91.0.1/24", a_sock, MAC_A, "a")
            b = vm("10.91.0.2/24", b_sock, MAC_B, "b")
            with Qmp(str(a.qmp_path)) as qmp:
                plan = plan_add(AddRequest(size=128 << 20, id="d1"), read_state(qmp),
                                read_host())
                if not execute_add(qmp, plan, timeout=60, ost_timeout=5).ok:
                    raise RuntimeError("hot-add failed")
                args = (*destination_args(read_state(qmp)).argv, "-incoming", "defer")
            Stream(b.console, a.console, "10.91.0.1").start()
            b.console.check("setsid sh -c 'while :; do ping -c 1 -W 2 10.91.0.1; sleep 0.2; "
                            "done' </dev/null >/dev/null 2>&1 &")
            time.sleep(3)
            dest = Qemu(replace(a.config, vhost_user_net=(VhostUserNet(a2_sock, mac=MAC_A),),
                                extra_args=args, paused=False), log=rundir / "dest.log")
            started.append(dest)
            dest.start()
            with Qmp(str(a.qmp_path)) as src, Qmp(str(dest.qmp_path)) as dst:
                o = run_migration(src, dst, f"unix:{rundir}/mig.sock", timeout=300)
            if not o.ok:
                raise RuntimeError(f"{kind}: migration failed: {o.error}")
            return {"backend": kind, "total_time": o.total_time, "downtime": o.downtime,
                    "setup_time": o.setup_time, "seconds": o.seconds,
                    "resumed_after": o.resumed_after, "transferred": o.transferred,
                    "dirty_sync_count": o.dirty_sync_count}
    finally:
        for q in reversed(started):
            q.stop()
        shutil.rmtree(rundir, ignore_errors=True)


# -- 2. the data path -------------------------------------------------------------------------
SIZE = 256
SLOT = 4096
RING = 0x10_0000  # rings after 1 MiB of buffers
RAM = 2 << 20


class Rings:
    """A transmit and a receive ring of SIZE chains each in one memfd, buffers before
    them; the driver's side re-posts the same chains every round (avail idx += SIZE)."""

    def __init__(self, frame: int) -> None:
        self.fd = os.memfd_create("bench-dp", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, RAM)
        self.mm = mmap.mmap(self.fd, RAM)
        self.manager = MemoryManager()
        with FdBag([os.dup(self.fd)]) as bag:
            self.manager.set_table([MemoryRegion(0, RAM, 0x7F00_0000_0000, 0)], bag)
        self.queues: list[SplitQueue] = []
        for q, (base, writable) in enumerate(((RING, True), (RING + 0x4_0000, False))):
            desc, avail = base, base + 16 * SIZE
            used = (avail + 6 + 2 * SIZE + 63) & ~63
            for i in range(SIZE):
                buf = (q * SIZE + i) * 2048
                length = 12 + (2048 - 12 if writable else frame)
                struct.pack_into("<QIHH", self.mm, desc + 16 * i, buf, length,
                                 2 if writable else 0, 0)
                struct.pack_into("<H", self.mm, avail + 4 + 2 * i, i)
                if not writable:
                    self.mm[buf + 12:buf + 12 + frame] = os.urandom(frame)
            queue = SplitQueue(q)
            queue.set_size(SIZE)
            queue.set_addresses(0x7F00_0000_0000 + desc, 0x7F00_0000_0000 + avail,
                                0x7F00_0000_0000 + used)
            queue.attach(self.manager.current)
            self.queues.append(queue)
        self.avail = [RING + 16 * SIZE, RING + 0x4_0000 + 16 * SIZE]
        self.idx = 0

    def post(self) -> None:
        self.idx = (self.idx + SIZE) & 0xFFFF
        for a in self.avail:
            struct.pack_into("<H", self.mm, a + 2, self.idx)

    def close(self) -> None:
        self.manager.clear()
        self.mm.close()
        os.close(self.fd)


def frames_per_second(path: str, frame: int, seconds: float) -> tuple[float, float]:
    """Frames per second of wall time, and per second of this process's CPU time (on
    a shared machine the second leaves out the time other processes took the CPU)."""
    rings = Rings(frame)
    log_fd, log = -1, None
    if path.endswith("+log"):
        log_fd = os.memfd_create("bench-log", os.MFD_CLOEXEC)
        os.ftruncate(log_fd, RAM // 4096 // 8 + 4096)
        log = DirtyLog.map(LogDescription(RAM // 4096 // 8 + 4096, 0), log_fd)
        for q in rings.queues:
            q.log, q.log_guest_addr = log, 0x40_0000 + 0x1000 * q.index
    reflector = (datapath.Reflector() if path.startswith("compiled")
                 else reference.Reflector())
    rx, tx = rings.queues
    stats = dict.fromkeys(reference.STATS, 0)
    frames = 0
    try:
        with rings.manager.hold() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            while time.perf_counter() - t0 < seconds:
                rings.post()
                frames += reflector.burst(mem, tx, rx, 12, False, SIZE, stats)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        if stats["rx_frames"] != frames:
            raise RuntimeError(f"{path}: {frames} taken, {stats['rx_frames']} reflected")
        if log is not None and not log.marks:
            raise RuntimeError(f"{path}: logging on, nothing marked")
        return frames / elapsed, frames / cpu
    finally:
        if log is not None:
            log.close()
            os.close(log_fd)
        rings.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="migrations per back-end")
    ap.add_argument("--seconds", type=float, default=3.0, help="per data-path measurement")
    ap.add_argument("--json", metavar="FILE", help="write the figures here")
    ap.add_argument("--skip-migration", action="store_true")
    ap.add_argument("--skip-datapath", action="store_true")
    args = ap.parse_args()
    out: dict[str, Any] = {"host": platform.node(), "cpus": os.cpu_count(),
                           "python": sys.version.split()[0], "datapath": datapath.name(),
                           "migrations": [], "datapath_fps": {}, "datapath_cpu_fps": {},
                           "datapath_runs": {}}
    if not args.skip_migration:
        print("migration (QEMU 7.2, TCG; seconds; median of "
              f"{args.repeat} per back-end, alternating)")
        for i in range(args.repeat):
            for kind in ("pyvhost", "dpdk"):
                r = migrate_once(kind)
                out["migrations"].append(r)
                print(f"  {i + 1} {kind:8} total {r['total_time']:.3f} downtime "
                      f"{r['downtime'] * 1000:.0f} ms, seen {r['seconds']:.3f}, destination "
                      f"ran {r['resumed_after']}", flush=True)
        print(f"{'back-end':10} {'total':>8} {'downtime':>10} {'seen':>8} {'to run':>8}")
        for kind in ("pyvhost", "dpdk"):
            rs = [r for r in out["migrations"] if r["backend"] == kind]
            med = {k: statistics.median(r[k] for r in rs if r[k] is not None)
                   for k in ("total_time", "downtime", "seconds", "resumed_after")}
            out[f"median_{kind}"] = med
            print(f"{kind:10} {med['total_time']:8.3f} {med['downtime'] * 1000:8.0f} ms "
                  f"{med['seconds']:8.3f} {med['resumed_after']:8.3f}")
    if not args.skip_datapath:
        print("data path, reflector burst in this process (frames per second of wall "
              "time, and of this process's CPU time)")
        paths = ["python", "python+log"] + (["compiled", "compiled+log"]
                                             if datapath.name() == "compiled" else [])
        for frame in (64, 1500):
            # Alternating paths, 3 rounds: on a shared machine a load that comes and goes
            # falls on every path alike, not on the one measured at that moment.
            runs: dict[str, list[tuple[float, float]]] = {path: [] for path in paths}
            for _ in range(3):
                for path in paths:
                    runs[path].append(frames_per_second(path, frame, args.seconds))
            for path in paths:
                fps = statistics.median(r[0] for r in runs[path])
                cpu = statistics.median(r[1] for r in runs[path])
                out["datapath_fps"][f"{path}/{frame}"] = fps
                out["datapath_cpu_fps"][f"{path}/{frame}"] = cpu
                out["datapath_runs"][f"{path}/{frame}"] = runs[path]
                print(f"  {frame:5} B {path:12} {fps:12,.0f} /s {cpu:12,.0f} /CPU-s   (runs: "
                      + ", ".join(f"{r[0]:,.0f}" for r in runs[path]) + ")", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    exit_on_sigterm()
    main()
