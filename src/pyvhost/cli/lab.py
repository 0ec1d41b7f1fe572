"""``pyvhost lab``: the README's main job, on the command line.

Parses options, runs :func:`pyvhost.lab.scenario.run_lab` and shows what it measured:
progress lines and a table per hot-plug step for people, or one JSON object
(``--json``, schema ``pyvhost.lab/1``, made by :mod:`pyvhost.lab.document`) for machines.
It measures and decides nothing itself. Ctrl-C (or SIGTERM) tears everything down: the
scenario's context manager ends QEMU and ``pyvhost net`` by pid and removes the run
directory.

Exit codes (the rule of :mod:`.common`): 0 every check passed; 1 a ping was lost or a check
failed (a leak); 2 the lab could not run (bad options, no QEMU, the image did not build, a
guest did not boot); 130 interrupted. Errors are the ``pyvhost.error/1`` document with
``--json``.
"""

from __future__ import annotations

import re
import signal
import time
from types import FrameType
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from pyvhost.errors import PyvhostError
from pyvhost.lab.accel import AccelRequest
from pyvhost.lab.config import GUEST_BLOCK, LabConfig
from pyvhost.lab.document import SCHEMA, report_json, step_json
from pyvhost.lab.scenario import run_lab
from pyvhost.units import mib, parse_size

from .common import Exit, configure_logging, console, emit_json, fail, json_option, verbosity


def _hotplug(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int]:
    """``6x128M``: (count, size)."""
    m = re.fullmatch(r"(\d{1,3})x(\S+)", value.strip())
    if m is None:
        raise click.BadParameter(f"{value!r} is not COUNTxSIZE like 6x128M", ctx=ctx,
                                 param=param)
    try:
        size = parse_size(m.group(2))
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None
    if size <= 0 or size % GUEST_BLOCK:
        raise click.BadParameter("the DIMM size must be a multiple of 128M (the guest's "
                                 "memory block)", ctx=ctx, param=param)
    return int(m.group(1)), size


def _ms(seconds: Any) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _port_drops(port: dict[str, Any]) -> int:
    return int(sum(port["rx_drops"].values()) + sum(port["tx_drops"].values()))


