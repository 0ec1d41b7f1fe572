"""``pyvhost mem migrate-args`` and ``pyvhost mem migrate`` against real QEMU (TCG: 7.2,
and 10.0 in the QEMU 10.0 pass) guests on a real ``pyvhost net``: a VM with a hot-added
DIMM migrates to a second QEMU started with migrate-args, on another socket of the same
switch, while the back-end writes into its receive buffers (in the DIMM) the whole time.

The frames written during the migration are checked where it matters, in the migrated
guest: its TCP receiver is stopped for the migration (SIGSTOP), so everything that
arrives meanwhile waits in its socket, in the receive buffers the back-end wrote; after
the migration it reads them, and its MD5 of the whole stream must be the sender's. A
page the back-end wrote and did not mark in the dirty log would reach the destination
stale: the guest would read old bytes there (the checksum offload tells it not to check
them itself).

Timeouts are generous and no test asserts a duration; durations are printed (-s).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from pyvhost import schemas
from pyvhost.backend.control import fetch_status
from pyvhost.hotplug.qmp import Qmp
from pyvhost.hotplug.state import read_state, vhost_regions
from pyvhost.lab.guest import GuestConsole
from pyvhost.lab.qemu import Qemu, VhostUserNet
from pyvhost.lab.traffic import Stream
from pyvhost.tools import procfs
from pyvhost.units import MiB
from support.guestmem import wait_memtotal
from support.procs import Procs, Started, wait_for_socket

from .conftest import BootVm, run_json

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

KB = 1024
DIMM = 128 * MiB
MAC_A, MAC_B = "52:54:00:00:96:01", "52:54:00:00:96:02"


def valid(doc: dict[str, Any]) -> dict[str, Any]:
    jsonschema.Draft202012Validator(schemas.load(doc["schema"])).validate(doc)
    return doc


def connection(ctl: Path, pid: int) -> dict[str, Any] | None:
    conns = fetch_status(str(ctl))["connections"]
    assert isinstance(conns, list)
    found = [c for c in conns if c["peer_pid"] == pid]
    return found[0] if found else None


def dimm_writes(ctl: Path, pid: int, gpa: int) -> int:
    conn = connection(ctl, pid)
    assert conn is not None
    (region,) = [r for r in conn["memory"] if r["guest_phys_addr"] == gpa]
    return int(region["writes"])


def held(pid: int) -> tuple[int, int, int, int]:
    """pyvhost net's fds, guest RAM fds, guest RAM mappings and dirty-log mappings."""
    ram = procfs.measure(pid, "memory-backend-memfd")
    logs = procfs.measure(pid, "vhost-log")
    return ram.fds, ram.matching_fds, ram.mappings, logs.mappings + logs.matching_fds


class Net:
    """``pyvhost net`` with the given sockets and a control socket."""

    def __init__(self, procs: Procs, directory: Path, *names: str) -> None:
        self.dir = directory
        self.ctl = directory / "ctl.sock"
        argv = ["net", "--control", str(self.ctl), "--no-stats"]
        for name in names:
            argv += ["--socket", str(self.sock(name))]
        self.proc: Started = procs.pyvhost(*argv)
        wait_for_socket(self.ctl, self.proc.proc, timeout=60)

    def sock(self, name: str) -> Path:
        return self.dir / f"{name}.sock"


@pytest.fixture
def destinations(tmp_path: Path) -> Iterator[list[Qemu]]:
    """Destination QEMUs a test starts; each stopped (by pid) at the end."""
    started: list[Qemu] = []
    try:
        yield started
    finally:
        for q in reversed(started):
            q.stop()


def start_destination(source: Qemu, socket: Path, mac: str, args: list[str], log: Path,
                      started: list[Qemu]) -> Qemu:
    """A QEMU started with the source's configuration, its NIC on ``socket``, and ``args``
    (migrate-args' output, ending in -incoming defer)."""
    cfg = replace(source.config, vhost_user_net=(VhostUserNet(socket, mac=mac),),
                  extra_args=(*source.config.extra_args, *args), paused=False)
    q = Qemu(cfg, log=log)
    started.append(q)
    return q.start(timeout=120)


