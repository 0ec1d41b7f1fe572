"""The hot-plug planner: request + QEMU's state + host facts -> steps, or refusals. Pure.

No I/O here: :mod:`.state` and :mod:`.host` read, :mod:`.execute` acts. A plan lists its
QMP steps in order, each with the step that undoes it; the executor runs the undo steps of
the done ones, last first, when anything fails. A refused plan still carries the steps it
would run (``--dry-run`` shows them; tests force them past the planner to see QEMU's own
verdict), but the executor runs it only when forced.

Every refusal has a stable code (:class:`Code`) and a message that says what to change.
The checks are the ones QEMU (7.2 and 10.0, measured: tests/hotplug) does late, badly
worded, or not at all: a DIMM QEMU does not share with vhost-user back-ends is accepted and
onlined by the guest, yet the back-ends never see what the guest writes there
(:mod:`.sharing`); the vhost-user region limit counts flat-view regions, not DIMMs
(:mod:`.flatview`); hugepages short fail ``object-add`` with "Cannot allocate memory".
Messages name the QEMU version that runs (``query-version``, :mod:`.qemu_rules`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, Literal, TypeVar

from pyvhost.units import MiB

from .host import HostFacts
from .qemu_rules import rules_for
from .regions import region_limit_info
from .sharing import BOOT_RAM_NOT_SHARED, memory_problems, unshared_effect
from .state import BASELINE_REGIONS, MemoryDevice, VmState, vhost_regions

# Linux x86-64 onlines hot-added memory in 128 MiB blocks (memory_block_size_bytes);
# the rest of a DIMM that is not a whole number of blocks is never used by the guest.
GUEST_BLOCK = 128 * MiB

BackendKind = Literal["memfd", "file", "ram"]
Policy = Literal["default", "preferred", "bind", "interleave"]


class Code(StrEnum):
    NO_SLOTS_CONFIGURED = "NO_SLOTS_CONFIGURED"
    NO_FREE_SLOT = "NO_FREE_SLOT"
    MAXMEM_EXCEEDED = "MAXMEM_EXCEEDED"
    SIZE_ALIGNMENT = "SIZE_ALIGNMENT"
    ID_IN_USE = "ID_IN_USE"
    NOT_SHARED_WITH_VHOST_USER = "NOT_SHARED_WITH_VHOST_USER"
    BOOT_RAM_NOT_SHARED = "BOOT_RAM_NOT_SHARED"
    VHOST_USER_REGION_LIMIT = "VHOST_USER_REGION_LIMIT"
    HUGEPAGES_SHORT = "HUGEPAGES_SHORT"
    MEM_PATH_MISSING = "MEM_PATH_MISSING"
    MEM_PATH_NOT_HUGETLBFS = "MEM_PATH_NOT_HUGETLBFS"
    NUMA_NODE_OUT_OF_RANGE = "NUMA_NODE_OUT_OF_RANGE"
    HOST_NODE_MISSING = "HOST_NODE_MISSING"
    BAD_REQUEST = "BAD_REQUEST"
    DEVICE_NOT_FOUND = "DEVICE_NOT_FOUND"
    NOT_VIRTIO_MEM = "NOT_VIRTIO_MEM"
    VIRTIO_MEM_SIZE_EXCEEDED = "VIRTIO_MEM_SIZE_EXCEEDED"
    VIRTIO_MEM_PLUGGED = "VIRTIO_MEM_PLUGGED"


CodeT = TypeVar("CodeT", bound=StrEnum)


@dataclass(frozen=True)
class Refusal(Generic[CodeT]):
    """One reason a preflight refuses: a code of its module's ``Code`` (this module's for
    hot-plug, :mod:`.migrate`'s for a migration) and a sentence for people."""

    code: CodeT
    message: str


@dataclass(frozen=True)
class Step:
    """One QMP command; ``wait_deleted`` names the device whose DEVICE_DELETED ends it,
    ``wait_size`` the (device id, size) a virtio-mem device must reach to end it."""

    command: str
    arguments: Mapping[str, Any]
    undo: Step | None = None
    wait_deleted: str | None = None
    wait_size: tuple[str, int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"command": self.command, "arguments": dict(self.arguments),
                "undo": self.undo.to_json() if self.undo else None}


