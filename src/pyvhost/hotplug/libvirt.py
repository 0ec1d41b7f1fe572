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
is bounded by the timeout. An attach cannot be cancelled: one that outlasts the timeout,
or is interrupted, is waited for :data:`GRACE` seconds more, then detached again if it
took effect, and what the domain has is said (:func:`execute_libvirt_add`).

What a DIMM can carry in libvirt (``<source><nodemask>``, ``<source><pagesize>``) is
written into it; what libvirt takes from the domain only (the memory policy, the
preallocation) is refused by :func:`libvirt_unsupported` unless the domain gives it
anyway. It must not decide whether a plan is wise (:mod:`.plan` does).
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

from pyvhost.errors import LocalError, PeerError, PyvhostError
from pyvhost.interrupts import Interrupted, deferred_interrupts

from .execute import Outcome, begin
from .host import BASE_PAGE_SIZE, HostFacts, HugepagePool, read_host
from .libvirt_xml import (
    NUMATUNE_POLICY,
    USER_ALIAS,
    LibvirtDomain,
    LibvirtUri,
    LibvirtXmlError,
    MigratingMemory,
    device_element,
    dimm_xml,
    format_nodeset,
    migrating_memory,
    parse_uri,
    read_domain,
    size_of,
)
from .plan import AddRequest, Code, Plan, Refusal, Step, plan_add, plan_remove
from .qmp import QmpCommandError
from .state import MemoryDevice, VmState, read_state

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


class _Call:
    """A blocking libvirt call in a thread of its own, waited for in the caller's thread
    (where Ctrl-C lands). libvirt's calls cannot be cancelled: one that is given up on
    runs on to its end, and :attr:`done` says when it got there."""

    def __init__(self, call: Callable[[], Any], what: str) -> None:
        self.what = what
        self.value: Any = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.ended: float | None = None
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(call,), name=f"pyvhost-{what}",
                         daemon=True).start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self.value = call()
        except BaseException as e:  # handed over to the waiting thread
            self.error = e
        finally:
            self.ended = time.monotonic()
            self.done.set()

    def wait(self, timeout: float) -> bool:
        """Whether the call returned within ``timeout`` seconds (interruptible)."""
        return self.done.wait(timeout)


def _bounded(call: Callable[[], T], timeout: float, what: str) -> T:
    """Run a blocking libvirt call in a thread; give up after ``timeout`` seconds (the
    thread is left to finish on its own: libvirt's calls cannot be cancelled)."""
    c = _Call(call, what)
    if not c.wait(timeout):
        raise LibvirtError(f"{what}: no answer within {timeout:g} s")
    if c.error is not None:
        raise c.error
    return c.value  # type: ignore[no-any-return]


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
    node = _guest_node(req, domain)
    # Host nodes and policy as libvirt will apply them (module docstring of
    # .libvirt_xml): the planner checks hugepages on those nodes.
    placement = domain.numatune.placement(node)
    host_nodes = req.host_nodes or placement.nodeset
    policy = placement.policy if host_nodes else req.policy
    check = replace(req, id=alias, backend="ram" if private_anon else "memfd", mem_path=None,
                    hugepages=huge, node=node, host_nodes=host_nodes,
                    policy=policy,  # type: ignore[arg-type]
                    prealloc=huge or backing.allocation == "immediate")
    plan = plan_add(check, state, host, domain.page_sizes)
    page = None
    if huge:
        page = backing.hugepage_size or host.default_hugepage_size
    flags = {"live": True, "config": persistent}
    try:
        xml = dimm_xml(alias, req.size, node, req.share, page if req.hugepages else None,
                       req.host_nodes)
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


def _guest_node(req: AddRequest, domain: LibvirtDomain) -> int | None:
    """The DIMM's guest NUMA node: ``--node``, else 0 when the guest has cells (libvirt
    needs one then)."""
    return req.node if req.node is not None else (0 if domain.state.numa_nodes else None)


