"""The Frontend against a scripted back-end on a real Unix socket."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator

import pytest

from pyvhost.frontend import (
    BackendClosedError,
    BackendError,
    BackendTimeoutError,
    Frontend,
    FrontendConnectError,
    FrontendMemory,
    FrontendUsageError,
    NackError,
)
from pyvhost.frontend.frontend import split_ring_layout
from pyvhost.frontend.memory import HOTPLUG_BASE
from pyvhost.protocol import messages as m
from pyvhost.protocol.constants import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    ProtocolFeature,
    Request,
    VirtioFeature,
    VirtioStatus,
)
from pyvhost.units import MiB

from .fake_backend import FakeBackend

PF = ProtocolFeature
MakeBackend = Callable[..., FakeBackend]


@pytest.fixture
def memory() -> Iterator[FrontendMemory]:
    with FrontendMemory() as mem:
        yield mem


def _connect(backend: FakeBackend, timeout: float = 5.0, **kwargs: bool) -> Frontend:
    fe = Frontend(**kwargs)
    fe.connect(backend.path, timeout=timeout)
    return fe


# -- connecting ----------------------------------------------------------------------------

def test_missing_socket_is_a_clear_error(short_dir: str) -> None:
    fe = Frontend()
    with pytest.raises(FrontendConnectError, match=r"no vhost-user socket at .*missing\.sock"):
        fe.connect(f"{short_dir}/missing.sock", timeout=1)
    assert not fe.connected


def test_stale_socket_is_a_clear_error(short_dir: str) -> None:
    path = f"{short_dir}/stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)  # bound, never listening: what a crashed back-end leaves behind
    with pytest.raises(FrontendConnectError, match="connection refused"):
        Frontend().connect(path, timeout=1)


def test_requests_need_a_connection() -> None:
    with pytest.raises(FrontendUsageError, match="not connected"):
        Frontend().get_features()


# -- negotiation -----------------------------------------------------------------------------

def test_negotiate_in_qemu_order(make_backend: MakeBackend) -> None:
    be = make_backend()
    with _connect(be) as fe:
        n = fe.negotiate()
        fe.sync()
    assert be.names == ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES",
                        "GET_QUEUE_NUM", "GET_MAX_MEM_SLOTS", "SET_OWNER", "SET_FEATURES",
                        "GET_STATUS", "SET_STATUS", "GET_FEATURES"]
    # need_reply only once REPLY_ACK is negotiated, never on requests with a reply.
    assert [r.name for r in be.records if r.need_reply] == ["SET_OWNER", "SET_FEATURES",
                                                            "SET_STATUS"]
    assert be.records[2].payload == m.U64(int(PF.MQ | PF.REPLY_ACK | PF.CONFIGURE_MEM_SLOTS
                                              | PF.STATUS))
    acked = int(VirtioFeature.VERSION_1) | VHOST_USER_F_PROTOCOL_FEATURES
    assert be.records[6].payload == m.U64(acked)
    assert be.records[8].payload == m.U64(int(VirtioStatus.FEATURES_OK))
    assert (n.features, n.queue_num, n.max_mem_slots, n.mem_slots) == (acked, 2, 32, True)
    assert n.protocol_feature_names == ["MQ", "REPLY_ACK", "CONFIGURE_MEM_SLOTS", "STATUS"]


def test_negotiate_takes_the_intersection(make_backend: MakeBackend) -> None:
    be = make_backend(protocol_features=int(PF.REPLY_ACK | PF.LOG_SHMFD | PF.BACKEND_REQ))
    with _connect(be) as fe:
        n = fe.negotiate(protocol_features=int(PF.REPLY_ACK | PF.MQ))
    assert n.protocol_features == PF.REPLY_ACK
    assert be.names == ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES",
                        "SET_OWNER", "SET_FEATURES"]


def test_negotiate_without_protocol_features(make_backend: MakeBackend) -> None:
    be = make_backend(features=int(VirtioFeature.VERSION_1 | VirtioFeature.RING_EVENT_IDX))
    with _connect(be) as fe:
        n = fe.negotiate(features=int(VirtioFeature.VERSION_1 | VirtioFeature.IN_ORDER))
        fe.sync()
    assert be.names == ["GET_FEATURES", "SET_OWNER", "SET_FEATURES", "GET_FEATURES"]
    assert not any(r.need_reply for r in be.records)
    assert n.features == VirtioFeature.VERSION_1
    assert n.protocol_features == 0


def test_ack_all_false_flags_only_what_qemu_flags(make_backend: MakeBackend,
                                                  memory: FrontendMemory) -> None:
    be = make_backend()
    with _connect(be, ack_all=False) as fe:
        fe.negotiate(protocol_features=int(PF.REPLY_ACK))
        memory.add_boot_ram(4 * MiB)
        fe.update_memory(memory)
        fe.sync()
    assert [r.name for r in be.records if r.need_reply] == ["SET_MEM_TABLE"]


def test_status_needs_the_feature(make_backend: MakeBackend) -> None:
    be = make_backend(protocol_features=int(PF.REPLY_ACK))
    with _connect(be) as fe:
        fe.negotiate()
        with pytest.raises(FrontendUsageError, match="STATUS"):
            fe.set_status(0)
        with pytest.raises(FrontendUsageError, match="CONFIGURE_MEM_SLOTS"):
            fe.get_max_mem_slots()


def test_status_round_trip(make_backend: MakeBackend) -> None:
    be = make_backend()
    with _connect(be) as fe:
        fe.negotiate()
        fe.set_status(int(VirtioStatus.ACKNOWLEDGE | VirtioStatus.DRIVER))
        assert fe.get_status() == VirtioStatus.ACKNOWLEDGE | VirtioStatus.DRIVER


# -- memory ------------------------------------------------------------------------------------

def test_set_mem_table_mode_sends_every_region_each_time(make_backend: MakeBackend,
                                                         memory: FrontendMemory) -> None:
    be = make_backend(protocol_features=int(PF.REPLY_ACK | PF.MQ))
    with _connect(be) as fe:
        fe.negotiate()
        assert not fe.uses_mem_slots and fe.memory_limit == 8
        boot = memory.add_boot_ram(8 * MiB)
        assert fe.update_memory(memory) == ["SET_MEM_TABLE"]
        assert fe.update_memory(memory) == []  # unchanged map: QEMU sends nothing
        dimm = memory.add_dimm(2 * MiB)
        assert fe.update_memory(memory) == ["SET_MEM_TABLE"]
        memory.detach(dimm)
        assert fe.update_memory(memory) == ["SET_MEM_TABLE"]
        dimm.close()
        assert fe.mem_table == (boot.region(),)
    tables = [r for r in be.records if r.name == "SET_MEM_TABLE"]
    assert [(len(t.payload.regions), t.nfds) for t in tables
            if isinstance(t.payload, m.MemoryTable)] == [(1, 1), (2, 2), (1, 1)]
    assert all(t.need_reply for t in tables)
    second = tables[1].payload
    assert isinstance(second, m.MemoryTable)
    assert [r.guest_phys_addr for r in second.regions] == [0, HOTPLUG_BASE]


def test_set_mem_table_carries_at_most_8_regions(make_backend: MakeBackend,
                                                 memory: FrontendMemory) -> None:
    be = make_backend(protocol_features=int(PF.REPLY_ACK))
    with _connect(be) as fe:
        fe.negotiate()
        memory.add_boot_ram(4 * MiB)
        for _ in range(7):
            memory.add_dimm(2 * MiB)
        fe.update_memory(memory)
        memory.add_dimm(2 * MiB)
        with pytest.raises(FrontendUsageError, match="at most 8"):
            fe.update_memory(memory)
        with pytest.raises(FrontendUsageError, match="at most 8"):
            fe.set_mem_table(memory.regions)
        assert len(fe.mem_table) == 8


def test_mem_slots_mode_removes_backwards_then_adds_by_gpa(make_backend: MakeBackend,
                                                          memory: FrontendMemory) -> None:
    be = make_backend()
    with _connect(be) as fe:
        fe.negotiate()
        assert fe.uses_mem_slots and fe.memory_limit == 32
        memory.add_boot_ram(8 * MiB)
        assert fe.update_memory(memory) == ["ADD_MEM_REG"]
        a = memory.add_dimm(2 * MiB)
        b = memory.add_dimm(2 * MiB)
        assert fe.update_memory(memory) == ["ADD_MEM_REG", "ADD_MEM_REG"]
        memory.detach(a)
        memory.detach(b)
        c = memory.add_dimm(4 * MiB)
        assert fe.update_memory(memory) == ["REM_MEM_REG", "REM_MEM_REG", "ADD_MEM_REG"]
        a.close()
        b.close()
        assert len(be.table) == 2
    mem_records = [r for r in be.records if r.name in ("ADD_MEM_REG", "REM_MEM_REG")]
    gpas = []
    for r in mem_records:
        assert isinstance(r.payload, m.SingleMemoryRegion)
        assert r.need_reply
        assert r.nfds == (1 if r.name == "ADD_MEM_REG" else 0)
        gpas.append((r.name, r.payload.region.guest_phys_addr))
    assert gpas == [("ADD_MEM_REG", 0), ("ADD_MEM_REG", HOTPLUG_BASE),
                    ("ADD_MEM_REG", HOTPLUG_BASE + 2 * MiB),
                    # walking the table backwards, as QEMU's send_remove_regions() does
                    ("REM_MEM_REG", HOTPLUG_BASE + 2 * MiB), ("REM_MEM_REG", HOTPLUG_BASE),
                    ("ADD_MEM_REG", c.guest_phys_addr)]
    removed = mem_records[3].payload
    assert isinstance(removed, m.SingleMemoryRegion)
    assert removed.region.mmap_offset == 0


def test_mem_slots_limit(make_backend: MakeBackend, memory: FrontendMemory) -> None:
    be = make_backend(max_mem_slots=2)
    with _connect(be) as fe:
        fe.negotiate()
        memory.add_boot_ram(4 * MiB)
        memory.add_dimm(2 * MiB)
        fe.update_memory(memory)
        third = memory.add_dimm(2 * MiB)
        with pytest.raises(FrontendUsageError, match="at most 2"):
            fe.update_memory(memory)
        with pytest.raises(FrontendUsageError, match="all in use"):
            fe.add_mem_reg(third)


def test_add_mem_reg_needs_mem_slots(make_backend: MakeBackend,
                                     memory: FrontendMemory) -> None:
    be = make_backend(protocol_features=int(PF.REPLY_ACK))
    with _connect(be) as fe:
        fe.negotiate()
        with pytest.raises(FrontendUsageError, match="CONFIGURE_MEM_SLOTS"):
            fe.add_mem_reg(memory.add_boot_ram(4 * MiB))


def test_nack_is_an_error_and_the_connection_goes_on(make_backend: MakeBackend,
                                                     memory: FrontendMemory) -> None:
    be = make_backend(nack={Request.SET_MEM_TABLE})
    with _connect(be) as fe:
        fe.negotiate(protocol_features=int(PF.REPLY_ACK))
        memory.add_boot_ram(4 * MiB)
        with pytest.raises(NackError, match="refused SET_MEM_TABLE") as info:
            fe.update_memory(memory)
        assert info.value.request == Request.SET_MEM_TABLE
        assert fe.mem_table == ()
        assert fe.get_features()  # still usable


# -- broken replies ---------------------------------------------------------------------------

@pytest.mark.parametrize(("trick", "error", "match"), [
    ("wrong-request", BackendError, "while waiting for GET_QUEUE_NUM"),
    ("no-reply-flag", BackendError, "reply flag is clear"),
    ("need-reply-flag", BackendError, "need_reply set"),
    ("bad-size", BackendError, "must be 8 bytes"),
    ("close", BackendClosedError, "closed the connection"),
    ("silent", BackendTimeoutError, "no reply .* within 0.3 s"),
])
def test_bad_replies_are_errors_and_break_the_connection(
        make_backend: MakeBackend, trick: str, error: type[Exception], match: str) -> None:
    be = make_backend(misbehave={Request.GET_QUEUE_NUM: trick})
    with _connect(be, timeout=0.3) as fe:
        with pytest.raises(error, match=match):
            fe.negotiate()
        with pytest.raises(FrontendUsageError, match="unusable after an earlier error"):
            fe.get_features()


def test_a_bad_ack_is_an_error(make_backend: MakeBackend, memory: FrontendMemory) -> None:
    be = make_backend(misbehave={Request.SET_MEM_TABLE: "bad-size"})
    with _connect(be) as fe:
        fe.negotiate(protocol_features=int(PF.REPLY_ACK))
        memory.add_boot_ram(4 * MiB)
        with pytest.raises(BackendError, match="bad reply to SET_MEM_TABLE"):
            fe.update_memory(memory)


# -- vrings ---------------------------------------------------------------------------------

def test_setup_vring(make_backend: MakeBackend, memory: FrontendMemory) -> None:
    be = make_backend()
    with _connect(be) as fe:
        fe.negotiate()
        boot = memory.add_boot_ram(4 * MiB)
        fe.update_memory(memory)
        first = len(be.records)
        vring = fe.setup_vring(0, 256, boot, offset=1 * MiB)
        assert fe.get_vring_base(0) == be.vring_base
        fds = (vring.kick_fd, vring.call_fd)
        for fd in fds:
            assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    for fd in fds:  # closed with the front-end
        assert not os.path.exists(f"/proc/self/fd/{fd}")
    records = be.records[first:]
    assert [r.name for r in records] == ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR",
                                         "SET_VRING_KICK", "SET_VRING_CALL",
                                         "SET_VRING_ENABLE", "GET_VRING_BASE"]
    assert [r.nfds for r in records] == [0, 0, 0, 1, 1, 0, 0]
    addr = records[2].payload
    assert isinstance(addr, m.VringAddr)
    desc, avail, used, size = split_ring_layout(256)
    base = boot.userspace_addr + MiB
    assert (addr.descriptor, addr.available, addr.used) == (base + desc, base + avail,
                                                            base + used)
    assert boot.contains_va(addr.used, size - used)
    assert records[5].payload == m.VringState(0, 1)


def test_no_vring_enable_without_protocol_features(make_backend: MakeBackend,
                                                   memory: FrontendMemory) -> None:
    be = make_backend(features=int(VirtioFeature.VERSION_1))
    with _connect(be) as fe:
        fe.negotiate()
        boot = memory.add_boot_ram(4 * MiB)
        fe.update_memory(memory)
        fe.setup_vring(1, 64, boot)
        fe.sync()
    assert "SET_VRING_ENABLE" not in be.names


@pytest.mark.parametrize(("size", "offset"), [(100, 0), (0, 0), (65536, 0), (256, 123),
                                              (32768, 0)])
def test_bad_vring_geometry(make_backend: MakeBackend, memory: FrontendMemory, size: int,
                            offset: int) -> None:
    be = make_backend()
    with _connect(be) as fe:
        fe.negotiate()
        boot = memory.add_boot_ram(256 * 1024)
        with pytest.raises(FrontendUsageError):
            fe.setup_vring(0, size, boot, offset)


# -- timing ---------------------------------------------------------------------------------

def test_every_request_is_timed(make_backend: MakeBackend, memory: FrontendMemory) -> None:
    be = make_backend()
    with _connect(be) as fe:
        fe.negotiate()
        memory.add_boot_ram(4 * MiB)
        fe.update_memory(memory)
        for _ in range(3):
            dimm = memory.add_dimm(2 * MiB)
            fe.update_memory(memory)
            memory.detach(dimm)
            fe.update_memory(memory)
            dimm.close()
    assert set(fe.timings) == {"GET_FEATURES", "GET_PROTOCOL_FEATURES",
                               "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM", "GET_MAX_MEM_SLOTS",
                               "SET_OWNER", "SET_FEATURES", "GET_STATUS", "SET_STATUS",
                               "ADD_MEM_REG", "REM_MEM_REG"}
    assert len(fe.timings["ADD_MEM_REG"]) == 4
    assert len(fe.timings["REM_MEM_REG"]) == 3
    assert all(ns > 0 for samples in fe.timings.values() for ns in samples)
