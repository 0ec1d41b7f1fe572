"""``pyvhost probe``: the command line of the leak probe (:mod:`pyvhost.frontend.probe`) and
of its robustness suite (:mod:`pyvhost.frontend.hostile`).

It parses options, shows progress and prints the report: a rich table, or with ``--json``
one ``pyvhost.probe/1`` object (hot-plug cycles) or one ``pyvhost.probe.hostile/1`` object
(``--hostile``); errors are the one ``pyvhost.error/1`` document. Exit codes: 0 no leak
(no hostile case failed), 1 leak found (a hostile case crashed, hung, leaked or harmed the
witness), 2 usage error, cannot connect, or the probe cannot run as asked or cannot
measure, 3 the back-end failed a step (a NACK, a wrong reply, no reply, it hung up or
exited mid-probe), 130 interrupted.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from pyvhost.errors import PeerError, PyvhostError
from pyvhost.frontend import plot, profiles
from pyvhost.frontend.errors import FrontendConnectError
from pyvhost.frontend.hostile import (
    CASES,
    CaseResult,
    HostileConfig,
    HostileReport,
    run_hostile,
)
from pyvhost.frontend.peer import CannotMeasureError
from pyvhost.frontend.probe import ProbeConfig, ProbeReport, run_probe
from pyvhost.tools.procfs import ProcessGoneError
from pyvhost.units import MiB, parse_size

from .common import Exit, configure_logging, console, emit_json, fail, json_option, verbosity
from .sockets import connect_failure

SCHEMA = "pyvhost.probe/1"
HOSTILE_SCHEMA = "pyvhost.probe.hostile/1"
CASES_SCHEMA = "pyvhost.probe.cases/1"
HINT = "is the back-end running, and is this the path it listens on?"


def _size_option(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        size = parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None
    if size <= 0:
        raise click.BadParameter("size must be positive", ctx=ctx, param=param)
    return size


HELP = """Check a vhost-user back-end for fd and mapping leaks across memory hot-plug.

\b
pyvhost plays the front-end's part (QEMU 7.2's by default): it connects to the
back-end's socket, negotiates features, starts the device with a boot memory
table (one memfd region at GPA 0) and its rings, measures the
back-end process (/proc/PID/fd and /proc/PID/maps), then runs CYCLES hot-plug
cycles: hot-add REGIONS regions one at a time, then remove them one at a time.
Each step sends exactly what QEMU sends when its memory map changes:
  - without CONFIGURE_MEM_SLOTS: one SET_MEM_TABLE with every region and one fd
    each (the same files again; the back-end gets fresh fd numbers every time
    and must close the ones it does not keep);
  - with CONFIGURE_MEM_SLOTS: REM_MEM_REG for each region gone, then ADD_MEM_REG
    for each new one.
Then it measures again. Any growth in the back-end's fds, in its fds on our
region files (memfds named pyvhost-fe-<pid>-<n>) or in its mappings of them is
a leak, and so is any removed region's file it still holds. Every cycle is
measured: the report gives each measure's growth per 1,000 cycles.

\b
The messages are those of a real front-end (--profile qemu-7.2, qemu-10.0 or
dpdk-virtio-user, each checked against captured wire traffic), rings and status
included. The measured process is the one holding the other end of the
connection that maps the boot region (a child that a back-end forked after
accept included); if none does, the probe says "cannot measure" and exits 2,
never "no leak". --pid names the process instead (checked the same way).
Run as root or as the back-end's user (reading /proc/PID/fd needs that).
Without CONFIGURE_MEM_SLOTS the table holds at most 8 regions: boot RAM + up to
7 hot-plugged ones; with it, at most what GET_MAX_MEM_SLOTS answered.

