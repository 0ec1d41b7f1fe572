"""The transport over a real ``socketpair(AF_UNIX)``: bytes, SCM_RIGHTS fds and peer creds."""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from pyvhost.protocol import messages as m
from pyvhost.protocol.codec import Decoder, encode
from pyvhost.protocol.constants import Request
from pyvhost.protocol.transport import (
    TransportError,
    peer_pid,
    recv_chunk,
    send_message,
    set_cloexec_nonblocking,
)
from support.memfd import memfd


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def test_message_with_fds_arrives_with_the_same_files(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    rd, wr = os.pipe()
    mfd = memfd(name="pyvhost-transport")
    sent = [efd, rd, mfd]
    data = encode(Request.SET_VRING_KICK, m.VringFd(0, False))
    send_message(a, data, sent)
    got, fds = recv_chunk(b)
    try:
        assert got == data
        assert len(fds) == 3
        # New numbers (ours are still open) for the same open files, in order.
        assert not set(fds) & set(sent)
        for mine, theirs in zip(sent, fds, strict=True):
            assert same_file(mine, theirs)
            assert not os.get_inheritable(theirs)  # received close-on-exec
        # The same eventfd: a count written through one is read through the other.
        os.eventfd_write(fds[0], 5)
        assert os.eventfd_read(efd) == 5
        os.write(wr, b"x")
        assert os.read(fds[1], 1) == b"x"
    finally:
        close_all(fds)
        close_all([efd, rd, wr, mfd])


def test_sender_keeps_its_fds(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    efd = os.eventfd(0)
    send_message(a, b"x", [efd])
    os.fstat(efd)  # still open: send_message does not take ownership
    _, fds = recv_chunk(b)
    close_all(fds)
    os.close(efd)


def test_message_without_fds(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    data = encode(Request.GET_FEATURES)
    send_message(a, data)
    assert recv_chunk(b) == (data, [])


def test_eof_is_empty_bytes(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.shutdown(socket.SHUT_WR)
    assert recv_chunk(b) == (b"", [])


def test_nonblocking_socket_with_nothing_to_read(
        pair: tuple[socket.socket, socket.socket]) -> None:
    _, b = pair
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        recv_chunk(b)


def test_large_message_is_sent_whole_and_its_fd_comes_once(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    data = bytes(range(256)) * 4096  # 1 MiB: more than the socket buffer
    efd = os.eventfd(0)
    received = bytearray()
    fds: list[int] = []

    def reader() -> None:
        while len(received) < len(data):
            chunk, chunk_fds = recv_chunk(b)
            if not chunk:
                return
            received.extend(chunk)
            fds.extend(chunk_fds)

    t = threading.Thread(target=reader)
    t.start()
    try:
        send_message(a, data, [efd])
    finally:
        t.join(timeout=30)
    assert not t.is_alive()
    try:
        assert bytes(received) == data
        assert len(fds) == 1
        assert same_file(fds[0], efd)
    finally:
        close_all(fds)
        os.close(efd)


def test_kernel_glues_fdless_bytes_before_an_fd_segment_never_after(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """The read boundary the codec's fd attribution relies on: fds arrive with a chunk
    that ends inside (or at the end of) the message they were sent with."""
    a, b = pair
    e1, e2 = os.eventfd(0), os.eventfd(0)
    msgs = [encode(Request.GET_FEATURES),
            encode(Request.SET_VRING_KICK, m.VringFd(0, False)),
            encode(Request.GET_QUEUE_NUM),
            encode(Request.SET_VRING_CALL, m.VringFd(0, False))]
    send_message(a, msgs[0])
    send_message(a, msgs[1], [e1])
    send_message(a, msgs[2])
    send_message(a, msgs[3], [e2])
    a.shutdown(socket.SHUT_WR)
    dec = Decoder()
    chunks: list[tuple[bytes, int]] = []
    while True:
        data, fds = recv_chunk(b)
        if not data:
            break
        chunks.append((data, len(fds)))
        dec.feed(data, fds)
    # Each read stops right after the segment that carried fds.
    assert chunks == [(msgs[0] + msgs[1], 1), (msgs[2] + msgs[3], 1)]
    got = []
    while (msg := dec.next_message()) is not None:
        got.append(msg)
    assert [msg.request for msg in got] == [Request.GET_FEATURES, Request.SET_VRING_KICK,
                                            Request.GET_QUEUE_NUM, Request.SET_VRING_CALL]
    assert [len(msg.fds) for msg in got] == [0, 1, 0, 1]
    assert same_file(got[1].fds.peek(0), e1)
    assert same_file(got[3].fds.peek(0), e2)
    for msg in got:
        msg.fds.close()
    close_all([e1, e2])


@pytest.mark.parametrize("n", [16, 17, 64])
def test_too_many_fds_raise_and_leak_nothing(
        pair: tuple[socket.socket, socket.socket], n: int) -> None:
    a, b = pair
    before = open_fd_count()
    mine = [os.eventfd(0) for _ in range(n)]
    send_message(a, b"0123456789ab", mine)
    close_all(mine)
    if n <= 16:
        # Room is made for twice the fds any message may carry: these still arrive, so
        # the codec can tell the peer what it did wrong.
        data, fds = recv_chunk(b)
        assert data == b"0123456789ab"
        assert len(fds) == n
        close_all(fds)
    else:
        with pytest.raises(TransportError):
            recv_chunk(b)
    assert open_fd_count() == before


def test_peer_pid_of_a_socketpair_is_this_process(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    assert peer_pid(a) == os.getpid()
    assert peer_pid(b) == os.getpid()


def test_peer_pid_unknown_for_an_unconnected_socket() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        assert peer_pid(s) is None


def test_set_cloexec_nonblocking() -> None:
    fd = os.eventfd(0)  # blocking
    try:
        os.set_inheritable(fd, True)
        set_cloexec_nonblocking(fd)
        assert not os.get_inheritable(fd)
        assert not os.get_blocking(fd)
        with pytest.raises(BlockingIOError) as info:
            os.eventfd_read(fd)
        assert info.value.errno == errno.EAGAIN
    finally:
        os.close(fd)
