"""``pyvhost mem``: memory hot-plug through QMP with the checks QEMU leaves out.

Subcommands ``status``, ``add``, ``remove``, ``resize`` (virtio-mem), and for live
migration ``migrate-args`` and ``migrate``. Each prints rich
tables for people, or one JSON object with ``--json`` (``pyvhost.mem.status/1``,
``pyvhost.mem.add/1``, ...; the JSON Schema files are in :mod:`pyvhost.schemas`, the
fields explained in docs/mem-json.md). It parses options, reads the state
(:mod:`pyvhost.hotplug.state`, :mod:`pyvhost.hotplug.host`), plans
(:mod:`pyvhost.hotplug.plan`) and runs (:mod:`pyvhost.hotplug.execute`); migration has
its preflight in :mod:`pyvhost.hotplug.migrate` and its run in
:mod:`pyvhost.hotplug.migrate_run`. It decides nothing itself.

Exit codes: 0 done (or a dry run that would be done), 1 refused by the preflight
(nothing was changed), 2 usage error, cannot connect to QMP or lost the connection
(in the middle of a change: what may be left and how to remove it), 3 QEMU failed a
step or did not answer it within --timeout (what was done was undone) or answered a
query with an error, 4 the guest did not complete an unplug or resize within --timeout
(or refused the unplug; also when QEMU did not answer its command in time and the
unplug or resize stays pending), 130 interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pyvhost.errors import PyvhostError
from pyvhost.hotplug.execute import (
    Outcome,
    StateUnknownError,
    describe_ost,
    execute_add,
    execute_remove,
    execute_resize,
)
from pyvhost.hotplug.host import HostFacts, page_sizes, read_host
from pyvhost.hotplug.migrate import DestinationArgs, Preflight, destination_args, preflight
from pyvhost.hotplug.migrate_run import MigrationOutcome, Progress, read_facts, run_migration
from pyvhost.hotplug.plan import (
    AddRequest,
    Plan,
    plan_add,
    plan_remove,
    plan_resize,
)
from pyvhost.hotplug.qemu_rules import version_text
from pyvhost.hotplug.qmp import Qmp, QmpCommandError, QmpConnectError, QmpMonitorHeldError
from pyvhost.hotplug.regions import region_limit_info
from pyvhost.hotplug.sharing import memory_problems
from pyvhost.hotplug.state import BASELINE_REGIONS, VmState, read_state, vhost_regions
from pyvhost.units import mib, parse_size

from .common import Exit, configure_logging, console, emit_json, fail, json_option, verbosity
from .sockets import connect_failure

QMP_HINT = "is QEMU running with -qmp unix:{path},server=on,wait=off?"
SCHEMA_STATUS = "pyvhost.mem.status/1"
SCHEMA_ADD = "pyvhost.mem.add/1"
SCHEMA_REMOVE = "pyvhost.mem.remove/1"
SCHEMA_RESIZE = "pyvhost.mem.resize/1"
SCHEMA_MIGRATE_ARGS = "pyvhost.mem.migrate-args/1"
SCHEMA_MIGRATE = "pyvhost.mem.migrate/1"


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None


def _nodes(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...]:
    """``0``, ``0,1``, ``0-3``, ``0-1,4``."""
    if not value:
        return ()
    out: list[int] = []
    try:
        for part in value.split(","):
            lo, _, hi = part.partition("-")
            out += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a node list like 0,1 or 0-3",
                                 ctx=ctx, param=param) from None
    return tuple(out)


def status_json(state: VmState, host: HostFacts, assume_limit: int,
                sizes: dict[str, int] | None = None) -> dict[str, Any]:
    """The ``pyvhost.mem.status/1`` document. ``sizes``: each backend's page size when the
    caller knows them (libvirt), else read from the host."""
    sizes = sizes if sizes is not None else page_sizes(state, host)
    boot = {b.id for b in state.boot_backends}
    by_memdev = {d.memdev: d.id for d in state.memory_devices}
    regions = vhost_regions(state, sizes)
    info = region_limit_info(state, assume_limit)
    limit, notes = info.limit, list(info.notes)
    return {
        "schema": SCHEMA_STATUS,
        "problems": [{"code": p.code, "id": p.id, "device": p.device, "message": p.message}
                     for p in memory_problems(state)],
        "vm": {"status": state.status,
               "qemu_version": version_text(state.qemu_version) if state.qemu_version
               else None, "boot_memory": state.boot_memory,
               "slots": state.slots, "slots_used": state.slots_used,
               "slots_free": max(0, state.slots - state.slots_used), "maxmem": state.maxmem,
               "plugged_memory": state.plugged_memory, "maxmem_left": state.maxmem_left,
               "numa_nodes": state.numa_nodes},
        "memory_devices": [{"id": d.id, "type": d.kind, "memdev": d.memdev, "addr": d.addr,
                            "size": d.size, "slot": d.slot, "node": d.node,
                            "hotplugged": d.hotplugged, "hotpluggable": d.hotpluggable,
                            "requested_size": d.requested_size, "block_size": d.block_size,
                            "max_size": d.max_size}
                           for d in state.memory_devices],
        "backends": [{"id": b.id, "type": b.qom_type, "size": b.size, "share": b.share,
                      "mem_path": b.mem_path, "page_size": sizes[b.id],
                      "host_nodes": list(b.host_nodes), "policy": b.policy,
                      "prealloc": b.prealloc, "fd": b.fd_backed,
                      "role": "boot" if b.id in boot else (
                          "device" if b.id in by_memdev else "unused"),
                      "device": by_memdev.get(b.id)} for b in state.backends],
        "vhost_user": {
            "regions_used": len(regions) if state.vhost_user else None,
            "region_limit": limit,
            "region_limit_assumed": info.assumed,
            "regions_free": None if limit is None else max(0, limit - len(regions)),
            "regions": [{"guest_phys_addr": r.guest_phys_addr, "memory_size": r.memory_size,
                         "memdev": r.name} for r in regions] if state.vhost_user else [],
            "devices": [{"id": d.id, "driver": d.driver, "chardev": d.chardev,
                         "socket": d.socket, "started": d.started,
                         "configure_mem_slots": d.configure_mem_slots,
                         "region_limit": d.region_limit,
                         "qemu_region_count": d.qemu_region_count}
                        for d in state.vhost_user],
            "notes": notes},
        "host": {"base_page_size": host.base_page_size,
                 "default_hugepage_size": host.default_hugepage_size,
                 "numa_nodes": list(host.host_nodes),
                 "hugepages": [{"page_size": p.page_size, "node": p.node, "total": p.total,
                                "free": p.free, "reserved": p.reserved,
                                "available": p.available}
                               for p in host.pools]},
    }


def plan_json(plan: Plan, schema: str, dry_run: bool, plan_seconds: float,
              outcome: Outcome | None) -> dict[str, Any]:
    p = plan.prediction
    return {
        "schema": schema, "dry_run": dry_run, "device_id": plan.device_id,
        "backend_id": plan.backend_id,
        "refusals": [{"code": str(r.code), "message": r.message} for r in plan.refusals],
        "steps": [s.to_json() for s in plan.steps],
        "prediction": None if p is None else {
            "slots_used": p.slots_used, "maxmem_left": p.maxmem_left,
            "vhost_user_regions": p.vhost_user_regions,
            "vhost_user_region_limit": p.vhost_user_region_limit,
            "vhost_user_region_limit_assumed": p.vhost_user_region_limit_assumed},
        "notes": list(plan.notes), "plan_seconds": plan_seconds,
        "outcome": None if outcome is None else {
            "ok": outcome.ok, "done": outcome.done, "failed_step": outcome.failed_step,
            "error": outcome.error, "rolled_back": outcome.rolled_back,
            "orphans": outcome.orphans, "acpi_ost": outcome.acpi_ost,
            "timed_out": outcome.timed_out, "seconds": outcome.seconds,
            "device": outcome.device},
    }


def _cells(*values: object) -> list[Text]:
    """Table cells as plain text: ids, paths and messages come from QEMU and the command
    line, and a ``[`` in them must not be read as rich markup."""
    return [v if isinstance(v, Text) else Text(str(v)) for v in values]


def _line(*parts: str | tuple[str, str]) -> Text:
    """A line of plain text with styled parts, e.g. ``_line(("refused", "red"), " ...")``."""
    return Text.assemble(*parts)


def _table(title: str, columns: tuple[str, ...], rows: list[list[Text]]) -> Table:
    t = Table(title=Text(title))
    for col in columns:
        t.add_column(col)
    for row in rows:
        t.add_row(*row)
    return t


def _print_status(doc: dict[str, Any], console: Console) -> None:
    vm = doc["vm"]
    console.print(_line(
        f"QEMU {vm['qemu_version'] or '(version unknown)'}, "
        f"VM {vm['status']}: boot {mib(vm['boot_memory'])}, plugged "
        f"{mib(vm['plugged_memory'])}, maxmem {mib(vm['maxmem'])} "
        f"({mib(vm['maxmem_left'])} left), slots {vm['slots_used']}/{vm['slots']}, "
        f"guest NUMA nodes {vm['numa_nodes']}"))
    console.print(_table(
        "memory backends", ("id", "type", "size", "share", "page", "mem-path", "host-nodes",
                            "policy", "prealloc", "role"),
        [_cells(b["id"], b["type"].removeprefix("memory-backend-"), mib(b["size"]),
                Text("on") if b["share"] else Text("off", style="red"), b["page_size"],
                b["mem_path"] or "-", ",".join(map(str, b["host_nodes"])) or "-",
                b["policy"], "yes" if b["prealloc"] else "no",
                b["role"] + (f" ({b['device']})" if b["device"] else ""))
         for b in doc["backends"]]))
    if doc["memory_devices"]:
        console.print(_table(
            "memory devices", ("id", "type", "memdev", "addr", "size", "slot", "node"),
            [_cells(d["id"], d["type"], d["memdev"],
                    "-" if d["addr"] is None else hex(d["addr"]), mib(d["size"]), d["slot"],
                    d["node"]) for d in doc["memory_devices"]]))
    for pool in doc["host"]["hugepages"]:
        if pool["node"] is None and pool["total"]:
            console.print(_line(f"host hugepages {pool['page_size'] // 1024} kB: "
                                f"{pool['available']} available ({pool['free']} free, "
                                f"{pool['reserved']} reserved) of {pool['total']}"))
    for problem in doc["problems"]:
        console.print(_line(("error", "red"), f" {problem['code']} {problem['id']}: "
                                              f"{problem['message']}"))
    vu = doc["vhost_user"]
    if not vu["devices"]:
        console.print("no vhost-user devices")
        return
    slots = {None: "unknown", True: "yes", False: "no"}
    console.print(_table(
        f"vhost-user devices: {vu['regions_used']} regions used, limit "
        f"{vu['region_limit']}, {vu['regions_free']} free",
        ("id", "driver", "chardev", "socket", "started", "MEM_SLOTS", "limit"),
        [_cells(d["id"], d["driver"], d["chardev"], d["socket"],
                "yes" if d["started"] else "no", slots[d["configure_mem_slots"]],
                d["region_limit"] or "-") for d in vu["devices"]]))
    for note in vu["notes"]:
        console.print(_line(f"note: {note}"))


def _print_plan(plan: Plan, dry_run: bool, outcome: Outcome | None, console: Console) -> None:
    for r in plan.refusals:
        console.print(_line(("refused", "red"), f" {r.code}: {r.message}"))
    for note in plan.notes:
        console.print(_line(f"note: {note}"))
    if dry_run or plan.refused:
        console.print(_table(
            "plan" + (" (not run)" if plan.refused else " (dry run)"), ("#", "QMP", "undo"),
            [_cells(i, f"{s.command} {json.dumps(dict(s.arguments))}",
                    f"{s.undo.command} {json.dumps(dict(s.undo.arguments))}" if s.undo
                    else "-") for i, s in enumerate(plan.steps, 1)]))
    if outcome is None:
        return
    if outcome.ok:
        console.print(_line(("done", "green"), f" {plan.action} {plan.device_id} in "
                                               f"{outcome.seconds:.2f} s"))
    else:
        # One line: the step, why, what was undone, what is left.
        parts: list[str | tuple[str, str]] = [
            ("failed", "red"), f" at {outcome.failed_step}: {outcome.error}"]
        if outcome.rolled_back:
            parts.append(f"; undone: {', '.join(_undone(plan, outcome.rolled_back))}")
        if outcome.orphans:
            parts += ["; ", ("left behind", "red"), f": {', '.join(outcome.orphans)}"]
        console.print(_line(*parts))
    for info in outcome.acpi_ost:
        console.print(_line(f"guest ACPI _OST for {info.get('device')}: {describe_ost(info)}"))


def _undone(plan: Plan, rolled_back: list[str]) -> list[str]:
    """``rolled_back`` with the id each undo command acted on ("object-del d1-mem"): they
    are the undo steps of the plan's first steps, last first, so the last ones of all."""
    undos = plan.undo_steps()[-len(rolled_back):] if rolled_back else ()
    out = []
    for text, undo in zip(rolled_back, undos, strict=False):
        ident = undo.arguments.get("id")
        out.append(f"{text} {ident}" if text == undo.command and ident else text)
    return out


@contextlib.contextmanager
def _qmp(path: str, timeout: float = 30.0) -> Iterator[Qmp]:
    """A QMP session for one subcommand, with its failures turned into the exit-code
    rule: cannot connect or lost the connection (2), QEMU answered an error outside a
    plan's steps (3), anything else pyvhost could not do (2). Failures of a plan's
    steps are not errors here: the executor's outcome reports them (and their undo)."""
    qmp = Qmp(path, timeout=timeout)
    try:
        # Bounded by the timeout, the greeting included: a socket that accepts and never
        # greets (another client holds the monitor) is named with its owner.
        qmp.connect()
    except QmpMonitorHeldError as e:
        fail(str(e), "connect")
    except QmpConnectError as e:
        fail(connect_failure(path, "QMP socket", QMP_HINT.format(path=path), e,
                             answered="not as QEMU's QMP monitor"), "connect")
    try:
        yield qmp
    except StateUnknownError as e:
        # A change was under way: the message says what may be left and how to clear it.
        fail(str(e), "connect")
    except QmpConnectError as e:
        fail(f"lost the QMP connection to {path}: {e}", "connect")
    except QmpCommandError as e:
        fail(f"QEMU answered with an error: {e}", "peer")
    except PyvhostError as e:
        fail(str(e), "run")
    finally:
        qmp.close()


EXIT_HELP = ("\b\nExit codes: 0 done (or a dry run that would be done), 1 refused by the "
             "preflight\n(nothing changed), 2 usage error or cannot connect (or QEMU "
             "stopped answering:\nwhat may be left is said), 3 QEMU failed a step or did "
             "not answer it in\n--timeout (undone), 4 the guest did not finish in --timeout "
             "(or refused; the\nstate is said), 130 interrupted.")

def timeout_option(default: float, help: str) -> Callable[[Any], Any]:
    return click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
                        default=default, show_default=True, help=help)


