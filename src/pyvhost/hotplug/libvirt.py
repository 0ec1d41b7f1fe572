"""``pyvhost mem --libvirt DOMAIN``: a libvirt domain as the source of the state and as
the one that acts, through libvirt's Python binding (the optional extra
``pyvhost[libvirt]``, libvirt-python built against libvirt-dev).

Under libvirt, QEMU's monitor belongs to libvirtd; pyvhost does not take it. It reads the
live domain XML (:mod:`.libvirt_xml`) and the host (this host's sysfs for a local URI,
libvirt's capabilities and free-page counts for a remote one), plans with the same
planner, and acts the way libvirt supports: ``virDomainAttachDeviceFlags`` of ``<memory
model='dimm' access='shared'>`` (live, and in the persistent config with ``persistent``),
verified in the live XML and undone by detaching it; ``virDomainDetachDeviceFlags`` for
remove, waited for until the device leaves the live XML (the guest's part). For a
migration it lists the ``<memory>`` devices the live XML carries to the destination
(:func:`read_migrating_memory`); libvirt migrates the domain itself.

Nothing goes through ``qemu-monitor-command`` unless asked (``qemu_monitor=True``): it
marks the domain tainted (custom-monitor). With it, the state is read from QEMU itself
(:func:`~.state.read_state` over :class:`LibvirtMonitor`): the exact flat view and the
vhost-user devices' negotiated features.

Every libvirt call that can wait on the network (opening a ``qemu+ssh://`` connection)
is bounded by the timeout. It must not decide (:mod:`.plan` does).
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any, TypeVar

from pyvhost.errors import LocalError, PeerError

from .execute import Outcome, begin
from .host import BASE_PAGE_SIZE, HostFacts, HugepagePool, read_host
from .libvirt_xml import (
    USER_ALIAS,
    LibvirtDomain,
    LibvirtUri,
    LibvirtXmlError,
    MigratingMemory,
    device_element,
    dimm_xml,
    migrating_memory,
    parse_uri,
    read_domain,
    size_of,
)
from .plan import AddRequest, Code, Plan, Refusal, Step, plan_add, plan_remove
from .qmp import QmpCommandError
from .state import VmState, read_state

T = TypeVar("T")
INSTALL_HINT = ("libvirt's Python binding is not installed: pip install 'pyvhost[libvirt]' "
                "(builds libvirt-python; needs the Debian packages libvirt-dev and "
                "pkg-config), or use a Python that has python3-libvirt")
_STATES = {0: "no state", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown",
           5: "shutoff", 6: "crashed", 7: "suspended"}


class LibvirtError(LocalError):
    """libvirt could not be used: no binding, no connection, no such domain."""


class LibvirtStepError(PeerError):
    """libvirt (or QEMU behind it) refused a step."""


def binding() -> tuple[ModuleType, ModuleType]:
    """``libvirt`` and ``libvirt_qemu``, or a :class:`LibvirtError` saying how to get them."""
    try:
        import libvirt
        import libvirt_qemu
    except ImportError as e:
        raise LibvirtError(INSTALL_HINT) from e
    return libvirt, libvirt_qemu


def _bounded(call: Callable[[], T], timeout: float, what: str) -> T:
    """Run a blocking libvirt call in a thread; give up after ``timeout`` seconds (the
    thread is left to finish on its own: libvirt's calls cannot be cancelled)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as e:  # handed over to the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, name=f"pyvhost-{what}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise LibvirtError(f"{what}: no answer within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


@dataclass
class Connection:
    """An open libvirt connection and one domain on it."""

    uri: LibvirtUri
    conn: Any
    dom: Any
    timeout: float

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            # libvirtd may be gone: nothing is left to release then.
            with contextlib.suppress(Exception):
                conn.close()


def open_domain(name: str, uri: str | None, timeout: float) -> Connection:
    """Connect to libvirt at ``uri`` (None: libvirt's default) and find domain ``name``."""
    lv, _ = binding()
    parsed = parse_uri(uri)
    where = uri or "libvirt's default URI"
    try:
        conn = _bounded(lambda: lv.open(uri), timeout, f"connect to {where}")
    except lv.libvirtError as e:
        raise LibvirtError(f"cannot connect to libvirt at {where}: "
                           f"{_one_line(e)}") from e
    if conn is None:
        raise LibvirtError(f"cannot connect to libvirt at {where}")
    try:
        dom = _bounded(lambda: conn.lookupByName(name), timeout, f"look up domain {name}")
    except lv.libvirtError as e:
        names: list[str] = []
        with contextlib.suppress(lv.libvirtError):
            names = sorted(d.name() for d in conn.listAllDomains(0))
        conn.close()
        raise LibvirtError(f"no domain {name!r} at {where} (domains: "
                           f"{', '.join(names) or 'none'}): {_one_line(e)}") from e
    return Connection(parsed, conn, dom, timeout)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


class LibvirtMonitor:
    """A :class:`~.qmp.Monitor` over ``virDomainQemuMonitorCommand``: QMP passed through
    libvirt. It taints the domain (custom-monitor); used only when asked. No events."""

    def __init__(self, c: Connection) -> None:
        self._c = c

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        lv, lvq = binding()
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        try:
            raw = _bounded(lambda: lvq.qemuMonitorCommand(self._c.dom, json.dumps(msg), 0),
                           self._c.timeout, command)
        except lv.libvirtError as e:
            raise LibvirtStepError(f"{command} through libvirt: {_one_line(e)}") from e
        try:
            reply = json.loads(raw)
        except (TypeError, ValueError) as e:
            raise LibvirtStepError(f"{command}: libvirt returned no JSON") from e
        if not isinstance(reply, dict):
            raise LibvirtStepError(f"{command}: libvirt returned {type(reply).__name__}")
        if "error" in reply:
            err = reply["error"] if isinstance(reply["error"], dict) else {}
            raise QmpCommandError(command, str(err.get("class", "")), str(err.get("desc", "")))
        return reply.get("return")

    def hmp(self, command_line: str) -> str:
        return str(self.execute("human-monitor-command", {"command-line": command_line}))

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        time.sleep(min(timeout, 0.2))
        return None


# -- reading -------------------------------------------------------------------------
def _status(c: Connection) -> str:
    state = _bounded(c.dom.state, c.timeout, "domain state")
    return _STATES.get(int(state[0]), "unknown")


def _version(c: Connection) -> tuple[int, int, int] | None:
    """The hypervisor's version as libvirt reports it (major * 1e6 + minor * 1e3 + micro)."""
    try:
        v = int(_bounded(c.conn.getVersion, c.timeout, "hypervisor version"))
    except Exception:
        return None
    return (v // 1_000_000, v // 1000 % 1000, v % 1000) if v > 0 else None


def read_libvirt(c: Connection, *, qemu_monitor: bool = False,
                 host: HostFacts | None = None) -> LibvirtDomain:
    """The domain's state: from its live XML, or (``qemu_monitor``) from QEMU itself."""
    lv, _ = binding()
    try:
        xml = _bounded(lambda: c.dom.XMLDesc(0), c.timeout, "domain XML")
    except lv.libvirtError as e:
        raise LibvirtError(f"cannot read the domain XML: {_one_line(e)}") from e
    status = _status(c)
    default_huge = host.default_hugepage_size if host is not None else None
    try:
        domain = read_domain(xml, status=status, qemu_version=_version(c),
                             default_hugepage=default_huge)
    except LibvirtXmlError as e:
        raise LibvirtError(f"domain XML: {e}") from e
    if status in ("shutoff", "shutdown", "crashed"):
        raise LibvirtError(f"domain {c.dom.name()} is {status}: memory hot-plug needs a "
                           f"running (or paused) domain")
    if not qemu_monitor:
        return domain
    state = read_state(LibvirtMonitor(c))
    version = state.qemu_version or domain.state.qemu_version
    return replace(domain, state=replace(state, qemu_version=version), estimated=False)


def read_migrating_memory(c: Connection) -> list[MigratingMemory]:
    """The domain's ``<memory>`` devices as a libvirt migration carries them (the live
    XML), each marked by whether the persistent config has it too."""
    lv, _ = binding()
    try:
        live = _bounded(lambda: c.dom.XMLDesc(0), c.timeout, "domain XML")
        persistent = bool(_bounded(c.dom.isPersistent, c.timeout, "domain persistence"))
        inactive = _bounded(lambda: c.dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE), c.timeout,
                            "persistent domain XML") if persistent else None
    except lv.libvirtError as e:
        raise LibvirtError(f"cannot read the domain XML: {_one_line(e)}") from e
    if _status(c) in ("shutoff", "shutdown", "crashed"):
        raise LibvirtError(f"domain {c.dom.name()} is not running: there is nothing to "
                           f"migrate live")
    try:
        return migrating_memory(live, inactive)
    except LibvirtXmlError as e:
        raise LibvirtError(f"domain XML: {e}") from e


def host_facts(c: Connection, mem_path: str | None = None) -> HostFacts:
    """This host's facts for a local URI; libvirt's view of the remote host otherwise
    (pages per NUMA cell from the capabilities, free pages from virNodeGetFreePages;
    reserved pages are not visible remotely)."""
    if not c.uri.remote:
        return read_host(mem_path)
    caps = ET.fromstring(_bounded(c.conn.getCapabilities, c.timeout, "capabilities"))
    pools: list[HugepagePool] = []
    nodes: list[int] = []
    sizes: set[int] = set()
    for cell in caps.iterfind("host/topology/cells/cell"):
        node = int(cell.get("id", "0"))
        nodes.append(node)
        for page in cell.iterfind("pages"):
            kib = int(page.get("size", "0"))
            if kib * 1024 == BASE_PAGE_SIZE:
                continue
            free = c.conn.getFreePages([kib], node, 1).get(node, {}).get(kib, 0)
            pools.append(HugepagePool(kib * 1024, node, int(page.text or 0), int(free)))
            sizes.add(kib * 1024)
    for size in sorted(sizes):
        mine = [p for p in pools if p.page_size == size]
        pools.append(HugepagePool(size, None, sum(p.total for p in mine),
                                  sum(p.free for p in mine)))
    return HostFacts(BASE_PAGE_SIZE, min(sizes) if sizes else None, tuple(sorted(nodes)),
                     tuple(pools))


# -- planning ------------------------------------------------------------------------
_FREE_ALIAS = re.compile(r"^ua-pyvhost-dimm(\d+)$")


def dimm_alias(wanted: str | None, state: VmState) -> str:
    """libvirt keeps user aliases (``ua-...``) as QEMU device ids: pyvhost's DIMMs are
    ``ua-pyvhost-dimmN``, or ``--id`` (``ua-`` is added when missing)."""
    if wanted is not None:
        return wanted if wanted.startswith(USER_ALIAS) else USER_ALIAS + wanted
    taken = set(state.device_ids) | {d.id for d in state.memory_devices if d.id}
    i = 0
    while f"ua-pyvhost-dimm{i}" in taken:
        i += 1
    return f"ua-pyvhost-dimm{i}"


def plan_libvirt_add(req: AddRequest, domain: LibvirtDomain, host: HostFacts, *,
                     persistent: bool) -> Plan:
    """The planner's checks for a DIMM that libvirt will back the way the domain's
    ``<memoryBacking>`` says, and one step: attach ``<memory model='dimm'>``, undone by
    detaching it."""
    state = domain.state
    alias = dimm_alias(req.id, state)
    backing = domain.backing
    huge = req.hugepages or backing.hugepages
    # What libvirt creates for access='shared' (or private): an fd backend (memfd or a
    # file), or memory-backend-ram for private anonymous memory.
    private_anon = (not req.share and backing.source == "anonymous" and not huge)
    node = req.node if req.node is not None else (0 if state.numa_nodes else None)
    check = replace(req, id=alias, backend="ram" if private_anon else "memfd", mem_path=None,
                    hugepages=huge, node=node)
    plan = plan_add(check, state, host, domain.page_sizes)
    page = None
    if huge:
        page = backing.hugepage_size or host.default_hugepage_size
    flags = {"live": True, "config": persistent}
    try:
        xml = dimm_xml(alias, req.size, node, req.share, page if req.hugepages else None)
    except ValueError as e:
        return replace(plan, steps=(), refusals=(*plan.refusals,
                                                 Refusal(Code.BAD_REQUEST, str(e))))
    step = Step("attach-device", {"xml": xml, **flags},
                undo=Step("detach-device", {"xml": xml, **flags}, wait_deleted=alias))
    notes = list(plan.notes)
    if domain.estimated and state.vhost_user:
        notes.append("vhost-user regions counted from the domain XML (libvirt does not "
                     "show QEMU's memory view): exact for a running guest, an upper bound "
                     "before its firmware ran; --qemu-monitor reads QEMU's own view "
                     "(taints the domain: custom-monitor)")
    return replace(plan, device_id=alias, backend_id=f"mem{alias}", steps=(step,),
                   notes=tuple(notes))


def plan_libvirt_remove(device_id: str, domain: LibvirtDomain, xml: str, *,
                        persistent: bool) -> Plan:
    """Detach memory device ``device_id`` (its live XML), waited for."""
    plan = plan_remove(device_id, domain.state)
    if plan.refused:
        return plan
    element = device_element(xml, device_id)
    if element is None:
        return replace(plan, steps=(), refusals=(Refusal(
            Code.DEVICE_NOT_FOUND, f"{device_id} is not in the domain's live XML"),))
    step = Step("detach-device", {"xml": element, "live": True, "config": persistent},
                wait_deleted=device_id)
    return replace(plan, steps=(step,))


# -- acting --------------------------------------------------------------------------
def _flags(lv: ModuleType, args: dict[str, Any], persistent_ok: bool) -> int:
    flags = int(lv.VIR_DOMAIN_AFFECT_LIVE)
    if args.get("config") and persistent_ok:
        flags |= int(lv.VIR_DOMAIN_AFFECT_CONFIG)
    return flags


def _live_aliases(c: Connection) -> set[str]:
    root = ET.fromstring(c.dom.XMLDesc(0))
    return {a.get("name", "") for a in root.iterfind("devices/memory/alias")}


def _qemu_objects(c: Connection) -> set[str] | None:
    try:
        objects = LibvirtMonitor(c).execute("qom-list", {"path": "/objects"})
    except (LibvirtStepError, QmpCommandError):
        return None
    return {str(o.get("name")) for o in objects}


def _wait_gone(c: Connection, alias: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alias in _live_aliases(c):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


def _call(c: Connection, name: str, xml: str, flags: int) -> None:
    method = getattr(c.dom, "attachDeviceFlags" if name == "attach-device"
                     else "detachDeviceFlags")
    _bounded(lambda: method(xml, flags), c.timeout, name)


def _one_step(c: Connection, plan: Plan, force: bool = False) -> tuple[float, Outcome, int]:
    """Run the plan's one step (attach-device or detach-device) unless the preflight
    refused the plan: when it started, the outcome so far (a libvirt refusal in
    ``failed_step`` and ``error``) and the flags the step was called with."""
    start, out = begin(plan, force)
    lv, _ = binding()
    (step,) = plan.steps
    persistent = bool(step.arguments.get("config")) and bool(c.dom.isPersistent())
    flags = _flags(lv, dict(step.arguments), persistent)
    try:
        _call(c, step.command, str(step.arguments["xml"]), flags)
    except (lv.libvirtError, LibvirtError) as e:
        out.failed_step, out.error = step.command, _one_line(e)
    return start, out, flags


def execute_libvirt_add(c: Connection, plan: Plan, *, force: bool = False,
                        qemu_monitor: bool = False) -> Outcome:
    """Attach the DIMM, verify it in the live XML; detach it when verification fails.
    When libvirt refuses (QEMU's object-add or device_add failed), libvirt has undone its
    own part: the live XML and (with ``qemu_monitor``) QEMU's /objects are checked."""
    start, out, flags = _one_step(c, plan, force)
    lv, _ = binding()
    (step,) = plan.steps
    if out.failed_step is not None:
        _leftovers(c, plan, out, qemu_monitor)
        out.seconds = time.monotonic() - start
        return out
    out.done.append(step.command)
    mine = [d for d in read_domain(c.dom.XMLDesc(0), status=_status(c), qemu_version=None,
                                   default_hugepage=None).state.memory_devices
            if d.id == plan.device_id]
    expected = plan.steps[0].arguments.get("xml")
    size = _size_in(str(expected))
    if len(mine) != 1 or mine[0].size != size:
        out.failed_step, out.error = "verify", (
            f"the live XML does not show {plan.device_id} with size {size}")
        undo = step.undo
        assert undo is not None
        try:
            _call(c, undo.command, str(undo.arguments["xml"]), flags)
            if _wait_gone(c, plan.device_id, c.timeout):
                out.rolled_back.append(undo.command)
            else:
                out.rolled_back.append(f"{undo.command}: not finished in {c.timeout:g} s")
        except (lv.libvirtError, LibvirtError) as e:
            out.rolled_back.append(f"{undo.command} failed: {_one_line(e)}")
        _leftovers(c, plan, out, qemu_monitor)
    else:
        d = mine[0]
        out.device = {"id": d.id, "memdev": d.memdev, "addr": d.addr, "size": d.size,
                      "slot": d.slot, "node": d.node}
        out.ok = True
    out.seconds = time.monotonic() - start
    return out


def _size_in(xml: str) -> int | None:
    el = ET.fromstring(xml).find("target/size")
    return size_of(el) if el is not None else None


def _leftovers(c: Connection, plan: Plan, out: Outcome, qemu_monitor: bool) -> None:
    left = [plan.device_id] if plan.device_id in _live_aliases(c) else []
    if qemu_monitor and plan.backend_id is not None:
        objects = _qemu_objects(c)
        if objects is not None and plan.backend_id in objects:
            left.append(plan.backend_id)
    out.orphans = left


def execute_libvirt_remove(c: Connection, plan: Plan, *, timeout: float) -> Outcome:
    """Detach, then wait until the device leaves the live XML (libvirt waits 5 s for the
    guest, then returns and finishes the removal when QEMU's DEVICE_DELETED comes)."""
    start, out, _ = _one_step(c, plan)
    (step,) = plan.steps
    if out.failed_step is not None:
        out.seconds = time.monotonic() - start
        return out
    if _wait_gone(c, plan.device_id, timeout):
        out.done.append(step.command)
        out.ok = True
    else:
        out.timed_out = True
        out.failed_step = step.command
        out.error = (f"{plan.device_id} is still in the domain {timeout:g} s after "
                     f"detach-device: the guest did not release it")
    out.seconds = time.monotonic() - start
    return out


__all__ = ["Connection", "LibvirtError", "LibvirtMonitor", "LibvirtStepError", "binding",
           "execute_libvirt_add", "execute_libvirt_remove", "host_facts", "open_domain",
           "plan_libvirt_add", "plan_libvirt_remove", "read_libvirt"]
