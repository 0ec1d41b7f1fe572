"""The planner without QEMU: every refusal code from hand-built states, steps and undo."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvhost.hotplug.host import PathFacts
from pyvhost.hotplug.plan import AddRequest, Code, plan_add, plan_remove, plan_resize
from pyvhost.hotplug.state import MemoryDevice, VmState

from .states import GiB, MiB, backend, dimm, host, vhost, vm

M128 = 128 * MiB


def codes(req: AddRequest, **kw: object) -> list[Code]:
    state = kw.pop("state", None) or vm()
    h = kw.pop("host_facts", None) or host()
    assert not kw
    return [r.code for r in plan_add(req, state, h).refusals]  # type: ignore[arg-type]


def test_a_good_request_has_two_steps_each_with_its_undo() -> None:
    plan = plan_add(AddRequest(M128), vm(), host())
    assert not plan.refused
    assert [s.command for s in plan.steps] == ["object-add", "device_add"]
    obj, dev = plan.steps
    assert obj.arguments == {"qom-type": "memory-backend-memfd", "id": "pyvhost-dimm0-mem",
                             "size": M128, "share": True}
    assert dev.arguments == {"driver": "pc-dimm", "id": "pyvhost-dimm0",
                             "memdev": "pyvhost-dimm0-mem"}
    # Undo runs last step first: device_del (waiting for DEVICE_DELETED), then object-del.
    assert [(u.command, dict(u.arguments)) for u in plan.undo_steps()] == [
        ("device_del", {"id": "pyvhost-dimm0"}), ("object-del", {"id": "pyvhost-dimm0-mem"})]
    assert plan.undo_steps()[0].wait_deleted == "pyvhost-dimm0"
    # After a failed device_add only object-add is undone.
    assert [u.command for u in plan.undo_steps(1)] == ["object-del"]


def test_ids_avoid_existing_ones() -> None:
    plan = plan_add(AddRequest(M128), vm(dimms=0), host())
    assert plan.device_id == "pyvhost-dimm0"
    state = vm()
    taken = state.__class__(**{**state.__dict__, "object_ids": ("pyvhost-dimm0-mem",)})
    assert plan_add(AddRequest(M128), taken, host()).device_id == "pyvhost-dimm1"


def test_no_slots_configured() -> None:
    assert codes(AddRequest(M128), state=vm(slots=0)) == [Code.NO_SLOTS_CONFIGURED]


def test_no_free_slot() -> None:
    assert codes(AddRequest(M128), state=vm(dimms=2, slots=2)) == [Code.NO_FREE_SLOT]


def test_maxmem_exceeded() -> None:
    state = vm(maxmem=512 * MiB)
    assert codes(AddRequest(384 * MiB), state=state) == [Code.MAXMEM_EXCEEDED]
    assert codes(AddRequest(256 * MiB), state=state) == []


@pytest.mark.parametrize("size", [100 * MiB, M128 + 4096, 129 * MiB])
def test_size_alignment(size: int) -> None:
    assert codes(AddRequest(size)) == [Code.SIZE_ALIGNMENT]


def test_size_alignment_to_hugepages() -> None:
    big = host(free_2m=1024)
    req = AddRequest(M128 + 1024 * 1024, hugepages=True)
    assert codes(req, host_facts=big) == [Code.SIZE_ALIGNMENT]


def test_id_in_use() -> None:
    assert codes(AddRequest(M128, id="d0"), state=vm(dimms=1)) == [Code.ID_IN_USE,
                                                                   Code.ID_IN_USE]


@pytest.mark.parametrize("req", [AddRequest(M128, backend="ram"), AddRequest(M128, share=False)])
def test_not_shared_with_vhost_user(req: AddRequest) -> None:
    assert codes(req, state=vm(vhost_user=(vhost(),))) == [Code.NOT_SHARED_WITH_VHOST_USER]
    assert codes(req) == []  # no vhost-user device: nobody needs to see it


@pytest.mark.parametrize("boot", [backend("ram0", 256 * MiB, "memory-backend-ram"),
                                  backend("ram0", 256 * MiB, share=False)])
def test_boot_ram_not_shared(boot: object) -> None:
    state = vm(vhost_user=(vhost(),), boot=boot)  # type: ignore[arg-type]
    assert codes(AddRequest(M128), state=state) == [Code.BOOT_RAM_NOT_SHARED]


def test_region_limit_counts_regions_not_dimms() -> None:
    # q35 boot RAM is 2 regions: 6 DIMMs reach DPDK's 8.
    assert codes(AddRequest(M128), state=vm(dimms=5, vhost_user=(vhost(False),))) == []
    refused = codes(AddRequest(M128), state=vm(dimms=6, vhost_user=(vhost(False),)))
    assert refused == [Code.VHOST_USER_REGION_LIMIT]


def test_region_limit_unknown_is_assumed_and_noted() -> None:
    state = vm(dimms=6, vhost_user=(vhost(None),))
    plan = plan_add(AddRequest(M128), state, host())
    assert [r.code for r in plan.refusals] == [Code.VHOST_USER_REGION_LIMIT]
    assert "has not started" in plan.notes[0]
    assert "assumed" in plan.refusals[0].message
    assert plan.prediction is not None and plan.prediction.vhost_user_region_limit_assumed
    assert not plan_add(AddRequest(M128, assume_region_limit=256), state, host()).refused


def test_known_limit_is_not_assumed() -> None:
    plan = plan_add(AddRequest(M128), vm(dimms=5, vhost_user=(vhost(False),)), host())
    assert plan.prediction is not None
    assert plan.prediction.vhost_user_region_limit == 8
    assert not plan.prediction.vhost_user_region_limit_assumed
    assert plan.notes == ()


@pytest.mark.parametrize(("version", "cap", "words"), [
    ((7, 2, 22), 256, "has no free memory slots left"),
    ((10, 0, 2), 512, "has not enough free memory slots left")])
def test_mem_slots_back_end_is_not_assumed_to_take_256(
        version: tuple[int, int, int], cap: int, words: str) -> None:
    """CONFIGURE_MEM_SLOTS: QEMU keeps GET_MAX_MEM_SLOTS to itself (DPDK 26.07 answers 8),
    so --region-limit (default 8) applies, capped by the version's cap."""
    state = vm(dimms=6, vhost_user=(vhost(True),), qemu_version=version)
    plan = plan_add(AddRequest(M128), state, host())
    assert [r.code for r in plan.refusals] == [Code.VHOST_USER_REGION_LIMIT]
    assert words in plan.refusals[0].message
    assert "GET_MAX_MEM_SLOTS" in plan.notes[0] and f"capped at {cap}" in plan.notes[0]
    big = plan_add(AddRequest(M128, assume_region_limit=509), state, host())
    assert not big.refused and big.prediction is not None
    assert big.prediction.vhost_user_region_limit == min(509, cap)
    assert big.prediction.vhost_user_region_limit_assumed


