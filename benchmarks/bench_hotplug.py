"""End-to-end memory hot-add latency in booted guests: pyvhost net and DPDK testpmd, one run.

One command: ``python benchmarks/bench_hotplug.py`` (``--reps N``, ``--json FILE`` to keep
every sample). Needs QEMU 7.2, dpdk-testpmd and the lab's guest image (built on
first use). It boots three guests (TCG, 256 MiB memfd boot RAM, ``memhp_default_state=
online_movable``), each with a virtio-net NIC on a different back-end:

- ``pyvhost (mem slots)``: ``pyvhost net --reflect``; QEMU sends ADD_MEM_REG / REM_MEM_REG;
- ``pyvhost (SET_MEM_TABLE)``: the same back-end with CONFIGURE_MEM_SLOTS hidden, so QEMU
  re-sends the whole table (fresh fds) on every change;
- ``DPDK testpmd``: DPDK 22.11 ``net_vhost`` (SET_MEM_TABLE only).

Every NIC's socket goes through the lab's relay (:mod:`pyvhost.tools.relay`), the same for
the three, which stamps the memory messages. One repetition on a guest: ``object-add``
a 128 MiB shared memfd, then ``device_add pc-dimm`` and

    device_add sent --(QEMU)--> table request at the relay --(back-end)--> its REPLY_ACK
    --(QEMU)--> device_add returns --(guest)--> the guest's ACPI _OST for the insert
    (Linux evaluates _OST after adding and onlining the memory)

then MemTotal is checked in the guest, and the DIMM is unplugged (``device_del`` to
DEVICE_DELETED, ``object-del``; the back-end's share from the relay too). Guests are
measured in turn, repetition by repetition, so load changes hit all three alike.
Medians and 90th percentiles in milliseconds; all wall-clock (``time.monotonic``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyvhost.hotplug.qmp import Qmp
from pyvhost.lab.image import build_image
from pyvhost.lab.qemu import BOOT_TIMEOUT, Qemu, VhostUserNet, guest_config
from pyvhost.protocol.constants import ProtocolFeature
from pyvhost.tools.process import end_process, exit_on_sigterm, pyvhost_argv
from pyvhost.tools.procfs import unix_listening
from pyvhost.tools.relay import MemoryUpdate, Relay
from pyvhost.units import MiB

DIMM = 128 * MiB
ACPI_INSERT = 1  # _OST source of a device-check (insert) notification

STAGES = (
    ("qemu_to_backend", "device_add -> table request at back-end"),
    ("backend", "back-end: request -> REPLY_ACK"),
    ("qemu_after_ack", "REPLY_ACK -> device_add returns"),
    ("device_add", "device_add (whole QMP command)"),
    ("guest", "device_add returned -> guest _OST (onlined)"),
    ("total", "hot-add end to end (device_add -> _OST)"),
    ("unplug", "unplug: device_del -> DEVICE_DELETED"),
    ("unplug_backend", "unplug: back-end request -> REPLY_ACK"),
)


@dataclass
class Target:
    name: str
    workdir: Path
    mac: str
    hide: int = 0
    proc: subprocess.Popen[bytes] | None = None
    dpdk_prefix: str | None = None
    relay: Relay | None = None
    qemu: Qemu | None = None
    qmp: Qmp | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    @property
    def backend_sock(self) -> Path:
        return self.workdir / f"{self.slug}.sock"

    @property
    def relay_sock(self) -> Path:
        return self.workdir / f"{self.slug}.relay"

    @property
    def slug(self) -> str:
        return "".join(ch for ch in self.name.lower() if ch.isalnum())[:12]

    def add(self, key: str, seconds: float) -> None:
        self.samples.setdefault(key, []).append(seconds)


# -- processes ---------------------------------------------------------------------------

def start_backend(t: Target, kind: str) -> None:
    if kind == "pyvhost":
        argv = pyvhost_argv("net", "--socket", str(t.backend_sock), "--reflect", "--no-stats")
    else:
        binary = shutil.which("dpdk-testpmd")
        if binary is None:
            raise SystemExit("dpdk-testpmd not found (Debian package dpdk-dev)")
        t.dpdk_prefix = f"pyvhost-bench-{uuid.uuid4().hex[:8]}"
        argv = [binary, "-l", "0-1", "--no-huge", "-m", "512", "--no-pci", "--file-prefix",
                t.dpdk_prefix, "--vdev", f"net_vhost0,iface={t.backend_sock},queues=1", "--",
                "--nb-cores=1", "--total-num-mbufs=2048", "--port-topology=loop",
                "--stats-period=3600"]
    # stdin stays an open pipe: testpmd without -i waits for Enter and must not see EOF.
    t.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not unix_listening(t.backend_sock):
        if t.proc.poll() is not None:
            raise SystemExit(f"{t.name}: back-end exited with {t.proc.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{t.name}: back-end not listening after 120 s")
        time.sleep(0.1)


def stop_target(t: Target) -> None:
    if t.qmp is not None:
        t.qmp.close()
    if t.qemu is not None:
        t.qemu.stop()
    if t.relay is not None:
        t.relay.stop()
    proc = t.proc
    if proc is not None:
        end_process(proc)
    if proc is not None and proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    if t.dpdk_prefix:
        shutil.rmtree(Path("/var/run/dpdk") / t.dpdk_prefix, ignore_errors=True)


# -- one repetition ----------------------------------------------------------------------

def _wait_event(qmp: Qmp, timeout: float, want: Any) -> float:
    """The time the first QMP event satisfying ``want(event)`` arrived."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SystemExit(f"no awaited QMP event within {timeout} s")
        event = qmp.next_event(min(left, 1.0))
        if event is not None and want(event):
            return time.monotonic()


