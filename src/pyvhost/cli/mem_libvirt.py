"""``pyvhost mem status|add|remove --libvirt DOMAIN [--connect URI]``: the branch of
``pyvhost mem`` (:mod:`.mem`) for libvirt domains. It reads, plans and acts through
:mod:`pyvhost.hotplug.libvirt` and prints with :mod:`.mem`'s printers: the same tables,
the same JSON documents, the same exit codes (0 done, 1 refused, 2 cannot connect, 3
libvirt/QEMU failed a step (undone), 4 the guest did not release a DIMM).
"""

from __future__ import annotations

import sys
import time
from typing import NoReturn

from pyvhost.errors import PyvhostError
from pyvhost.hotplug.execute import Outcome
from pyvhost.hotplug.libvirt import (
    Connection,
    LibvirtError,
    execute_libvirt_add,
    execute_libvirt_remove,
    host_facts,
    open_domain,
    plan_libvirt_add,
    plan_libvirt_remove,
    read_libvirt,
)
from pyvhost.hotplug.plan import AddRequest, Plan

from .common import Exit, console, fail
from .mem import (
    SCHEMA_ADD,
    SCHEMA_REMOVE,
    _emit,
    _print_plan,
    _print_status,
    plan_json,
    status_json,
)

TAINT_NOTE = ("--qemu-monitor: QEMU's state was read through qemu-monitor-command; libvirt "
              "marks the domain tainted (custom-monitor)")


def _connect(domain: str, uri: str | None, timeout: float) -> Connection:
    try:
        return open_domain(domain, uri, timeout)
    except ValueError as e:  # a URI that is not a QEMU driver's
        fail(str(e), "usage")
    except LibvirtError as e:
        fail(str(e), "connect")


def status(domain: str, uri: str | None, as_json: bool, region_limit: int, timeout: float,
           qemu_monitor: bool) -> NoReturn:
    c = _connect(domain, uri, timeout)
    try:
        host = host_facts(c)
        dom = read_libvirt(c, qemu_monitor=qemu_monitor, host=host)
        doc = status_json(dom.state, host, region_limit, sizes=dom.page_sizes)
    except PyvhostError as e:
        fail(str(e), "connect")
    finally:
        c.close()
    if qemu_monitor:
        doc["vhost_user"]["notes"].append(TAINT_NOTE)
    if as_json:
        _emit(doc, True)
    else:
        _print_status(doc, console())
    sys.exit(Exit.PROBLEM if doc["problems"] else Exit.OK)


def add(domain: str, uri: str | None, req: AddRequest, *, dry_run: bool, force: bool,
        persistent: bool, qemu_monitor: bool, timeout: float, as_json: bool) -> NoReturn:
    if req.backend != "memfd" or req.mem_path is not None:
        fail("--backend and --mem-path are libvirt's choice under --libvirt (its "
             "<memoryBacking>); use --hugepages, --no-share, --node", "usage")
    c = _connect(domain, uri, timeout)
    outcome: Outcome | None = None
    try:
        host = host_facts(c)
        dom = read_libvirt(c, qemu_monitor=qemu_monitor, host=host)
        t0 = time.monotonic()
        plan = plan_libvirt_add(req, dom, host, persistent=persistent)
        plan_seconds = time.monotonic() - t0
        if not dry_run and (force or not plan.refused):
            outcome = execute_libvirt_add(c, plan, force=force, qemu_monitor=qemu_monitor)
    except PyvhostError as e:
        fail(str(e), "connect")
    finally:
        c.close()
    _show(plan, SCHEMA_ADD, dry_run, plan_seconds, outcome, as_json, qemu_monitor)
    if outcome is not None:
        sys.exit(Exit.OK if outcome.ok else Exit.PEER_FAILED)
    sys.exit(Exit.PROBLEM if plan.refused else Exit.OK)


def remove(domain: str, uri: str | None, device_id: str, *, dry_run: bool,
           persistent: bool, timeout: float, as_json: bool) -> NoReturn:
    c = _connect(domain, uri, timeout)
    outcome: Outcome | None = None
    try:
        dom = read_libvirt(c)
        t0 = time.monotonic()
        plan = plan_libvirt_remove(device_id, dom, c.dom.XMLDesc(0), persistent=persistent)
        plan_seconds = time.monotonic() - t0
        if not dry_run and not plan.refused:
            outcome = execute_libvirt_remove(c, plan, timeout=timeout)
    except PyvhostError as e:
        fail(str(e), "connect")
    finally:
        c.close()
    _show(plan, SCHEMA_REMOVE, dry_run, plan_seconds, outcome, as_json, False)
    if outcome is None:
        sys.exit(Exit.PROBLEM if plan.refused else Exit.OK)
    if outcome.ok:
        sys.exit(Exit.OK)
    sys.exit(Exit.GUEST if outcome.timed_out else Exit.PEER_FAILED)


def _show(plan: Plan, schema: str, dry_run: bool, plan_seconds: float,
          outcome: Outcome | None, as_json: bool, qemu_monitor: bool) -> None:
    doc = plan_json(plan, schema, dry_run, plan_seconds, outcome)
    if qemu_monitor:
        doc["notes"].append(TAINT_NOTE)
    if as_json:
        _emit(doc, True)
    else:
        _print_plan(plan, dry_run, outcome, console())
        if qemu_monitor:
            console().print(f"note: {TAINT_NOTE}")