def test_unknown_qemu_version_gets_a_warning_and_the_nearest_rules() -> None:
    for version, rules in (((11, 2, 0), "10.0"), ((6, 2, 0), "7.2"), (None, "10.0")):
        plan = plan_add(AddRequest(M128),
                        vm(dimms=6, vhost_user=(vhost(False),), qemu_version=version), host())
        assert f"QEMU {rules}'s rules" in plan.notes[0]
        assert f"QEMU {rules} refuses" in plan.refusals[0].message
    # No warning for the versions tested, nor without vhost-user devices.
    assert plan_add(AddRequest(M128), vm(qemu_version=(11, 0, 0)), host()).notes == ()


def test_existing_unshared_dimm_is_a_problem_and_a_note() -> None:
    from dataclasses import replace

    from pyvhost.hotplug.sharing import memory_problems

    state = vm(dimms=2, vhost_user=(vhost(False),))
    private = replace(state.backends[1], share=False)
    state = replace(state, backends=(state.backends[0], private, *state.backends[2:]))
    (p,) = memory_problems(state)
    assert (p.code, p.id, p.device) == ("NOT_SHARED_WITH_VHOST_USER", "d0-mem", "d0")
    assert "private copy-on-write" in p.message and "lost" in p.message
    plan = plan_add(AddRequest(M128), state, host())
    assert not plan.refused and "d0" in plan.notes[0]
    assert memory_problems(replace(state, vhost_user=())) == ()