def _updates_between(relay: Relay, start: int, timeout: float = 30) -> list[MemoryUpdate]:
    updates = relay.wait_updates(start + 1, timeout)[start:]
    if not updates or any(u.need_reply and not u.ok for u in updates):
        raise SystemExit(f"memory updates missing or refused: {updates}")
    return updates


def one_rep(t: Target, rep: int) -> None:
    assert t.qmp is not None and t.relay is not None and t.qemu is not None
    qmp, relay, console = t.qmp, t.relay, t.qemu.console
    dev, mem = f"bench{rep}", f"bench{rep}-mem"
    mem_before = console.meminfo()["MemTotal"]
    qmp.execute("object-add", {"qom-type": "memory-backend-memfd", "id": mem,
                               "size": DIMM, "share": True})
    start = len(relay.memory_updates())
    t0 = time.monotonic()
    qmp.execute("device_add", {"driver": "pc-dimm", "id": dev, "memdev": mem})
    t1 = time.monotonic()

    def inserted(event: dict[str, Any]) -> bool:
        info = event.get("data", {}).get("info", {})
        return bool(event.get("event") == "ACPI_DEVICE_OST" and info.get("device") == dev
                    and info.get("source") == ACPI_INSERT)

    t_ost = _wait_event(qmp, 60, inserted)
    updates = _updates_between(relay, start)
    first, last = updates[0], updates[-1]
    assert last.acked is not None
    t.requests.append("+".join(u.name for u in updates))
    t.add("qemu_to_backend", first.sent - t0)
    t.add("backend", last.acked - first.sent)
    t.add("qemu_after_ack", t1 - last.acked)
    t.add("device_add", t1 - t0)
    t.add("guest", t_ost - t1)
    t.add("total", t_ost - t0)
    deadline = time.monotonic() + 60
    while console.meminfo()["MemTotal"] != mem_before + DIMM // 1024:
        if time.monotonic() > deadline:
            raise SystemExit(f"{t.name}: the DIMM never showed up in MemTotal")
        time.sleep(0.2)

    start = len(relay.memory_updates())
    u0 = time.monotonic()
    qmp.execute("device_del", {"id": dev})
    u1 = _wait_event(qmp, 120, lambda e: e.get("event") == "DEVICE_DELETED"
                     and e.get("data", {}).get("device") == dev)
    qmp.execute("object-del", {"id": mem})
    t.add("unplug", u1 - u0)
    updates = _updates_between(relay, start)
    assert updates[-1].acked is not None
    t.add("unplug_backend", updates[-1].acked - updates[0].sent)
    deadline = time.monotonic() + 60
    while console.meminfo()["MemTotal"] != mem_before:
        if time.monotonic() > deadline:
            raise SystemExit(f"{t.name}: MemTotal did not go back after the unplug")
        time.sleep(0.2)


