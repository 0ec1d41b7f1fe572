"""Front-ends and guests that misbehave, one way per test.

Each test checks three things: the documented reaction (a NACK when the request had
need_reply and REPLY_ACK was negotiated, else the back-end closes the connection; a broken
ring is reported through its err eventfd and DEVICE_NEEDS_RESET), that no fd or mapping
outlives the bad connection, and that a connection opened before it still passes traffic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import pytest

from pyvhost.backend.connection import UNSUPPORTED
from pyvhost.protocol import messages as m
from pyvhost.protocol.constants import (
    FLAG_NEED_REPLY,
    MAX_PAYLOAD_SIZE,
    VHOST_USER_VERSION,
    Request,
    VirtioStatus,
)
from support.memfd import MemfdRegion

from .conftest import Backend
from .harness import DRIVER_OK, TABLE_PROTOCOL, TX, NetPort, region_name
from .rawclient import (
    RawClient,
    fd_count,
    maps_count,
    raw_header,
    read_eventfd,
    wait_fd_count,
    wait_until,
)

NEEDS_RESET = int(VirtioStatus.DEVICE_NEEDS_RESET)
#: Each message-level error is tried with need_reply (expect a NACK) and without (close).
reaction = pytest.mark.parametrize("need_reply", [True, False], ids=["nack", "close"])


@pytest.fixture
def baseline(good: NetPort) -> int:
    """The process's fd count with the good connection up and idle."""
    return fd_count()


@pytest.fixture
def bad(backend: Backend, baseline: int) -> Iterator[NetPort]:
    """A second connection, opened after the good one, for the test to misuse."""
    port = NetPort(backend.path, tag="bad")
    try:
        yield port
    finally:
        port.close()


def expect_refused(client: RawClient, request: int, payload: m.Payload, *,
                   need_reply: bool, fds: Sequence[int] = ()) -> None:
    """Send a request the back-end must refuse; check the reaction."""
    client.send(request, payload, flags=FLAG_NEED_REPLY if need_reply else 0, fds=fds)
    expect_reaction(client, request, need_reply)


def refused_unmapped(bad: NetPort, request: int, payload: m.Payload, *, need_reply: bool,
                     fds: Sequence[int]) -> None:
    """A memory request the back-end must refuse without mapping anything: its RAM is
    mapped once afterwards, by us only."""
    expect_refused(bad.client, request, payload, need_reply=need_reply, fds=fds)
    assert maps_count(bad.ram.name) == 1


def expect_reaction(client: RawClient, request: int, need_reply: bool) -> None:
    if need_reply:
        reply = client.recv_reply(request, ack=True)
        assert isinstance(reply.payload, m.U64)
        assert reply.payload.value != 0, "refused request was acked with 0"
        client.sync()  # the connection goes on
    else:
        assert client.wait_closed() == b"", "the back-end answered instead of closing"


def finish(good: NetPort, bad: NetPort | RawClient, baseline: int,
           regions: Sequence[MemfdRegion] = ()) -> None:
    """Close the bad connection; nothing it caused may stay; the good one still works."""
    names = [r.name for r in regions]
    if isinstance(bad, NetPort):
        names += [bad.ram.name, bad.ring_mem.name, *(r.name for r in bad.extra)]
    bad.close()
    for region in regions:
        region.close()
    wait_fd_count(baseline)
    wait_until(lambda: not any(maps_count(name) for name in names), "regions unmapped")
    good.client.sync()
    good.check_traffic(16, seed=3)


def comes_up(port: NetPort) -> None:
    """After a NACKed request (which changed nothing) the port still comes up."""
    port.setup_memory()
    port.setup_ring(port.rx)
    port.setup_ring(port.tx)
    port.check_traffic(8)


def negotiate_only(port: NetPort) -> None:
    """Features and protocol features (REPLY_ACK on), no SET_OWNER yet."""
    c = port.client
    c.get_u64(Request.GET_FEATURES)
    c.get_u64(Request.GET_PROTOCOL_FEATURES)
    c.send(Request.SET_PROTOCOL_FEATURES, m.U64(int(port.protocol)))
    c.reply_ack = True


# -- framing ------------------------------------------------------------------------------

def test_truncated_header_then_close(backend: Backend, good: NetPort, baseline: int) -> None:
    client = RawClient.connect(backend.path)
    client.send_raw(raw_header(Request.GET_FEATURES, 0)[:7])
    finish(good, client, baseline)


@reaction
def test_payload_size_does_not_fit_request(bad: NetPort, good: NetPort, baseline: int,
                                           need_reply: bool) -> None:
    bad.negotiate()
    flags = VHOST_USER_VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    bad.client.send_raw(raw_header(Request.SET_FEATURES, 4, flags) + bytes(4))
    expect_reaction(bad.client, Request.SET_FEATURES, need_reply)
    if need_reply:
        comes_up(bad)
    finish(good, bad, baseline)