def test_hugepages_short_global_and_per_node() -> None:
    assert codes(AddRequest(M128, hugepages=True)) == [Code.HUGEPAGES_SHORT]
    assert codes(AddRequest(M128, hugepages=True), host_facts=host(free_2m=64)) == []
    bind = AddRequest(M128, hugepages=True, host_nodes=(0,), policy="bind")
    assert codes(bind, host_facts=host(free_2m=64, node_free=10)) == [Code.HUGEPAGES_SHORT]
    assert codes(bind, host_facts=host(free_2m=64, node_free=64)) == []


def test_mem_path_missing_and_not_hugetlbfs() -> None:
    missing = host(mem_path=PathFacts("/x/y", False, "ext4", None))
    req = AddRequest(M128, backend="file", mem_path="/x/y")
    assert codes(req, host_facts=missing) == [Code.MEM_PATH_MISSING]
    tmpfs = host(mem_path=PathFacts("/dev/shm", True, "tmpfs", None), free_2m=64)
    huge = AddRequest(M128, backend="file", mem_path="/dev/shm", hugepages=True)
    assert codes(huge, host_facts=tmpfs) == [Code.MEM_PATH_NOT_HUGETLBFS]
    hugetlbfs = host(mem_path=PathFacts("/dev/hugepages", True, "hugetlbfs", 2 * MiB))
    on_huge = AddRequest(M128, backend="file", mem_path="/dev/hugepages")
    assert codes(on_huge, host_facts=hugetlbfs) == [Code.HUGEPAGES_SHORT]


def test_numa_node_out_of_range() -> None:
    assert codes(AddRequest(M128, node=1)) == [Code.NUMA_NODE_OUT_OF_RANGE]
    assert codes(AddRequest(M128, node=0)) == []
    assert codes(AddRequest(M128, node=1), state=vm(numa_nodes=2)) == []
    assert codes(AddRequest(M128, node=2), state=vm(numa_nodes=2)) == [
        Code.NUMA_NODE_OUT_OF_RANGE]


def test_host_node_missing() -> None:
    req = AddRequest(M128, host_nodes=(3,), policy="bind")
    assert codes(req) == [Code.HOST_NODE_MISSING]


def test_remove_plan() -> None:
    plan = plan_remove("d1", vm(dimms=2))
    assert [(s.command, dict(s.arguments)) for s in plan.steps] == [
        ("device_del", {"id": "d1"}), ("object-del", {"id": "d1-mem"})]
    assert plan.steps[0].wait_deleted == "d1"
    assert [r.code for r in plan_remove("zz", vm()).refusals] == [Code.DEVICE_NOT_FOUND]


@given(dimms=st.integers(0, 8), slots=st.integers(0, 8), size_blocks=st.integers(1, 40),
       maxmem_gib=st.integers(1, 8))
def test_slot_and_maxmem_refusals_match_arithmetic(dimms: int, slots: int, size_blocks: int,
                                                   maxmem_gib: int) -> None:
    dimms = min(dimms, slots)
    state = vm(dimms=dimms, slots=slots, maxmem=maxmem_gib * GiB)
    size = size_blocks * M128
    got = set(codes(AddRequest(size), state=state))
    left = maxmem_gib * GiB - state.boot_memory - dimms * M128
    assert (Code.NO_SLOTS_CONFIGURED in got) == (slots == 0)
    assert (Code.NO_FREE_SLOT in got) == (slots > 0 and dimms >= slots)
    assert (Code.MAXMEM_EXCEEDED in got) == (slots > 0 and size > max(left, 0))
    plan = plan_add(AddRequest(size), state, host())
    # Whatever the verdict, the steps and their undo are the same shape.
    assert [u.command for u in plan.undo_steps()] == ["device_del", "object-del"]


