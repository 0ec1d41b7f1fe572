"""``pyvhost probe``: the command line of the leak probe (:mod:`pyvhost.frontend.probe`).

It parses options, shows progress and prints the report (a rich table, or one JSON
object with ``--json``). Exit codes: 0 no leak, 1 leak found, 2 usage or connection
error (or any other failure to finish the probe), 130 interrupted.
"""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pyvhost.errors import PyvhostError
from pyvhost.frontend import plot, profiles
from pyvhost.frontend.hostile import (
    CASES,
    CaseResult,
    HostileConfig,
    HostileReport,
    run_hostile,
)
from pyvhost.frontend.probe import ProbeConfig, ProbeReport, run_probe
from pyvhost.units import MiB, parse_size

EXIT_OK = 0
EXIT_LEAK = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

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
Exit codes: 0 no leak, 1 leak found (or a hostile case failed), 2 usage or
connection error or cannot measure, 130 Ctrl-C.

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
@click.option("--socket", "socket_path", required=True, metavar="PATH",
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
@click.option("--json", "as_json", is_flag=True,
              help="Print exactly one JSON object on stdout (no table, no progress bar).")
@click.pass_context
def probe(ctx: click.Context, socket_path: str, cycles: int, regions: int, region_size: int,
          boot_size: int, pid: int | None, mem_slots: bool | None, memory_dir: str | None,
          timeout: float, settle: float, profile: str, device: str, queue_pairs: int,
          listen: bool, accept_timeout: float, reconnect: bool, plot_path: str | None,
          hostile: bool, cases: tuple[str, ...], include_destructive: bool,
          witness_socket: str | None, case_timeout: float, time_limit: float,
          list_cases: bool, as_json: bool) -> None:
    if list_cases:
        _list_cases(as_json)
        ctx.exit(EXIT_OK)
    if hostile:
        _hostile(ctx, HostileConfig(socket_path, witness_socket, cases, include_destructive,
                                    device, case_timeout, time_limit, pid), listen, as_json)
    config = ProbeConfig(socket_path=socket_path, cycles=cycles, regions=regions,
                         region_size=region_size, boot_size=boot_size, pid=pid,
                         mem_slots=mem_slots, timeout=timeout, settle=settle,
                         directory=memory_dir, profile=profile, device=device,
                         queue_pairs=queue_pairs, listen=listen,
                         accept_timeout=accept_timeout, reconnect=reconnect)
    err = Console(stderr=True)
    try:
        report = run_probe(config) if as_json else _run_with_progress(config, err)
        if plot_path is not None:
            plot.draw(report.series, plot_path,
                      f"pyvhost probe: pid {report.pid} on {report.socket}")
    except KeyboardInterrupt:
        _fail(as_json, err, "interrupted", EXIT_INTERRUPTED)
        ctx.exit(EXIT_INTERRUPTED)
    except PyvhostError as e:
        _fail(as_json, err, str(e), EXIT_ERROR, kind=type(e).__name__)
        ctx.exit(EXIT_ERROR)
    if as_json:
        click.echo(json.dumps(report.to_json(), sort_keys=False))
    else:
        _print_report(report, Console())
    ctx.exit(EXIT_LEAK if report.leak else EXIT_OK)


def _run_with_progress(config: ProbeConfig, err: Console) -> ProbeReport:
    columns = (TextColumn("hot-plug cycles"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("cycles", total=config.cycles)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return run_probe(config, progress=advance)


def _fail(as_json: bool, err: Console, message: str, code: int, kind: str = "") -> None:
    if as_json:
        click.echo(json.dumps({"error": message, "error_type": kind or None,
                               "exit_code": code}))
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n % MiB == 0 else f"{n} bytes"


def _print_report(report: ProbeReport, out: Console) -> None:
    mode = "ADD_MEM_REG / REM_MEM_REG" if report.mem_slots else "SET_MEM_TABLE"
    out.print(f"back-end pid [bold]{report.pid}[/] on {report.socket}"
              + (" (it connected to us)" if report.listen else ""), highlight=False)
    m = report.measured
    if m is not None:
        extra = "" if m.peercred_pid in (None, m.pid) else (
            f"; SO_PEERCRED names {m.peercred_pid}, which does not serve it")
        out.print(f"measured process found by: {m.how}{extra}", highlight=False)
    out.print(f"front-end profile: {report.profile} ({report.device})", highlight=False)
    out.print(f"{report.cycles} cycles x {report.regions} regions of "
              f"{_size(report.region_size)}; memory updates via {mode}; protocol features: "
              f"{', '.join(report.protocol_features) or 'none'}", highlight=False)

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
        style = "red" if delta > 0 else ""
        table.add_row(label, str(vb), str(vp), str(va),
                      f"[{style}]{delta:+d}[/]" if style else f"{delta:+d}")
    out.print(table)

    lat = Table(title="memory update round trips (ms)", title_justify="left")
    for col in ("request", "count", "median", "p99", "max"):
        lat.add_column(col, justify="left" if col == "request" else "right")
    for name, stats in report.latency_by_request.items():
        lat.add_row(name, str(stats.count), f"{stats.median:.3f}", f"{stats.p99:.3f}",
                    f"{stats.max:.3f}")
    s = report.latency
    lat.add_row("[bold]all[/]", str(s.count), f"{s.median:.3f}", f"{s.p99:.3f}",
                f"{s.max:.3f}")
    out.print(lat)
    if not report.reply_ack:
        out.print("no REPLY_ACK: round trips are send times only", style="yellow")
    if report.cycles >= 2:
        slopes = report.series.per_1000()
        out.print(f"growth per 1,000 cycles: fds {slopes['fds']:+g}, fds on our regions "
                  f"{slopes['region_fds']:+g}, mappings {slopes['mappings']:+g}",
                  highlight=False)
    if report.stale_files:
        out.print(f"[red]still held after removal:[/] {', '.join(report.stale_files)}",
                  highlight=False)
    again = report.reconnect
    if again is not None:
        out.print(f"next connection: after {again.seconds:.2f} s, pid {again.pid}, "
                  f"{'leak' if again.leak else 'no leak'}", highlight=False)
    gone = report.disconnected
    if gone is not None:
        out.print(f"after hang-up the back-end holds {gone.matching_fds} fds and "
                  f"{gone.mappings} mappings of our regions", highlight=False)
    if report.leak:
        out.print("[bold red]verdict: leak[/]")
    else:
        out.print("[bold green]verdict: no leak[/]")


# -- --hostile ----------------------------------------------------------------------------
def _list_cases(as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"cases": [{"name": c.name, "group": c.group, "what": c.what,
                                          "spec": c.spec, "destructive": c.destructive}
                                         for c in CASES]}))
        return
    out = Console()
    for c in CASES:
        mark = " (destructive)" if c.destructive else ""
        out.print(f"[bold]{c.name}[/]{mark}: {c.what}\n    spec: {c.spec}", highlight=False)


def _hostile(ctx: click.Context, config: HostileConfig, listen: bool, as_json: bool) -> None:
    err = Console(stderr=True)
    if listen:
        _fail(as_json, err, "--hostile connects to the back-end; it does not take --listen",
              EXIT_ERROR, "UsageError")
        ctx.exit(EXIT_ERROR)
    try:
        if as_json:
            report = run_hostile(config)
        else:
            def show(result: CaseResult) -> None:
                style = "red" if result.failed else ""
                text = f"{result.name:<45} {result.outcome}"
                err.print(f"[{style}]{text}[/]" if style else text, highlight=False)

            report = run_hostile(config, progress=show)
    except KeyboardInterrupt:
        _fail(as_json, err, "interrupted", EXIT_INTERRUPTED)
        ctx.exit(EXIT_INTERRUPTED)
    except PyvhostError as e:
        _fail(as_json, err, str(e), EXIT_ERROR, kind=type(e).__name__)
        ctx.exit(EXIT_ERROR)
    if as_json:
        click.echo(json.dumps({"socket": config.socket_path, "mode": "hostile",
                               "hostile": report.to_json()}))
    else:
        _print_hostile(report, Console())
    ctx.exit(EXIT_LEAK if report.failed else EXIT_OK)


def _print_hostile(report: HostileReport, out: Console) -> None:
    m = report.measured
    if m is not None:
        out.print(f"back-end pid [bold]{m.pid}[/] (found by {m.how}); witness on "
                  f"{report.witness_socket}", highlight=False)
    table = Table(title="hostile cases", title_justify="left")
    for col in ("case", "outcome", "response", "detail"):
        table.add_column(col)
    for r in report.results:
        outcome = f"[red]{r.outcome}[/]" if r.failed else r.outcome
        table.add_row(r.name, outcome, r.response, r.detail)
    out.print(table)
    counts = ", ".join(f"{k} {v}" for k, v in report.counts().items())
    out.print(f"{'[bold red]' if report.failed else '[bold green]'}{counts}[/]")