def test_payload_over_the_size_limit_closes(bad: NetPort, good: NetPort,
                                            baseline: int) -> None:
    bad.negotiate()
    size = MAX_PAYLOAD_SIZE + 1
    # A framing error closes the stream even when a reply was asked for.
    flags = VHOST_USER_VERSION | FLAG_NEED_REPLY
    bad.client.send_raw(raw_header(Request.SET_CONFIG, size, flags) + bytes(size))
    assert bad.client.wait_closed() == b""
    finish(good, bad, baseline)


@reaction
def test_too_many_fds(bad: NetPort, good: NetPort, baseline: int, need_reply: bool) -> None:
    bad.negotiate()
    table = m.MemoryTable((bad.ram.region(),))
    refused_unmapped(bad, Request.SET_MEM_TABLE, table, need_reply=need_reply,
                     fds=[bad.ram.fd, bad.ring_mem.fd])
    finish(good, bad, baseline)


def test_more_fds_than_any_message_may_carry(bad: NetPort, good: NetPort,
                                             baseline: int) -> None:
    bad.negotiate()
    table = m.MemoryTable((bad.ram.region(),))
    # 20 fds do not fit the room the transport makes (16): the kernel truncates, and the
    # connection is closed whatever the flags say.
    bad.client.send(Request.SET_MEM_TABLE, table, flags=FLAG_NEED_REPLY, fds=[bad.ram.fd] * 20)
    assert bad.client.wait_closed() == b""
    finish(good, bad, baseline)


@reaction
def test_too_few_fds(bad: NetPort, good: NetPort, baseline: int, need_reply: bool) -> None:
    bad.negotiate()
    table = m.MemoryTable((bad.ram.region(), bad.ring_mem.region()))
    refused_unmapped(bad, Request.SET_MEM_TABLE, table, need_reply=need_reply,
                     fds=[bad.ram.fd])
    finish(good, bad, baseline)


@reaction
def test_unknown_request(bad: NetPort, good: NetPort, baseline: int,
                         need_reply: bool) -> None:
    bad.negotiate()
    expect_refused(bad.client, 99, m.Raw(b"\x01" * 8), need_reply=need_reply)
    finish(good, bad, baseline)


#: A well-formed message of every request the back-end lists as unsupported: payload, fds.
UNSUPPORTED_CASES: dict[int, tuple[m.Payload, int]] = {
    Request.NET_SET_MTU: (m.U64(9000), 0),
    Request.SET_BACKEND_REQ_FD: (m.Empty(), 1),
    Request.SET_VRING_ENDIAN: (m.VringState(0, 1), 0),
    Request.RESET_DEVICE: (m.Empty(), 0),
}


def test_every_unsupported_request_has_a_case() -> None:
    assert set(UNSUPPORTED_CASES) == set(UNSUPPORTED)


@pytest.mark.parametrize("request_", UNSUPPORTED_CASES, ids=lambda r: Request(r).name)
def test_unsupported_request_is_refused_and_its_fds_closed(bad: NetPort, good: NetPort,
                                                           baseline: int,
                                                           request_: int) -> None:
    bad.start()
    payload, nfds = UNSUPPORTED_CASES[request_]
    region = MemfdRegion(region_name("unsupported"), 1 << 16, 0)
    try:
        expect_refused(bad.client, request_, payload, need_reply=True,
                       fds=[region.fd] * nfds)
        bad.check_traffic(4)  # refused, and nothing else changed
        finish(good, bad, baseline, [region])
    finally:
        region.close()


# -- state machine ------------------------------------------------------------------------

@reaction
def test_mem_table_before_set_owner(bad: NetPort, good: NetPort, baseline: int,
                                    need_reply: bool) -> None:
    if need_reply:
        negotiate_only(bad)  # REPLY_ACK, so that a NACK can be asked for
    table = m.MemoryTable((bad.ram.region(),))
    refused_unmapped(bad, Request.SET_MEM_TABLE, table, need_reply=need_reply,
                     fds=[bad.ram.fd])
    finish(good, bad, baseline)


@reaction
def test_add_mem_reg_without_configure_mem_slots(bad: NetPort, good: NetPort, baseline: int,
                                                 need_reply: bool) -> None:
    bad.protocol = TABLE_PROTOCOL
    bad.negotiate()
    refused_unmapped(bad, Request.ADD_MEM_REG, m.SingleMemoryRegion(bad.ram.region()),
                     need_reply=need_reply, fds=[bad.ram.fd])
    finish(good, bad, baseline)


# -- memory -------------------------------------------------------------------------------

@reaction
def test_overlapping_regions_in_mem_table(bad: NetPort, good: NetPort, baseline: int,
                                          need_reply: bool) -> None:
    bad.negotiate()
    # Both regions at GPA 0: guest addresses would be ambiguous.
    table = m.MemoryTable((bad.ram.region(gpa=0), bad.ring_mem.region(gpa=0x1000)))
    expect_refused(bad.client, Request.SET_MEM_TABLE, table, need_reply=need_reply,
                   fds=[bad.ram.fd, bad.ring_mem.fd])
    assert maps_count(bad.ram.name) == maps_count(bad.ring_mem.name) == 1
    if need_reply:
        comes_up(bad)
    finish(good, bad, baseline)