dry_run_option = click.option("--dry-run", is_flag=True,
                              help="Check and show the plan; change nothing.")
qmp_option = click.option("--qmp", "qmp_path", metavar="SOCK",
                          help="QEMU's QMP Unix socket (-qmp unix:SOCK,server=on,wait=off).")
limit_option = click.option(
    "--region-limit", type=click.IntRange(1, 512), default=BASELINE_REGIONS, show_default=True,
    help="Region limit to assume for vhost-user devices whose limit QEMU does not show: "
         "not started by the guest yet, or started with CONFIGURE_MEM_SLOTS (QEMU keeps "
         "the back-end's GET_MAX_MEM_SLOTS answer). Capped by QEMU's own cap.")
persistent_option = click.option(
    "--persistent", is_flag=True,
    help="With --libvirt: change the domain's persistent config too.")
qemu_monitor_option = click.option(
    "--qemu-monitor", is_flag=True,
    help="With --libvirt: read QEMU's own memory view through qemu-monitor-command (exact "
         "vhost-user region count); TAINTS the domain (libvirt: custom-monitor).")


def libvirt_options(f: Any) -> Any:
    """``--libvirt DOMAIN [--connect URI]``: a libvirt domain instead of ``--qmp``
    (:mod:`.mem_libvirt`)."""
    f = click.option("--connect", "connect_uri", metavar="URI",
                     help="libvirt URI for --libvirt (default: libvirt's; "
                          "qemu+ssh://HOST/system for another host).")(f)
    return click.option("--libvirt", "libvirt_domain", metavar="DOMAIN",
                        help="A libvirt domain instead of --qmp: state from its live XML, "
                             "changes through libvirt (pip install 'pyvhost[libvirt]').")(f)


