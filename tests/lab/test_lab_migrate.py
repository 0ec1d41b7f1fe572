"""``pyvhost lab --migrate`` against real QEMU 10.0 (the QEMU 10.0 pass; deselected on 7.2,
whose TCG migration loses guest writes: NEEDS_QEMU_9) TCG guests on a real ``pyvhost
net``. A ping sent at the switchover can be lost (the source's queues stop, and frames
for VM 1 are dropped as port_down until the destination runs): the migration's ping
check accepts it only then, and only when the source's port dropped at least as many
frames (under CPU load, 1 run of 12 lost one). DIMMs hot-added into VM 1 under ping,
then VM 1 live-migrated to a second QEMU started with migrate-args' arguments on another
socket of the same switch, while VM 2 streams into it. The report is validated against
``pyvhost.lab/1`` and read check by check: the frames the back-end wrote into the DIMMs
while QEMU copied the VM, the stream's MD5 in the migrated guest, the pings across, the
source's connection and dirty log gone once it quit, the destination's table equal to
what its QEMU sends."""

from __future__ import annotations

import pytest

from pyvhost.lab.config import LabConfig
from pyvhost.lab.image import GuestImage

from .test_lab import _check_step_usage, image, run_report  # noqa: F401 - fixture

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def test_lab_migrates_vm1_with_its_hot_added_memory(image: GuestImage) -> None:  # noqa: F811
    report = run_report(LabConfig(dimms=2, migrate=True, accel="tcg"), image)
    assert report["config"]["migrate"] is True
    (step,) = [s for s in report["steps"] if s["action"] == "migrate"]
    m = step["migration"]
    print(f"\nmigration: total {m['total_time']} s, downtime {m['downtime']} s; "
          f"{m['dimm_frames']} frames into the DIMMs, {m['log_marks']} marks; stream "
          f"{m['stream_bytes']} bytes {'intact' if m['stream_intact'] else 'CORRUPTED'}; "
          f"pings {m['pings_lost']}/{m['pings_sent']} lost ({m['pings_lost_switchover']} at "
          f"the switchover; source dropped {m['source_drops']}), longest gap "
          f"{m['longest_gap']} s")
    assert step["ok"], [c for c in step["checks"] if not c["ok"]]
    names = {c["name"] for c in step["checks"]}
    assert {"migration completed", "stream intact in the migrated guest", "pings continue",
            "source released", "table is what QEMU sends",
            "frames written into hot-added memory while migrating"} <= names
    assert m["refusals"] == [] and m["ok"] and m["status"] == "completed"
    assert m["dimm_frames"] > 0 and m["log_marks"] >= m["dimm_frames"]
    assert m["stream_intact"] and m["stream_bytes"] > 0
    assert m["source_gone"] and m["log_held"] == 0
    assert m["pings_answered_after"] > 0
    assert m["pings_lost"] == m["pings_lost_switchover"] <= m["source_drops"].get("port_down", 0)
    assert m["destination_pid"] in report["pids"]["qemu"]
    assert m["source_pid"] not in report["pids"]["qemu"]
    # The destination holds the source's table: boot RAM and both DIMMs, one fd each.
    _check_step_usage(report, step)
    assert len(step["backend"]["regions"]) == 3
    assert report["ok"], report["problems"]
    assert report["summary"]["migrated"] is True
    assert report["summary"]["released_after_vms"] is True