@dataclass(frozen=True)
class AddRequest:
    size: int
    backend: BackendKind = "memfd"
    share: bool = True
    mem_path: str | None = None
    hugepages: bool = False
    node: int | None = None
    host_nodes: tuple[int, ...] = ()
    policy: Policy | None = None
    prealloc: bool = False
    prealloc_threads: int | None = None
    id: str | None = None
    # The limit to assume for a vhost-user device whose limit QMP cannot tell (not started
    # by the guest yet, or its back-end negotiated CONFIGURE_MEM_SLOTS and QEMU keeps its
    # GET_MAX_MEM_SLOTS answer): 8 is right for every back-end (:mod:`.regions`).
    assume_region_limit: int = BASELINE_REGIONS


@dataclass(frozen=True)
class Prediction:
    """What the VM will look like after the plan (what status would show)."""

    slots_used: int
    maxmem_left: int
    vhost_user_regions: int | None  # None without vhost-user devices
    vhost_user_region_limit: int | None
    # The limit is --region-limit for some device (its back-end's is not known).
    vhost_user_region_limit_assumed: bool = False


@dataclass(frozen=True)
class Plan:
    action: Literal["add", "remove", "resize"]
    device_id: str
    backend_id: str | None
    steps: tuple[Step, ...]
    refusals: tuple[Refusal[Code], ...] = ()
    prediction: Prediction | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def refused(self) -> bool:
        return bool(self.refusals)

    def undo_steps(self, done: int | None = None) -> tuple[Step, ...]:
        """The undo steps of the first ``done`` steps (all by default), last first."""
        n = len(self.steps) if done is None else done
        return tuple(s.undo for s in reversed(self.steps[:n]) if s.undo is not None)