class _Printer:
    """Progress lines and step tables on a rich console (stderr with --json)."""

    def __init__(self, console: Console, tables: bool) -> None:
        self.console = console
        self.tables = tables
        self.start = time.monotonic()

    def say(self, message: str) -> None:
        self.console.print(f"[dim]{time.monotonic() - self.start:6.1f}s[/dim] {message}",
                           highlight=False)

    def step(self, step: dict[str, Any]) -> None:
        if not self.tables:
            return
        c = self.console
        qemu = step.get("qemu")
        title = (f"step {step['index']}: {step['action']} {step['device'] or ''}").strip()
        if step["action"] == "migrate":
            self._migration(step)
            return
        if step["action"] == "baseline":
            verdict = "all VMs up, before hot-plug"
        elif qemu is None:
            codes = ", ".join(r["code"] for r in step["planner"]["refusals"])
            verdict = f"[yellow]refused by the planner[/yellow] ({codes})"
        elif qemu["ok"]:
            verdict = "[green]done[/green]"
        else:
            verdict = f"[yellow]refused by QEMU[/yellow]: {qemu['error']}"
        c.print(f"\n[bold]{title}[/bold]: {verdict}", highlight=False)
        if qemu is None and step["action"] != "baseline":
            for r in step["planner"]["refusals"]:
                c.print(f"  planner: {r['message']}", highlight=False)
            return
        self._table(step)
        b, g = step["backend"], step.get("guest") or {}
        delta = g.get("mem_total_delta_kib", 0)
        c.print(f"  guest MemTotal {g.get('mem_total_kib', 0) / 1024:.0f} MiB"
                f"{f' ({delta / 1024:+.0f} MiB)' if delta else ''}; back-end process: "
                f"{b['fds']} fds ({b['guest_ram_fds']} on guest RAM), {b['mappings']} "
                f"mappings ({b['guest_ram_mappings']} of guest RAM)", highlight=False)
        t = step.get("timing") or {}
        if "qmp_seconds" in t:
            parts = [f"{t['command']} {_ms(t['qmp_seconds'])} ms"]
            if "backend_seconds" in t:
                where = ("inside it" if t.get("backend_inside_command")
                         else f"{_ms(t['backend_received_after'])} ms after it was sent")
                parts.append(f"back-end {t['backend_request']} {_ms(t['backend_seconds'])} "
                             f"ms ({where})")
            if "acpi_ost_after" in t:
                parts.append(f"guest _OST +{_ms(t['acpi_ost_after'])} ms")
            if "mem_total_after" in t:
                parts.append(f"MemTotal +{_ms(t['mem_total_after'])} ms")
            c.print("  time: " + ", ".join(parts), highlight=False)
        if step.get("pings"):
            p = step["pings"]
            c.print(f"  continuous ping: {p['received']}/{p['sent']} answered", highlight=False)
        failed = [ch for ch in step.get("checks", []) if not ch["ok"]]
        ok = len(step.get("checks", [])) - len(failed)
        c.print(f"  checks: {ok}/{len(step.get('checks', []))} ok", highlight=False)
        for ch in failed:
            c.print(f"  [red]FAILED[/red] {ch['name']}: {ch['detail']}", highlight=False)

    def _migration(self, step: dict[str, Any]) -> None:
        c, m = self.console, step["migration"]
        verdict = "[green]done[/green]" if m["ok"] else f"[red]failed[/red]: {m['error']}"
        c.print(f"\n[bold]step {step['index']}: VM 1 live-migrated to QEMU pid "
                f"{m['destination_pid']}[/bold]: {verdict}", highlight=False)
        self._table(step)
        c.print(f"  QEMU: total {_ms(m['total_time'])} ms, downtime {_ms(m['downtime'])} ms, "
                f"setup {_ms(m['setup_time'])} ms, {(m['transferred'] or 0) >> 20} MiB in "
                f"{m['dirty_sync_count']} dirty syncs; the destination ran "
                f"{_ms(m['resumed_after'])} ms after", highlight=False)
        c.print(f"  meanwhile the back-end wrote {m['dimm_frames']} frames "
                f"({m['dimm_bytes']} bytes) into the hot-added DIMMs and marked "
                f"{m['log_marks']} ranges in a dirty log of {m['log_size']} bytes",
                highlight=False)
        c.print(f"  stream from VM 2: {m['stream_bytes']} bytes, "
                f"{'intact' if m['stream_intact'] else '[red]CORRUPTED[/red]'} in the migrated "
                f"guest; pings: {m['pings_sent']} sent, {m['pings_lost']} lost "
                f"({m['pings_lost_switchover']} at the switchover, where the source's port "
                f"dropped {m['source_drops'].get('port_down', 0)} frames), longest gap "
                f"{m['longest_gap'] * 1000:.0f} ms", highlight=False)
        failed = [ch for ch in step["checks"] if not ch["ok"]]
        c.print(f"  checks: {len(step['checks']) - len(failed)}/{len(step['checks'])} ok",
                highlight=False)
        for ch in failed:
            c.print(f"  [red]FAILED[/red] {ch['name']}: {ch['detail']}", highlight=False)

    def _table(self, step: dict[str, Any]) -> None:
        qm = step.get("qemu_memory") or {}
        names = {(r["guest_phys_addr"], r["memory_size"]): r["memdev"]
                 for r in qm.get("vhost_user_regions", [])}
        dimms = {d["memdev"]: d for d in qm.get("devices", [])}
        t = Table(title=f"VM 1: QEMU's memory and the back-end's table "
                        f"(generation {step['backend']['table_generation']})",
                  title_justify="left")
        for col in ("GPA start", "GPA end", "size"):
            t.add_column(col, justify="right")
        t.add_column("QEMU memory")
        t.add_column("fds held", justify="right")
        shown: set[str | None] = set()
        for r in step["backend"]["regions"]:
            gpa, size = r["guest_phys_addr"], r["memory_size"]
            memdev = names.get((gpa, size))
            dimm = dimms.get(memdev)
            what = (f"{dimm['id']} (slot {dimm['slot']})" if dimm
                    else f"boot RAM ({memdev})" if memdev else "[red]not sent by QEMU[/red]")
            t.add_row(f"{gpa:#x}", f"{gpa + size:#x}", mib(size), what, str(r["fds_held"]))
            shown.add(memdev)
        for d in qm.get("devices", []):
            if d["memdev"] not in shown and d["addr"] is not None:
                # A memory device whose memory the back-end does not have (e.g. share=off).
                t.add_row(f"{d['addr']:#x}", f"{d['addr'] + d['size']:#x}", mib(d["size"]),
                          f"{d['id']} (slot {d['slot']})", "[red]not in the table[/red]")
        self.console.print(t)

    def summary(self, r: dict[str, Any]) -> None:
        c = self.console
        s, b = r["summary"], r["backend"]
        c.print()
        t = Table(title="hot-plug steps (times in ms)", title_justify="left",
                  caption_justify="left",
                  caption="QMP: device_add (device_del) sent to answered; back-end: its "
                          "table update (message taken to new table in force), inside "
                          "device_add since QEMU waits for the back-end's ack; QEMU: the "
                          "rest; _OST, MemTotal: when the guest answered, and when its "
                          "MemTotal changed, counted from the command")
        for col in ("step", "DIMM", "result", "QMP", "back-end", "QEMU", "_OST",
                    "MemTotal"):
            t.add_column(col, justify="right", no_wrap=True)
        for st in r["steps"]:
            if st["action"] in ("baseline", "migrate"):
                continue
            tm = st.get("timing") or {}
            qemu = st.get("qemu")
            result = ("planner" if qemu is None else "ok" if qemu["ok"] else "refused")
            action = {"add": "add", "remove": "remove"}.get(st["action"], "forced")
            t.add_row(f"{st['index']} {action}", str(st["device"]).removeprefix("pyvhost-"),
                      result, *(_ms(tm.get(k)) for k in (
                          "qmp_seconds", "backend_seconds", "qemu_seconds", "acpi_ost_after",
                          "mem_total_after")))
        c.print(t)
        t = Table(title="the back-end process (pyvhost net)", title_justify="left")
        for col in ("", "fds", "on guest RAM", "mappings", "of guest RAM"):
            t.add_column(col, justify="right")
        for key, label in (("before_vms", "before the VMs"), ("baseline", "VMs up"),
                           ("after", "after hot-plug"), ("after_vms", "VMs quit")):
            u = b.get(key)
            if u:
                t.add_row(label, str(u["fds"]), str(u["guest_ram_fds"]), str(u["mappings"]),
                          str(u["guest_ram_mappings"]))
        c.print(t)
        t = Table(title="switch ports", title_justify="left", caption_justify="left",
                  caption="dropped at boot: flooded to a guest whose NIC was not started "
                          "yet; dropped after: from the first ping on")
        for col in ("VM", "frames from VM", "frames to VM", "dropped at boot",
                    "dropped after"):
            t.add_column(col, justify="right")
        at_boot = {p["vm"]: _port_drops(p) for p in r.get("switch_at_baseline", [])}
        for p in r.get("switch", []):
            boot = at_boot.get(p["vm"], 0)
            t.add_row(str(p["vm"]), str(p["rx_frames"]), str(p["tx_frames"]), str(boot),
                      str(_port_drops(p) - boot))
        c.print(t)
        for st in r["steps"]:
            if st["action"] == "migrate":
                m = st["migration"]
                c.print(f"migration of VM 1: {'completed' if m['ok'] else 'FAILED'}, total "
                        f"{_ms(m['total_time'])} ms, downtime {_ms(m['downtime'])} ms; "
                        f"{m['dimm_frames']} frames written into the hot-added DIMMs "
                        f"meanwhile, stream {'intact' if m['stream_intact'] else 'CORRUPTED'}; "
                        f"pings {m['pings_lost']}/{m['pings_sent']} lost "
                        f"({m['pings_lost_switchover']} at the switchover), longest gap "
                        f"{m['longest_gap'] * 1000:.0f} ms; source released: "
                        f"{'yes' if m['source_gone'] and not m['log_held'] else 'NO'}",
                        highlight=False)
        c.print(f"DIMMs: {s['dimms_added']} added, {s['dimms_removed']} removed; pings: "
                f"{s['pings_sent']} sent, {s['pings_lost']} lost"
                + (f" ({s['pings_lost_switchover']} at a migration's switchover)"
                   if s.get("pings_lost_switchover") else "")
                + f"; {r['seconds']:.1f} s",
                highlight=False)
        if r["ok"]:
            c.print("[bold green]OK[/bold green]: no ping lost; the back-end held one fd "
                    "and one mapping per region at every step, and nothing once the VMs "
                    "quit")
        else:
            c.print("[bold red]PROBLEMS[/bold red]:")
            for p in r["problems"]:
                c.print(f"  - {p}", highlight=False)