def _source(qmp_path: str | None, libvirt_domain: str | None) -> None:
    if (qmp_path is None) == (libvirt_domain is None):
        fail("give one of --qmp SOCK or --libvirt DOMAIN", "usage")


@click.group()
@verbosity
def mem() -> None:
    """Memory hot-plug through QMP, with the checks QEMU leaves out.

    \b
    pyvhost mem status --qmp /run/vm0.qmp
    pyvhost mem add --qmp /run/vm0.qmp --size 1G --dry-run
    pyvhost mem add --qmp /run/vm0.qmp --size 1G --backend file \\
        --mem-path /dev/hugepages --hugepages --host-nodes 0 --policy bind
    pyvhost mem remove --qmp /run/vm0.qmp pyvhost-dimm0
    pyvhost mem resize --qmp /run/vm0.qmp vmem0 --size 512M
    pyvhost mem add --libvirt web01 --size 1G [--connect qemu+ssh://HOST/system]
    pyvhost mem migrate-args --qmp /run/vm0.qmp
    pyvhost mem migrate --qmp /run/vm0.qmp --to /run/vm0-dest.qmp --uri unix:/run/vm0.mig
    \b
    resize is for virtio-mem devices (QEMU 7.2 and 10.0 run them beside vhost-user
    devices: -device virtio-mem-pci,memdev=M,requested-size=0, on a share=on memfd or
    file backend, with -m ...,maxmem=; 10.0 can remove one shrunk to 0 that sits on a
    pcie-root-port; see docs/virtio-mem.md).
    \b
    Every subcommand takes --json: one object, its schema named in its schema field
    (pyvhost.mem.status/1, pyvhost.mem.add/1, ...; errors pyvhost.error/1).
    \b
    Exit codes: 0 done (or a dry run that would be done), 1 refused by the preflight
    (nothing changed), 2 usage error, cannot connect to QMP or lost the connection
    (QEMU stopped answering in the middle of a change: what may be left in QEMU and
    how to remove it is said), 3 QEMU failed a step or did not answer it within
    --timeout (undone) or answered a query with an error, 4 the guest did not finish
    an unplug or resize in --timeout (or refused the unplug: its ACPI _OST status is
    reported; or QEMU did not answer the unplug or resize in time and it stays
    pending), 130 interrupted (Ctrl-C, SIGTERM).
    """