def add_dimm_in_kernel_zone(q: Qemu, device_id: str) -> int:
    """Hot-add a DIMM and online its blocks in ZONE_NORMAL (online_kernel), where the
    guest's receive buffers (kernel allocations) come from; returns its GPA."""
    c = q.console
    before = c.meminfo()["MemTotal"]
    _, old_blocks = c.memory_blocks()
    code, doc = run_json("add", "--qmp", str(q.qmp_path), "--size", "128M", "--id", device_id)
    assert code == 0 and doc["outcome"]["ok"], doc
    gpa = int(doc["outcome"]["device"]["addr"])
    assert wait_memtotal(c, before + DIMM // KB) == before + DIMM // KB
    block_size, blocks = c.memory_blocks()
    for blk in blocks:
        if blk.index not in {o.index for o in old_blocks}:
            assert blk.index * block_size >= gpa
            c.offline_block(blk.index)
            c.online_block(blk.index, "online_kernel")
    return gpa


def status(q: Qemu) -> str:
    reply = q.control.cmd("query-status")
    assert isinstance(reply, dict)
    return str(reply["status"])


def migrate_args(q: Qemu) -> list[str]:
    code, doc = run_json("migrate-args", "--qmp", str(q.qmp_path))
    assert code == 0, doc
    args: list[str] = valid(doc)["args"]
    assert args[-2:] == ["-incoming", "defer"]
    return args


def test_migration_with_the_back_end_writing_throughout(
        boot_vm: BootVm, procs: Procs, short_dir: Path, tmp_path: Path,
        destinations: list[Qemu]) -> None:
    net = Net(procs, short_dir, "a", "a2", "b")
    a = boot_vm(ip="10.96.0.1/24", channel="virtio",
                vhost_user_net=(VhostUserNet(net.sock("a"), mac=MAC_A),))
    b = boot_vm(ip="10.96.0.2/24", channel="virtio",
                vhost_user_net=(VhostUserNet(net.sock("b"), mac=MAC_B),))
    code, out = b.console.ping("10.96.0.1", count=3)
    assert code == 0, out
    gpa = add_dimm_in_kernel_zone(a, "d1")

    stream = Stream(b.console, a.console, "10.96.0.1")
    stream.start()
    # Until the guest's receive buffers are in the DIMM (the ones posted before it was
    # onlined are used up first).
    start = dimm_writes(net.ctl, a.pid, gpa)
    deadline = time.monotonic() + 120
    while dimm_writes(net.ctl, a.pid, gpa) < start + 300:
        assert time.monotonic() < deadline, "the stream never reached the DIMM"
        time.sleep(0.5)

    args = migrate_args(a)
    assert any('"id":"d1"' in x for x in args), args
    dest = start_destination(a, net.sock("a2"), MAC_A, args, tmp_path / "dest.log",
                             destinations)
    writes_before = dimm_writes(net.ctl, a.pid, gpa)
    stream.pause_receiver()
    t0 = time.monotonic()
    code, doc = run_json("migrate", "--qmp", str(a.qmp_path), "--to", str(dest.qmp_path),
                         "--uri", f"unix:{short_dir}/mig.sock", "--timeout", "300")
    assert code == 0, doc
    o = valid(doc)["outcome"]
    assert doc["refusals"] == [] and o["ok"] and o["status"] == "completed", doc
    assert o["destination_state"] == "running"
    print(f"\nmigration: {time.monotonic() - t0:.2f} s through the command; QEMU: total "
          f"{o['total_time']:.3f} s, downtime {o['downtime'] * 1000:.0f} ms, "
          f"{o['transferred'] >> 20} MiB sent in {o['dirty_sync_count']} dirty syncs")

    # What the back-end wrote into the DIMM and marked while QEMU copied the VM.
    src_conn = connection(net.ctl, a.pid)
    assert src_conn is not None and src_conn["dirty_log"] is not None
    written = dimm_writes(net.ctl, a.pid, gpa) - writes_before
    marks = src_conn["dirty_log"]["marks"]
    print(f"during the migration the back-end wrote {written} frames into the DIMM; "
          f"{marks} ranges marked in a log of {src_conn['dirty_log']['mmap_size']} bytes")
    assert written > 0 and marks >= written
    assert src_conn["dirty_log"]["overflows"] == 0

    console = GuestConsole.connect(dest.console_path, name="dest", log=tmp_path / "dest.con")
    try:
        stream.resume_receiver(console)
        result = stream.finish(console)
        print(f"stream: {result.received} bytes received, MD5 {result.md5} "
              f"({'intact' if result.intact else 'CORRUPTED'})")
        assert result.intact, result
        code, out = console.ping("10.96.0.2", count=3)
        assert code == 0, out
    finally:
        console.close()

    # The destination's table is what its QEMU sends.
    with Qmp(str(dest.qmp_path)) as qmp:
        sent = sorted((r.guest_phys_addr, r.memory_size) for r in vhost_regions(
            read_state(qmp), {}))
    dst_conn = connection(net.ctl, dest.pid)
    assert dst_conn is not None
    assert sorted((r["guest_phys_addr"], r["memory_size"]) for r in dst_conn["memory"]) == sent
    assert gpa in {g for g, _ in sent}

    # Once the source quits, everything it had is released: its regions, fds, mappings and
    # the dirty log.
    a.stop()
    deadline = time.monotonic() + 30
    while connection(net.ctl, a.pid) is not None:
        assert time.monotonic() < deadline, "the source's connection stayed"
        time.sleep(0.1)
    conns = fetch_status(str(net.ctl))["connections"]
    assert isinstance(conns, list)
    regions = sum(len(c["memory"]) for c in conns)
    fds, ram_fds, ram_maps, log = held(net.proc.pid)
    assert (ram_fds, ram_maps, log) == (regions, regions, 0), (fds, ram_fds, ram_maps, log)
    assert net.proc.proc.poll() is None


def test_a_destination_missing_a_dimm_is_refused(boot_vm: BootVm, procs: Procs,
                                                 short_dir: Path, tmp_path: Path,
                                                 destinations: list[Qemu]) -> None:
    net = Net(procs, short_dir, "a", "a2")
    a = boot_vm(ip="10.95.0.1/24", channel="virtio",
                vhost_user_net=(VhostUserNet(net.sock("a"), mac=MAC_A),))
    add_dimm_in_kernel_zone(a, "d1")
    add_dimm_in_kernel_zone(a, "d2")
    args = migrate_args(a)
    # The destination gets d1 only: the second -object/-device pair is left out.
    partial = args[:4] + args[-2:]
    assert '"id":"d1"' in partial[3]
    dest = start_destination(a, net.sock("a2"), MAC_A, partial, tmp_path / "dest.log",
                             destinations)
    code, doc = run_json("migrate", "--qmp", str(a.qmp_path), "--to", str(dest.qmp_path),
                         "--uri", f"unix:{short_dir}/mig.sock")
    assert code == 1, doc
    valid(doc)
    assert [r["code"] for r in doc["refusals"]] == ["DEST_MISSING_DIMM"], doc
    assert "d2" in doc["refusals"][0]["message"] and doc["outcome"] is None
    # Nothing was started: the source runs, the destination still waits.
    assert status(a) == "running" and status(dest) == "inmigrate"
    assert a.control.cmd("query-migrate") == {}
    # The full arguments pass the same preflight.
    whole = start_destination(a, net.sock("a2"), MAC_A, args, tmp_path / "dest2.log",
                              destinations)
    dest.stop()
    code, doc = run_json("migrate", "--qmp", str(a.qmp_path), "--to", str(whole.qmp_path),
                         "--uri", f"unix:{short_dir}/mig.sock", "--dry-run")
    assert code == 0 and doc["refusals"] == [] and doc["outcome"] is None, doc


def test_ten_migrations_back_and_forth_leak_nothing(boot_vm: BootVm, procs: Procs,
                                                    short_dir: Path, tmp_path: Path,
                                                    destinations: list[Qemu]) -> None:
    """A VM with a hot-added DIMM migrates ten times between two sockets of one switch
    while another VM pings it; after each migration, once the old QEMU quit, the back-end
    holds the same fds, guest RAM mappings and no dirty log."""
    net = Net(procs, short_dir, "x", "y", "b")
    vm = boot_vm(ip="10.94.0.1/24", channel="virtio",
                 vhost_user_net=(VhostUserNet(net.sock("x"), mac=MAC_A),))
    b = boot_vm(ip="10.94.0.2/24", channel="virtio",
                vhost_user_net=(VhostUserNet(net.sock("b"), mac=MAC_B),))
    add_dimm_in_kernel_zone(vm, "d1")
    b.console.check("setsid sh -c 'while :; do ping -c 1 -W 2 10.94.0.1; sleep 0.2; done' "
                    "</dev/null >/dev/null 2>&1 &")
    current, sockets = vm, ["y", "x"]
    after: list[tuple[int, int, int, int]] = []
    for i in range(10):
        args = migrate_args(current)
        dest = start_destination(current, net.sock(sockets[i % 2]), MAC_A, args,
                                 tmp_path / f"dest{i}.log", destinations)
        code, doc = run_json("migrate", "--qmp", str(current.qmp_path), "--to",
                             str(dest.qmp_path), "--uri", f"unix:{short_dir}/mig{i}.sock")
        assert code == 0, doc
        o = doc["outcome"]
        old = current
        old.stop()
        deadline = time.monotonic() + 30
        while connection(net.ctl, old.pid) is not None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        current = dest
        after.append(held(net.proc.pid))
        print(f"\nmigration {i + 1}: downtime {o['downtime'] * 1000:.0f} ms, total "
              f"{o['total_time']:.2f} s; pyvhost net holds (fds, RAM fds, RAM maps, log) "
              f"{after[-1]}")
    assert len(set(after)) == 1, after
    assert after[0][3] == 0
    console = GuestConsole.connect(current.console_path, name="last")
    try:
        assert console.ping("10.94.0.2", count=3)[0] == 0
        total = console.meminfo()["MemTotal"]
        assert total > 256 * MiB // KB
    finally:
        console.close()
