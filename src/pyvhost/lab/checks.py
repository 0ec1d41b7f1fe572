"""The lab's checks and its verdict: plain functions over the typed records of
:mod:`.records`, with no I/O (a failed check is a finding, reported, not an exception).

After every step:

- the back-end holds one fd and one mapping per region of all its tables, and no other
  fd than with every VM up before the first hot-plug (QEMU re-sends every region with a
  fresh fd on each SET_MEM_TABLE: a back-end that keeps them leaks);
- the back-end's table for VM 1 is exactly the regions QEMU's flat view says it sends;
- the other VMs' tables did not change;
- the guest saw the DIMM come (or go); or, for a hot-add QEMU refused, the back-end was
  left untouched (same table generation, fds and mappings) and nothing was left in QEMU;
- the continuous ping got more answers after the step.

After a live migration of VM 1 (``--migrate``, :func:`migration_checks`): the preflight
passed and QEMU completed it; the back-end wrote frames into the hot-added DIMMs while
QEMU copied the VM, and the stream they carried arrived intact in the migrated guest; no
ping was lost but at the switchover (:func:`pings_check`); the source's connection,
regions and dirty log are gone once it quit; the destination's table is what its QEMU
sends, one fd and one mapping per region.

The verdict (:func:`judge`) adds what only the whole run shows: pings lost, frames the
switch dropped, what the back-end still holds after the VMs quit, DIMMs not added.
"""

from __future__ import annotations

from .config import HOTPLUG_VM
from .records import (
    Backend,
    BackendUsage,
    Check,
    Migration,
    PingCounts,
    PingResult,
    PortCounters,
    Step,
    Summary,
    TrafficWait,
    Usage,
    Verdict,
)


def leak_checks(backend: Backend, baseline: Usage) -> list[Check]:
    """One fd and one mapping per region of all the back-end's tables, no other fd."""
    u, regions = backend.usage, backend.regions_held
    return [
        Check("one mapping per region", u.ram_mappings == regions,
              f"{u.ram_mappings} guest RAM mappings for {regions} regions"),
        Check("one fd per region", u.ram_fds == regions,
              f"{u.ram_fds} guest RAM fds for {regions} regions"),
        Check("no other fd", u.other_fds == baseline.other_fds,
              f"{u.other_fds} other fds, {baseline.other_fds} at baseline"),
    ]


def table_checks(step: Step, before: Step) -> list[Check]:
    """VM 1's table is what QEMU sends; the other VMs' tables did not move."""
    assert step.backend is not None and before.backend is not None
    sent = sorted((r.guest_phys_addr, r.memory_size)
                  for r in (step.qemu_memory.vhost_user_regions if step.qemu_memory else ()))
    vm1 = step.backend.hotplug_vm
    held = sorted((r.guest_phys_addr, r.memory_size) for r in (vm1.regions if vm1 else ()))
    others = (set(step.backend.connections) | set(before.backend.connections)) - {HOTPLUG_VM}
    same = all(step.backend.generation(vm) == before.backend.generation(vm) for vm in others)
    return [Check("table is what QEMU sends", sent == held,
                  f"back-end {len(held)} regions, QEMU's flat view {len(sent)}"),
            Check("other VMs' tables unchanged", same, "")]


def outcome_checks(step: Step, before: Step) -> list[Check]:
    """A hot-plug QEMU carried out shows in the guest; one it refused changed nothing."""
    assert step.qemu is not None and step.backend is not None and before.backend is not None
    if step.qemu.ok:
        g = step.guest
        return [Check("guest sees the DIMM" if step.action != "remove" else "guest let it go",
                      g is not None and bool(g.reached),
                      f"MemTotal {g.before_kib if g else '?'} -> "
                      f"{g.mem_total_kib if g else '?'} KiB")]
    vm1, vm1_before = step.backend.hotplug_vm, before.backend.hotplug_vm
    same = ((vm1.generation if vm1 else None) == (vm1_before.generation if vm1_before else None)
            and step.backend.usage == before.backend.usage)
    return [Check("refused hot-plug left the back-end untouched", same,
                  f"QEMU: {step.qemu.error}; the back-end's table generation, fds and "
                  f"mappings {'as before' if same else 'changed'}"),
            Check("nothing left behind in QEMU", not step.qemu.orphans,
                  f"orphans: {list(step.qemu.orphans)}")]


def traffic_check(traffic: TrafficWait) -> Check:
    c = traffic.counts
    return Check("traffic flows after the step", c.received >= traffic.wanted,
                 f"{c.received}/{c.sent} pings answered so far")


def step_checks(step: Step, before: Step, baseline: Usage) -> tuple[Check, ...]:
    """Every check of a hot-plug step QEMU was asked to run; ``before`` is the last step
    that was measured, ``baseline`` what the back-end held before the first hot-plug."""
    assert step.backend is not None
    checks = leak_checks(step.backend, baseline) + table_checks(step, before)
    checks += outcome_checks(step, before)
    if step.traffic is not None:
        checks.append(traffic_check(step.traffic))
    return tuple(checks)


