"""Front-end profiles against the golden captures: each profile, played against a
recording back-end that answers what the captured back-end answered, sends what the real
front-end sent, message by message (request, need_reply, fd count, and every value that
does not depend on where memory happens to be mapped)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvhost.frontend import Frontend, FrontendMemory, ProbeConfig, ProbeError, profiles, run_probe
from pyvhost.frontend.errors import FrontendUsageError
from pyvhost.frontend.memory import MiB
from pyvhost.protocol import messages as m
from pyvhost.protocol.codec import Decoder
from pyvhost.protocol.constants import (
    FLAG_NEED_REPLY,
    ProtocolFeature,
    Request,
    request_name,
)

from .fake_backend import FakeBackend, Record

CAPTURES = Path(__file__).parent.parent / "data" / "captures"
MakeBackend = Callable[..., FakeBackend]
PF = ProtocolFeature
Step = tuple[str, bool, int, object]


def _detail(request: int, payload: m.Payload) -> object:
    """What must match between a capture and a replay: values, not addresses."""
    if request in (Request.SET_PROTOCOL_FEATURES, Request.SET_STATUS):
        assert isinstance(payload, m.U64)
        return payload.value
    if request in (Request.SET_VRING_ENABLE, Request.SET_VRING_NUM, Request.SET_VRING_BASE):
        assert isinstance(payload, m.VringState)
        return (payload.index, payload.num)
    if request == Request.GET_VRING_BASE:
        assert isinstance(payload, m.VringState)
        return payload.index  # DPDK leaves the previous reply's num in the request
    if request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        assert isinstance(payload, m.VringFd)
        return (payload.index, payload.nofd)
    if request == Request.SET_VRING_ADDR:
        assert isinstance(payload, m.VringAddr)
        return payload.index
    if request == Request.SET_MEM_TABLE:
        assert isinstance(payload, m.MemoryTable)
        return len(payload.regions)
    if request in (Request.ADD_MEM_REG, Request.REM_MEM_REG):
        assert isinstance(payload, m.SingleMemoryRegion)
        return (payload.region.guest_phys_addr, payload.region.memory_size)
    if request == Request.GET_CONFIG:
        assert isinstance(payload, m.ConfigSpace)
        return payload.size
    return None


def captured(name: str) -> tuple[list[Step], dict[str, int]]:
    """The front-end's requests in a capture, and what the back-end answered to GET_*."""
    steps: list[Step] = []
    answers: dict[str, int] = {}
    last = ""
    for line in (CAPTURES / name).read_text().splitlines():
        d = json.loads(line)
        raw = bytes.fromhex(d["hex"])
        if d["dir"] == "frontend->backend":
            # The capture counted the fds; stand-ins let the decoder check the count.
            dec = Decoder()
            dec.feed(raw, [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(d["nfds"])])
            msg = dec.next_message()
            assert msg is not None
            with msg.fds:
                steps.append((request_name(d["request"]), bool(d["flags"] & FLAG_NEED_REPLY),
                              d["nfds"], _detail(d["request"], msg.payload)))
            last = request_name(d["request"])
        elif len(raw) == 20 and last.startswith("GET_") and last not in answers:
            answers[last] = int.from_bytes(raw[12:20], "little")
    return steps, answers


def replayed(records: list[Record]) -> list[Step]:
    return [(r.name, r.need_reply, r.nfds, _detail(r.request, r.payload)) for r in records]


def _backend(make_backend: MakeBackend, answers: dict[str, int]) -> FakeBackend:
    return make_backend(features=answers["GET_FEATURES"],
                        protocol_features=answers["GET_PROTOCOL_FEATURES"],
                        queue_num=answers.get("GET_QUEUE_NUM", 1),
                        max_mem_slots=answers.get("GET_MAX_MEM_SLOTS", 8))


def _play(be: FakeBackend, profile: profiles.Profile, device: str, boot_size: int,
          hotplug: bool) -> None:
    with FrontendMemory() as memory, Frontend() as fe:
        fe.connect(be.path, timeout=5)
        session = profiles.Session(profile, fe, memory, device=device)
        try:
            session.negotiate()
            boot = session.add_region(boot_size, boot=True)
            session.start(boot)
            if hotplug:  # the captures' QMP: add dimm1, add dimm2, remove dimm1
                dimm1 = session.add_region(128 * MiB)
                session.update_memory()
                session.add_region(128 * MiB)
                session.update_memory()
                memory.detach(dimm1)
                session.update_memory()
                dimm1.close()
            session.stop()
        finally:
            session.close()
    assert be.wait_done()


@pytest.mark.parametrize(("profile", "capture", "device", "boot", "hotplug"), [
    ("qemu-7.2", "qemu72_dpdk_setmemtable.jsonl", "net", 256 * MiB, True),
    ("qemu-7.2", "qemu72_memslots.jsonl", "blk", 256 * MiB, True),
    ("qemu-10.0", "qemu100_dpdk_setmemtable.jsonl", "net", 256 * MiB, True),
    ("qemu-10.0", "qemu100_memslots.jsonl", "blk", 256 * MiB, True),
    ("dpdk-virtio-user", "dpdk_virtio_user_handshake.jsonl", "net", 512 * MiB, False),
])
def test_profile_replays_its_capture(make_backend: MakeBackend, profile: str, capture: str,
                                     device: str, boot: int, hotplug: bool) -> None:
    expected, answers = captured(capture)
    be = _backend(make_backend, answers)
    p = profiles.get(profile)
    assert capture in p.captures
    _play(be, p, device, boot, hotplug)
    got = replayed(be.records)
    for i, (want, have) in enumerate(zip(expected, got, strict=False)):
        assert want == have, f"message {i}: capture {want}, profile sent {have}"
    assert len(got) == len(expected), (got[len(expected):], expected[len(got):])