def _with_virtio_mem(share: bool = True, requested: int = 0,
                     vhost_user: bool = True) -> VmState:
    state = vm(vhost_user=(vhost(True),) if vhost_user else ())
    dev = MemoryDevice("vmem0", "virtio-mem", "vmem0-mem", 4 * GiB, requested, None, 0,
                       False, False, requested_size=requested, block_size=2 * MiB,
                       max_size=1 * GiB)
    return replace(state, memory_devices=(dev,),
                   backends=(*state.backends, backend("vmem0-mem", GiB, share=share)))


def test_resize_plans_one_qom_set_undone_by_the_old_size() -> None:
    plan = plan_resize("vmem0", 256 * MiB, _with_virtio_mem(requested=128 * MiB))
    assert not plan.refused
    (step,) = plan.steps
    assert step.command == "qom-set" and step.wait_size == ("vmem0", 256 * MiB)
    assert step.arguments == {"path": "/machine/peripheral/vmem0",
                              "property": "requested-size", "value": 256 * MiB}
    assert step.undo is not None and step.undo.arguments["value"] == 128 * MiB
    assert any("prelaunch" in n for n in plan.notes)  # the guest must run to resize


@pytest.mark.parametrize(("device", "size", "share", "code"), [
    ("nope", M128, True, Code.DEVICE_NOT_FOUND),
    ("d0", M128, True, Code.NOT_VIRTIO_MEM),
    ("vmem0", 3 * MiB, True, Code.SIZE_ALIGNMENT),
    ("vmem0", 2 * GiB, True, Code.VIRTIO_MEM_SIZE_EXCEEDED),
    ("vmem0", M128, False, Code.NOT_SHARED_WITH_VHOST_USER),
])
def test_resize_refusals(device: str, size: int, share: bool, code: Code) -> None:
    state = _with_virtio_mem(share=share)
    if device == "d0":
        state = replace(state, memory_devices=(dimm("d0", 0),))
    assert [r.code for r in plan_resize(device, size, state).refusals] == [code]


def test_virtio_mem_is_not_removed_on_7_2_but_shrunk() -> None:
    plan = plan_remove("vmem0", _with_virtio_mem())
    assert [r.code for r in plan.refusals] == [Code.BAD_REQUEST]
    assert "QEMU 7.2 cannot unplug" in plan.refusals[0].message
    assert "resize" in plan.refusals[0].message


def _on_10_0(state: VmState, bus: str) -> VmState:
    devices = tuple(replace(d, bus=bus) for d in state.memory_devices)
    return replace(state, memory_devices=devices, qemu_version=(10, 0, 2))


def test_virtio_mem_is_removed_on_10_0_when_empty_and_on_a_root_port() -> None:
    plan = plan_remove("vmem0", _on_10_0(_with_virtio_mem(), "/machine/peripheral/rp1/rp1"))
    assert not plan.refused
    assert [(s.command, s.wait_deleted) for s in plan.steps] == [
        ("device_del", "vmem0"), ("object-del", None)]
    assert plan.backend_id == "vmem0-mem"


@pytest.mark.parametrize(("requested", "bus", "code", "words"), [
    (M128, "/machine/peripheral/rp1/rp1", Code.VIRTIO_MEM_PLUGGED, "QEMU 10.0 unplugs"),
    (0, "/machine/q35/pcie.0", Code.BAD_REQUEST, "on pcie.0"),
])
def test_virtio_mem_remove_refusals_on_10_0(requested: int, bus: str, code: Code,
                                            words: str) -> None:
    plan = plan_remove("vmem0", _on_10_0(_with_virtio_mem(requested=requested), bus))
    assert [r.code for r in plan.refusals] == [code]
    assert words in plan.refusals[0].message and "7.2" not in plan.refusals[0].message
