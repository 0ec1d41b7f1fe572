"""``pyvhost mem status|add|remove|migrate-args --libvirt DOMAIN [--connect URI]``: the branch of
``pyvhost mem`` (:mod:`.mem`) for libvirt domains. It reads, plans and acts through
:mod:`pyvhost.hotplug.libvirt` and prints with :mod:`.mem`'s printers: the same tables,
the same JSON documents, the same exit codes (0 done, 1 refused, 2 cannot connect or an
option libvirt has no way to apply, 3 libvirt/QEMU failed a step or did not return within
--timeout (undone), 4 the guest did not release a DIMM, 130 interrupted).
``pyvhost mem migrate --libvirt`` is refused here with what to use instead: libvirt
migrates a domain itself, its hot-added DIMMs included.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any, NoReturn

import click

from pyvhost.errors import PyvhostError
from pyvhost.hotplug.execute import Outcome
from pyvhost.hotplug.libvirt import (
    Connection,
    LibvirtError,
    LibvirtStepError,
    execute_libvirt_add,
    execute_libvirt_remove,
    host_facts,
    libvirt_unsupported,
    open_domain,
    plan_libvirt_add,
    plan_libvirt_remove,
    read_libvirt,
    read_migrating_memory,
)
from pyvhost.hotplug.plan import AddRequest, Plan
from pyvhost.hotplug.qmp import QmpCommandError

from .common import console, emit_json, fail
from .mem import (
    SCHEMA_ADD,
    SCHEMA_MIGRATE_ARGS,
    SCHEMA_REMOVE,
    _exit_for,
    _print_plan,
    plan_json,
    status_json,
)

TAINT_NOTE = ("--qemu-monitor: QEMU's state was read through qemu-monitor-command; libvirt "
              "marks the domain tainted (custom-monitor)")


@contextlib.contextmanager
def _domain(domain: str, uri: str | None, timeout: float) -> Iterator[Connection]:
    """The libvirt connection for one subcommand, its failures under the exit-code rule:
    no binding, no libvirt, no such domain (2); libvirt or QEMU answered a query with an
    error (3)."""
    try:
        c = open_domain(domain, uri, timeout)
    except ValueError as e:  # a URI that is not a QEMU driver's
        fail(str(e), "usage")
    except LibvirtError as e:
        fail(str(e), "connect")
    try:
        yield c
    except (LibvirtStepError, QmpCommandError) as e:
        fail(str(e), "peer")
    except LibvirtError as e:
        fail(str(e), "connect")
    except PyvhostError as e:
        fail(str(e), "run")
    finally:
        c.close()


def status(domain: str, uri: str | None, region_limit: int, timeout: float,
           qemu_monitor: bool) -> dict[str, Any]:
    """The ``pyvhost.mem.status/1`` document of a libvirt domain."""
    with _domain(domain, uri, timeout) as c:
        host = host_facts(c)
        dom = read_libvirt(c, qemu_monitor=qemu_monitor, host=host)
    doc = status_json(dom.state, host, region_limit, sizes=dom.page_sizes)
    if qemu_monitor:
        doc["vhost_user"]["notes"].append(TAINT_NOTE)
    return doc


def add(domain: str, uri: str | None, req: AddRequest, *, dry_run: bool, force: bool,
        persistent: bool, qemu_monitor: bool, timeout: float, as_json: bool) -> NoReturn:
    if req.backend != "memfd" or req.mem_path is not None:
        fail("--backend and --mem-path are libvirt's choice under --libvirt (its "
             "<memoryBacking>); use --hugepages, --no-share, --node", "usage")
    outcome: Outcome | None = None
    with _domain(domain, uri, timeout) as c:
        host = host_facts(c)
        dom = read_libvirt(c, qemu_monitor=qemu_monitor, host=host)
        unsupported = libvirt_unsupported(req, dom)
        if unsupported is not None:
            fail(unsupported, "usage")
        t0 = time.monotonic()
        plan = plan_libvirt_add(req, dom, host, persistent=persistent)
        plan_seconds = time.monotonic() - t0
        if not dry_run and (force or not plan.refused):
            outcome = execute_libvirt_add(c, plan, force=force, qemu_monitor=qemu_monitor,
                                          progress=_progress)
    _show(plan, SCHEMA_ADD, dry_run, plan_seconds, outcome, as_json, qemu_monitor)
    _exit_for(plan, outcome)


def _progress(line: str) -> None:
    """A progress line on stderr (stdout keeps the table or the one JSON document)."""
    console(stderr=True).print(f"note: {line}", markup=False, highlight=False)


def remove(domain: str, uri: str | None, device_id: str, *, dry_run: bool,
           persistent: bool, timeout: float, as_json: bool) -> NoReturn:
    outcome: Outcome | None = None
    with _domain(domain, uri, timeout) as c:
        dom = read_libvirt(c)
        t0 = time.monotonic()
        plan = plan_libvirt_remove(device_id, dom, c.dom.XMLDesc(0), persistent=persistent)
        plan_seconds = time.monotonic() - t0
        if not dry_run and not plan.refused:
            outcome = execute_libvirt_remove(c, plan, timeout=timeout)
    _show(plan, SCHEMA_REMOVE, dry_run, plan_seconds, outcome, as_json, False)
    _exit_for(plan, outcome)


def _show(plan: Plan, schema: str, dry_run: bool, plan_seconds: float,
          outcome: Outcome | None, as_json: bool, qemu_monitor: bool) -> None:
    doc = plan_json(plan, schema, dry_run, plan_seconds, outcome)
    if qemu_monitor:
        doc["notes"].append(TAINT_NOTE)
    if as_json:
        emit_json(doc)
        return
    out = console()
    _print_plan(plan, dry_run, outcome, out)
    if qemu_monitor:
        out.print(f"note: {TAINT_NOTE}", markup=False)


#: Why ``pyvhost mem migrate --libvirt`` is refused, and what to use.
MIGRATE_REFUSAL = (
    "pyvhost mem migrate does not drive libvirt migrations: libvirt migrates a domain "
    "itself and starts the destination from the domain's live XML, hot-added DIMMs "
    "included. Use virsh migrate --live {domain} qemu+ssh://DEST/system; pyvhost mem "
    "migrate-args --libvirt {domain} lists the <memory> devices the destination gets, "
    "and pyvhost status on each back-end's control socket shows its dirty log during "
    "the migration")


def migrate_args(domain: str, uri: str | None, *, timeout: float, as_json: bool) -> None:
    """The ``<memory>`` devices a libvirt migration carries to the destination: on stdout
    (XML, or the ``pyvhost.mem.migrate-args/1`` document with a ``libvirt`` part); notes
    on stderr."""
    with _domain(domain, uri, timeout) as c:
        devices = read_migrating_memory(c)
        persistent = bool(c.dom.isPersistent())
    notes = ["libvirt carries these <memory> devices to the destination itself, in the "
             "domain's live XML (virsh migrate --live): nothing to add by hand; a "
             "destination XML of your own (virsh migrate --xml) must have them with these "
             "aliases, sizes, nodes and addresses"]
    if not devices:
        notes = ["the domain has no <memory> devices: nothing to recreate"]
    for d in devices:
        if persistent and d.persistent is False:
            notes.append(f"{d.alias} is in the live XML only, not in the persistent "
                         f"config: the destination runs it, but a restart of the domain "
                         f"drops it (virsh attach-device --config adds it there)")
    if as_json:
        emit_json({"schema": SCHEMA_MIGRATE_ARGS, "args": [], "command_line": "",
                   "dimms": [], "notes": notes,
                   "libvirt": {"domain": domain, "uri": uri, "persistent": persistent,
                               "memory_devices": [
                                   {"alias": d.alias, "model": d.model, "size": d.size,
                                    "node": d.node, "slot": d.slot, "base": d.base,
                                    "persistent": d.persistent, "xml": d.xml}
                                   for d in devices]}})
        return
    for d in devices:
        click.echo(d.xml)
    err = console(stderr=True)
    for note in notes:
        err.print(f"note: {note}", markup=False, highlight=False)
