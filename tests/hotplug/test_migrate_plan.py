"""The migration preflight and the destination's arguments, on hand-built QEMU states (no
QEMU): each refusal code from the one thing that causes it, and arguments that recreate
exactly what the source has."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from pyvhost.hotplug.migrate import (
    Code,
    MigrationFacts,
    VhostLogging,
    destination_args,
    preflight,
)
from pyvhost.hotplug.state import MemoryBackend, VmState

from .states import GiB, MiB, backend, dimm, vhost, vm

LOGS = VhostLogging(offers_log_all=True, offers_log_shmfd=True, log_enabled=False, log_size=0)
SRC_FACTS = MigrationFacts("running", None, (), {"c0": True}, {"net0": LOGS})
DST_FACTS = MigrationFacts("inmigrate", None, (), {"c0": True}, {})


def pair(dimms: int = 2) -> tuple[VmState, VmState]:
    """A source with ``dimms`` hot-added DIMMs and a destination made to match."""
    src = vm(dimms=dimms, vhost_user=(vhost(True),))
    dst = replace(src, memory_devices=tuple(replace(d, hotplugged=False)
                                            for d in src.memory_devices))
    return src, dst


def codes(src: VmState, dst: VmState, src_facts: MigrationFacts = SRC_FACTS,
          dst_facts: MigrationFacts = DST_FACTS) -> list[Code]:
    return [r.code for r in preflight(src, src_facts, dst, dst_facts).refusals]


def test_a_matching_destination_passes() -> None:
    src, dst = pair()
    result = preflight(src, SRC_FACTS, dst, DST_FACTS)
    assert result.refusals == () and not result.refused


def test_a_missing_dimm_is_refused() -> None:
    src, dst = pair(3)
    dst = replace(dst, memory_devices=dst.memory_devices[:2])
    (refusal,) = preflight(src, SRC_FACTS, dst, DST_FACTS).refusals
    assert refusal.code is Code.DEST_MISSING_DIMM
    assert "d2" in refusal.message and "migrate-args" in refusal.message


def test_an_extra_dimm_is_refused() -> None:
    src, _ = pair(1)
    _, bigger = pair(2)
    assert codes(src, bigger) == [Code.DEST_EXTRA_DIMM]


@pytest.mark.parametrize("change", ["addr", "slot", "size", "node", "memdev"])
def test_a_dimm_elsewhere_or_of_another_size_is_refused(change: str) -> None:
    src, dst = pair(1)
    d = dst.memory_devices[0]
    other = {"addr": replace(d, addr=(d.addr or 0) + 128 * MiB), "slot": replace(d, slot=5),
             "size": replace(d, size=256 * MiB), "node": replace(d, node=1),
             "memdev": replace(d, memdev="other-mem")}[change]
    assert codes(src, replace(dst, memory_devices=(other,))) == [Code.DEST_LAYOUT_DIFFERS]


@pytest.mark.parametrize("change", ["share", "qom_type", "size", "hugetlb"])
def test_a_dimm_on_another_kind_of_backend_is_refused(change: str) -> None:
    src, dst = pair(1)
    b = dst.backend("d0-mem")
    assert b is not None
    other: MemoryBackend = {
        "share": replace(b, share=False), "qom_type": replace(b, qom_type="memory-backend-file",
                                                              mem_path="/dev/shm/x"),
        "size": replace(b, size=256 * MiB), "hugetlb": replace(b, hugetlb=True)}[change]
    dst = replace(dst, backends=tuple(other if x.id == "d0-mem" else x for x in dst.backends))
    refusals = preflight(src, SRC_FACTS, dst, DST_FACTS).refusals
    assert [r.code for r in refusals] == [Code.DEST_LAYOUT_DIFFERS]
    assert "backend" in refusals[0].message


def test_other_boot_memory_is_refused() -> None:
    src, dst = pair(0)
    assert codes(src, replace(dst, boot_memory=512 * MiB)) == [Code.DEST_LAYOUT_DIFFERS]
    assert codes(src, replace(dst, maxmem=8 * GiB)) == [Code.DEST_LAYOUT_DIFFERS]
    assert codes(src, replace(dst, backends=(backend("ram0", 512 * MiB),))) == [
        Code.DEST_LAYOUT_DIFFERS]


def test_the_destination_must_wait_for_a_migration() -> None:
    src, dst = pair()
    assert codes(src, dst, dst_facts=replace(DST_FACTS, run_state="running")) == [
        Code.DEST_NOT_INCOMING]


def test_the_source_must_run_and_not_migrate_already() -> None:
    src, dst = pair()
    assert codes(src, dst, replace(SRC_FACTS, run_state="postmigrate")) == [
        Code.SOURCE_NOT_RUNNING]
    assert codes(src, dst, replace(SRC_FACTS, migration_status="active")) == [
        Code.MIGRATION_ACTIVE]
    assert codes(src, dst, replace(SRC_FACTS, migration_status="completed")) == []
    assert codes(src, dst, replace(SRC_FACTS, run_state="paused")) == []


def test_a_back_end_without_logging_is_refused() -> None:
    src, dst = pair()
    no_shmfd = replace(LOGS, offers_log_shmfd=False)
    blocked = replace(SRC_FACTS, logging={"net0": no_shmfd}, blocked_reasons=(
        "Migration disabled: vhost-user backend lacks VHOST_USER_PROTOCOL_F_LOG_SHMFD "
        "feature.",))
    refusals = preflight(src, blocked, dst, DST_FACTS).refusals
    assert [r.code for r in refusals] == [Code.BACKEND_NO_LOGGING]  # said once
    assert "VHOST_USER_PROTOCOL_F_LOG_SHMFD" in refusals[0].message
    # A device the guest has not started: QEMU's blocker says it.
    unstarted = replace(SRC_FACTS, logging={}, blocked_reasons=(
        "Migration disabled: vhost lacks VHOST_F_LOG_ALL feature.",))
    assert codes(src, dst, unstarted) == [Code.BACKEND_NO_LOGGING]
    other = replace(SRC_FACTS, blocked_reasons=("some device can not migrate",))
    assert codes(src, dst, other) == [Code.MIGRATION_BLOCKED]


def test_vhost_user_devices_must_be_there_and_connected() -> None:
    src, dst = pair()
    assert codes(src, replace(dst, vhost_user=())) == [Code.VHOST_USER_DEVICE_MISSING]
    assert codes(src, dst, dst_facts=replace(DST_FACTS, chardev_connected={"c0": False})) == [
        Code.VHOST_USER_NOT_CONNECTED]
    assert codes(src, dst, dst_facts=replace(DST_FACTS, chardev_connected={})) == [
        Code.VHOST_USER_NOT_CONNECTED]


def test_a_destination_that_can_not_migrate_on_is_a_note() -> None:
    src, dst = pair()
    facts = replace(DST_FACTS, blocked_reasons=("Migration disabled: vhost lacks "
                                                "VHOST_F_LOG_ALL feature.",))
    result = preflight(src, SRC_FACTS, dst, facts)
    assert not result.refused
    assert any("could not migrate on" in n for n in result.notes)


def test_destination_args_recreate_the_hot_added_dimms() -> None:
    src = vm(dimms=2, vhost_user=(vhost(True),))
    cold = replace(src.memory_devices[0], hotplugged=False)
    src = replace(src, memory_devices=(cold, src.memory_devices[1]))
    args = destination_args(src)
    assert [d.device.id for d in args.dimms] == ["d1"]
    assert any("d0: on the source's own command line" in n for n in args.notes)
    obj, dev = args.argv[1], args.argv[3]
    assert args.argv[0] == "-object" and args.argv[2] == "-device"
    assert json.loads(obj) == {"qom-type": "memory-backend-memfd", "id": "d1-mem",
                               "size": 128 * MiB, "share": True}
    assert json.loads(dev) == {"driver": "pc-dimm", "id": "d1", "memdev": "d1-mem",
                               "addr": 4 * GiB + 128 * MiB, "slot": 1, "node": 0}
    assert [d.device.id for d in destination_args(src, every_dimm=True).dimms] == ["d0", "d1"]


def test_destination_args_carry_every_backend_property() -> None:
    b = MemoryBackend("h-mem", "memory-backend-file", 1 * GiB, True, "/dev/hugepages,x",
                      False, 0, (0, 1), "bind", True)
    src = vm(dimms=0)
    d = replace(dimm("h", 0, 1 * GiB), memdev="h-mem")
    src = replace(src, memory_devices=(d,), backends=(*src.backends, b))
    (only,) = destination_args(src).dimms
    assert json.loads(only.argv[1]) == {
        "qom-type": "memory-backend-file", "id": "h-mem", "size": 1 * GiB, "share": True,
        "mem-path": "/dev/hugepages,x", "host-nodes": [0, 1], "policy": "bind",
        "prealloc": True}
    # A destination built from these arguments passes the preflight's layout checks.
    dst = replace(src, memory_devices=(replace(d, hotplugged=False),))
    assert codes(src, dst, replace(SRC_FACTS, logging={}), DST_FACTS) == []


def test_unused_backends_are_noted() -> None:
    src = vm(dimms=1)
    src = replace(src, backends=(*src.backends, backend("spare-mem")))
    assert any("spare-mem is used by no device" in n for n in destination_args(src).notes)