def libvirt_unsupported(req: AddRequest, domain: LibvirtDomain) -> str | None:
    """Why ``req`` cannot be done as asked through libvirt, with what to set in the domain
    XML instead; None when it can. A DIMM in libvirt 9.0 has a ``<source><nodemask>``
    (``--host-nodes``) and a ``<source><pagesize>`` (``--hugepages``), but no policy and
    no preallocation of its own: both come from the domain (module docstring of
    :mod:`.libvirt_xml`). An option that asks for what the domain gives anyway is fine."""
    node = _guest_node(req, domain)
    p = domain.numatune.placement(node)
    if req.policy is not None and req.policy != "default" and req.policy != p.policy:
        mode = {v: k for k, v in NUMATUNE_POLICY.items()}[req.policy]
        nodes = format_nodeset(req.host_nodes or p.nodeset) or "N"
        where = (f"<numatune><memnode cellid='{node}' mode='{mode}' nodeset='{nodes}'/>"
                 if domain.state.numa_nodes else
                 f"<numatune><memory mode='{mode}' nodeset='{nodes}'/>")
        return (f"--policy {req.policy} under --libvirt: libvirt has no memory policy per "
                f"DIMM; a DIMM on guest node {node or 0} gets the mode of {p.source}, "
                f"{p.mode} (QEMU's {p.policy}). Set {where} in the domain XML (it applies "
                f"from the domain's next start), or leave out --policy")
    backing = domain.backing
    preallocated = req.hugepages or backing.hugepages or backing.allocation == "immediate"
    if req.prealloc and not preallocated:
        return ("--prealloc under --libvirt: libvirt has no preallocation per DIMM; it "
                "preallocates a DIMM on hugepages (--hugepages), and every DIMM of a domain "
                "with <memoryBacking><allocation mode='immediate'/></memoryBacking> (it "
                "applies from the domain's next start). Add --hugepages, set that in the "
                "domain XML, or leave out --prealloc")
    threads = backing.allocation_threads
    if req.prealloc_threads is not None and req.prealloc_threads != threads:
        return (f"--prealloc-threads {req.prealloc_threads} under --libvirt: libvirt takes "
                f"them from the domain's <memoryBacking><allocation mode='immediate' "
                f"threads='N'/> (here {threads if threads is not None else 'not set'}). "
                f"Set threads='{req.prealloc_threads}' there (it applies from the domain's "
                f"next start), or leave out --prealloc-threads")
    return None


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
#: How long an attach that outlasted the timeout, or was interrupted, is waited for
#: beyond: libvirt cannot cancel it, and only once it has returned does the live XML say
#: whether the DIMM is in QEMU (libvirt 9.0 lists the device in the live XML while its
#: object-add is still on the way to QEMU, measured). Any other change to the domain
#: waits for it meanwhile (libvirt's job lock: 30 s, then "cannot acquire state change
#: lock"), so nothing else is tried until it has returned.
GRACE = 10.0
#: The least time an undo waits for the guest to release the DIMM it was just given (a
#: short --timeout bounds libvirt's answer, not the guest's ACPI eject, which takes a
#: TCG guest several seconds right after the DIMM arrived).
UNDO_WAIT = 30.0
#: How often an undo asks again for a detach the guest has not acted on (:func:`_undo`).
REDETACH = 8.0
Progress = Callable[[str], None]


def _flags(lv: ModuleType, args: dict[str, Any], persistent_ok: bool) -> int:
    flags = int(lv.VIR_DOMAIN_AFFECT_LIVE)
    if args.get("config") and persistent_ok:
        flags |= int(lv.VIR_DOMAIN_AFFECT_CONFIG)
    return flags


def _live_aliases(c: Connection) -> set[str]:
    root = ET.fromstring(_bounded(lambda: c.dom.XMLDesc(0), c.timeout, "domain XML"))
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


def _method(c: Connection, name: str) -> Callable[[str, int], Any]:
    return getattr(c.dom, "attachDeviceFlags" if name == "attach-device"  # type: ignore[no-any-return]
                   else "detachDeviceFlags")


def _call(c: Connection, name: str, xml: str, flags: int,
          timeout: float | None = None) -> None:
    _bounded(lambda: _method(c, name)(xml, flags), c.timeout if timeout is None else timeout,
             name)


