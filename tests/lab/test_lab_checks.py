"""The lab's checks, verdict and JSON document on typed records made here (no QEMU): each
check fails for the fault it is there for, and every document the records make is valid
``pyvhost.lab/1`` while a document with a field missing, retyped or added is not.

Real runs (``test_lab.py``) produce and validate the same document from real guests.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from pyvhost import schemas
from pyvhost.hotplug.plan import Code, Refusal
from pyvhost.lab import checks
from pyvhost.lab.accel import AccelChoice
from pyvhost.lab.config import LabConfig
from pyvhost.lab.document import report_json, step_json
from pyvhost.lab.image import GuestImage, KernelPackage
from pyvhost.lab.records import (
    Backend,
    BackendUsage,
    Connection,
    GuestMemory,
    MemoryDevice,
    MemoryUpdate,
    Migration,
    PingCounts,
    PingResult,
    PlannerVerdict,
    PortCounters,
    QemuMemory,
    QemuOutcome,
    Region,
    Report,
    SentRegion,
    Step,
    Timing,
    TrafficWait,
    Usage,
)

MiB = 1 << 20
BOOT = Region(0, 256 * MiB, 1)
DIMM = Region(4 << 30, 128 * MiB, 1)
VALIDATOR = jsonschema.Draft202012Validator(schemas.load("pyvhost.lab/1"))


def conn(regions: tuple[Region, ...], generation: int, pid: int = 100,
         update: MemoryUpdate | None = None) -> Connection:
    return Connection(f"vm{pid}", pid, ("REPLY_ACK", "STATUS"), generation, regions, update)


def backend(vm1: tuple[Region, ...], gen1: int = 1, gen2: int = 1, other_fds: int = 20,
            extra_ram: int = 0) -> Backend:
    ram = len(vm1) + 1 + extra_ram
    return Backend(Usage(other_fds + ram, ram, 230 + ram, ram),
                   {0: conn(vm1, gen1), 1: conn((BOOT,), gen2, pid=101)})


def sent(*regions: Region) -> QemuMemory:
    return QemuMemory(
        (MemoryDevice("pyvhost-dimm0", "pyvhost-dimm0-mem", DIMM.guest_phys_addr,
                      DIMM.memory_size, 0),) if DIMM in regions else (),
        DIMM.memory_size if DIMM in regions else 0,
        tuple(SentRegion(r.guest_phys_addr, r.memory_size,
                         "ram0" if r is BOOT else "pyvhost-dimm0-mem") for r in regions))


BASELINE = Step(0, "baseline", None, backend=backend((BOOT,)), qemu_memory=sent(BOOT),
                guest=GuestMemory(157456, 0))
OUTCOME = QemuOutcome(True, ("object-add", "device_add"), None, None, (), (),
                      ({"device": "pyvhost-dimm0", "status": 0},), 0.04)
PLANNER = PlannerVerdict((), 2, 8)


def added(**changes: Any) -> Step:
    """A hot-add that went right, with ``changes``."""
    step = Step(1, "add", "pyvhost-dimm0", planner=PLANNER, qemu=OUTCOME,
                backend=backend((BOOT, DIMM), gen1=2), qemu_memory=sent(BOOT, DIMM),
                guest=GuestMemory(288528, 131072, reached=True),
                timing=Timing("device_add", 0.0045, "SET_MEM_TABLE", 0.003, 0.0003, True,
                              0.0042, 0.038, 0.078),
                traffic=TrafficWait(4, PingCounts(4, 4)), pings=PingCounts(4, 4))
    return replace(step, **changes)


def checked(step: Step) -> Step:
    """``step`` with its checks, held to the baseline."""
    assert BASELINE.backend is not None
    return replace(step, checks=checks.step_checks(step, BASELINE, BASELINE.backend.usage))


def failed(step: Step) -> list[str]:
    return [c.name for c in checked(step).checks if not c.ok]


def test_a_good_step_passes_every_check() -> None:
    step = added()
    names = [c.name for c in checked(step).checks]
    assert names == ["one mapping per region", "one fd per region", "no other fd",
                     "table is what QEMU sends", "other VMs' tables unchanged",
                     "guest sees the DIMM", "traffic flows after the step"]
    assert failed(step) == []


@pytest.mark.parametrize("step, check", [
    # The leak: an old fd and its mapping kept after SET_MEM_TABLE.
    (added(backend=backend((BOOT, DIMM), gen1=2, extra_ram=1)),
     ["one mapping per region", "one fd per region"]),
    (added(backend=backend((BOOT, DIMM), gen1=2, other_fds=21)), ["no other fd"]),
    (added(backend=backend((BOOT,), gen1=2)), ["table is what QEMU sends"]),
    (added(backend=backend((BOOT, DIMM), gen1=2, gen2=2)), ["other VMs' tables unchanged"]),
    (added(guest=GuestMemory(157456, 0, reached=False)), ["guest sees the DIMM"]),
    (added(traffic=TrafficWait(8, PingCounts(9, 5))), ["traffic flows after the step"]),
], ids=["leaked-fd", "other-fd", "table-not-sent", "other-vm-moved", "guest-blind",
        "pings-stalled"])
def test_each_check_catches_its_fault(step: Step, check: list[str]) -> None:
    assert failed(step) == check


def test_a_refused_hot_add_must_leave_the_back_end_untouched() -> None:
    refused = QemuOutcome(False, ("object-add",), "device_add", "no free memory slots left",
                          ("object-del",), (), (), 0.01)
    same = added(qemu=refused, backend=BASELINE.backend, qemu_memory=sent(BOOT),
                 guest=GuestMemory(157456, 0))
    assert failed(same) == []
    moved = replace(same, backend=backend((BOOT,), gen1=2))
    assert failed(moved) == ["refused hot-plug left the back-end untouched"]
    orphan = replace(same, qemu=replace(refused, orphans=("pyvhost-dimm0-mem",)))
    assert failed(orphan) == ["nothing left behind in QEMU"]


RELEASED = Usage(9, 0, 234, 0)  # after the VMs quit: as before they started


def report(steps: tuple[Step, ...], lost: int = 0, drops: int = 0,
           after_vms: Usage = RELEASED) -> Report:
    ports = (PortCounters(1, 50, 50, {}, {}), PortCounters(2, 50, 50 - drops,
                                                           {"port_down": drops} if drops else {},
                                                           {}))
    usage = BackendUsage(Usage(9, 0, 233, 0), Usage(25, 2, 236, 2), Usage(27, 3, 237, 3),
                         after_vms)
    config = LabConfig(dimms=1)
    image = GuestImage(Path("/cache/guest/k"), "k", Path("/cache/guest/k/vmlinuz"),
                       Path("/cache/guest/k/initrd.cpio"),
                       KernelPackage("linux-image-6.1.0-28-cloud-amd64", "6.1.119-1"),
                       "6.1.0-28-cloud-amd64", ("virtio",))
    pings = (PingResult(1, 2, 3, 3, 0), PingResult(2, 1, 3, 3, 0))
    continuous = PingCounts(30, 30 - lost)
    switch_base = (PortCounters(1, 5, 5, {}, {}), PortCounters(2, 5, 5, {}, {}))
    verdict = checks.judge(steps, pings, continuous, ports, switch_base, usage, config.dimms)
    return Report(config, image, "/tmp/pyvhost-lab-x", 4242, (4243, 4244),
                  AccelChoice("tcg", "KVM did not boot the guest here before (cached)"),
                  usage, pings, {1: ("REPLY_ACK",), 2: ("REPLY_ACK",)}, switch_base,
                  continuous, ports, 12.5, steps, verdict)


def test_the_verdict() -> None:
    good = report((BASELINE, checked(added())))
    assert good.ok and good.verdict.summary.dimms_added == 1
    assert good.verdict.summary.pings_sent == 36
    bad = report((BASELINE, checked(added(backend=backend((BOOT, DIMM), gen1=2,
                                                          extra_ram=1)))),
                 lost=2, drops=3, after_vms=Usage(10, 1, 235, 1))
    assert not bad.ok
    assert [p.split(":")[0] for p in bad.verdict.problems] == [
        "step 1 (add pyvhost-dimm0)", "step 1 (add pyvhost-dimm0)", "2 pings lost",
        "the switch dropped 3 frames after the VMs were up",
        "after the VMs quit the back-end holds 10 fds (9 before they started) and 1 guest "
        "RAM mappings"]
    assert report((BASELINE,)).verdict.problems == ("only 0 of 1 DIMMs were hot-added",)


def test_the_document_is_valid_and_the_schema_is_strict() -> None:
    planner_refused = Step(2, "add", "pyvhost-dimm1",
                           planner=PlannerVerdict((Refusal(Code.VHOST_USER_REGION_LIMIT,
                                                           "8 regions"),), 9, 8),
                           pings=PingCounts(8, 8))
    doc = report_json(report((BASELINE, checked(added()), planner_refused)))
    VALIDATOR.validate(doc)
    assert doc["steps"][2]["qemu"] is None and "backend" not in doc["steps"][2]
    assert doc["steps"][1]["timing"]["backend_inside_command"] is True
    assert doc["summary"]["dimms_added"] == 1 and doc["ok"] is True

    def broken(change: Any) -> dict[str, Any]:
        d = copy.deepcopy(doc)
        change(d)
        return d

    for bad in (broken(lambda d: d["steps"][1].pop("backend")),
                broken(lambda d: d["steps"][1]["backend"].update(fds="26")),
                broken(lambda d: d["steps"][0].update(planner=d["steps"][1]["planner"])),
                broken(lambda d: d["steps"][2].update(backend=d["steps"][1]["backend"])),
                broken(lambda d: d.update(extra=1)),
                broken(lambda d: d["summary"].pop("pings_lost")),
                broken(lambda d: d["steps"][1]["timing"].pop("backend_seconds"))):
        assert not VALIDATOR.is_valid(bad)


def test_a_step_without_timing_details_is_still_valid() -> None:
    step = added(timing=Timing("device_del"), action="remove")
    out = step_json(step)
    assert out["timing"] == {"command": "device_del"}
    doc = report_json(report((BASELINE, step)))
    VALIDATOR.validate(doc)


def migration(**changes: Any) -> Migration:
    """A migration that went right (pings answered all along), with ``changes``."""
    m = Migration(
        uri="unix:/tmp/m.sock", refusals=(), ok=True, status="completed", error=None,
        total_time=1.4, downtime=0.004, setup_time=0.003, seconds=1.5, transferred=100 << 20,
        dirty_sync_count=4, resumed_after=0.007, source_pid=4243, destination_pid=4250,
        dimm_frames=100, dimm_bytes=125000, log_size=139264, log_marks=280,
        log_overflows=0, pings_sent=8, pings_lost=0, longest_gap=0.3,
        pings_lost_switchover=0, pings_answered_after=3, source_drops={},
        stream_bytes=900000, stream_md5="a", stream_expected_md5="a", source_gone=True,
        log_held=0, drops_before=0, drops_after=0)
    return replace(m, **changes)


@pytest.mark.parametrize("changes, ok", [
    ({}, True),
    # Sent at the switchover and lost, with the source's stopped queue dropping frames:
    # what any back-end does (seen in CI: 1 ping, 6 frames port_down).
    ({"pings_lost": 1, "pings_lost_switchover": 1, "source_drops": {"port_down": 6}}, True),
    # Lost elsewhere (before the switchover, or after it: the destination not answering).
    ({"pings_lost": 1}, False),
    ({"pings_lost": 2, "pings_lost_switchover": 1, "source_drops": {"port_down": 6}}, False),
    # Put down to the switchover, yet the source dropped nothing there: not explained.
    ({"pings_lost": 1, "pings_lost_switchover": 1}, False),
    ({"pings_lost": 2, "pings_lost_switchover": 2, "source_drops": {"port_down": 1}}, False),
    # Nothing answered once the migration ended: pings did not continue.
    ({"pings_answered_after": 0}, False),
], ids=["clean", "switchover", "lost-elsewhere", "one-more-than-switchover",
        "switchover-without-drops", "more-than-dropped", "no-answer-after"])
def test_pings_across_a_migration(changes: dict[str, Any], ok: bool) -> None:
    check = checks.pings_check(migration(**changes))
    assert check.name == "pings continue" and check.ok is ok, check.detail


def test_the_verdict_leaves_switchover_losses_to_the_migration_check() -> None:
    def migrated(m: Migration) -> Step:
        return Step(2, "migrate", "qemu-4250", migration=m,
                    checks=(checks.pings_check(m),))

    at_switchover = migration(pings_lost=1, pings_lost_switchover=1,
                              source_drops={"port_down": 6})
    good = report((BASELINE, checked(added()), migrated(at_switchover)), lost=1)
    assert good.ok, good.verdict.problems
    assert (good.verdict.summary.pings_lost, good.verdict.summary.pings_lost_switchover) \
        == (1, 1)
    # One more lost elsewhere in the run: that one is a problem.
    bad = report((BASELINE, checked(added()), migrated(at_switchover)), lost=2)
    assert "1 pings lost" in bad.verdict.problems
    # A migration whose own check failed excuses nothing.
    unexplained = migration(pings_lost=1, pings_lost_switchover=1)
    worse = report((BASELINE, checked(added()), migrated(unexplained)), lost=1)
    assert "1 pings lost" in worse.verdict.problems
    assert any(p.startswith("step 2 (migrate qemu-4250): pings continue")
               for p in worse.verdict.problems)
