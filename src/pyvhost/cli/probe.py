"""``pyvhost probe``: the command line of the leak probe (:mod:`pyvhost.frontend.probe`).

It parses options, shows progress and prints the report (a rich table, or one
``pyvhost.probe/1`` JSON object with ``--json``). Exit codes: 0 no leak, 1 leak found,
2 usage error or cannot connect (or the probe cannot run as asked), 3 the back-end failed
a step (a NACK, a wrong reply, no reply, it hung up or exited mid-probe), 130
interrupted.
"""

from __future__ import annotations

import os
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from pyvhost.errors import PeerError, PyvhostError
from pyvhost.frontend.errors import FrontendConnectError
from pyvhost.frontend.probe import ProbeConfig, ProbeReport, run_probe
from pyvhost.tools.procfs import ProcessGoneError
from pyvhost.units import MiB, parse_size

from .common import Exit, configure_logging, console, emit_json, fail, json_option, verbosity
from .sockets import connect_failure

SCHEMA = "pyvhost.probe/1"
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
pyvhost plays QEMU 7.2's part: it connects to the back-end's socket, negotiates
features, sends a boot memory table (one memfd region at GPA 0), measures the
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
a leak.

\b
Run as root or as the back-end's user (reading /proc/PID/fd needs that). The
back-end's pid comes from the socket (SO_PEERCRED) unless --pid is given.
Without CONFIGURE_MEM_SLOTS the table holds at most 8 regions: boot RAM + up to
7 hot-plugged ones.

\b
Exit codes: 0 no leak, 1 leak found, 2 usage error or cannot connect (or the probe
cannot run as asked: too many regions, --mem-slots not offered, no access to
/proc/PID), 3 the back-end failed a step (NACK, wrong or no reply, hung up or exited
mid-probe), 130 interrupted (Ctrl-C, SIGTERM).

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
"""


@click.command("probe", help=HELP, short_help="Check a back-end for fd/mapping leaks "
               "across memory hot-plug.")
@click.option("--socket", "socket_path", required=True, metavar="PATH",
              help="The back-end's vhost-user socket (it must be listening).")
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
              help="The back-end's pid (default: from the socket's SO_PEERCRED).")
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
@json_option(help="Print exactly one JSON object on stdout (schema pyvhost.probe/1; no "
                 "table, no progress bar).")
@verbosity
def probe(socket_path: str, cycles: int, regions: int, region_size: int,
          boot_size: int, pid: int | None, mem_slots: bool | None, memory_dir: str | None,
          timeout: float, settle: float, as_json: bool) -> None:
    configure_logging()
    if pid is not None and not os.path.exists(f"/proc/{pid}"):
        fail(f"--pid {pid}: no such process", "usage")
    config = ProbeConfig(socket_path=socket_path, cycles=cycles, regions=regions,
                         region_size=region_size, boot_size=boot_size, pid=pid,
                         mem_slots=mem_slots, timeout=timeout, settle=settle,
                         directory=memory_dir)
    try:
        report = (run_probe(config) if as_json
                  else _run_with_progress(config, console(stderr=True)))
    except FrontendConnectError as e:
        fail(connect_failure(socket_path, "vhost-user socket", HINT, e), "connect")
    except (PeerError, ProcessGoneError) as e:
        # The back-end broke the protocol, hung up, stopped answering or exited.
        fail(f"the back-end failed: {e}", "peer")
    except PyvhostError as e:
        fail(str(e), "usage")
    if as_json:
        emit_json(json_doc(report))
    else:
        _print_report(report, console())
    raise click.exceptions.Exit(Exit.PROBLEM if report.leak else Exit.OK)


def json_doc(report: ProbeReport) -> dict[str, Any]:
    """The ``pyvhost.probe/1`` document: the report's fields and its schema."""
    return {"schema": SCHEMA, **report.to_json()}


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
    mode = "ADD_MEM_REG / REM_MEM_REG" if report.mem_slots else "SET_MEM_TABLE"
    out.print(Text.assemble("back-end pid ", (str(report.pid), "bold"),
                            f" on {report.socket}"))
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
    gone = report.disconnected
    if gone is not None:
        out.print(f"after hang-up the back-end holds {gone.matching_fds} fds and "
                  f"{gone.mappings} mappings of our regions", highlight=False)
    if report.leak:
        out.print("[bold red]verdict: leak[/]")
    else:
        out.print("[bold green]verdict: no leak[/]")