@click.command()
@click.option("--vms", type=click.IntRange(2, 8), default=2, show_default=True,
              help="VMs on the switch. DIMMs go into VM 1; the others ping it throughout.")
@click.option("--hotplug", "dimms", default="6x128M", show_default=True, callback=_hotplug,
              metavar="COUNTxSIZE", help="DIMMs to hot-add into VM 1, one at a time.")
@click.option("--unplug", is_flag=True, help="Then remove them again, last first.")
@click.option("--mem-slots/--no-mem-slots", default=False, show_default=True,
              help="Whether pyvhost net offers CONFIGURE_MEM_SLOTS: QEMU then sends "
                   "ADD_MEM_REG per DIMM (beyond 8 regions) instead of re-sending the "
                   "whole table with fresh fds (SET_MEM_TABLE, 8 regions at most, as to "
                   "DPDK 22.11).")
@click.option("--probe-limit", is_flag=True,
              help="After the DIMMs, add more until the planner refuses; then force that "
                   "one through to show QEMU's own refusal, and that the back-end was not "
                   "touched.")
@click.option("--migrate", is_flag=True,
              help="After the DIMMs, live-migrate VM 1 to a second QEMU started with "
                   "pyvhost mem migrate-args' arguments, on another socket of the same "
                   "pyvhost net, while VM 2 streams into it and pings it; check the "
                   "stream in the migrated guest and what the source leaves behind.")
