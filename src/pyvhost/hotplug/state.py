"""QEMU's memory state, read through QMP into frozen dataclasses (:func:`read_state`).

Owns reading only: memory devices (``query-memory-devices``), memory backends
(``qom-list /objects`` and ``qom-get`` of each backend's properties: type, size, share,
mem-path, hugetlb, host-nodes, policy, prealloc), the hot-plug limits (``qom-get
/machine memory``: size, slots, max-size), guest NUMA nodes (HMP ``info numa``), the
vhost-user devices (``qom-list /machine/peripheral*``, HMP ``info network`` for netdev
types, ``/chardevs/ID addr`` for their socket) and the flat memory view (HMP ``info mtree
-f``) from which :mod:`.flatview` counts vhost-user regions the way QEMU does.

What QMP does not tell: a vhost-user back-end's memory-slot limit. QEMU learns whether it
negotiated CONFIGURE_MEM_SLOTS only at connection; ``x-query-virtio-status`` shows the
protocol features only once the guest driver has started the device. Before that,
:attr:`VhostUserDevice.configure_mem_slots` is None (unknown).

It must not change anything in QEMU and must not decide: :mod:`.plan` does.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from .flatview import FlatRange, VhostRegion, parse_flat_view, vhost_user_regions
from .qemu_rules import BASELINE_REGIONS as BASELINE_REGIONS
from .qemu_rules import Version
from .qmp import Monitor, QmpCommandError, parse_version

FD_BACKENDS = ("memory-backend-memfd", "memory-backend-file")
# hw/virtio/vhost-user.c: without CONFIGURE_MEM_SLOTS a back-end gets at most
# VHOST_MEMORY_BASELINE_NREGIONS regions; with it, min(GET_MAX_MEM_SLOTS, the cap of the
# QEMU version: :mod:`.qemu_rules`).
CONFIGURE_MEM_SLOTS = "VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS"
_NETDEV = re.compile(r"^\s*\\ (\S+): index=\d+,type=([\w-]+)(?:,.* to (\S+))?")
_NUMA_NODES = re.compile(r"^(\d+) nodes")


@dataclass(frozen=True)
class MemoryBackend:
    id: str
    qom_type: str
    size: int
    share: bool
    mem_path: str | None
    hugetlb: bool  # memory-backend-memfd hugetlb=on
    hugetlbsize: int  # 0: the host's default hugepage size
    host_nodes: tuple[int, ...]
    policy: str
    prealloc: bool

    @property
    def fd_backed(self) -> bool:
        """QEMU has an fd for it, so vhost-user back-ends are told about it."""
        return self.qom_type in FD_BACKENDS


@dataclass(frozen=True)
class MemoryDevice:
    id: str | None
    kind: str  # "dimm", "nvdimm", "virtio-mem", "virtio-pmem", "sgx-epc"
    memdev: str | None  # backend id
    addr: int | None
    size: int
    slot: int | None
    node: int | None
    hotplugged: bool
    hotpluggable: bool
    # virtio-mem only (None for DIMMs): ``size`` is what the guest has plugged now.
    requested_size: int | None = None
    block_size: int | None = None
    max_size: int | None = None
    # virtio-mem only: the QOM path of the bus it sits on (``parent_bus``), which decides
    # whether device_del can take it away at all (q35's root bus pcie.0 cannot).
    bus: str | None = None


@dataclass(frozen=True)
class VhostUserDevice:
    id: str
    qom_path: str
    driver: str
    chardev: str | None
    socket: str | None
    started: bool
    configure_mem_slots: bool | None  # None: unknown until the guest driver starts it
    qemu_region_count: int | None  # QEMU's own n-mem-sections, when started

    @property
    def region_limit(self) -> int | None:
        """QEMU's limit for this device when it is known (8 without CONFIGURE_MEM_SLOTS);
        None when unknown: not started yet, or CONFIGURE_MEM_SLOTS negotiated, since QEMU
        takes min(GET_MAX_MEM_SLOTS, its cap) and keeps the back-end's answer to itself
        (no QMP command shows it; DPDK 26.07 answers 8, libvhost-user 32, pyvhost 509).
        """
        if self.configure_mem_slots is False:
            return BASELINE_REGIONS
        return None


@dataclass(frozen=True)
class VmState:
    status: str
    boot_memory: int
    slots: int
    maxmem: int
    plugged_memory: int
    numa_nodes: int
    backends: tuple[MemoryBackend, ...]
    memory_devices: tuple[MemoryDevice, ...]
    vhost_user: tuple[VhostUserDevice, ...]
    flat_view: tuple[FlatRange, ...]
    object_ids: tuple[str, ...]
    device_ids: tuple[str, ...]
    qemu_version: Version | None = None  # query-version; None when not known

    def backend(self, backend_id: str) -> MemoryBackend | None:
        return next((b for b in self.backends if b.id == backend_id), None)

    def device(self, device_id: str) -> MemoryDevice | None:
        return next((d for d in self.memory_devices if d.id == device_id), None)

    @property
    def slots_used(self) -> int:
        return sum(1 for d in self.memory_devices if d.slot is not None)

    @property
    def maxmem_left(self) -> int:
        return max(0, self.maxmem - self.boot_memory - self.plugged_memory)

    @property
    def boot_backends(self) -> tuple[MemoryBackend, ...]:
        """Backends mapped in the flat view but not by a memory device: boot RAM."""
        mapped = {r.name for r in self.flat_view if r.kind == "ram"}
        used = {d.memdev for d in self.memory_devices}
        return tuple(b for b in self.backends if b.id in mapped and b.id not in used)


def page_size(backend: MemoryBackend, base_page_size: int, default_hugepage: int | None,
              mem_path_page: int | None = None) -> int:
    """The page size of a backend's RAMBlock (what QEMU rounds vhost-user regions to)."""
    if backend.qom_type == "memory-backend-memfd" and backend.hugetlb:
        return backend.hugetlbsize or default_hugepage or base_page_size
    if backend.qom_type == "memory-backend-file" and mem_path_page:
        return mem_path_page
    return base_page_size


