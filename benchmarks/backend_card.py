"""The back-end report card: ``pyvhost probe`` and ``--hostile`` against every real vhost-user
back-end on this machine, written to ``docs/backends.md``.

One command: ``python benchmarks/backend_card.py`` (``--out FILE``, ``--cycles N``,
``--only NAME``, ``--json FILE`` to keep every report). It lives in benchmarks/ with the
other one-command runs that start real peers and publish measured figures (BENCHMARKS.md);
like them it is linted and type-checked with the package, and it only uses the library
(:func:`pyvhost.frontend.run_probe`, :func:`pyvhost.frontend.hostile.run_hostile`), never
the command line's output.

Back-ends (each started here, ended by pid, its runtime files removed):

- DPDK 22.11 testpmd ``net_vhost``, server mode (it listens; a second ``net_vhost`` port
  on a second socket is the hostile suite's witness: one port serves one device at a
  time) and client mode (``client=1``, the probe listens; reconnect probed);
- QEMU 7.2's virtiofsd, default sandbox (it forks after accept) and ``-o sandbox=chroot``;
- qemu-storage-daemon's vhost-user-blk export (a second export of the same process on a
  second socket is the witness: it serves one client per socket);
- ``pyvhost net --reflect`` with CONFIGURE_MEM_SLOTS, and with ``--no-mem-slots``, on
  the compiled data path, and with CONFIGURE_MEM_SLOTS on the pure-Python one
  (``PYVHOST_PURE=1``);
- Open vSwitch 3.1 with DPDK (``dpdkvhostuser`` and ``dpdkvhostuserclient``) when
  ``ovs-vswitchd-dpdk`` is installed: a private database and run directory, ended by pid,
  hugepages given back (see :func:`ovs`).

The hostile suite runs its non-destructive cases against every back-end that serves more
than one connection (virtiofsd serves one, then exits); a back-end that crashes is started
again and the suite goes on (the restart is counted). Then, on a fresh start, the
destructive case (guest memory truncated under a live ring) and one ordinary case after
it: does the back-end survive, and does it serve the next connection?
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyvhost import datapath
from pyvhost.errors import PyvhostError
from pyvhost.frontend import ProbeConfig, run_probe
from pyvhost.frontend.hostile import CASES, FAILING, HostileConfig, run_hostile
from pyvhost.tools.process import end_process, exit_on_sigterm, pyvhost_argv
from pyvhost.tools.procfs import unix_listening

ROOT = Path(__file__).resolve().parent.parent
DPDK_RUNTIME = Path("/var/run/dpdk")
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


@dataclass
class Peer:
    """A started back-end: its processes (ended by pid), files to remove, a log."""

    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    cleanup: list[Callable[[], object]] = field(default_factory=list)
    log: Path | None = None

    def start(self, argv: list[str], log: Path, stdin_pipe: bool = False,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                                    start_new_session=True, env=env)
        self.procs.append(proc)
        self.log = log
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            end_process(proc, signal.SIGINT, 15)
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        self.procs.clear()
        for undo in reversed(self.cleanup):
            with contextlib.suppress(Exception):
                undo()
        self.cleanup.clear()


def wait_listening(path: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not unix_listening(path):
        if proc.poll() is not None:
            raise RuntimeError(f"pid {proc.pid} exited with {proc.returncode} before "
                               f"listening on {path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on {path} after {timeout} s")
        time.sleep(0.05)


def testpmd(peer: Peer, work: Path, vdevs: list[str], name: str) -> subprocess.Popen[bytes]:
    prefix = f"pyvhost-card-{name}-{uuid.uuid4().hex[:6]}"
    peer.cleanup.append(lambda: shutil.rmtree(DPDK_RUNTIME / prefix, ignore_errors=True))
    return peer.start(["stdbuf", "-oL", "dpdk-testpmd", "-l", "0-1", "--no-huge", "-m", "512",
                       "--no-pci", "--file-prefix", prefix,
                       *(a for v in vdevs for a in ("--vdev", v)), "--",
                       "--nb-cores=1", "--total-num-mbufs=2048"],
                      work / f"{name}.log", stdin_pipe=True)


# -- what one row of the card is -------------------------------------------------------------
@dataclass
class Row:
    name: str
    mode: str
    probe: dict[str, Any] | None = None
    probe_error: str = ""
    hostile: dict[str, Any] | None = None
    hostile_note: str = ""
    note: str = ""
    #: The destructive case and the case after it, or why they did not run.
    destructive: dict[str, Any] | None = None
    destructive_note: str = ""


@dataclass
class Backend:
    """How to start one back-end and what to run against it."""

    name: str
    mode: str
    #: Starts the back-end; returns (socket, witness socket or None).
    start: Callable[[Peer, Path], tuple[str, str | None]]
    device: str = "net"
    listen: bool = False
    hostile: bool = True
    hostile_note: str = ""
    note: str = ""
    #: A program the back-end needs; without it the row says so (not run).
    needs: str = ""
    #: Run the destructive case too (only where the hostile suite runs), else say why not.
    destructive: bool = True
    destructive_note: str = ""


def _dpdk_server(peer: Peer, work: Path) -> tuple[str, str | None]:
    socks = [str(work / "dpdk.sock"), str(work / "dpdk-witness.sock")]
    for sock in socks:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
    proc = testpmd(peer, work, [f"net_vhost{i},iface={sock},queues=1"
                                for i, sock in enumerate(socks)], "dpdk")
    for sock in socks:
        wait_listening(sock, proc)
    return socks[0], socks[1]


def _dpdk_client(peer: Peer, work: Path) -> tuple[str, str | None]:
    sock = str(work / "dpdk-client.sock")
    testpmd(peer, work, [f"net_vhost0,iface={sock},client=1,queues=1"], "dpdk-client")
    return sock, None


def _virtiofsd(*extra: str) -> Callable[[Peer, Path], tuple[str, str | None]]:
    def start(peer: Peer, work: Path) -> tuple[str, str | None]:
        shared = work / "shared"
        shared.mkdir(exist_ok=True)
        sock = str(work / "vfs.sock")
        proc = peer.start([VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={shared}",
                           *extra], work / "virtiofsd.log")
        wait_listening(sock, proc)
        return sock, None
    return start


def _qsd(peer: Peer, work: Path) -> tuple[str, str | None]:
    socks = [str(work / "qsd0.sock"), str(work / "qsd1.sock")]
    argv = ["qemu-storage-daemon"]
    for i, sock in enumerate(socks):
        argv += ["--blockdev", f"driver=null-co,node-name=null{i}",
                 "--export", f"type=vhost-user-blk,id=e{i},node-name=null{i},"
                             f"addr.type=unix,addr.path={sock}"]
    proc = peer.start(argv, work / "qsd.log")
    for sock in socks:
        wait_listening(sock, proc)
    return socks[0], socks[1]


def _pyvhost(*extra: str, pure: bool = False) -> Callable[[Peer, Path],
                                                          tuple[str, str | None]]:
    env = {k: v for k, v in os.environ.items() if k != "PYVHOST_PURE"}
    if pure:
        env["PYVHOST_PURE"] = "1"

    def start(peer: Peer, work: Path) -> tuple[str, str | None]:
        sock = str(work / "pv.sock")
        proc = peer.start(pyvhost_argv("net", "--socket", sock, "--reflect", *extra),
                          work / "pyvhost.log", env=env)
        wait_listening(sock, proc)
        return sock, None
    return start


# -- Open vSwitch 3.1 with DPDK ---------------------------------------------------------------
OVS_VSWITCHD = "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk"
OVS_SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


def _hugepages(peer: Peer, work: Path, pages: int) -> Path:
    """Reserve 2 MiB pages and mount a private hugetlbfs; both undone at stop."""
    before = int(HUGEPAGES.read_text())
    HUGEPAGES.write_text(str(max(before, pages)))
    peer.cleanup.append(lambda: HUGEPAGES.write_text(str(before)))
    mnt = work / "huge"
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "hugetlbfs", "none", str(mnt)], check=True)
    peer.cleanup.append(lambda: subprocess.run(["umount", str(mnt)], check=False))
    return mnt


def ovs(client: bool) -> Callable[[Peer, Path], tuple[str, str | None]]:
    """ovsdb-server and ovs-vswitchd-dpdk on a private database and run directory
    (OVS_RUNDIR, OVS_DBDIR, OVS_LOGDIR), never the system's: other_config dpdk-init, no PCI,
    256 MiB of hugepages and no more (dpdk-socket-limit), one PMD core; a netdev bridge
    with two vhost-user ports (the second is the hostile suite's witness)."""
    def start(peer: Peer, work: Path) -> tuple[str, str | None]:
        for d in ("run", "db", "log"):
            shutil.rmtree(work / d, ignore_errors=True)  # every start is a fresh switch
            (work / d).mkdir()
        env = dict(os.environ, OVS_RUNDIR=str(work / "run"), OVS_DBDIR=str(work / "db"),
                   OVS_LOGDIR=str(work / "log"))
        db = str(work / "db" / "conf.db")
        subprocess.run(["ovsdb-tool", "create", db, OVS_SCHEMA], check=True, env=env)
        remote = f"unix:{work / 'run' / 'db.sock'}"
        server = peer.start(["ovsdb-server", db, f"--remote=p{remote}",
                             f"--unixctl={work / 'run' / 'ovsdb.ctl'}"],
                            work / "ovsdb.log", env=env)
        wait_listening(str(work / "run" / "db.sock"), server)

        def vsctl(*args: str) -> None:
            subprocess.run(["ovs-vsctl", f"--db={remote}", "--timeout=180", *args],
                           check=True, env=env, stdout=subprocess.DEVNULL)

        huge = _hugepages(peer, work, 256)
        prefix = f"pyvhost-card-ovs-{uuid.uuid4().hex[:6]}"
        peer.cleanup.append(lambda: shutil.rmtree(DPDK_RUNTIME / prefix, ignore_errors=True))
        vsctl("--no-wait", "init")
        vsctl("--no-wait", "set", "Open_vSwitch", ".", "other_config:dpdk-init=true",
              f"other_config:dpdk-extra=--no-pci --file-prefix={prefix} --huge-dir={huge}",
              "other_config:dpdk-socket-mem=256", "other_config:dpdk-socket-limit=256",
              "other_config:pmd-cpu-mask=0x2")
        peer.start([OVS_VSWITCHD, remote, f"--unixctl={work / 'run' / 'vswitchd.ctl'}",
                    f"--log-file={work / 'log' / 'vswitchd.log'}"], work / "vswitchd.out",
                   env=env)
        vsctl("add-br", "br0", "--", "set", "bridge", "br0", "datapath_type=netdev")
        if client:
            sock = str(work / "ovs-client.sock")
            vsctl("add-port", "br0", "vhc0", "--", "set", "Interface", "vhc0",
                  "type=dpdkvhostuserclient", f"options:vhost-server-path={sock}")
            return sock, None
        socks = []
        for port in ("vhu0", "vhu1"):
            vsctl("add-port", "br0", port, "--", "set", "Interface", port,
                  "type=dpdkvhostuser")
            socks.append(str(work / "run" / port))
        for sock in socks:
            wait_listening(sock, peer.procs[-1], timeout=120)
        return socks[0], socks[1]
    return start


BACKENDS = [
    Backend("DPDK 22.11 testpmd net_vhost", "server (it listens)", _dpdk_server,
            note="witness: a second net_vhost port of the same testpmd"),
    Backend("DPDK 22.11 testpmd net_vhost", "client=1 (probe listens)", _dpdk_client,
            listen=True, hostile=False,
            hostile_note="the same vhost library as server mode (see that column)"),
    Backend("Open vSwitch 3.1 (DPDK 22.11)", "dpdkvhostuser (it listens)", ovs(False),
            note="witness: a second dpdkvhostuser port of the same ovs-vswitchd",
            needs=OVS_VSWITCHD),
    Backend("Open vSwitch 3.1 (DPDK 22.11)", "dpdkvhostuserclient (probe listens)",
            ovs(True), listen=True, hostile=False,
            hostile_note="the same vhost library as dpdkvhostuser (see that column)",
            needs=OVS_VSWITCHD),
    Backend("QEMU 7.2 virtiofsd", "default sandbox (forks after accept)",
            _virtiofsd(), device="fs", hostile=False,
            hostile_note="not run: serves one connection, then exits"),
    Backend("QEMU 7.2 virtiofsd", "-o sandbox=chroot", _virtiofsd("-o", "sandbox=chroot"),
            device="fs", hostile=False,
            hostile_note="not run: serves one connection, then exits"),
    Backend("qemu-storage-daemon 7.2 vhost-user-blk", "server", _qsd, device="blk",
            note="witness: a second export of the same process"),
    Backend("pyvhost net --reflect", "CONFIGURE_MEM_SLOTS", _pyvhost(),
            note="compiled data path (the default where it is built)"),
    Backend("pyvhost net --reflect", "--no-mem-slots (SET_MEM_TABLE)",
            _pyvhost("--no-mem-slots"), destructive=False,
            destructive_note="not run: the same data path as CONFIGURE_MEM_SLOTS",
            note="compiled data path"),
    Backend("pyvhost net --reflect", "PYVHOST_PURE=1 (pure-Python data path)",
            _pyvhost(pure=True), note="CONFIGURE_MEM_SLOTS, the pure-Python data path"),
]

DESTRUCTIVE = next(c.name for c in CASES if c.destructive)
#: The ordinary case run after the destructive one: is the next connection served?
AFTER = "framing-unknown-request"


def run_backend(b: Backend, cycles: int, regions: int, work: Path) -> Row:
    row = Row(b.name, b.mode, hostile_note=b.hostile_note, note=b.note,
              destructive_note=b.destructive_note)
    if b.needs and not os.access(b.needs, os.X_OK):
        row.probe_error = f"{b.needs} is not installed"
        return row
    peer = Peer()
    try:
        sock, witness = b.start(peer, work)
        try:
            report = run_probe(ProbeConfig(sock, cycles=cycles, regions=regions,
                                           device=b.device, listen=b.listen,
                                           reconnect=b.listen, accept_timeout=90))
            doc = report.to_json()
            doc.pop("series", None)
            row.probe = doc
        except PyvhostError as e:
            row.probe_error = f"{type(e).__name__}: {e}"
        peer.stop()
    except (PyvhostError, RuntimeError, subprocess.CalledProcessError) as e:
        row.probe_error = row.probe_error or f"{type(e).__name__}: {e}"
    finally:
        peer.stop()
    if b.hostile:
        try:
            sock, witness = b.start(peer, work)

            def restart() -> None:
                peer.stop()
                b.start(peer, work)

            hostile = run_hostile(HostileConfig(sock, witness, device=b.device,
                                                case_timeout=3),
                                  restart=restart)
            row.hostile = hostile.to_json()
        except (PyvhostError, RuntimeError, subprocess.CalledProcessError) as e:
            row.hostile_note = f"could not run: {type(e).__name__}: {e}"
        finally:
            peer.stop()
    if b.hostile and b.destructive:
        try:
            sock, witness = b.start(peer, work)
            proc = peer.procs[-1]
            bus = run_hostile(HostileConfig(sock, witness, cases=(DESTRUCTIVE, AFTER),
                                            device=b.device, case_timeout=3))
            row.destructive = bus.to_json()
            time.sleep(0.5)
            if proc.poll() is not None:
                row.destructive_note = _exit_status(proc.returncode)
        except (PyvhostError, RuntimeError, subprocess.CalledProcessError) as e:
            row.destructive_note = f"could not run: {type(e).__name__}: {e}"
        finally:
            peer.stop()
    return row


def _exit_status(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exited with {code}"


# -- the page -------------------------------------------------------------------------------
def _verdict(row: Row) -> str:
    if row.probe is None:
        return f"could not run ({row.probe_error})" if row.probe_error else "n/a"
    return str(row.probe["verdict"])


def _latency(row: Row) -> str:
    if row.probe is None:
        return ""
    by = row.probe["latency_ms"]["by_request"]
    return ", ".join(f"{name} {stats['median']:.3f}" for name, stats in by.items())


def _held(row: Row) -> str:
    p = row.probe
    if p is None:
        return ""
    return (f"fds {p['region_fds_before']}/{p['region_fds_peak']}/{p['region_fds_after']}, "
            f"maps {p['mappings_before']}/{p['mappings_peak']}/{p['mappings_after']}")


def _hostile_summary(row: Row) -> str:
    if row.hostile is None:
        return row.hostile_note or "n/a"
    counts = row.hostile["counts"]
    bad = {k: v for k, v in counts.items() if k in FAILING}
    text = ", ".join(f"{k} {v}" for k, v in counts.items())
    extra = f" (restarted {row.hostile['restarts']}x)" if row.hostile["restarts"] else ""
    return ("**" + text + "**" if bad else text) + extra


def _witness(row: Row) -> str:
    frames = (row.hostile or {}).get("witness_frames")
    if not frames:
        return ""
    if frames["frames_back"]:
        return "answers; frames used and sent back"
    if frames["checked"]:
        return "answers; frames used"
    return "answers only" + (f" ({frames['detail']})" if frames["detail"] else "")


def _destructive(row: Row) -> str:
    d = row.destructive
    if d is None:
        return row.destructive_note or "n/a"
    cases = {c["name"]: c for c in d["cases"]}
    first, after = cases.get(DESTRUCTIVE), cases.get(AFTER)
    if first is None:
        return "n/a"
    text = first["outcome"]
    text = f"**{text}**" if text in FAILING else text
    if row.destructive_note and first["outcome"] == "crashed":
        text += f" ({row.destructive_note})"
    if after is not None:
        text += f"; next connection: {after['outcome']}"
    return text


def _short(name: str) -> str:
    first = name.split()[0]
    return {"Open": "OVS", "qemu-storage-daemon": "qsd"}.get(first, first)


def render(rows: list[Row], cycles: int, regions: int, started: str, seconds: float) -> str:
    lines = [
        "# Back-end report card",
        "",
        "What `pyvhost probe` finds when it plays QEMU 7.2's memory hot-plug against real",
        "vhost-user back-ends, and what its `--hostile` suite finds. Regenerate with one",
        "command (root; it starts and ends every back-end itself):",
        "",
        "```sh",
        "python benchmarks/backend_card.py",
        "```",
        "",
        f"Run {started} on {platform.node() and 'this machine'}: {platform.system()} "
        f"{platform.release()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, pyvhost's data path {datapath.name()}; {seconds:.0f} s "
        f"in all. Leak probe: {cycles} cycles x {regions} regions of 2 MiB, boot RAM 64 "
        "MiB, profile qemu-7.2.",
        "",
        "The machine is shared with other work and noisy (other test runs on the same 2 "
        "cores): round trips are wall-clock medians that move with the load, DPDK's (CPU "
        "work per SET_MEM_TABLE with the rings live) most. A few hostile outcomes vary "
        "from run to run (a back-end that dies in one run leaks in the next; an fd let go "
        "just before or after the 3 s bound of every wait): compare two runs before you "
        "rely on one cell.",
        "",
        "## Leak probe",
        "",
        "| back-end | mode | measured process | memory updates | verdict | our files held "
        "before/peak/after | median update round trip (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r.probe or {}
        m = p.get("measured_process") or {}
        who = ""
        if m:
            who = f"pid {m['pid']} ({m['how']})"
            if m.get("peercred_pid") not in (None, m["pid"]):
                who += f"; SO_PEERCRED {m['peercred_pid']}"
        mode = "ADD/REM_MEM_REG" if p.get("mem_slots") else ("SET_MEM_TABLE" if p else "")
        recon = p.get("reconnect")
        verdict = _verdict(r) + (f"; reconnect after {recon['seconds']} s: "
                                 f"{'leak' if recon['leak'] else 'no leak'}" if recon else "")
        lines.append(f"| {r.name} | {r.mode} | {who} | {mode} | {verdict} | {_held(r)} | "
                     f"{_latency(r)} |")
    lines += [
        "",
        "\"our files held\": fds on, and mappings of, the probe's region files (memfds "
        "named `pyvhost-fe-<pid>-<n>`), before the cycles, with every region of the first "
        "cycle plugged, and after the cycles.",
        "",
        "## Hostile cases",
        "",
        "The witness (another VM's device, started before the first case) must still get "
        "answers after every case and, on a net device whose frames it saw used before "
        "the cases, still have them used (and sent back, if they were). The destructive "
        "case truncates the file of a connection's boot RAM (its rings) to 0 bytes and "
        "kicks; it runs on a fresh start of the back-end, followed by one ordinary case "
        "on a new connection.",
        "",
        "| back-end | mode | witness | outcomes | memory truncated under a live ring |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.name} | {r.mode} | {_witness(r)} | {_hostile_summary(r)} | "
                     f"{_destructive(r)} |")
    ran = [r for r in rows if r.hostile is not None]
    lines += ["", "Per case (pass: answered and kept serving; nack: refused, kept serving; "
              "closed: hung up on that connection; crashed, hung, leaked, harmed-others "
              "fail):", ""]
    header = "| case | " + " | ".join(f"{_short(r.name)} {r.mode.split()[0]}"
                                     for r in ran) + " |"
    lines += [header, "|---" * (len(ran) + 1) + "|"]
    by_row = [{c["name"]: c for c in (r.hostile or {}).get("cases", [])} for r in ran]
    for case in CASES:
        if case.destructive:
            continue
        cells = []
        for results in by_row:
            c = results.get(case.name)
            if c is None:
                cells.append("")
            else:
                cells.append(f"**{c['outcome']}**" if c["outcome"] in FAILING
                             else c["outcome"])
        lines.append(f"| {case.name} | " + " | ".join(cells) + " |")
    lines += ["", "Details of every failing verdict:", ""]
    for r, results in zip(ran, by_row, strict=True):
        for c in results.values():
            if c["outcome"] in FAILING:
                lines.append(f"- {r.name} ({r.mode}), `{c['name']}`: {c['outcome']}: "
                             f"{c['detail'] or c['response']}")
    lines += ["", f"The destructive case (`{DESTRUCTIVE}`), then `{AFTER}` on a new "
              "connection:", ""]
    for r in rows:
        cases = {c["name"]: c for c in (r.destructive or {}).get("cases", [])}
        c, after = cases.get(DESTRUCTIVE), cases.get(AFTER)
        if c is None:
            continue
        text = f"- {r.name} ({r.mode}): {c['outcome']}"
        if c["outcome"] == "crashed":
            text += f" ({r.destructive_note or c['detail']})"
        else:
            frames = (r.destructive or {}).get("witness_frames") or {}
            text += (f" (the case's connection: {c['response']})"
                     + ("; the witness's frames kept coming back" if frames.get("frames_back")
                        else "; the witness unharmed"))
        if after is not None:
            text += f"; then `{AFTER}`: {after['outcome']}"
            if after["outcome"] == "not run":
                text += f" ({after['detail']})"
        lines.append(text)
    lines += ["", "The spec sentence each case relies on: `pyvhost probe --list-cases`.", ""]
    notes = [f"- {r.name} ({r.mode}): {r.note}" for r in rows if r.note]
    if notes:
        lines += ["Notes:", "", *notes, ""]
    return "\n".join(lines)


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pvcard-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--out", default=str(ROOT / "docs" / "backends.md"))
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--regions", type=int, default=3)
    ap.add_argument("--only", action="append", default=[],
                    help="run only back-ends whose name contains this (repeatable)")
    args = ap.parse_args(argv)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.monotonic()
    rows: list[Row] = []
    chosen = [b for b in BACKENDS
              if not args.only or any(o.lower() in f"{b.name} {b.mode}".lower()
                                      for o in args.only)]
    for b in chosen:
        print(f"== {b.name} ({b.mode})", file=sys.stderr, flush=True)
        with workdir() as work:
            row = run_backend(b, args.cycles, args.regions, work)
        print(f"   {_verdict(row)}; hostile: {_hostile_summary(row)}; destructive: "
              f"{_destructive(row)}", file=sys.stderr, flush=True)
        rows.append(row)
    page = render(rows, args.cycles, args.regions, started, time.monotonic() - t0)
    Path(args.out).write_text(page)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(main())
