"""The ``pyvhost.lab/1`` JSON document, made from the typed records of a run: the one place
that knows its field names. The schema is ``pyvhost/schemas/lab.1.json`` and the fields
are explained in ``docs/lab-json.md``; a change that removes or retypes a field is a new
schema version.

VM numbers in the document count from 1; sizes are bytes, times seconds.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from .config import BOOT_MEMORY, HOTPLUG_VM, LabConfig
from .records import (
    Backend,
    Migration,
    PingCounts,
    PingResult,
    PortCounters,
    QemuMemory,
    Report,
    Step,
    Timing,
    Usage,
)

SCHEMA = "pyvhost.lab/1"


def report_json(r: Report) -> dict[str, Any]:
    """The whole run."""
    b = r.backend
    return {
        "schema": SCHEMA,
        "config": config_json(r.config),
        "image": {"directory": str(r.image.directory),
                  "kernel_release": r.image.kernel_release},
        "run_directory": r.run_directory,
        "pids": {"pyvhost_net": r.net_pid, "qemu": list(r.qemu_pids)},
        "accel": {"requested": r.config.accel, "used": r.accel.accel,
                  "reason": r.accel.reason, "trial_seconds": r.accel.trial_seconds},
        "backend": {"before_vms": usage_json(b.before_vms), "baseline": usage_json(b.baseline),
                    "after": usage_json(b.after), "after_vms": usage_json(b.after_vms)},
        "pings": [ping_json(p) for p in r.pings],
        "protocol_features": {str(n): list(f) for n, f in sorted(r.protocol_features.items())},
        "switch_at_baseline": [port_json(p) for p in r.switch_at_baseline],
        "continuous_ping": counts_json(r.continuous_ping),
        "switch": [port_json(p) for p in r.switch],
        "seconds": r.seconds,
        "steps": [step_json(s) for s in r.steps],
        "summary": asdict(r.verdict.summary),
        "problems": list(r.verdict.problems),
        "ok": r.ok,
    }


def config_json(c: LabConfig) -> dict[str, Any]:
    return {"vms": c.vms, "dimms": c.dimms, "dimm_size": c.dimm_size, "unplug": c.unplug,
            "mem_slots": c.mem_slots, "probe_limit": c.probe_limit, "slots": c.slot_count,
            "maxmem": c.maxmem_bytes, "boot_memory": BOOT_MEMORY,
            "addresses": [c.ip(i) for i in range(c.vms)], "hotplug_vm": HOTPLUG_VM + 1,
            "accel": c.accel, "migrate": c.migrate}


def step_json(s: Step) -> dict[str, Any]:
    """One step; what was not measured (a step the planner refused) is left out."""
    out: dict[str, Any] = {
        "index": s.index, "action": s.action, "device": s.device, "ok": s.ok,
        "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in s.checks],
        "pings": None if s.pings is None else counts_json(s.pings)}
    if s.planner is not None:
        p = s.planner
        out["planner"] = {
            "refused": p.refused,
            "refusals": [{"code": str(r.code), "message": r.message} for r in p.refusals],
            "predicted_regions": p.predicted_regions, "region_limit": p.region_limit}
        q = s.qemu
        out["qemu"] = None if q is None else {
            "ok": q.ok, "done": list(q.done), "failed_step": q.failed_step, "error": q.error,
            "rolled_back": list(q.rolled_back), "orphans": list(q.orphans),
            "acpi_ost": [dict(e) for e in q.acpi_ost], "seconds": q.seconds}
    if s.backend is not None:
        out["backend"] = backend_json(s.backend)
    if s.qemu_memory is not None:
        out["qemu_memory"] = qemu_memory_json(s.qemu_memory)
    if s.guest is not None:
        out["guest"] = {"mem_total_kib": s.guest.mem_total_kib,
                        "mem_total_delta_kib": s.guest.delta_kib}
    if s.timing is not None:
        out["timing"] = timing_json(s.timing)
    if s.migration is not None:
        out["migration"] = migration_json(s.migration)
    return out


def migration_json(m: Migration) -> dict[str, Any]:
    """A migrate step's record (field by field: docs/lab-json.md)."""
    out = {k: v for k, v in asdict(m).items() if k != "refusals"}
    out["refusals"] = [{"code": str(r.code), "message": r.message} for r in m.refusals]
    out["stream_intact"] = m.stream_intact
    return out


def usage_json(u: Usage) -> dict[str, int]:
    return {"fds": u.fds, "guest_ram_fds": u.ram_fds, "mappings": u.mappings,
            "guest_ram_mappings": u.ram_mappings}


def backend_json(b: Backend) -> dict[str, Any]:
    """The back-end process, and its table for VM 1 (the other VMs' region counts)."""
    vm1 = b.hotplug_vm
    return {
        **usage_json(b.usage),
        "table_generation": None if vm1 is None else vm1.generation,
        "regions": [{"guest_phys_addr": r.guest_phys_addr, "memory_size": r.memory_size,
                     "fds_held": r.fds_held} for r in (vm1.regions if vm1 else ())],
        "other_vms_regions": {str(vm + 1): len(c.regions)
                              for vm, c in b.connections.items() if vm != HOTPLUG_VM}}


def qemu_memory_json(m: QemuMemory) -> dict[str, Any]:
    return {"devices": [{"id": d.id, "memdev": d.memdev, "addr": d.addr, "size": d.size,
                         "slot": d.slot} for d in m.devices],
            "plugged_memory": m.plugged_memory,
            "vhost_user_regions": [{"guest_phys_addr": r.guest_phys_addr,
                                    "memory_size": r.memory_size, "memdev": r.memdev}
                                   for r in m.vhost_user_regions]}


def timing_json(t: Timing) -> dict[str, Any]:
    """The command, and each time that was seen."""
    return {k: v for k, v in asdict(t).items() if v is not None}


def counts_json(c: PingCounts) -> dict[str, int]:
    return {"sent": c.sent, "received": c.received, "lost": c.lost}


def ping_json(p: PingResult) -> dict[str, int]:
    return {"from": p.from_vm_number, "to": p.to_vm_number, "sent": p.sent,
            "received": p.received, "exit_code": p.exit_code}


def port_json(p: PortCounters) -> dict[str, Any]:
    return {"vm": p.vm_number, "rx_frames": p.rx_frames, "tx_frames": p.tx_frames,
            "rx_drops": dict(p.rx_drops), "tx_drops": dict(p.tx_drops)}