def vhost_regions(state: VmState, page_sizes: dict[str, int]) -> tuple[VhostRegion, ...]:
    """The regions QEMU sends every vhost-user back-end now (see :mod:`.flatview`)."""
    fd = {b.id: page_sizes.get(b.id, 4096) for b in state.backends if b.fd_backed}
    return vhost_user_regions(state.flat_view, fd)


def _children(monitor: Monitor, path: str) -> list[tuple[str, str]]:
    try:
        props = monitor.execute("qom-list", {"path": path})
    except QmpCommandError:
        return []
    return [(p["name"], p["type"][6:-1]) for p in props if p["type"].startswith("child<")]


def _get(monitor: Monitor, path: str, prop: str, default: Any = None) -> Any:
    try:
        return monitor.execute("qom-get", {"path": path, "property": prop})
    except QmpCommandError:
        return default


def _backend(monitor: Monitor, oid: str, qom_type: str) -> MemoryBackend:
    path = f"/objects/{oid}"
    mem_path = _get(monitor, path, "mem-path") if qom_type == "memory-backend-file" else None
    return MemoryBackend(
        id=oid, qom_type=qom_type, size=int(_get(monitor, path, "size", 0)),
        share=bool(_get(monitor, path, "share", False)), mem_path=mem_path,
        hugetlb=bool(_get(monitor, path, "hugetlb", False)),
        hugetlbsize=int(_get(monitor, path, "hugetlbsize", 0) or 0),
        host_nodes=tuple(int(n) for n in _get(monitor, path, "host-nodes", []) or []),
        policy=str(_get(monitor, path, "policy", "default")),
        prealloc=bool(_get(monitor, path, "prealloc", False)))


def _memory_device(entry: dict[str, Any]) -> MemoryDevice:
    data = entry.get("data", {})
    memdev = data.get("memdev")
    if isinstance(memdev, str) and memdev.startswith("/objects/"):
        memdev = memdev.removeprefix("/objects/")
    size = data.get("size", data.get("max-size", 0))

    def opt(key: str) -> int | None:
        value = data.get(key)
        return None if value is None else int(value)

    return MemoryDevice(id=data.get("id"), kind=str(entry.get("type")), memdev=memdev,
                        addr=data.get("addr", data.get("memaddr")), size=int(size),
                        slot=data.get("slot"), node=data.get("node"),
                        hotplugged=bool(data.get("hotplugged")),
                        hotpluggable=bool(data.get("hotpluggable")),
                        requested_size=opt("requested-size"), block_size=opt("block-size"),
                        max_size=opt("max-size"))