@mem.command(epilog=EXIT_HELP)
@qmp_option
@libvirt_options
@qemu_monitor_option
@timeout_option(30.0, "Seconds to wait for QEMU or libvirt (the connect included).")
@json_option(help="Print one JSON object (schema pyvhost.mem.status/1).")
@limit_option
@verbosity
def status(qmp_path: str | None, libvirt_domain: str | None, connect_uri: str | None,
           qemu_monitor: bool, timeout: float, as_json: bool, region_limit: int) -> None:
    """Memory devices, slots, maxmem, backends, vhost-user regions, NUMA nodes. Exits 1
    when memory in use cannot be shared with the vhost-user back-ends."""
    configure_logging()
    _source(qmp_path, libvirt_domain)
    if libvirt_domain is not None:
        from . import mem_libvirt

        doc = mem_libvirt.status(libvirt_domain, connect_uri, region_limit, timeout,
                                 qemu_monitor)
    else:
        assert qmp_path is not None
        with _qmp(qmp_path, timeout) as qmp:
            state = read_state(qmp)
        doc = status_json(state, read_host(), region_limit)
    if as_json:
        emit_json(doc)
    else:
        _print_status(doc, console())
    if doc["problems"]:
        # The check found a problem: memory in use that the back-ends cannot share.
        raise click.exceptions.Exit(Exit.PROBLEM)