def pings_check(m: Migration) -> Check:
    """Pings continue across a migration: the destination answers, and no ping is lost
    but at the switchover, where the source's stopped queues dropped at least as many
    frames (port_down) as pings were lost. Frames for VM 1 sent between the source's
    stop and the destination's start have no ring anywhere: any back-end drops them.
    A ping lost anywhere else, or more lost than the source dropped, fails."""
    port_down = m.source_drops.get("port_down", 0)
    other = m.pings_lost - m.pings_lost_switchover
    ok = other == 0 and m.pings_lost_switchover <= port_down and m.pings_answered_after > 0
    return Check("pings continue", ok,
                 f"{m.pings_sent} pings, {m.pings_lost} lost ({m.pings_lost_switchover} sent "
                 f"at the switchover, when the source's port dropped {port_down} frames "
                 f"port_down), {m.pings_answered_after} answered after it, longest gap "
                 f"{m.longest_gap} s")


def migration_checks(step: Step, before: Step, baseline: Usage) -> tuple[Check, ...]:
    """Every check of a migrate step (VM 1 is the destination in ``step.backend``)."""
    m = step.migration
    assert m is not None and step.backend is not None
    checks = [
        Check("preflight passed", not m.refusals,
              "; ".join(f"{r.code}: {r.message}" for r in m.refusals) or "no refusal"),
        Check("migration completed", m.ok,
              m.error or f"total {m.total_time} s, downtime {m.downtime} s"),
        Check("frames written into hot-added memory while migrating", m.dimm_frames > 0,
              f"{m.dimm_frames} frames ({m.dimm_bytes} bytes) into the DIMMs; "
              f"{m.log_marks} ranges marked in the dirty log"),
        Check("nothing written past the dirty log", m.log_overflows == 0,
              f"{m.log_overflows} writes past a log covering {m.log_size * 8 * 4096} bytes"),
        Check("stream intact in the migrated guest", m.stream_intact,
              f"{m.stream_bytes} bytes, MD5 {m.stream_md5} (sent: {m.stream_expected_md5})"),
        pings_check(m),
        Check("source released", m.source_gone and m.log_held == 0,
              f"source connection {'closed' if m.source_gone else 'still open'}; "
              f"{m.log_held} dirty-log fds and mappings held"),
    ]
    return tuple(checks + leak_checks(step.backend, baseline)
                 + table_checks(step, before))


def judge(steps: tuple[Step, ...], pings: tuple[PingResult, ...], continuous: PingCounts,
          switch: tuple[PortCounters, ...], switch_at_baseline: tuple[PortCounters, ...],
          backend: BackendUsage, dimms_wanted: int) -> Verdict:
    """The run's verdict: every failed check, and what only the whole run shows."""
    problems = [f"step {s.index} ({s.action} {s.device or ''}): {c.name}: {c.detail}"
                for s in steps for c in s.checks if not c.ok]
    lost = continuous.lost + sum(p.sent - p.received for p in pings)
    migrated = [s.migration for s in steps if s.migration is not None]
    # Pings lost at a migration's switchover are its check's (pings_check), not a problem.
    switchover = sum(m.pings_lost_switchover for m in migrated
                     if pings_check(m).ok)
    if lost - switchover:
        problems.append(f"{lost - switchover} pings lost")
    dropped = _drops(switch) - _drops(switch_at_baseline)
    for m in migrated:
        # Port sets differ across a migration (the source's port leaves, the
        # destination's joins): count before and after it, each on its own ports.
        dropped -= m.drops_after - m.drops_before
    if dropped:
        problems.append(f"the switch dropped {dropped} frames after the VMs were up")
    if any(p.exit_code for p in pings):
        problems.append("a ping between VMs failed")
    gone = backend.after_vms
    released = gone.fds == backend.before_vms.fds and gone.ram_mappings == 0
    if not released:
        problems.append(f"after the VMs quit the back-end holds {gone.fds} fds "
                        f"({backend.before_vms.fds} before they started) and "
                        f"{gone.ram_mappings} guest RAM mappings")
    added = sum(1 for s in steps if s.action == "add" and s.done)
    if added < dimms_wanted:
        problems.append(f"only {added} of {dimms_wanted} DIMMs were hot-added")
    summary = Summary(
        dimms_added=added,
        dimms_removed=sum(1 for s in steps if s.action == "remove" and s.done),
        pings_sent=continuous.sent + sum(p.sent for p in pings),
        pings_lost=lost, frames_dropped=dropped, released_after_vms=released,
        migrated=any(m.ok for m in migrated), pings_lost_switchover=switchover)
    return Verdict(summary, tuple(problems))


def _drops(ports: tuple[PortCounters, ...]) -> int:
    return sum(p.drops for p in ports)