# -- report ------------------------------------------------------------------------------

def _stats(samples: list[float]) -> tuple[float, float]:
    ms = sorted(s * 1000 for s in samples)
    p90 = statistics.quantiles(ms, n=10, method="inclusive")[8] if len(ms) > 1 else ms[0]
    return statistics.median(ms), p90


def report(targets: list[Target]) -> str:
    head = "| stage (ms, median / p90) | " + " | ".join(t.name for t in targets) + " |"
    lines = [head, "|---|" + "---:|" * len(targets)]
    for key, label in STAGES:
        cells = []
        for t in targets:
            med, p90 = _stats(t.samples[key])
            cells.append(f"{med:.1f} / {p90:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| messages per hot-add | "
                 + " | ".join(", ".join(sorted(set(t.requests))) for t in targets) + " |")
    return "\n".join(lines)


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pvbh-"))  # short: Unix socket paths
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=10, help="hot-add/unplug cycles per guest")
    ap.add_argument("--json", metavar="FILE", help="also write every sample as JSON")
    args = ap.parse_args()
    if args.reps < 1:
        ap.error("--reps must be at least 1")
    image = build_image()
    load_start = os.getloadavg()
    with _workdir() as wd:
        targets = [
            Target("pyvhost (mem slots)", wd, "52:54:00:00:95:01"),
            Target("pyvhost (SET_MEM_TABLE)", wd, "52:54:00:00:95:02",
                   hide=int(ProtocolFeature.CONFIGURE_MEM_SLOTS)),
            Target("DPDK testpmd", wd, "52:54:00:00:95:03"),
        ]
        try:
            for i, (t, kind) in enumerate(zip(targets, ("pyvhost", "pyvhost", "dpdk"),
                                              strict=True)):
                start_backend(t, kind)
                t.relay = Relay(t.relay_sock, t.backend_sock,
                                hide_protocol_features=t.hide).start()
                t.qemu = Qemu(guest_config(image, ip=f"10.95.{i}.1/24",
                                           vhost_user_net=(VhostUserNet(t.relay_sock,
                                                                        mac=t.mac),)))
                t.qemu.boot(BOOT_TIMEOUT)
                t.qmp = Qmp(str(t.qemu.qmp_path), timeout=120).connect()
                print(f"{t.name}: guest booted", file=sys.stderr)
            for rep in range(args.reps):
                for t in targets:
                    one_rep(t, rep)
                print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr)
        finally:
            for t in targets:
                stop_target(t)
    load_end = os.getloadavg()
    machine = (f"{os.cpu_count()} CPUs, {platform.machine()}, kernel {platform.release()}, "
               f"Python {platform.python_version()}; load average {load_start[0]:.2f} at "
               f"start, {load_end[0]:.2f} at end")
    print(f"Hot-add of one 128 MiB DIMM, {args.reps} repetitions per guest ({machine}).\n")
    print(report(targets))
    if args.json:
        doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine,
               "reps": args.reps, "dimm_bytes": DIMM,
               "targets": {t.name: {"samples_seconds": t.samples, "requests": t.requests}
                           for t in targets}}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    exit_on_sigterm()
    main()