@mem.command(epilog=EXIT_HELP)
@qmp_option
@libvirt_options
@qemu_monitor_option
@persistent_option
@click.option("--size", required=True, callback=_size, metavar="SIZE",
              help="DIMM size: 128M, 1G, ... (a multiple of 128M and of the page size).")
@click.option("--backend", type=click.Choice(["memfd", "file", "ram"]), default="memfd",
              show_default=True, help="Memory backend (ram: not shareable, refused "
                                      "when vhost-user devices exist).")
@click.option("--share/--no-share", default=True, show_default=True,
              help="share=on: required for vhost-user back-ends to see the memory.")
@click.option("--mem-path", metavar="PATH", help="File or directory (--backend file).")
@click.option("--hugepages", is_flag=True,
              help="Back with hugepages (memfd hugetlb=on, or a hugetlbfs --mem-path).")
@click.option("--node", type=int, help="Guest NUMA node of the DIMM.")
@click.option("--host-nodes", callback=_nodes, metavar="LIST",
              help="Host NUMA nodes for the memory (0,1 or 0-3); with --libvirt the "
                   "DIMM's <source><nodemask>.")
@click.option("--policy", type=click.Choice(["bind", "preferred", "interleave"]),
              help="Host NUMA policy for --host-nodes (default bind); with --libvirt "
                   "only the domain's <numatune> mode (docs/libvirt.md).")
@click.option("--prealloc", is_flag=True,
              help="Allocate all memory at object-add; with --libvirt only with "
                   "--hugepages or the domain's <allocation mode='immediate'>.")
@click.option("--prealloc-threads", type=click.IntRange(1, 256), help="Threads for prealloc.")
@click.option("--id", "device_id", metavar="ID",
              help="DIMM id (its backend is ID-mem); default pyvhost-dimmN.")
@dry_run_option
@click.option("--force", is_flag=True, hidden=True,
              help="Run a refused plan anyway (tests use it to see QEMU's own refusal).")
@timeout_option(30.0, "Seconds to wait for QEMU and the guest.")
@json_option(help="Print one JSON object (schema pyvhost.mem.add/1).")
@limit_option
@verbosity
def add(qmp_path: str | None, libvirt_domain: str | None, connect_uri: str | None,
        qemu_monitor: bool, persistent: bool, size: int, backend: str, share: bool,
        mem_path: str | None, hugepages: bool, node: int | None, host_nodes: tuple[int, ...],
        policy: str | None, prealloc: bool, prealloc_threads: int | None,
        device_id: str | None, dry_run: bool, force: bool, timeout: float, as_json: bool,
        region_limit: int) -> None:
    """Hot-add a DIMM: object-add a backend, device_add pc-dimm, verify; undo on failure.
    With --libvirt: attach <memory model='dimm' access='shared'> live, verify, undo."""
    configure_logging()
    _source(qmp_path, libvirt_domain)
    req = AddRequest(size=size, backend=backend,  # type: ignore[arg-type]
                     share=share, mem_path=mem_path, hugepages=hugepages, node=node,
                     host_nodes=host_nodes, policy=policy,  # type: ignore[arg-type]
                     prealloc=prealloc, prealloc_threads=prealloc_threads, id=device_id,
                     assume_region_limit=region_limit)
    if libvirt_domain is not None:
        from . import mem_libvirt

        mem_libvirt.add(libvirt_domain, connect_uri, req, dry_run=dry_run, force=force,
                        persistent=persistent, qemu_monitor=qemu_monitor, timeout=timeout,
                        as_json=as_json)
    assert qmp_path is not None
    host = read_host(mem_path)

    def run(qmp: Qmp, plan: Plan, state: VmState) -> Outcome:
        running = state.status == "running"
        return execute_add(qmp, plan, timeout=timeout,
                           ost_timeout=min(timeout, 10.0) if running else 0.0, force=force)

    plan, plan_seconds, outcome = _plan_and_run(
        qmp_path, timeout, lambda state: plan_add(req, state, host, page_sizes(state, host)),
        run, dry_run=dry_run, force=force)
    _show(plan, SCHEMA_ADD, dry_run, plan_seconds, outcome, as_json)
    _exit_for(plan, outcome)


