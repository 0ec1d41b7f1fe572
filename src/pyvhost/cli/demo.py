"""``pyvhost demo``: the README's main job for now.

It starts a real ``pyvhost net`` back-end process, connects pyvhost's front-end to it the
way QEMU 7.2 does, and hot-adds then removes memory, showing after every step the
back-end's memory table (asked from its control socket) and its open fds and mappings
(read from /proc/<pid>). Then it runs ``pyvhost probe`` cycles against it and prints
the verdict. Everything it starts is ended, and every socket and memfd released, on exit
or Ctrl-C.

Exit codes: 0 no leak, 1 the probe found a leak, 2 the demo could not run (the back-end
did not start or failed a step), 130 interrupted. ``--json`` prints one
``pyvhost.demo/1`` document: the steps and the probe's ``pyvhost.probe/1`` report.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from pyvhost.backend.control import fetch_status
from pyvhost.errors import PyvhostError
from pyvhost.frontend.frontend import Frontend
from pyvhost.frontend.memory import FrontendMemory, MiB
from pyvhost.frontend.probe import ProbeConfig, ProbeReport, run_probe
from pyvhost.protocol.constants import ProtocolFeature
from pyvhost.tools import procfs
from pyvhost.tools.process import end_process, pyvhost_argv

from .common import Exit, configure_logging, console, emit_json, fail, json_option, verbosity
from .probe import json_doc as probe_doc

SCHEMA = "pyvhost.demo/1"


@contextlib.contextmanager
def _backend(workdir: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, str]]:
    """``pyvhost net --reflect`` on a socket in ``workdir``, its log kept in a file there
    (the demo's own output stays the demo's); ended by pid on the way out."""
    sock, ctl = str(workdir / "vhost-net.sock"), str(workdir / "pyvhost.ctl")
    log = workdir / "pyvhost-net.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            pyvhost_argv("net", "--socket", sock, "--control", ctl, "--reflect", "--no-stats"),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(ctl):
            if proc.poll() is not None:
                fail(f"the pyvhost back-end did not start: {_last_line(log)} (pyvhost net "
                     f"exited with {proc.returncode})", "run")
            if time.monotonic() > deadline:
                fail("the pyvhost back-end did not start within 20 s", "run")
            time.sleep(0.05)
        yield proc, sock, ctl
    finally:
        end_process(proc, timeout=10)


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    last = next((line for line in reversed(lines) if line), "no message")
    return last.removeprefix("error: ")


def _snapshot(ctl: str, pid: int, needle: str) -> dict[str, object]:
    state = fetch_status(ctl)
    conns = state.get("connections")
    assert isinstance(conns, list)
    usage = procfs.measure(pid, needle)
    return {"memory": conns[0]["memory"] if conns else [], "fds": usage.fds,
            "region_fds": usage.matching_fds, "mappings": usage.mappings}


def _show(out: Console, title: str, snap: dict[str, object]) -> None:
    out.print(f"[bold]{title}[/bold]")
    table = Table()
    for col in ("GPA start", "GPA end", "size", "fds held"):
        table.add_column(col, justify="right")
    memory = snap["memory"]
    assert isinstance(memory, list)
    for r in memory:
        gpa, size = r["guest_phys_addr"], r["memory_size"]
        table.add_row(f"{gpa:#x}", f"{gpa + size:#x}", f"{size // MiB} MiB", str(r["fds_held"]))
    out.print(table)
    out.print(f"  back-end process: {snap['fds']} open fds, {snap['region_fds']} on guest "
              f"RAM files, {snap['mappings']} mappings of guest RAM\n")


@click.command()
@click.option("--mem-slots/--no-mem-slots", default=False, show_default=True,
              help="Hot-plug with ADD_MEM_REG/REM_MEM_REG (CONFIGURE_MEM_SLOTS) instead of "
                   "QEMU's default whole-table SET_MEM_TABLE re-sends.")
@click.option("--dimms", default=3, show_default=True, type=click.IntRange(1, 7),
              help="DIMMs to hot-add one at a time.")
@click.option("--cycles", default=200, show_default=True, type=click.IntRange(0),
              help="Hot-add/remove cycles of the leak probe at the end.")
@json_option(help="One JSON object instead of tables (schema pyvhost.demo/1); progress "
                  "goes to stderr.")
@verbosity
def demo(mem_slots: bool, dimms: int, cycles: int, as_json: bool) -> None:
    """Watch a pyvhost back-end's memory table across memory hot-plug.

    Starts `pyvhost net` on a socket in a temporary directory, plays QEMU 7.2's part
    (boot RAM, then DIMMs hot-added one at a time, then one removed) and shows after each
    step the back-end's memory table and its fd and mapping counts. Finishes with
    `pyvhost probe` cycles: a correct back-end's counts never grow.

    \b
    Exit codes: 0 no leak, 1 the probe found a leak, 2 the demo could not run (the
    back-end did not start or failed a step), 130 interrupted (Ctrl-C, SIGTERM).
    """
    configure_logging()
    out = console(stderr=as_json)
    try:
        steps, report = _run(mem_slots, dimms, cycles, None if as_json else out)
    except (PyvhostError, OSError, ValueError) as e:
        # The demo's own back-end, its control socket or the host let it down.
        fail(f"the demo could not run: {e}", "run")
    if as_json:
        emit_json({"schema": SCHEMA, "steps": steps, "probe": probe_doc(report)})
    else:
        p = report.to_json()
        out.print(f"probe: {cycles} cycles x 2 regions: fds {p['fds_before']} -> "
                  f"{p['fds_after']}, mappings {p['mappings_before']} -> "
                  f"{p['mappings_after']}, median update {report.latency.median:.3f} ms: "
                  f"[bold]{report.verdict}[/bold]")
    raise click.exceptions.Exit(Exit.PROBLEM if report.leak else Exit.OK)


def _run(mem_slots: bool, dimms: int, cycles: int,
         out: Console | None) -> tuple[list[dict[str, object]], ProbeReport]:
    """Start the back-end, play the hot-plug steps (shown on ``out`` unless None), probe."""
    steps: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="pyvhost-demo-") as tmp, \
            _backend(Path(tmp)) as (proc, sock, ctl):
        memory = FrontendMemory()
        fe = Frontend()
        try:
            fe.connect(sock)
            wanted = ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.STATUS
            if mem_slots:
                wanted |= ProtocolFeature.CONFIGURE_MEM_SLOTS
            fe.negotiate(protocol_features=wanted)
            how = "ADD_MEM_REG" if mem_slots else "SET_MEM_TABLE with every region"

            def step(title: str, sent: list[str]) -> None:
                snap = _snapshot(ctl, proc.pid, memory.name_prefix)
                snap["step"], snap["sent"] = title, sent
                steps.append(snap)
                if out is not None:
                    _show(out, f"{title}\n  front-end sent: {', '.join(sent) or 'nothing'}",
                          snap)

            memory.add_boot_ram(256 * MiB)
            step("boot RAM 256 MiB", fe.update_memory(memory.regions))
            added = []
            for i in range(dimms):
                added.append(memory.add_dimm(128 * MiB))
                step(f"hot-add DIMM {i + 1} (128 MiB) via {how}",
                     fe.update_memory(memory.regions))
            gone = added[0]
            memory.detach(gone)
            step("remove DIMM 1", fe.update_memory(memory.regions))
            gone.close()
        finally:
            fe.close()
            memory.close()
        report = run_probe(ProbeConfig(sock, cycles=cycles, regions=2, pid=proc.pid,
                                       mem_slots=mem_slots))
    return steps, report
