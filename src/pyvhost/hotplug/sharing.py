"""Guest memory that vhost-user back-ends cannot share, and what really happens to it.
Pure: it reads a :class:`~.state.VmState` and says, per backend, what is wrong.

Two different failures, both accepted by QEMU and by libvirt 9.0 without a word
(measured with QEMU 7.2 and DPDK 22.11; the back-end's view is tested in
tests/hotplug/test_booted_guest.py):

- an fd-backed backend with ``share=off`` (libvirt: ``access='private'``): QEMU sends the
  back-end the region and its fd, the back-end maps the file, but QEMU mapped it
  MAP_PRIVATE, so the guest writes private copy-on-write pages the back-end never sees
  (24,122 non-zero guest pages in such a DIMM, 0 in DPDK's view). Packets the guest puts
  there are lost, and what the back-end writes there the guest does not read.
- ``memory-backend-ram`` (no fd): QEMU never tells the back-ends about it at all; a
  descriptor pointing there is outside every region the back-end has (dropped packets,
  or a device the back-end marks broken).

``mem status`` reports each such backend that is in use (boot RAM or behind a memory
device) as a problem with its id; the planner refuses to add more of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .state import MemoryBackend, VmState

BOOT_RAM_NOT_SHARED = "BOOT_RAM_NOT_SHARED"
NOT_SHARED_WITH_VHOST_USER = "NOT_SHARED_WITH_VHOST_USER"


@dataclass(frozen=True)
class Problem:
    """Memory in use that the VM's vhost-user back-ends cannot share."""

    code: str
    id: str  # the backend's id (QOM /objects/ID)
    device: str | None  # the memory device using it; None for boot RAM
    message: str


def shared(backend: MemoryBackend) -> bool:
    """Whether vhost-user back-ends see what the guest writes there."""
    return backend.fd_backed and backend.share


def unshared_effect(qom_type: str, share: bool) -> str:
    """What happens to packets in memory of this kind (for messages)."""
    if qom_type in ("memory-backend-memfd", "memory-backend-file") and not share:
        return ("QEMU sends the back-end this region and its fd and the back-end maps it, "
                "but the guest writes private copy-on-write pages the back-end never sees: "
                "packets placed there are lost or stale")
    return ("it has no fd, so QEMU never sends it to the back-ends: packet buffers the "
            "guest places there are outside every region the back-end has (lost packets)")


def memory_problems(state: VmState) -> tuple[Problem, ...]:
    """Every backend in use that the vhost-user devices cannot share (none without
    vhost-user devices)."""
    if not state.vhost_user:
        return ()
    names = ", ".join(d.id for d in state.vhost_user)
    out: list[Problem] = []
    boot = {b.id for b in state.boot_backends}
    by_memdev = {d.memdev: d.id for d in state.memory_devices if d.memdev}
    for b in state.backends:
        if shared(b) or (b.id not in boot and b.id not in by_memdev):
            continue
        what = f"{b.qom_type} share={'on' if b.share else 'off'}"
        effect = unshared_effect(b.qom_type, b.share)
        if b.id in boot:
            out.append(Problem(BOOT_RAM_NOT_SHARED, b.id, None,
                               f"boot RAM {b.id!r} is {what}: the vhost-user devices ({names}) "
                               f"cannot work on this VM; {effect}. Restart the VM with shared "
                               f"memory (-object memory-backend-memfd,...,share=on; libvirt: "
                               f"<memoryBacking><access mode='shared'/>)"))
        else:
            dev = by_memdev[b.id]
            out.append(Problem(NOT_SHARED_WITH_VHOST_USER, b.id, dev,
                               f"memory device {dev!r} (backend {b.id!r}) is {what}: {effect}, "
                               f"for the vhost-user devices ({names}). Remove it (pyvhost mem "
                               f"remove {dev}) and add shared memory instead"))
    return tuple(out)