def _plan_and_run(qmp_path: str, timeout: float, make_plan: Callable[[VmState], Plan],
                  run: Callable[[Qmp, Plan, VmState], Outcome], *, dry_run: bool,
                  force: bool = False) -> tuple[Plan, float, Outcome | None]:
    """Read the VM's state, plan (timed), and run the plan unless it is a dry run or
    refused (and not forced): the plan, the planner's seconds and what running did."""
    with _qmp(qmp_path, timeout) as qmp:
        state = read_state(qmp)
        t0 = time.monotonic()
        plan = make_plan(state)
        plan_seconds = time.monotonic() - t0
        outcome = None
        if not dry_run and (force or not plan.refused):
            outcome = run(qmp, plan, state)
    return plan, plan_seconds, outcome


def _show(plan: Plan, schema: str, dry_run: bool, plan_seconds: float,
          outcome: Outcome | None, as_json: bool) -> Console | None:
    """The plan and its outcome: the JSON document, or tables on the console returned."""
    if as_json:
        emit_json(plan_json(plan, schema, dry_run, plan_seconds, outcome))
        return None
    out = console()
    _print_plan(plan, dry_run, outcome, out)
    return out


def _exit_for(plan: Plan, outcome: Outcome | None) -> NoReturn:
    """The exit code of add, remove and resize: refused (1), done (0), the guest did not
    finish (4), or QEMU failed a step (3)."""
    if outcome is None:
        code = Exit.PROBLEM if plan.refused else Exit.OK
    elif outcome.ok:
        code = Exit.OK
    else:
        code = Exit.GUEST if outcome.timed_out else Exit.PEER_FAILED
    raise click.exceptions.Exit(code)


@mem.command(epilog=EXIT_HELP)
@qmp_option
@libvirt_options
@persistent_option
@click.argument("device_id", metavar="ID")
@timeout_option(30.0, "Seconds to wait for the guest to release the DIMM (DEVICE_DELETED).")
@dry_run_option
@json_option(help="Print one JSON object (schema pyvhost.mem.remove/1).")
@verbosity
def remove(qmp_path: str | None, libvirt_domain: str | None, connect_uri: str | None,
           persistent: bool, device_id: str, timeout: float, dry_run: bool,
           as_json: bool) -> None:
    """Hot-remove a DIMM, or on QEMU 10.0 an empty virtio-mem device (shrink it to 0
    first; 7.2 cannot unplug those): device_del, wait for the guest, object-del its backend.
    ID may also name a memory backend no device uses (what an add cut short can leave).
    With --libvirt: detach the DIMM, wait until it leaves the domain."""
    configure_logging()
    _source(qmp_path, libvirt_domain)
    if libvirt_domain is not None:
        from . import mem_libvirt

        mem_libvirt.remove(libvirt_domain, connect_uri, device_id, dry_run=dry_run,
                           persistent=persistent, timeout=timeout, as_json=as_json)
    assert qmp_path is not None
    plan, plan_seconds, outcome = _plan_and_run(
        qmp_path, timeout, lambda state: plan_remove(device_id, state),
        lambda qmp, plan, state: execute_remove(qmp, plan, timeout=timeout), dry_run=dry_run)
    out = _show(plan, SCHEMA_REMOVE, dry_run, plan_seconds, outcome, as_json)
    if out is not None and outcome is not None and outcome.timed_out:
        out.print(
            "the guest did not release the DIMM: the unplug request stays pending in "
            "QEMU and the backend stays in use. Guests must online hot-added memory "
            "movable (memhp_default_state=online_movable) for it to be removable.")
    _exit_for(plan, outcome)


@mem.command(epilog=EXIT_HELP)
@click.option("--qmp", "qmp_path", metavar="SOCK", required=True,
              help="QEMU's QMP Unix socket (-qmp unix:SOCK,server=on,wait=off); under "
                   "libvirt: virsh update-memory-device.")
@click.argument("device_id", metavar="ID")
@click.option("--size", required=True, callback=_size, metavar="SIZE",
              help="Requested size: 0, 512M, 2G, ... (a multiple of the device's block size, "
                   "at most its memdev's size).")
@timeout_option(60.0, "Seconds to wait for the guest to plug or unplug the memory.")
@dry_run_option
@json_option(help="Print one JSON object (schema pyvhost.mem.resize/1).")
@verbosity
def resize(qmp_path: str, device_id: str, size: int, timeout: float, dry_run: bool,
           as_json: bool) -> None:
    """Resize a virtio-mem device: qom-set requested-size, wait for the guest to get there
    (MEMORY_DEVICE_SIZE_CHANGE)."""
    configure_logging()
    plan, plan_seconds, outcome = _plan_and_run(
        qmp_path, timeout, lambda state: plan_resize(device_id, size, state),
        lambda qmp, plan, state: execute_resize(qmp, plan, timeout=timeout), dry_run=dry_run)
    out = _show(plan, SCHEMA_RESIZE, dry_run, plan_seconds, outcome, as_json)
    if out is not None and outcome is not None and outcome.device is not None:
        out.print(_line(f"{device_id}: {mib(outcome.device.get('size'))} plugged, "
                        f"{mib(outcome.device.get('requested-size'))} requested"))
    _exit_for(plan, outcome)