def _with_bus(monitor: Monitor, dev: MemoryDevice) -> MemoryDevice:
    """A virtio-mem device with the bus it sits on (DIMMs are on none)."""
    if dev.kind != "virtio-mem" or dev.id is None:
        return dev
    bus = _get(monitor, f"/machine/peripheral/{dev.id}", "parent_bus")
    return dataclasses.replace(dev, bus=str(bus) if bus else None)


def _netdevs(info_network: str) -> dict[str, tuple[str, str | None]]:
    """netdev id -> (type, chardev) from HMP ``info network``."""
    out: dict[str, tuple[str, str | None]] = {}
    for line in info_network.splitlines():
        m = _NETDEV.match(line)
        if m is not None:
            out[m.group(1)] = (m.group(2), m.group(3))
    return out


def _virtio_status(monitor: Monitor) -> dict[str, dict[str, Any]]:
    """qdev path -> x-query-virtio-status (experimental in 7.2; absent is fine)."""
    out: dict[str, dict[str, Any]] = {}
    try:
        devices = monitor.execute("x-query-virtio")
    except QmpCommandError:
        return out
    for dev in devices:
        try:
            status = monitor.execute("x-query-virtio-status", {"path": dev["path"]})
        except QmpCommandError:
            continue
        out[str(dev["path"]).removesuffix("/virtio-backend")] = status
    return out


def _vhost_user(monitor: Monitor) -> tuple[list[VhostUserDevice], list[str]]:
    netdevs = _netdevs(monitor.hmp("info network"))
    virtio = _virtio_status(monitor)
    found: list[VhostUserDevice] = []
    ids: list[str] = []
    for container in ("/machine/peripheral", "/machine/peripheral-anon"):
        for name, qom_type in _children(monitor, container):
            path = f"{container}/{name}"
            if container.endswith("peripheral"):
                ids.append(name)
            chardev: str | None = None
            if qom_type.startswith("vhost-user-"):
                chardev = _get(monitor, path, "chardev")
            elif qom_type.startswith("virtio-net"):
                netdev = _get(monitor, path, "netdev")
                kind, chardev = netdevs.get(str(netdev), ("", None))
                if kind != "vhost-user":
                    continue
            else:
                continue
            socket = None
            if chardev:
                addr = _get(monitor, f"/chardevs/{chardev}", "addr")
                if isinstance(addr, dict):
                    socket = addr.get("path")
            status = virtio.get(path, {})
            vhost = status.get("vhost-dev")
            slots: bool | None = None
            count: int | None = None
            if isinstance(vhost, dict):
                protocols = vhost.get("protocol-features", {}).get("protocols", [])
                slots = any(str(p).startswith(CONFIGURE_MEM_SLOTS) for p in protocols)
                count = vhost.get("n-mem-sections")
            found.append(VhostUserDevice(
                id=name, qom_path=path, driver=qom_type, chardev=chardev, socket=socket,
                started=bool(status.get("vhost-started", False)),
                configure_mem_slots=slots, qemu_region_count=count))
    # qom-list walks a hash table: its order changes as devices come and go. Sorted, the
    # devices (and every message naming them) read the same from one call to the next.
    return sorted(found, key=lambda d: d.id), ids


def read_state(monitor: Monitor) -> VmState:
    """One consistent-enough snapshot of QEMU's memory state (nothing is changed)."""
    memory = monitor.execute("qom-get", {"path": "/machine", "property": "memory"})
    summary = monitor.execute("query-memory-size-summary")
    objects = _children(monitor, "/objects")
    backends = tuple(_backend(monitor, oid, t) for oid, t in objects
                     if t.startswith("memory-backend-"))
    devices = tuple(_with_bus(monitor, _memory_device(e))
                    for e in monitor.execute("query-memory-devices"))
    vhost, device_ids = _vhost_user(monitor)
    numa = _NUMA_NODES.match(monitor.hmp("info numa").strip())
    status = monitor.execute("query-status")
    version = parse_version(monitor.execute("query-version"))
    size = int(memory["size"])
    return VmState(
        status=str(status.get("status")), boot_memory=size,
        slots=int(memory.get("slots", 0)), maxmem=int(memory.get("max-size", size)),
        plugged_memory=int(summary.get("plugged-memory", 0)),
        numa_nodes=int(numa.group(1)) if numa else 0,
        backends=backends, memory_devices=devices, vhost_user=tuple(vhost),
        flat_view=parse_flat_view(monitor.hmp("info mtree -f")),
        object_ids=tuple(oid for oid, _ in objects), device_ids=tuple(device_ids),
        qemu_version=version)