def test_every_profile_names_existing_captures() -> None:
    for p in profiles.PROFILES.values():
        assert p.captures, p.name
        for name in p.captures:
            assert (CAPTURES / name).is_file(), (p.name, name)


def test_unknown_profile_is_a_usage_error() -> None:
    with pytest.raises(FrontendUsageError, match="known: dpdk-virtio-user"):
        profiles.get("qemu-1.0")


def test_dpdk_profile_places_regions_at_their_user_address(make_backend: MakeBackend) -> None:
    be = make_backend(protocol_features=int(PF.MQ | PF.REPLY_ACK | PF.STATUS))
    _play(be, profiles.get("dpdk-virtio-user"), "net", 4 * MiB, False)
    table = next(r.payload for r in be.records if r.name == "SET_MEM_TABLE")
    assert isinstance(table, m.MemoryTable)
    (region,) = table.regions
    assert region.guest_phys_addr == region.userspace_addr != 0


def test_dpdk_profile_pauses_rings_around_a_table_update(make_backend: MakeBackend) -> None:
    be = make_backend(protocol_features=int(PF.MQ | PF.REPLY_ACK | PF.STATUS))
    with FrontendMemory() as memory, Frontend() as fe:
        fe.connect(be.path)
        s = profiles.Session(profiles.get("dpdk-virtio-user"), fe, memory)
        s.negotiate()
        s.start(s.add_region(4 * MiB, boot=True))
        first = len(be.records)
        s.add_region(2 * MiB)
        assert s.update_memory() == ["SET_MEM_TABLE"]
        s.close()
    assert be.wait_done()
    names = [(r.name, _detail(r.request, r.payload)) for r in be.records[first:]]
    assert names == [("SET_VRING_ENABLE", (0, 0)), ("SET_VRING_ENABLE", (1, 0)),
                     ("SET_MEM_TABLE", 2),
                     ("SET_VRING_ENABLE", (0, 1)), ("SET_VRING_ENABLE", (1, 1))]


def test_qemu_profile_repeats_updates_per_queue_pair(make_backend: MakeBackend) -> None:
    be = make_backend()  # CONFIGURE_MEM_SLOTS offered
    with FrontendMemory() as memory, Frontend() as fe:
        fe.connect(be.path)
        s = profiles.Session(profiles.get("qemu-7.2"), fe, memory, queue_pairs=2)
        s.negotiate()
        s.start(s.add_region(4 * MiB, boot=True))
        dimm = s.add_region(2 * MiB)
        assert s.update_memory() == ["ADD_MEM_REG", "ADD_MEM_REG"]
        memory.detach(dimm)
        assert s.update_memory() == ["REM_MEM_REG", "REM_MEM_REG"]
        dimm.close()
        s.close()
    assert [r.name for r in be.records].count("SET_VRING_NUM") == 4


@pytest.mark.parametrize("profile", sorted(profiles.PROFILES))
def test_probe_runs_every_profile(make_backend: MakeBackend, profile: str) -> None:
    be = make_backend(protocol_features=int(PF.MQ | PF.REPLY_ACK | PF.STATUS))
    report = run_probe(ProbeConfig(be.path, cycles=2, regions=2, boot_size=4 * MiB,
                                   settle=0.0, timeout=2.0, profile=profile))
    assert report.verdict == "no leak"
    assert report.profile == profile
    assert report.requests_sent == {"SET_MEM_TABLE": 8}


def test_profiles_differ_where_the_captures_do() -> None:
    """QEMU 10.0 against 7.2, from the golden data: need_reply on SET_VRING_ENABLE, and the
    stop order of a vhost-user-net device. Nothing else in the captured sequences moved."""
    old, _ = captured("qemu72_dpdk_setmemtable.jsonl")
    new, _ = captured("qemu100_dpdk_setmemtable.jsonl")
    enable = [s for s in new if s[0] == "SET_VRING_ENABLE"]
    assert enable and all(need for _, need, _, _ in enable)
    assert not any(need for name, need, _, _ in old if name == "SET_VRING_ENABLE")
    assert [s[0] for s in old[-3:]] == ["SET_STATUS", "GET_VRING_BASE", "GET_VRING_BASE"]
    assert [s[0] for s in new[-3:]] == ["GET_VRING_BASE", "GET_VRING_BASE", "SET_STATUS"]
    strip = [(n, r, f, d) for n, r, f, d in old if n != "SET_VRING_ENABLE"][:-3]
    assert strip == [(n, r, f, d) for n, r, f, d in new if n != "SET_VRING_ENABLE"][:-3]


def test_get_max_mem_slots_is_honoured(make_backend: MakeBackend) -> None:
    """A back-end that answers GET_MAX_MEM_SLOTS with 4 gets at most 4 regions."""
    be = make_backend(max_mem_slots=4)
    with pytest.raises(ProbeError, match="need 5 memory slots, the back-end takes 4"):
        run_probe(ProbeConfig(be.path, cycles=1, regions=4, boot_size=4 * MiB, settle=0.0))
    report = run_probe(ProbeConfig(be.path, cycles=2, regions=3, boot_size=4 * MiB,
                                   settle=0.0))
    assert report.mem_slots and report.max_mem_slots == 4
    most = max(len(be.table), report.peak_table)
    assert most <= 4