def test_add_mem_reg_overlapping_a_mapped_region(bad: NetPort, good: NetPort,
                                                 baseline: int) -> None:
    bad.start()
    other = bad.extra_region("overlap", 0x8_0000)  # inside ram's GPAs
    assert bad.client.ack(Request.ADD_MEM_REG, m.SingleMemoryRegion(other.region()),
                          fds=[other.fd]) != 0
    assert maps_count(other.name) == 1
    bad.check_traffic(8)  # the table is as it was
    finish(good, bad, baseline)


@reaction
def test_rem_mem_reg_of_unknown_region(bad: NetPort, good: NetPort, baseline: int,
                                       need_reply: bool) -> None:
    bad.start()
    unknown = m.MemoryRegion(0x10_0000_0000, 1 << 20, 0x7000_0000_0000, 0)
    expect_refused(bad.client, Request.REM_MEM_REG, m.SingleMemoryRegion(unknown),
                   need_reply=need_reply)
    if need_reply:
        bad.check_traffic(8)
    finish(good, bad, baseline)


@reaction
def test_vring_address_outside_memory(bad: NetPort, good: NetPort, baseline: int,
                                      need_reply: bool) -> None:
    bad.negotiate()
    bad.setup_memory()
    c = bad.client
    assert c.ack(Request.SET_VRING_NUM, m.VringState(TX, bad.queue_size)) == 0
    good_addr = bad.tx.addr()
    outside = 0x1000  # the first pages are never mapped: in no region
    expect_refused(c, Request.SET_VRING_ADDR,
                   m.VringAddr(TX, 0, outside, good_addr.used, good_addr.available, 0),
                   need_reply=need_reply)
    if need_reply:
        # A refused SET_VRING_ADDR changed nothing: re-sending the memory (as QEMU does
        # on hot-plug) must not find a broken ring, and the port comes up.
        bad.add_region(bad.extra_region("later", 0x8000_0000))
        assert bad.status() == 0, "a refused SET_VRING_ADDR left a ring to break"
        bad.setup_ring(bad.rx)
        bad.setup_ring(bad.tx)
        bad.ok(Request.SET_STATUS, m.U64(DRIVER_OK))
        bad.check_traffic(8)
        assert read_eventfd(bad.tx.err_fd) == 0
        assert bad.status() == DRIVER_OK
    finish(good, bad, baseline)


# -- the guest breaks its rings -----------------------------------------------------------

Breakage = Callable[[NetPort], None]


def _loop(port: NetPort) -> None:
    gpa = port.pool.alloc()
    port.tx.write_desc(0, gpa, 16, 1, 1)  # NEXT -> 1
    port.tx.write_desc(1, gpa, 16, 1, 0)  # NEXT -> 0
    port.tx.put_avail(0)
    port.tx.publish()


def _outside(port: NetPort) -> None:
    port.tx.write_desc(0, 0x7F_0000_0000, 64, 0)
    port.tx.put_avail(0)
    port.tx.publish()


def _avail_jump(port: NetPort) -> None:
    port.tx.publish(port.tx.size + 5)


@pytest.mark.parametrize("breakage", [_loop, _outside, _avail_jump],
                         ids=["descriptor-loop", "descriptor-outside-memory",
                              "avail-idx-past-queue-size"])
@pytest.mark.parametrize("kicked", ["tx", "rx"])
def test_guest_breaks_tx_ring(backend: Backend, bad: NetPort, good: NetPort, baseline: int,
                              breakage: Breakage, kicked: str) -> None:
    bad.start()
    bad.check_traffic(4)
    breakage(bad)
    # ReflectNet serves its tx queue on a kick of either queue; the queue that broke is
    # the one reported, whichever was kicked.
    (bad.tx if kicked == "tx" else bad.rx).kick()
    wait_until(lambda: read_eventfd(bad.tx.err_fd) > 0, "tx err eventfd signalled")
    assert read_eventfd(bad.rx.err_fd) == 0
    assert bad.status() == DRIVER_OK | NEEDS_RESET
    # The queue stays stopped; the connection, the process and other connections go on.
    bad.tx.kick()
    bad.client.sync()
    assert backend.thread is not None and backend.thread.is_alive()
    good.check_traffic(8)
    assert good.status() == DRIVER_OK
    finish(good, bad, baseline)


# -- front-ends that say nothing ----------------------------------------------------------

def test_silent_and_stalled_front_ends_do_not_block_others(backend: Backend, good: NetPort,
                                                           baseline: int) -> None:
    silent = RawClient.connect(backend.path)
    stalled = RawClient.connect(backend.path)
    memory = MemfdRegion(region_name("stalled"), 1 << 16, 0)
    try:
        # Half of a SET_MEM_TABLE, with its fd: the back-end holds both while it waits.
        message = raw_header(Request.SET_MEM_TABLE, 40) + m.MemoryTable(
            (memory.region(),)).pack()
        stalled.send_raw(message[:20], fds=[memory.fd])
        good.check_traffic(32, seed=5)
        good.client.sync()
        silent.close()
        finish(good, stalled, baseline, [memory])
    finally:
        for c in (silent, stalled):
            c.close()
        memory.close()
