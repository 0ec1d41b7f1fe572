"""Live migration on the wire: dirty logging (SET_LOG_BASE, VHOST_F_LOG_ALL,
VHOST_VRING_F_LOG) and GET_VRING_BASE, against the real back-end on a real socket, driven
the way QEMU 7.2 drives it when a migration starts.

QEMU's order (hw/virtio/vhost.c, vhost_migration_log): SET_LOG_BASE with the log's memfd
(the back-end answers), SET_FEATURES with VHOST_F_LOG_ALL, then SET_VRING_ADDR of every
ring with VHOST_VRING_F_LOG and log_guest_addr (the used ring's GPA). The log's bits are
read from its memfd (``os.pread``), never through the back-end's code.

Bad input gets what the rest of the protocol gets: SET_LOG_BASE has a reply of its own, so
a refused one closes the connection (a NACK would read as success to QEMU 7.2, which does
not look at the reply's payload); nothing it carried stays open or mapped, and a
connection opened before it still passes traffic.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pyvhost import datapath
from pyvhost.memory.dirtylog import ATOMIC, BYTE_SPAN
from pyvhost.protocol import messages as m
from pyvhost.protocol.constants import FLAG_NEED_REPLY, ProtocolFeature, Request, VirtioFeature
from support.memfd import memfd

from .conftest import Backend
from .harness import QEMU_PROTOCOL, RING_GPA, RING_SIZE, NetPort, make_frames, swapped
from .rawclient import fd_count, wait_fd_count, wait_until
from .test_bad_input import expect_reaction, finish, reaction

LOG_ALL = int(VirtioFeature.LOG_ALL)
PROTOCOL = QEMU_PROTOCOL | ProtocolFeature.LOG_SHMFD
#: Where the test says the used rings are logged: far from where they are (RING_GPA), so
#: a mark at the ring's own GPA instead of log_guest_addr shows.
LOG_USED = 0x8000_0000
#: A log that covers guest memory up to 4 GiB (one bit per 4 KiB page).
LOG_SIZE = (4 << 30) // BYTE_SPAN


def log_memfd(name: str = "pyvhost-test-log", size: int = LOG_SIZE) -> int:
    return memfd(size, name=name)


def set_log_base(port: NetPort, fd: int, size: int = LOG_SIZE, offset: int = 0) -> None:
    """SET_LOG_BASE as QEMU sends it (no need_reply: the reply is explicit)."""
    reply = port.client.request(Request.SET_LOG_BASE, m.LogDescription(size, offset), fds=[fd])
    assert reply == m.U64(0), reply


def log_used(port: NetPort, on: bool = True) -> None:
    """SET_VRING_ADDR of every ring with VHOST_VRING_F_LOG (``log_guest_addr`` LOG_USED
    plus the ring's offset), or without it."""
    for ring in port.rings:
        a = ring.addr()
        port.ok(Request.SET_VRING_ADDR, m.VringAddr(
            a.index, m.VringAddr.F_LOG if on else 0, a.descriptor, a.used, a.available,
            LOG_USED + ring.layout.used if on else 0))


def start_logging(port: NetPort, fd: int) -> None:
    set_log_base(port, fd)
    port.ok(Request.SET_FEATURES, m.U64(port.features | LOG_ALL))
    log_used(port)


def dirty_groups(fd: int, size: int = LOG_SIZE) -> set[int]:
    """The guest-physical 32 KiB groups (GPA // BYTE_SPAN) whose log byte is not zero."""
    data = os.pread(fd, size, 0)
    return {i for i, b in enumerate(data) if b}


def groups(gpa: int, length: int) -> set[int]:
    return set(range(gpa // BYTE_SPAN, (gpa + length - 1) // BYTE_SPAN + 1))


@pytest.fixture
def baseline(good: NetPort) -> int:
    """The process's fd count with the good connection up and idle."""
    return fd_count()


@pytest.fixture
def port(backend: Backend) -> Iterator[NetPort]:
    p = NetPort(backend.path, tag="mig", protocol=PROTOCOL)
    try:
        p.start()
        yield p
    finally:
        p.close()


def test_logging_is_offered(port: NetPort) -> None:
    assert port.client.get_u64(Request.GET_FEATURES) & LOG_ALL
    assert port.client.get_u64(Request.GET_PROTOCOL_FEATURES) & ProtocolFeature.LOG_SHMFD


def test_frames_written_while_logging_are_marked(backend: Backend, port: NetPort) -> None:
    """Every RX buffer the back-end fills and every used ring it updates is marked, the
    used rings at log_guest_addr, on whichever data path this process runs (the reflector
    switches to the logging one); the rings' own pages are not."""
    fd = log_memfd()
    try:
        port.check_traffic(8)
        assert dirty_groups(fd) == set()
        start_logging(port, fd)
        frames = make_frames(40, seed=7)
        rx_bufs: list[tuple[int, int]] = []
        for start in range(0, len(frames), 16):
            chunk = frames[start:start + 16]
            posted = [port._post_rx(k, port.pool) for k in range(len(chunk))]
            port.rx.kick()
            sent = [port._post_tx(start + k, f, port.pool) for k, f in enumerate(chunk)]
            port.tx.kick()
            port.tx.wait_used(len(chunk))
            used = dict(port.rx.wait_used(len(chunk)))
            for head, gpa in posted:
                rx_bufs.append((gpa, used[head]))
                assert port.guest.read(gpa + 12, used[head] - 12) in map(swapped, chunk)
            for _, gpa in (*posted, *sent):
                port.pool.release(gpa)
        dirty = dirty_groups(fd)
        for gpa, n in rx_bufs:
            assert groups(gpa, n) <= dirty, f"RX buffer at {gpa:#x} not logged"
        for ring in port.rings:
            assert groups(LOG_USED + ring.layout.used, 8) <= dirty
        assert not dirty & groups(RING_GPA, RING_SIZE), "a ring logged at its own GPA"
        dev = backend.devices[-1]
        assert dev.logging_kicks > 0
        desc = dev.describe()
        # The compiled path marks the log itself where it runs (PYVHOST_PURE=1: the pure).
        assert desc["logging_data_path"] == datapath.logging_name() == (
            "compiled" if datapath.name() == "compiled" and ATOMIC else "python")
        print(f"\ndata path {datapath.name()}; while logging: {datapath.logging_name()}, "
              f"{dev.logging_kicks} kicks")
    finally:
        os.close(fd)


def test_logging_off_marks_nothing(port: NetPort) -> None:
    """A log given but VHOST_F_LOG_ALL not acked, or acked and taken back: no mark; the
    data path returns to the fast one."""
    fd = log_memfd()
    try:
        set_log_base(port, fd)
        log_used(port)
        port.check_traffic(8)
        assert dirty_groups(fd) == set()
        port.ok(Request.SET_FEATURES, m.U64(port.features | LOG_ALL))
        port.check_traffic(8)
        assert dirty_groups(fd)
        os.pwrite(fd, bytes(LOG_SIZE), 0)
        port.ok(Request.SET_FEATURES, m.U64(port.features))
        log_used(port, on=False)
        port.check_traffic(8)
        assert dirty_groups(fd) == set()
    finally:
        os.close(fd)


def held_log_maps(name: str) -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if f"/memfd:{name} " in line)


def test_a_replaced_log_is_unmapped_and_its_fd_closed(backend: Backend) -> None:
    """QEMU sends a new log when it resizes it (memory hot-plugged during a migration) and
    at each migration: the old one must go, or every migration leaks a mapping and an fd."""
    names = [f"pyvhost-test-log{i}" for i in range(5)]
    fds = [log_memfd(name) for name in names]
    base = fd_count()
    port = NetPort(backend.path, tag="mig", protocol=PROTOCOL)
    try:
        port.start()
        started = fd_count()
        set_log_base(port, fds[0])
        port.ok(Request.SET_FEATURES, m.U64(port.features | LOG_ALL))
        for i in range(1, 5):
            set_log_base(port, fds[i])
            old = os.pread(fds[i - 1], LOG_SIZE, 0)
            port.check_traffic(4, seed=i)
            assert [held_log_maps(n) for n in names] == [0] * i + [1] + [0] * (4 - i)
            assert fd_count() == started + 1  # mmap's dup of the one log in force
            assert dirty_groups(fds[i]), "the new log is marked"
            assert os.pread(fds[i - 1], LOG_SIZE, 0) == old, "the old one is not"
    finally:
        port.close()
        for fd in fds:
            os.close(fd)
    wait_until(lambda: not any(held_log_maps(n) for n in names), "log unmapped at close")
    wait_fd_count(base - len(fds), "every fd of the port and its log closed")


@reaction
def test_set_log_base_without_log_shmfd(backend: Backend, good: NetPort, baseline: int,
                                        need_reply: bool) -> None:
    """Without LOG_SHMFD there is no way to share a log: refused, and the front-end (which
    waits for no reply then) is closed on."""
    bad = NetPort(backend.path, tag="bad")  # QEMU_PROTOCOL: no LOG_SHMFD
    fd = log_memfd()
    try:
        bad.start()
        bad.client.send(Request.SET_LOG_BASE, m.LogDescription(LOG_SIZE, 0),
                        flags=FLAG_NEED_REPLY if need_reply else 0, fds=[fd])
        assert bad.client.wait_closed() == b""
    finally:
        os.close(fd)
    finish(good, bad, baseline)


def _bad_log(name: str) -> tuple[int, int, int]:
    """(fd, size, offset) of a hostile SET_LOG_BASE."""
    if name == "too-small":
        return log_memfd(size=4096), 4097, 0
    if name == "offset-past-file":
        return log_memfd(size=8192), 4096, 4097
    if name == "offset-overflows":
        return log_memfd(size=8192), 8192, 2**64 - 4096
    if name == "size-zero":
        return log_memfd(size=8192), 0, 0
    if name == "eventfd":
        return os.eventfd(0), 8, 0
    raise AssertionError(name)


@pytest.mark.parametrize("case", ["too-small", "offset-past-file", "offset-overflows",
                                  "size-zero", "eventfd"])
def test_a_bad_log_closes_the_connection(backend: Backend, good: NetPort, baseline: int,
                                         case: str) -> None:
    bad = NetPort(backend.path, tag="bad", protocol=PROTOCOL)
    fd, size, offset = _bad_log(case)
    try:
        bad.start()
        bad.client.send(Request.SET_LOG_BASE, m.LogDescription(size, offset), fds=[fd])
        assert bad.client.wait_closed() == b""
    finally:
        os.close(fd)
    finish(good, bad, baseline)


def test_a_log_fd_missing_closes_the_connection(backend: Backend, good: NetPort,
                                                baseline: int) -> None:
    bad = NetPort(backend.path, tag="bad", protocol=PROTOCOL)
    bad.start()
    bad.client.send(Request.SET_LOG_BASE, m.LogDescription(LOG_SIZE, 0))
    assert bad.client.wait_closed() == b""
    finish(good, bad, baseline)


def test_a_bad_log_after_a_good_one_leaves_nothing(backend: Backend, good: NetPort,
                                                   baseline: int) -> None:
    bad = NetPort(backend.path, tag="bad", protocol=PROTOCOL)
    fd, small = log_memfd("pyvhost-test-goodlog"), log_memfd(size=4096)
    try:
        bad.start()
        start_logging(bad, fd)
        bad.check_traffic(4)
        assert held_log_maps("pyvhost-test-goodlog") == 1
        bad.client.send(Request.SET_LOG_BASE, m.LogDescription(8192, 0), fds=[small])
        assert bad.client.wait_closed() == b""
    finally:
        os.close(fd)
        os.close(small)
    finish(good, bad, baseline)
    assert held_log_maps("pyvhost-test-goodlog") == 0


@reaction
@pytest.mark.parametrize("flags,log", [(2, 0), (0x100, 0), (1, 2**64 - 16)],
                         ids=["unknown-flag", "high-flag", "log-addr-overflows"])
def test_bad_vring_log_fields(backend: Backend, good: NetPort, baseline: int,
                              need_reply: bool, flags: int, log: int) -> None:
    bad = NetPort(backend.path, tag="bad", protocol=PROTOCOL)
    bad.start()
    a = bad.tx.addr()
    bad.client.send(Request.SET_VRING_ADDR,
                    m.VringAddr(a.index, flags, a.descriptor, a.used, a.available, log),
                    flags=FLAG_NEED_REPLY if need_reply else 0)
    expect_reaction(bad.client, Request.SET_VRING_ADDR, need_reply)
    if need_reply:
        bad.check_traffic(4)  # refused, nothing changed
    finish(good, bad, baseline)


def test_set_log_fd_is_accepted_and_its_fd_closed(port: NetPort) -> None:
    base = fd_count()
    efd = os.eventfd(0)
    try:
        assert port.client.ack(Request.SET_LOG_FD, fds=[efd]) == 0
    finally:
        os.close(efd)
    wait_fd_count(base)
    port.check_traffic(4)


def test_get_vring_base_stops_the_ring_where_the_destination_resumes(port: NetPort) -> None:
    """GET_VRING_BASE answers the next available index (everything taken was used) and
    stops the ring: a kick then serves nothing. SET_VRING_BASE with that index, the
    addresses and a kick start it again where it was, as on a migration's destination."""
    port.check_traffic(24)
    bases = {}
    for ring in port.rings:
        reply = port.client.request(Request.GET_VRING_BASE, m.VringState(ring.index, 0))
        assert isinstance(reply, m.VringState) and reply.index == ring.index
        bases[ring.index] = reply.num
    assert bases == {0: 24, 1: 24}
    frame = make_frames(1, seed=9)[0]
    port._post_rx(0, port.pool)
    port.rx.kick()
    port._post_tx(0, frame, port.pool)
    port.tx.kick()
    port.client.sync()
    assert port.tx.used_idx() == 24 and port.rx.used_idx() == 24, "a stopped ring served"
    for ring in port.rings:
        port.ok(Request.SET_VRING_BASE, m.VringState(ring.index, bases[ring.index]))
        port.ok(Request.SET_VRING_ADDR, ring.addr())
        assert ring.kick_fd is not None
        port.ok(Request.SET_VRING_KICK, m.VringFd(ring.index, False), fds=[ring.kick_fd])
    port.tx.wait_used(1)
    ((_head, written),) = port.rx.wait_used(1)
    assert written == 12 + len(frame)