# -- live migration ------------------------------------------------------------------------

def migrate_args_json(args: DestinationArgs, argv: list[str]) -> dict[str, Any]:
    return {"schema": SCHEMA_MIGRATE_ARGS, "args": argv,
            "command_line": " ".join(shlex.quote(a) for a in argv),
            "dimms": [{"id": d.device.id, "memdev": d.backend.id, "size": d.device.size,
                       "addr": d.device.addr, "slot": d.device.slot, "node": d.device.node,
                       "object": dict(d.object_props), "device": dict(d.device_props)}
                      for d in args.dimms],
            "notes": list(args.notes)}


@mem.command("migrate-args", epilog="\b\nExit codes: 0 printed, 2 usage error or cannot "
             "connect, 3 QEMU answered a query with an error, 130 interrupted.")
@qmp_option
@libvirt_options
@click.option("--all", "every_dimm", is_flag=True,
              help="Every DIMM, not only the hot-added ones (for a destination whose "
                   "command line has none).")
@click.option("--incoming/--no-incoming", default=True, show_default=True,
              help="End with -incoming defer: pyvhost mem migrate then gives the URI.")
@json_option(help=f"Print one JSON object (schema {SCHEMA_MIGRATE_ARGS}).")
@verbosity
def migrate_args(qmp_path: str | None, libvirt_domain: str | None, connect_uri: str | None,
                 every_dimm: bool, incoming: bool, as_json: bool) -> None:
    """The arguments a migration's destination needs for the source's hot-added memory.

    \b
    QEMU does not migrate device creation: the destination is started with the source's
    command line plus one -object and one -device (JSON syntax) per hot-added DIMM, with
    the same ids, size, backend, share, mem-path, hugepages, NUMA node, slot and
    address. Notes (what is left out, and why) go to stderr.
    \b
    With --libvirt DOMAIN: the domain's <memory> devices as its live XML has them
    (libvirt starts a migration's destination from that XML, so they travel with it),
    and which of them the persistent config lacks; --all and --incoming do not apply.
    """
    configure_logging()
    _source(qmp_path, libvirt_domain)
    if libvirt_domain is not None:
        from . import mem_libvirt

        mem_libvirt.migrate_args(libvirt_domain, connect_uri, timeout=30.0, as_json=as_json)
        return
    assert qmp_path is not None
    with _qmp(qmp_path) as qmp:
        state = read_state(qmp)
    args = destination_args(state, every_dimm=every_dimm)
    argv = [*args.argv, *(("-incoming", "defer") if incoming else ())]
    if as_json:
        emit_json(migrate_args_json(args, argv))
        return
    pairs = [argv[i:i + 2] for i in range(0, len(argv), 2)]
    lines = [" ".join(shlex.quote(a) for a in pair) for pair in pairs]
    click.echo(" \\\n".join(lines))
    err = console(stderr=True)
    for note in args.notes:
        err.print(_line(f"note: {note}"))


