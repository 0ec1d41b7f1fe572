"""Hand-built QEMU states and host facts for planner tests (no QEMU)."""

from __future__ import annotations

from dataclasses import replace

from pyvhost.hotplug.flatview import FlatRange
from pyvhost.hotplug.host import HostFacts, HugepagePool, PathFacts
from pyvhost.hotplug.state import MemoryBackend, MemoryDevice, VhostUserDevice, VmState

MiB = 1 << 20
GiB = 1 << 30
BOOT = 256 * MiB


def backend(bid: str, size: int = 128 * MiB, qom_type: str = "memory-backend-memfd",
            share: bool = True) -> MemoryBackend:
    return MemoryBackend(bid, qom_type, size, share, None, False, 0, (), "default", False)


def dimm(did: str, slot: int, size: int = 128 * MiB) -> MemoryDevice:
    return MemoryDevice(did, "dimm", f"{did}-mem", 4 * GiB + slot * size, size, slot, 0,
                        True, True)


def vhost(configure_mem_slots: bool | None = None) -> VhostUserDevice:
    return VhostUserDevice("net0", "/machine/peripheral/net0", "virtio-net-pci", "c0",
                           "vh.sock", configure_mem_slots is not None, configure_mem_slots,
                           None)


def boot_view(name: str = "ram0", size: int = BOOT) -> list[FlatRange]:
    """q35's flat view of boot RAM below 4 GiB, as ``info mtree -f`` shows it."""
    return [FlatRange(0, 0xC0000, "ram", name, 0),
            FlatRange(0xC0000, 0x20000, "rom", "pc.rom", 0),
            FlatRange(0xE0000, 0x20000, "rom", "pc.bios", 0x20000),
            FlatRange(0x100000, size - 0x100000, "ram", name, 0x100000),
            FlatRange(0xFFFC0000, 0x40000, "rom", "pc.bios", 0)]


def vm(*, dimms: int = 0, slots: int = 8, maxmem: int = 4 * GiB, numa_nodes: int = 0,
       vhost_user: tuple[VhostUserDevice, ...] = (),
       boot: MemoryBackend | None = None,
       qemu_version: tuple[int, int, int] | None = (7, 2, 22)) -> VmState:
    boot = boot or backend("ram0", BOOT)
    devices = tuple(dimm(f"d{i}", i) for i in range(dimms))
    view = boot_view(boot.id) + [FlatRange(d.addr or 0, d.size, "ram", f"{d.id}-mem", 0)
                                 for d in devices]
    backends = (boot, *(backend(f"{d.id}-mem") for d in devices))
    return VmState("prelaunch", BOOT, slots, maxmem, sum(d.size for d in devices), numa_nodes,
                   backends, devices, vhost_user, tuple(view),
                   tuple(b.id for b in backends), tuple(d.id or "" for d in devices),
                   qemu_version)


def host(*, free_2m: int = 0, nodes: tuple[int, ...] = (0,), node_free: int = 0,
         mem_path: PathFacts | None = None) -> HostFacts:
    pools = [HugepagePool(2 * MiB, None, free_2m, free_2m)]
    pools += [HugepagePool(2 * MiB, n, node_free, node_free) for n in nodes]
    return HostFacts(4096, 2 * MiB, nodes, tuple(pools), mem_path)


def with_status(state: VmState, status: str) -> VmState:
    return replace(state, status=status)