\b
Exit codes: 0 no leak, 1 leak found (with --hostile: a case crashed, hung,
leaked or harmed the witness), 2 usage error or cannot connect (or the probe
cannot run as asked: too many regions, --mem-slots not offered, no access to
/proc/PID; or cannot measure: no process maps the back-end's memory), 3 the
back-end failed a step (NACK, wrong or no reply, hung up or exited mid-probe),
130 interrupted (Ctrl-C, SIGTERM).

\b
Examples:
  Probe DPDK 22.11 (testpmd's vhost PMD is the back-end; it listens on the socket):
    dpdk-testpmd -l 0-1 --no-huge -m 512 --no-pci --file-prefix p0 \\
        --vdev 'net_vhost0,iface=/tmp/vh.sock,queues=1' \\
        -- --nb-cores=1 --total-num-mbufs=2048
    pyvhost probe --socket /tmp/vh.sock --cycles 20 --regions 3
  (keep testpmd's stdin open: it exits when stdin hits end of file)
\b
  Machine-readable report, larger regions, a back-end in another pid namespace:
    pyvhost probe --socket /run/vhost0.sock --json --region-size 128M --pid 4242
\b
  Force the SET_MEM_TABLE path even if the back-end offers memory slots:
    pyvhost probe --socket /tmp/vhost0.sock --no-mem-slots --regions 7
\b
  A back-end in client mode (OVS dpdkvhostuserclient, DPDK client=1): listen,
  and probe its reconnect too:
    pyvhost probe --socket /tmp/fe.sock --listen --reconnect
\b
  A slow leak: 10,000 cycles, growth per 1,000 cycles, a picture:
    pyvhost probe --socket /tmp/vh.sock --cycles 10000 --plot series.png
\b
  Robustness: named hostile cases, a witness connection, exit 1 on a crash,
  hang, leak or harm to the witness:
    pyvhost probe --socket /tmp/vh.sock --hostile
    pyvhost probe --list-cases
"""


@click.command("probe", help=HELP, short_help="Check a back-end for fd/mapping leaks "
               "across memory hot-plug.")
@click.option("--socket", "socket_path", metavar="PATH",
              help="The back-end's vhost-user socket (it must be listening), or with "
                   "--listen the path to listen on.")
@click.option("--cycles", type=click.IntRange(min=0), default=10, show_default=True,
              help="Hot-plug cycles (add all regions, then remove them).")
@click.option("--regions", type=click.IntRange(min=1), default=3, show_default=True,
              help="Regions hot-added per cycle, one at a time.")
@click.option("--region-size", metavar="SIZE", default="2M", show_default=True,
              callback=_size_option,
              help="Size of each hot-added region (K, M, G are binary units).")
@click.option("--boot-size", metavar="SIZE", default="64M", show_default=True,
              callback=_size_option,
              help="Size of the boot RAM region at GPA 0.")
@click.option("--pid", type=click.IntRange(min=1), default=None,
              help="The back-end's pid (default: the process holding the other end of "
                   "the connection that maps guest memory).")
@click.option("--mem-slots/--no-mem-slots", default=None,
              help="Use (require) or refuse CONFIGURE_MEM_SLOTS (ADD/REM_MEM_REG). "
                   "Default: use it when the back-end offers it.")
@click.option("--memory-dir", type=click.Path(file_okay=False, exists=True), default=None,
              help="Back regions with files in this directory (a hugetlbfs mount, "
                   "/dev/shm) instead of memfds.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=5.0,
              show_default=True, help="Seconds to wait for a connection or a reply.")
@click.option("--settle", type=click.FloatRange(min=0), default=0.2, show_default=True,
              help="Seconds to wait before each measurement.")
@click.option("--profile", type=click.Choice(profiles.names()), default="qemu-7.2",
              show_default=True,
              help="Whose messages to send: a front-end's sequence as captured from it.")
@click.option("--device", type=click.Choice(profiles.DEVICES), default="net",
              show_default=True,
              help="The device the back-end serves (its rings; GET_CONFIG for blk).")
@click.option("--queue-pairs", type=click.IntRange(min=1, max=64), default=1,
              show_default=True,
              help="net: queue pairs; QEMU sends every memory update once per pair.")
@click.option("--listen", is_flag=True,
              help="Listen on --socket and wait for the back-end to connect (client-mode "
                   "back-ends: OVS dpdkvhostuserclient, DPDK client=1, pyvhost net "
                   "--client), as QEMU's server=on chardev does.")
@click.option("--accept-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, help="With --listen: seconds to wait for the back-end.")
@click.option("--reconnect", is_flag=True,
              help="After the run, probe the next connection too (with --listen: the "
                   "back-end's own reconnect; else a second connect).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              metavar="FILE.png",
              help="Draw fds and mappings over the cycles (needs pyvhost[plot]).")
@click.option("--hostile", is_flag=True,
              help="Instead of hot-plug cycles: run the robustness suite (named hostile "
                   "cases; exit 1 if any crashed, hung, leaked or harmed the witness).")
@click.option("--case", "cases", multiple=True, metavar="NAME",
              help="With --hostile: run only this case (repeatable; see --list-cases).")
@click.option("--include-destructive", is_flag=True,
              help="With --hostile: also the cases that may kill a back-end that is not "
                   "robust (guest memory truncated under a live ring).")
@click.option("--witness-socket", metavar="PATH", default=None,
              help="With --hostile: where the witness connects (default --socket); for a "
                   "back-end that serves one connection per socket.")
@click.option("--case-timeout", type=click.FloatRange(min=0, min_open=True), default=3.0,
              show_default=True, help="With --hostile: seconds for every wait of a case.")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=600.0,
              show_default=True, help="With --hostile: seconds for the whole suite.")
@click.option("--list-cases", is_flag=True, help="List the hostile cases and exit.")
@json_option(help="Print exactly one JSON object on stdout (schema pyvhost.probe/1, or "
                 "pyvhost.probe.hostile/1 with --hostile; no table, no progress bar).")
@verbosity
def probe(socket_path: str | None, cycles: int, regions: int, region_size: int,
          boot_size: int, pid: int | None, mem_slots: bool | None, memory_dir: str | None,
          timeout: float, settle: float, profile: str, device: str, queue_pairs: int,
          listen: bool, accept_timeout: float, reconnect: bool, plot_path: str | None,
          hostile: bool, cases: tuple[str, ...], include_destructive: bool,
          witness_socket: str | None, case_timeout: float, time_limit: float,
          list_cases: bool, as_json: bool) -> None:
    configure_logging()
    if list_cases:
        _list_cases(as_json)
        raise click.exceptions.Exit(Exit.OK)
    if socket_path is None:
        raise click.UsageError("Missing option '--socket'.")
    if pid is not None and not os.path.exists(f"/proc/{pid}"):
        fail(f"--pid {pid}: no such process", "usage")
    if hostile:
        if listen:
            fail("--hostile connects to the back-end; it does not take --listen", "usage")
        _hostile(HostileConfig(socket_path, witness_socket, cases, include_destructive,
                               device, case_timeout, time_limit, pid), as_json)
    config = ProbeConfig(socket_path=socket_path, cycles=cycles, regions=regions,
                         region_size=region_size, boot_size=boot_size, pid=pid,
                         mem_slots=mem_slots, timeout=timeout, settle=settle,
                         directory=memory_dir, profile=profile, device=device,
                         queue_pairs=queue_pairs, listen=listen,
                         accept_timeout=accept_timeout, reconnect=reconnect)
    if plot_path is not None:
        try:
            plot.require()
        except PyvhostError as e:
            fail(str(e), "run")
    with _errors(socket_path):
        report = (run_probe(config) if as_json
                  else _run_with_progress(config, console(stderr=True)))
    if plot_path is not None:
        try:
            plot.draw(report.series, plot_path,
                      f"pyvhost probe: pid {report.pid} on {report.socket}")
        except PyvhostError as e:
            fail(str(e), "run")
    if as_json:
        emit_json(json_doc(report))
    else:
        _print_report(report, console())
    raise click.exceptions.Exit(Exit.PROBLEM if report.leak else Exit.OK)


@contextlib.contextmanager
def _errors(socket_path: str) -> Iterator[None]:
    """The probe's and the suite's exceptions as the common rule's error kinds
    (KeyboardInterrupt goes on to :func:`pyvhost.cli.main`: 130)."""
    try:
        yield
    except FrontendConnectError as e:
        fail(connect_failure(socket_path, "vhost-user socket", HINT, e), "connect")
    except CannotMeasureError as e:
        # Never "no leak" for a process the probe did not see.
        fail(f"cannot measure: {e}", "run")
    except (PeerError, ProcessGoneError) as e:
        # The back-end broke the protocol, hung up, stopped answering or exited.
        fail(f"the back-end failed: {e}", "peer")
    except PyvhostError as e:
        fail(str(e), "usage")


def json_doc(report: ProbeReport) -> dict[str, Any]:
    """The ``pyvhost.probe/1`` document: the report's fields and its schema."""
    return {"schema": SCHEMA, **report.to_json()}


def hostile_doc(report: HostileReport) -> dict[str, Any]:
    """The ``pyvhost.probe.hostile/1`` document."""
    return {"schema": HOSTILE_SCHEMA, **report.to_json()}


def _run_with_progress(config: ProbeConfig, err: Console) -> ProbeReport:
    columns = (TextColumn("hot-plug cycles"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("cycles", total=config.cycles)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return run_probe(config, progress=advance)


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n % MiB == 0 else f"{n} bytes"


def _print_report(report: ProbeReport, out: Console) -> None:
    # Paths, file names and the back-end's words print as plain text (Text), never markup.
    mode = "ADD_MEM_REG / REM_MEM_REG" if report.mem_slots else "SET_MEM_TABLE"
    out.print(Text.assemble("back-end pid ", (str(report.pid), "bold"),
                            f" on {report.socket}",
                            " (it connected to us)" if report.listen else ""))
    m = report.measured
    if m is not None:
        extra = "" if m.peercred_pid in (None, m.pid) else (
            f"; SO_PEERCRED names {m.peercred_pid}, which does not serve it")
        out.print(Text(f"measured process found by: {m.how}{extra}"))
    out.print(Text(f"front-end profile: {report.profile} ({report.device})"))
    out.print(Text(f"{report.cycles} cycles x {report.regions} regions of "
                   f"{_size(report.region_size)}; memory updates via {mode}; protocol "
                   f"features: {', '.join(report.protocol_features) or 'none'}"))

    table = Table(title="back-end process", title_justify="left")
    table.add_column("measure")
    table.add_column("before", justify="right")
    table.add_column("peak (cycle 1)", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    b, p, a = report.before, report.peak, report.after
    for label, vb, vp, va in (("open fds", b.fds, p.fds, a.fds),
                              ("fds on our regions", b.matching_fds, p.matching_fds,
                               a.matching_fds),
                              ("mappings of our regions", b.mappings, p.mappings, a.mappings),
                              ("bytes mapped of our regions", b.mapped_bytes, p.mapped_bytes,
                               a.mapped_bytes)):
        delta = va - vb
        table.add_row(label, str(vb), str(vp), str(va),
                      Text(f"{delta:+d}", style="red" if delta > 0 else ""))
    out.print(table)

    lat = Table(title="memory update round trips (ms)", title_justify="left")
    for col in ("request", "count", "median", "p99", "max"):
        lat.add_column(col, justify="left" if col == "request" else "right")
    for name, stats in report.latency_by_request.items():
        lat.add_row(name, str(stats.count), f"{stats.median:.3f}", f"{stats.p99:.3f}",
                    f"{stats.max:.3f}")
    s = report.latency
    lat.add_row(Text("all", style="bold"), str(s.count), f"{s.median:.3f}", f"{s.p99:.3f}",
                f"{s.max:.3f}")
    out.print(lat)
    if not report.reply_ack:
        out.print("no REPLY_ACK: round trips are send times only", style="yellow")
    if report.cycles >= 2:
        slopes = report.series.per_1000()
        out.print(Text(f"growth per 1,000 cycles: fds {slopes['fds']:+g}, fds on our regions "
                       f"{slopes['region_fds']:+g}, mappings {slopes['mappings']:+g}"))
    if report.stale_files:
        out.print(Text.assemble(("still held after removal:", "red"),
                                f" {', '.join(report.stale_files)}"))
    again = report.reconnect
    if again is not None:
        out.print(Text(f"next connection: after {again.seconds:.2f} s, pid {again.pid}, "
                       f"{'leak' if again.leak else 'no leak'}"))
    gone = report.disconnected
    if gone is not None:
        out.print(Text(f"after hang-up the back-end holds {gone.matching_fds} fds and "
                       f"{gone.mappings} mappings of our regions"))
    if report.leak:
        out.print(Text("verdict: leak", style="bold red"))
    else:
        out.print(Text("verdict: no leak", style="bold green"))


# -- --hostile ----------------------------------------------------------------------------
def _list_cases(as_json: bool) -> None:
    if as_json:
        emit_json({"schema": CASES_SCHEMA,
                   "cases": [{"name": c.name, "group": c.group, "what": c.what,
                              "spec": c.spec, "destructive": c.destructive} for c in CASES]})
        return
    out = console()
    for c in CASES:
        mark = " (destructive)" if c.destructive else ""
        out.print(Text.assemble((c.name, "bold"), f"{mark}: {c.what}\n    spec: {c.spec}"))


def _hostile(config: HostileConfig, as_json: bool) -> None:
    """Run the suite, print its report, and end the command with its exit code."""
    err = console(stderr=True)

    def show(result: CaseResult) -> None:
        err.print(Text(f"{result.name:<45} {result.outcome}",
                       style="red" if result.failed else ""))

    with _errors(config.socket_path):
        report = run_hostile(config, progress=None if as_json else show)
    if as_json:
        emit_json(hostile_doc(report))
    else:
        _print_hostile(report, console())
    raise click.exceptions.Exit(Exit.PROBLEM if report.failed else Exit.OK)


def _print_hostile(report: HostileReport, out: Console) -> None:
    m = report.measured
    if m is not None:
        out.print(Text.assemble("back-end pid ", (str(m.pid), "bold"),
                                f" (found by {m.how}); witness on {report.witness_socket}"))
    f = report.frames
    if f is not None:
        seen = ("its frames are used and come back: both checked after every case" if f.back
                else "its frames are used: checked after every case" if f.used
                else "control messages only")
        out.print(Text(f"witness: {seen}" + (f" ({f.detail})" if f.detail else "")))
    table = Table(title="hostile cases", title_justify="left")
    for col in ("case", "outcome", "response", "detail"):
        table.add_column(col)
    for r in report.results:
        table.add_row(r.name, Text(r.outcome, style="red" if r.failed else ""),
                      Text(r.response), Text(r.detail))
    out.print(table)
    counts = ", ".join(f"{k} {v}" for k, v in report.counts().items())
    out.print(Text(counts, style="bold red" if report.failed else "bold green"))
