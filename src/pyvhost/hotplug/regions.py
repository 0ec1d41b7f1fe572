"""vhost-user region accounting for the planner and ``mem status``: the limit QEMU applies
(the smallest over the vhost-user devices), for the QEMU version that runs, and whether
that limit is known or assumed. Pure.

What QEMU knows and QMP shows: whether a started device's back-end negotiated
CONFIGURE_MEM_SLOTS (``x-query-virtio-status``). Without it the limit is 8, exactly. With
it QEMU takes min(GET_MAX_MEM_SLOTS, its cap) and keeps the back-end's answer to itself;
back-ends answer anything from 8 (DPDK 26.07) through 32 (libvhost-user, SPDK) to 509
(pyvhost, rust-vmm). So the limit of such a device, and of a device the guest has not
started (QMP cannot tell then), is an assumption: ``--region-limit`` (default 8, safe for
every back-end), capped by the version's cap, and the plan says it is assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

from .qemu_rules import BASELINE_REGIONS, QemuRules, rules_for
from .state import VmState


@dataclass(frozen=True)
class RegionLimit:
    limit: int | None  # None without vhost-user devices
    assumed: bool  # some device's limit is --region-limit, not known
    notes: tuple[str, ...]
    rules: QemuRules


def region_limit_info(state: VmState, assume: int) -> RegionLimit:
    """QEMU's vhost-user region limit for ``state``, assuming ``assume`` where unknown."""
    rules, warning = rules_for(state.qemu_version)
    limits: list[int] = []
    notes: list[str] = [warning] if warning and state.vhost_user else []
    assumed = False
    capped = min(assume, rules.max_ram_slots)
    for dev in state.vhost_user:
        if dev.configure_mem_slots is False:
            limits.append(BASELINE_REGIONS)
            continue
        assumed = True
        limits.append(capped)
        if dev.configure_mem_slots:
            notes.append(f"{dev.id}: its back-end negotiated CONFIGURE_MEM_SLOTS, so QEMU "
                         f"takes the back-end's GET_MAX_MEM_SLOTS answer (capped at "
                         f"{rules.max_ram_slots} by QEMU {rules.name}), which no QMP command "
                         f"shows; assuming {capped} regions (--region-limit N with the "
                         f"back-end's own figure: DPDK 26.07 answers 8, libvhost-user 32, "
                         f"pyvhost 509)")
        else:
            notes.append(f"{dev.id}: the guest has not started this device, so QMP cannot "
                         f"tell whether its back-end has CONFIGURE_MEM_SLOTS; assuming a "
                         f"limit of {capped} regions (--region-limit changes it)")
    return RegionLimit(min(limits) if limits else None, assumed, tuple(notes), rules)