def _size_text(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _free_id(taken: set[str], prefix: str) -> str:
    i = 0
    while f"{prefix}{i}" in taken or f"{prefix}{i}-mem" in taken:
        i += 1
    return f"{prefix}{i}"


def backend_page_size(req: AddRequest, host: HostFacts) -> int:
    """The page size the new backend will have."""
    if req.backend == "memfd" and req.hugepages:
        return host.default_hugepage_size or host.base_page_size
    if req.backend == "file" and host.mem_path and host.mem_path.hugetlb_page_size:
        return host.mem_path.hugetlb_page_size
    return host.base_page_size


def region_limit(state: VmState, assume: int) -> tuple[int | None, list[str]]:
    """QEMU's vhost-user region limit (the minimum over devices), and notes on guesses
    (:func:`.regions.region_limit_info` says whether it is assumed)."""
    info = region_limit_info(state, assume)
    return info.limit, list(info.notes)


def plan_add(req: AddRequest, state: VmState, host: HostFacts,
             page_sizes: Mapping[str, int] | None = None) -> Plan:
    """Plan ``object-add`` + ``device_add pc-dimm`` for ``req``; refuse what would go wrong.

    ``page_sizes`` maps existing backend ids to their page sizes (for region counting of
    hugepage-backed memory); 4 KiB is assumed for those missing.
    """
    r: list[Refusal[Code]] = []
    taken = set(state.object_ids) | set(state.device_ids)
    device_id = req.id or _free_id(taken, "pyvhost-dimm")
    backend_id = f"{device_id}-mem"

    if req.size <= 0:
        r.append(Refusal(Code.BAD_REQUEST, "--size must be positive"))
    if req.backend != "file" and req.mem_path is not None:
        r.append(Refusal(Code.BAD_REQUEST, "--mem-path needs --backend file"))
    if req.backend == "file" and req.mem_path is None:
        r.append(Refusal(Code.BAD_REQUEST, "--backend file needs --mem-path PATH"))
    if req.backend == "ram" and req.hugepages:
        r.append(Refusal(Code.BAD_REQUEST,
                         "--hugepages needs --backend memfd or --backend file"))
    if req.policy not in (None, "default") and not req.host_nodes:
        r.append(Refusal(Code.BAD_REQUEST, f"--policy {req.policy} needs --host-nodes"))

    # Slots and maxmem: QEMU refuses these itself, with less guidance.
    if state.slots == 0:
        r.append(Refusal(Code.NO_SLOTS_CONFIGURED,
                         "QEMU was started without memory hot-plug slots: restart it with "
                         "-m SIZE,slots=N,maxmem=MAX (hot-plug cannot be enabled later)"))
    elif state.slots_used >= state.slots:
        r.append(Refusal(Code.NO_FREE_SLOT,
                         f"all {state.slots} memory slots are in use: remove a DIMM "
                         f"(pyvhost mem remove ID) or restart QEMU with more slots="))
    if state.slots and req.size > state.maxmem_left:
        r.append(Refusal(Code.MAXMEM_EXCEEDED,
                         f"{_size_text(req.size)} exceeds what maxmem leaves: "
                         f"{_size_text(state.maxmem_left)} of maxmem="
                         f"{_size_text(state.maxmem)} (boot {_size_text(state.boot_memory)}"
                         f" + plugged {_size_text(state.plugged_memory)}); ask for at most "
                         f"{_size_text(state.maxmem_left)} or restart QEMU with a larger "
                         f"maxmem"))

    page = backend_page_size(req, host)
    if req.size > 0 and req.size % page:
        r.append(Refusal(Code.SIZE_ALIGNMENT,
                         f"{req.size} bytes is not a multiple of the backend's page size "
                         f"{_size_text(page)}"))
    elif req.size > 0 and req.size % GUEST_BLOCK:
        rounded = max(GUEST_BLOCK, req.size // GUEST_BLOCK * GUEST_BLOCK)
        r.append(Refusal(Code.SIZE_ALIGNMENT,
                         f"{_size_text(req.size)} is not a multiple of 128M: the guest "
                         f"(Linux x86-64) onlines memory in 128 MiB blocks and would never "
                         f"use the rest; round to {_size_text(rounded)}"))

    if req.id is not None:
        for kind, oid in (("device", device_id), ("object", backend_id)):
            if oid in taken:
                r.append(Refusal(Code.ID_IN_USE,
                                 f"a QEMU {kind} named {oid!r} already exists: choose "
                                 f"another --id"))

    # vhost-user: every piece of guest RAM must reach the back-ends.
    notes: list[str] = []
    regions: int | None = None
    limit: int | None = None
    assumed = False
    if state.vhost_user:
        names = ", ".join(d.id for d in state.vhost_user)
        if req.backend == "ram" or not req.share:
            effect = unshared_effect(f"memory-backend-{req.backend}", req.share)
            r.append(Refusal(Code.NOT_SHARED_WITH_VHOST_USER,
                             f"vhost-user devices ({names}) cannot share this memory: QEMU "
                             f"(and libvirt) would accept the DIMM and the guest would use "
                             f"it, but {effect}; use --backend memfd or file, with share "
                             f"on"))
        for p in memory_problems(state):
            if p.code == BOOT_RAM_NOT_SHARED:
                r.append(Refusal(Code.BOOT_RAM_NOT_SHARED, p.message))
            else:
                notes.append(f"already wrong on this VM: {p.message}")
        regions = len(vhost_regions(state, dict(page_sizes or {})))
        info = region_limit_info(state, req.assume_region_limit)
        limit, assumed = info.limit, info.assumed
        notes += info.notes
        if limit is not None and regions >= limit:
            how = (" (assumed: --region-limit, since QEMU does not show the back-end's own "
                   "limit)" if assumed else "")
            r.append(Refusal(Code.VHOST_USER_REGION_LIMIT,
                             f"vhost-user devices ({names}) already get {regions} memory "
                             f"regions, their limit is {limit}{how}: QEMU "
                             f"{info.rules.name} refuses another memory device "
                             f"(\"{info.rules.region_refusal}\"). Remove a DIMM, use fewer "
                             f"larger DIMMs, or use a back-end with CONFIGURE_MEM_SLOTS"))

    # Host side: NUMA nodes, hugepages, mem-path.
    if req.node is not None and req.node >= max(state.numa_nodes, 1):
        r.append(Refusal(Code.NUMA_NODE_OUT_OF_RANGE,
                         f"guest NUMA node {req.node} does not exist: the guest has "
                         f"{state.numa_nodes} node(s) (0..{max(state.numa_nodes, 1) - 1})"))
    missing = [n for n in req.host_nodes if n not in host.host_nodes]
    if missing:
        r.append(Refusal(Code.HOST_NODE_MISSING,
                         f"host NUMA node(s) {missing} do not exist; the host has "
                         f"{list(host.host_nodes)}"))
    mp = host.mem_path
    if req.backend == "file" and mp is not None and not mp.exists:
        r.append(Refusal(Code.MEM_PATH_MISSING,
                         f"--mem-path {mp.path} does not exist on the host: create it "
                         f"(a directory on hugetlbfs or tmpfs) or mount hugetlbfs there"))
    if req.backend == "file" and req.hugepages and mp is not None and mp.fstype != "hugetlbfs":
        r.append(Refusal(Code.MEM_PATH_NOT_HUGETLBFS,
                         f"--hugepages asked, but {mp.path} is on {mp.fstype or 'no mount'}, "
                         f"not hugetlbfs: mount -t hugetlbfs none DIR and pass that DIR"))
    # Hugepages are used by memfd hugetlb=on, or by a file on hugetlbfs (asked or not).
    uses_hugepages = (req.backend == "memfd" and req.hugepages) or bool(
        req.backend == "file" and mp is not None and mp.hugetlb_page_size)
    if uses_hugepages and req.size > 0:
        needed = -(-req.size // page)
        nodes: list[int | None] = list(req.host_nodes) if req.policy == "bind" else [None]
        have = 0
        for n in nodes:
            pool = host.pool(page, n)
            have += pool.available if pool else 0
        where = f"host node(s) {req.host_nodes}" if req.policy == "bind" else "the host"
        if have < needed:
            r.append(Refusal(Code.HUGEPAGES_SHORT,
                             f"{needed} hugepages of {_size_text(page)} needed, {have} free "
                             f"on {where}: raise nr_hugepages (/sys/kernel/mm/hugepages/"
                             f"hugepages-{page // 1024}kB/nr_hugepages, or per node under "
                             f"/sys/devices/system/node/nodeN/hugepages) or ask for less"))

    obj: dict[str, Any] = {"qom-type": f"memory-backend-{req.backend}", "id": backend_id,
                           "size": req.size}
    if req.backend != "ram":
        obj["share"] = req.share
    if req.backend == "file":
        obj["mem-path"] = req.mem_path
    if req.backend == "memfd" and req.hugepages:
        obj["hugetlb"] = True
        obj["hugetlbsize"] = page
    if req.host_nodes:
        obj["host-nodes"] = list(req.host_nodes)
        obj["policy"] = req.policy or "bind"
    if req.prealloc:
        obj["prealloc"] = True
        if req.prealloc_threads:
            obj["prealloc-threads"] = req.prealloc_threads
    dimm: dict[str, Any] = {"driver": "pc-dimm", "id": device_id, "memdev": backend_id}
    if req.node is not None:
        dimm["node"] = req.node
    steps = (
        Step("object-add", obj, undo=Step("object-del", {"id": backend_id})),
        Step("device_add", dimm,
             undo=Step("device_del", {"id": device_id}, wait_deleted=device_id)),
    )
    adds_region = req.backend != "ram"
    prediction = Prediction(
        slots_used=state.slots_used + 1, maxmem_left=state.maxmem_left - req.size,
        vhost_user_regions=None if regions is None else regions + int(adds_region),
        vhost_user_region_limit=limit, vhost_user_region_limit_assumed=assumed)
    return Plan("add", device_id, backend_id, steps, tuple(r), prediction, tuple(notes))


def plan_remove(device_id: str, state: VmState) -> Plan:
    """Plan ``device_del`` (wait for DEVICE_DELETED) then ``object-del`` of its backend.

    A DIMM, or a virtio-mem device where the QEMU version unplugs those (10.0, not 7.2)
    and nothing is plugged or requested in it. An id that names a memory backend no
    device and no boot RAM uses (what an add cut short can leave) plans its ``object-del``
    alone."""
    dev = state.device(device_id)
    if dev is None:
        backend = state.backend(device_id)
        used = {d.memdev for d in state.memory_devices} | {
            b.id for b in state.boot_backends}
        if backend is not None and backend.id not in used:
            return Plan("remove", device_id, backend.id,
                        (Step("object-del", {"id": backend.id}),), (),
                        Prediction(state.slots_used, state.maxmem_left, None, None),
                        (f"{device_id} is a memory backend no device uses: it is deleted",))
        return Plan("remove", device_id, None, (), (_not_found(device_id, state),))
    if dev.kind == "virtio-mem":
        refusal = _virtio_mem_unplug_refusal(dev, state)
        if refusal is not None:
            return Plan("remove", device_id, dev.memdev, (), (refusal,))
    steps = [Step("device_del", {"id": device_id}, wait_deleted=device_id)]
    if dev.memdev is not None:
        steps.append(Step("object-del", {"id": dev.memdev}))
    prediction = Prediction(state.slots_used - (dev.slot is not None),
                            state.maxmem_left + dev.size, None, None)
    return Plan("remove", device_id, dev.memdev, tuple(steps), (), prediction)


#: q35's root bus: a device on it cannot be hot-unplugged ("Bus 'pcie.0' does not support
#: hotplugging", QEMU 7.2 and 10.0).
ROOT_BUS = "pcie.0"


def _virtio_mem_unplug_refusal(dev: MemoryDevice, state: VmState) -> Refusal[Code] | None:
    """Why QEMU would refuse device_del of virtio-mem device ``dev``, if it would."""
    rules, _ = rules_for(state.qemu_version)
    shrink = f"pyvhost mem resize --qmp SOCK {dev.id} --size 0"
    if not rules.virtio_mem_unplug:
        return Refusal(Code.BAD_REQUEST,
                       f"{dev.id} is a virtio-mem device: QEMU {rules.name} cannot unplug "
                       f"it (\"virtio based memory devices cannot be unplugged\"); shrink "
                       f"it instead ({shrink})")
    if dev.bus is not None and dev.bus.rsplit("/", 1)[-1] == ROOT_BUS:
        return Refusal(Code.BAD_REQUEST,
                       f"{dev.id} is a virtio-mem device on {ROOT_BUS}, q35's root bus, "
                       f"which has no hot-unplug: QEMU {rules.name} refuses device_del "
                       f"there; shrink it instead ({shrink}), or give virtio-mem devices "
                       f"you mean to remove a pcie-root-port (-device pcie-root-port,"
                       f"id=rp1 and bus=rp1)")
    requested = dev.requested_size or 0
    if dev.size or requested:
        return Refusal(Code.VIRTIO_MEM_PLUGGED,
                       f"{dev.id} still has {_size_text(dev.size)} plugged and "
                       f"{_size_text(requested)} requested: QEMU {rules.name} unplugs a "
                       f"virtio-mem device only when both are 0; shrink it first "
                       f"({shrink}), then remove it")
    return None


def _not_found(device_id: str, state: VmState) -> Refusal[Code]:
    known = ", ".join(d.id for d in state.memory_devices if d.id) or "none"
    return Refusal(Code.DEVICE_NOT_FOUND,
                   f"no memory device {device_id!r} (memory devices: {known})")


def plan_resize(device_id: str, size: int, state: VmState) -> Plan:
    """Plan ``qom-set requested-size`` of a virtio-mem device, ended by its
    MEMORY_DEVICE_SIZE_CHANGE to ``size``; undone by setting the old requested size.

    QEMU checks alignment and the maximum itself (a ``qom-set`` error); the planner says
    what to ask for instead, and refuses growing memory that vhost-user back-ends could
    not reach.
    """
    dev = state.device(device_id)
    if dev is None:
        return Plan("resize", device_id, None, (), (_not_found(device_id, state),))
    if dev.kind != "virtio-mem":
        return Plan("resize", device_id, dev.memdev, (), (Refusal(
            Code.NOT_VIRTIO_MEM,
            f"{device_id} is a {dev.kind} device: only virtio-mem devices are resized; "
            f"add or remove DIMMs with pyvhost mem add / remove"),))
    r: list[Refusal[Code]] = []
    notes: list[str] = []
    block = dev.block_size or 0
    max_size = dev.max_size if dev.max_size is not None else dev.size
    if size < 0:
        r.append(Refusal(Code.BAD_REQUEST, "--size must not be negative"))
    elif block and size % block:
        lo = size // block * block
        r.append(Refusal(Code.SIZE_ALIGNMENT,
                         f"{_size_text(size)} is not a multiple of {device_id}'s block size "
                         f"{_size_text(block)}: ask for {_size_text(lo)} or "
                         f"{_size_text(lo + block)}"))
    if size > max_size:
        r.append(Refusal(Code.VIRTIO_MEM_SIZE_EXCEEDED,
                         f"{_size_text(size)} exceeds {device_id}'s maximum "
                         f"{_size_text(max_size)} (the size of its memdev, fixed when QEMU "
                         f"started): ask for at most {_size_text(max_size)}"))
    current = dev.requested_size if dev.requested_size is not None else dev.size
    backend = state.backend(dev.memdev) if dev.memdev else None
    if (state.vhost_user and size > current and backend is not None
            and not (backend.fd_backed and backend.share)):
        names = ", ".join(d.id for d in state.vhost_user)
        r.append(Refusal(Code.NOT_SHARED_WITH_VHOST_USER,
                         f"{device_id}'s memdev {backend.id} is not an fd shared with the "
                         f"vhost-user devices ({names}): "
                         f"{unshared_effect(backend.qom_type, backend.share)}; do not grow "
                         f"it"))
    if state.status != "running":
        notes.append(f"the VM is {state.status}: the guest's virtio-mem driver changes the "
                     f"plugged size only while it runs")
    path = f"/machine/peripheral/{device_id}"
    step = Step("qom-set", {"path": path, "property": "requested-size", "value": size},
                undo=Step("qom-set", {"path": path, "property": "requested-size",
                                      "value": current}),
                wait_size=(device_id, size))
    prediction = Prediction(state.slots_used, state.maxmem_left, None, None)
    return Plan("resize", device_id, dev.memdev, (step,), tuple(r), prediction, tuple(notes))