@click.option("--accel", type=click.Choice(["auto", "tcg", "kvm"]), default="auto",
              show_default=True,
              help="auto: KVM only where a guest really boots with it (tried once per host "
                   "kernel with a 20 s deadline, the verdict cached), else TCG.")
@json_option(f"Print one JSON object on stdout (schema {SCHEMA}; errors: pyvhost.error/1); "
             "progress and logs go to stderr.")
@verbosity
def lab(vms: int, dimms: tuple[int, int], unplug: bool, mem_slots: bool, probe_limit: bool,
        migrate: bool, accel: AccelRequest, as_json: bool) -> None:
    """Real VMs on a pyvhost switch, memory hot-added under a continuous ping.

    \b
    Builds (or loads) the guest image, starts `pyvhost net` with one vhost-user socket
    per VM, boots the VMs (Debian's QEMU 7.2, or $PYVHOST_QEMU; 10.99.0.1, .2, ...),
    pings between them, starts a continuous ping to VM 1, then hot-adds DIMMs into VM 1
    one at a time with pyvhost's planner (what `pyvhost mem add` does). After every step
    it shows QEMU's memory devices, VM 1's MemTotal, the back-end's memory table for VM
    1 and the fds and mappings of the back-end process, and checks: one fd and one
    mapping per region, no other fd, the table equal to what QEMU sends. Ends with a
    summary: pings lost, fds and mappings before and after, each step's time split into
    QEMU's part and the back-end's. The first run downloads the Debian cloud kernel with
    apt-get to build the guest image (cached afterwards).

    \b
    Exit codes: 0 all checks passed; 1 a ping was lost or a check failed (a leak);
    2 the lab could not run (bad options, no QEMU, the image did not build, a guest
    did not boot); 130 interrupted (Ctrl-C or SIGTERM: QEMU and pyvhost net are ended,
    the run directory removed).
    """
    configure_logging()
    count, size = dimms
    try:
        config = LabConfig(vms=vms, dimms=count, dimm_size=size, unplug=unplug,
                           mem_slots=mem_slots, probe_limit=probe_limit, migrate=migrate,
                           accel=accel)
    except ValueError as e:
        fail(str(e), "usage")
    printer = _Printer(console(stderr=as_json), tables=not as_json)

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        report = run_lab(config, say=printer.say,
                         on_step=lambda step: printer.step(step_json(step)))
    except KeyboardInterrupt:
        printer.say("interrupted: QEMU and pyvhost net are stopped, the run directory "
                    "removed")
        fail("interrupted", "interrupted")
    except (PyvhostError, OSError) as e:
        fail(str(e), "run")
    finally:
        signal.signal(signal.SIGTERM, old_term)
    doc = report_json(report)
    if as_json:
        emit_json(doc)
    else:
        printer.summary(doc)
    raise click.exceptions.Exit(Exit.OK if report.ok else Exit.PROBLEM)