def _step_flags(c: Connection, step: Step) -> int:
    lv, _ = binding()
    persistent = bool(step.arguments.get("config")) and bool(
        _bounded(c.dom.isPersistent, c.timeout, "domain persistence"))
    return _flags(lv, dict(step.arguments), persistent)


def _one_step(c: Connection, plan: Plan, force: bool = False) -> tuple[float, Outcome, int]:
    """Run the plan's one step (detach-device) unless the preflight refused the plan:
    when it started, the outcome so far (a libvirt refusal in ``failed_step`` and
    ``error``) and the flags the step was called with."""
    start, out = begin(plan, force)
    lv, _ = binding()
    (step,) = plan.steps
    flags = _step_flags(c, step)
    try:
        _call(c, step.command, str(step.arguments["xml"]), flags)
    except (lv.libvirtError, LibvirtError) as e:
        out.failed_step, out.error = step.command, _one_line(e)
    return start, out, flags


def execute_libvirt_add(c: Connection, plan: Plan, *, force: bool = False,
                        qemu_monitor: bool = False, grace: float = GRACE,
                        progress: Progress | None = None) -> Outcome:
    """Attach the DIMM, verify it in the live XML; detach it when verification fails.
    When libvirt refuses (QEMU's object-add or device_add failed), libvirt has undone its
    own part: the live XML and (with ``qemu_monitor``) QEMU's /objects are checked.

    An attach that outlasts the timeout, or is interrupted (Ctrl-C, SIGTERM), is waited
    for ``grace`` seconds more (said through ``progress``), then undone if it took
    effect; an interrupt then raises :class:`~pyvhost.interrupts.Interrupted` saying
    what the domain has. Further interrupts are held while that runs."""
    start, out = begin(plan, force)
    lv, _ = binding()
    (step,) = plan.steps
    flags = _step_flags(c, step)
    xml = str(step.arguments["xml"])
    call = _Call(lambda: _method(c, step.command)(xml, flags), step.command)
    mine: MemoryDevice | None = None
    try:
        answered = call.wait(c.timeout)
        if answered and call.error is None:
            out.done.append(step.command)
            try:
                mine = _verify(c, plan, out)
            except (LibvirtError, lv.libvirtError) as e:
                # Attached, but not verified (the live XML not read in time): undone, as
                # a DIMM that is not there as asked would be.
                out.failed_step, out.error = "verify", (
                    f"could not read the live XML to check {plan.device_id}: "
                    f"{_one_line(e)}")
    except KeyboardInterrupt:
        # Until the DIMM is verified the add is all or nothing, as on a failure.
        raise _add_interrupted(c, plan, call, out, flags, grace, progress,
                               qemu_monitor) from None
    with deferred_interrupts():
        if not answered:
            why = f"{step.command} did not return within {c.timeout:g} s"
            out.failed_step, out.error = step.command, why
            try:
                out.error = f"{why}; " + _settle(c, plan, call, out, flags, grace, progress,
                                                 qemu_monitor, why)
            except (PyvhostError, lv.libvirtError) as e:
                out.error = f"{why}; could not look at what is left: {_one_line(e)}"
        elif call.error is not None:
            if not isinstance(call.error, lv.libvirtError | LibvirtError):
                raise call.error
            out.failed_step, out.error = step.command, _one_line(call.error)
            _leftovers(c, plan, out, qemu_monitor)
        elif mine is None:
            _undo(c, plan, flags, out, progress)
            try:
                _leftovers(c, plan, out, qemu_monitor)
            except (LibvirtError, lv.libvirtError) as e:
                out.orphans = [plan.device_id]
                domain = c.dom.name()
                out.error = (f"{out.error}; could not look at what is left "
                             f"({_one_line(e)}): {plan.device_id} may still be attached; "
                             f"see pyvhost mem status --libvirt {domain}, and remove it "
                             f"with pyvhost mem remove --libvirt {domain} {plan.device_id}")
        else:
            out.device = {"id": mine.id, "memdev": mine.memdev, "addr": mine.addr,
                          "size": mine.size, "slot": mine.slot, "node": mine.node}
            out.ok = True
    out.seconds = time.monotonic() - start
    return out