def _uri(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``unix:PATH`` or ``tcp:HOST:PORT``: the transports pyvhost checks and tests."""
    if value is None:
        return None
    if re.fullmatch(r"unix:/\S+|tcp:(\[[0-9a-fA-F:]+\]|[\w.-]+):\d{1,5}", value) is None:
        raise click.BadParameter(f"{value!r} is not unix:/PATH or tcp:HOST:PORT", ctx=ctx,
                                 param=param)
    return value


def migrate_json(src: str, dst: str, uri: str, dry_run: bool, pf: Preflight,
                 preflight_seconds: float, outcome: MigrationOutcome | None) -> dict[str, Any]:
    o = outcome
    return {
        "schema": SCHEMA_MIGRATE, "source": src, "destination": dst, "uri": uri,
        "dry_run": dry_run,
        "refusals": [{"code": str(r.code), "message": r.message} for r in pf.refusals],
        "notes": list(pf.notes), "preflight_seconds": round(preflight_seconds, 4),
        "outcome": None if o is None else {
            "ok": o.ok, "status": o.status, "error": o.error, "timed_out": o.timed_out,
            "cancelled": o.cancelled, "incoming": o.incoming, "total_time": o.total_time,
            "downtime": o.downtime, "setup_time": o.setup_time, "transferred": o.transferred,
            "ram_total": o.ram_total, "dirty_sync_count": o.dirty_sync_count,
            "seconds": o.seconds, "destination_state": o.destination_state,
            "resumed_after": o.resumed_after,
            "progress": [dataclasses.asdict(p) for p in o.progress]}}


def _say_progress(out: Console) -> Callable[[Progress], None]:
    def say(p: Progress) -> None:
        out.print(_line(f"{p.seconds:7.1f} s {p.status}: {mib(p.transferred)} sent, "
                        f"{mib(p.remaining)} of {mib(p.total)} left, {p.mbps:.0f} Mbit/s, "
                        f"{p.dirty_pages_rate} pages dirtied/s"))
    return say


def _ms_text(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


@mem.command(epilog="\b\nExit codes: 0 migrated (or a dry run that would migrate), 1 "
             "refused by the\npreflight (nothing changed), 2 usage error or cannot connect, "
             "3 QEMU failed the\nmigration (the source runs on), 4 it did not complete in "
             "--timeout (cancelled,\nthe source runs on), 130 interrupted (cancelled).")
@qmp_option
@libvirt_options
@click.option("--to", "dest_qmp", metavar="SOCK",
              help="The destination QEMU's QMP socket: started with the source's command "
                   "line, the arguments of pyvhost mem migrate-args, and -incoming defer.")
@click.option("--uri", callback=_uri, metavar="URI",
              help="Where the destination listens: unix:/PATH or tcp:HOST:PORT.")
@timeout_option(300.0, "Seconds the migration may take; then it is cancelled and the "
                       "source runs on.")
@dry_run_option
@json_option(help=f"Print one JSON object (schema {SCHEMA_MIGRATE}); progress goes to stderr.")
@verbosity
def migrate(qmp_path: str | None, libvirt_domain: str | None, connect_uri: str | None,
            dest_qmp: str | None, uri: str | None, timeout: float, dry_run: bool,
            as_json: bool) -> None:
    """Live-migrate a VM whose memory was hot-added, with the checks QEMU leaves out.

    \b
    First the preflight: the destination waits for a migration, has every DIMM of the
    source with the same layout (ids, sizes, backends, slots, addresses) and no other,
    its vhost-user devices are connected to their back-ends, and the source's
    back-ends can log the pages they write (VHOST_F_LOG_ALL, PROTOCOL_F_LOG_SHMFD). A
    refusal names a stable code and what to change. Then migrate-incoming on the
    destination, migrate on the source, progress every second until it completes
    within --timeout, and QEMU's total time and downtime. The source is left paused
    (postmigrate) for you to quit. --to and --uri are required.
    \b
    --libvirt DOMAIN is refused (exit 2) with what to use: libvirt migrates a domain
    itself (virsh migrate --live), its hot-added DIMMs included.
    """
    configure_logging()
    _source(qmp_path, libvirt_domain)
    if libvirt_domain is not None:
        from .mem_libvirt import MIGRATE_REFUSAL

        fail(MIGRATE_REFUSAL.format(domain=libvirt_domain), "usage")
    if dest_qmp is None or uri is None:
        fail("give --to SOCK and --uri URI (the destination's QMP socket and where it "
             "listens)", "usage")
    assert qmp_path is not None
    if os.path.realpath(qmp_path) == os.path.realpath(dest_qmp):
        fail("--to names the source's own QMP socket", "usage")
    out = console(stderr=as_json)
    with _qmp(qmp_path, timeout) as src, _qmp(dest_qmp, timeout) as dst:
        t0 = time.monotonic()
        src_state, dst_state = read_state(src), read_state(dst)
        pf = preflight(src_state, read_facts(src, src_state), dst_state,
                       read_facts(dst, dst_state))
        pf_seconds = time.monotonic() - t0
        for r in pf.refusals:
            out.print(_line(("refused", "red"), f" {r.code}: {r.message}"))
        for note in pf.notes:
            out.print(_line(f"note: {note}"))
        outcome = None
        if not pf.refused and not dry_run:
            out.print(_line(f"migrating to {uri}"))
            outcome = run_migration(src, dst, uri, timeout=timeout,
                                    on_progress=_say_progress(out))
    if as_json:
        emit_json(migrate_json(qmp_path, dest_qmp, uri, dry_run, pf, pf_seconds, outcome))
    if outcome is None:
        if not pf.refused:
            out.print(_line(("preflight passed", "green"), " (dry run: nothing started)"))
        raise click.exceptions.Exit(Exit.PROBLEM if pf.refused else Exit.OK)
    if outcome.ok:
        out.print(_line(("done", "green"),
                        f": migrated in {outcome.seconds:.2f} s (QEMU: total "
                        f"{_ms_text(outcome.total_time)}, downtime "
                        f"{_ms_text(outcome.downtime)}, setup {_ms_text(outcome.setup_time)})"
                        f"; the destination is {outcome.destination_state}"
                        + ("" if outcome.resumed_after is None else
                           f" {_ms_text(outcome.resumed_after)} later")))
        raise click.exceptions.Exit(Exit.OK)
    out.print(_line(("failed", "red"), f": {outcome.error}; the source runs on"))
    raise click.exceptions.Exit(Exit.GUEST if outcome.timed_out else Exit.PEER_FAILED)