def _verify(c: Connection, plan: Plan, out: Outcome) -> MemoryDevice | None:
    """The DIMM as the live XML has it, or None (``out`` says why) when it is not there
    with the size asked for."""
    xml = _bounded(lambda: c.dom.XMLDesc(0), c.timeout, "domain XML")
    mine = [d for d in read_domain(xml, status=_status(c), qemu_version=None,
                                   default_hugepage=None).state.memory_devices
            if d.id == plan.device_id]
    size = _size_in(str(plan.steps[0].arguments.get("xml")))
    if len(mine) == 1 and mine[0].size == size:
        return mine[0]
    out.failed_step, out.error = "verify", (
        f"the live XML does not show {plan.device_id} with size {size}")
    return None


def _undo(c: Connection, plan: Plan, flags: int, out: Outcome,
          progress: Progress | None = None) -> None:
    """Detach the DIMM the plan attached and wait until it leaves the live XML (the guest
    must release it), bounded by the timeout or :data:`UNDO_WAIT`, whichever is longer.

    The detach is asked again every :data:`REDETACH` seconds while the DIMM stays: a
    guest given the eject request right as its DIMM arrived sometimes never acts on it
    (seen twice in about ten runs with libvirt 9.0, QEMU 7.2 and Linux 6.1 under TCG: the
    guest onlined the DIMM and logged nothing of an eject), and QEMU sends the request
    again for a repeated device_del."""
    lv, _ = binding()
    undo = plan.steps[0].undo
    assert undo is not None
    wait = max(c.timeout, UNDO_WAIT)
    name = plan.device_id or ""
    if progress is not None:
        progress(f"detaching {name} again: waiting up to {wait:g} s for the guest to "
                 f"release it")
    xml = str(undo.arguments["xml"])
    deadline = time.monotonic() + wait
    try:
        _call(c, undo.command, xml, flags, wait)
        asks = 1
        while not _wait_gone(c, name, min(REDETACH, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                out.rolled_back.append(f"{undo.command}: not finished in {wait:g} s "
                                       f"(asked {asks} times)")
                return
            if progress is not None:
                progress(f"{name} is still in the domain: asking libvirt to detach it "
                         f"again")
            with contextlib.suppress(lv.libvirtError, LibvirtError):
                _call(c, undo.command, xml, flags, max(1.0, deadline - time.monotonic()))
                asks += 1
        out.rolled_back.append(undo.command)
    except (lv.libvirtError, LibvirtError) as e:
        out.rolled_back.append(f"{undo.command} failed: {_one_line(e)}")


def _settle(c: Connection, plan: Plan, call: _Call, out: Outcome, flags: int, grace: float,
            progress: Progress | None, qemu_monitor: bool, why: str) -> str:
    """After an attach was given up on (``why``): wait up to ``grace`` seconds for it to
    return, undo it if it took effect, and say what the domain has now."""
    lv, _ = binding()
    name, cmd = plan.device_id, call.what
    if not call.done.is_set():
        if progress is not None:
            progress(f"{why}: waiting up to {grace:g} s for libvirt's {cmd} of {name} to "
                     f"return (libvirt cannot cancel it), to undo it")
        if not call.wait(grace):
            out.orphans = [name] if name is not None else []
            domain = c.dom.name()
            return (f"libvirt's {cmd} had not returned {grace:g} s later and is still "
                    f"running: {name} may yet be attached (libvirt lists it in the live XML "
                    f"already); see pyvhost mem status --libvirt {domain}, and remove it "
                    f"with pyvhost mem remove --libvirt {domain} {name}")
    assert call.ended is not None
    late = f"libvirt's {cmd} returned {call.ended - call.started:.1f} s after it was sent"
    if call.error is not None:
        if not isinstance(call.error, lv.libvirtError | LibvirtError):
            raise call.error
        _leftovers(c, plan, out, qemu_monitor)
        return f"{late}, failed ({_one_line(call.error)}); {_left(c, out, qemu_monitor)}"
    _undo(c, plan, flags, out, progress)
    _leftovers(c, plan, out, qemu_monitor)
    undone = [r for r in out.rolled_back if r == "detach-device"]
    if undone and not out.orphans:
        return f"{late}, with {name} attached; undone: detach-device {name}; " + _left(
            c, out, qemu_monitor)
    return f"{late}, with {name} attached; {'; '.join(out.rolled_back)}; " + _left(
        c, out, qemu_monitor)


def _left(c: Connection, out: Outcome, qemu_monitor: bool) -> str:
    """What ``out.orphans`` says the domain has, in words."""
    if out.orphans:
        return "left behind: " + ", ".join(out.orphans)
    where = "the live XML or in QEMU's /objects" if qemu_monitor else "the live XML"
    return f"nothing of it is left in {where}"


def _add_interrupted(c: Connection, plan: Plan, call: _Call, out: Outcome, flags: int,
                     grace: float, progress: Progress | None,
                     qemu_monitor: bool) -> Interrupted:
    """Undo an add interrupted while libvirt attached the DIMM or before it was
    verified; the exception to raise says what the domain has now."""
    name = plan.device_id
    where = "during attach-device" if not call.done.is_set() else "before the check"
    out.failed_step, out.error = "attach-device", "interrupted"
    with deferred_interrupts():
        try:
            text = _settle(c, plan, call, out, flags, grace, progress, qemu_monitor,
                           f"interrupted {where}")
        except (PyvhostError, binding()[0].libvirtError) as e:
            return Interrupted(f"interrupted {where} of {name}; could not look at what is "
                               f"left: {_one_line(e)} (see pyvhost mem status --libvirt "
                               f"{c.dom.name()})")
    return Interrupted(f"interrupted {where} of {name}; {text}")


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
    guest, then returns and finishes the removal when QEMU's DEVICE_DELETED comes). An
    interrupt raises :class:`~pyvhost.interrupts.Interrupted` saying what is left: a
    detach cannot be taken back."""
    try:
        start, out, _ = _one_step(c, plan)
        (step,) = plan.steps
        if out.failed_step is not None:
            out.seconds = time.monotonic() - start
            return out
        gone = _wait_gone(c, plan.device_id, timeout)
    except KeyboardInterrupt:
        raise _remove_interrupted(c, plan) from None
    if gone:
        out.done.append(step.command)
        out.ok = True
    else:
        out.timed_out = True
        out.failed_step = step.command
        out.error = (f"{plan.device_id} is still in the domain {timeout:g} s after "
                     f"detach-device: the guest did not release it")
    out.seconds = time.monotonic() - start
    return out


def _remove_interrupted(c: Connection, plan: Plan) -> Interrupted:
    name = plan.device_id
    with deferred_interrupts():
        try:
            present = name in _live_aliases(c)
        except (PyvhostError, binding()[0].libvirtError) as e:
            # libvirt 11.3 answers the look only once the detach's job has ended, and
            # gives up after 30 s ("cannot acquire state change lock"); 9.0 answers.
            return Interrupted(f"interrupted during the removal of {name}; could not look "
                               f"at what is left: {_one_line(e)}; a detach cannot be taken "
                               f"back; if {name} is still in the domain, run pyvhost mem "
                               f"remove --libvirt {c.dom.name()} {name} again to finish")
    if not present:
        return Interrupted(f"interrupted after {name} left the domain: removed")
    return Interrupted(f"interrupted while {name} was being detached: it is still in the "
                       f"live XML; a detach cannot be taken back and the guest may still "
                       f"release it; run pyvhost mem remove --libvirt {c.dom.name()} {name} "
                       f"again to finish")


__all__ = ["GRACE", "Connection", "LibvirtError", "LibvirtMonitor", "LibvirtStepError",
           "binding", "execute_libvirt_add", "execute_libvirt_remove", "host_facts",
           "libvirt_unsupported", "open_domain", "plan_libvirt_add", "plan_libvirt_remove",
           "read_libvirt"]
