"""Finding the process that serves a connection: the peer socket's inode (sock_diag), the
processes holding it (/proc/*/fd), and the one that maps the boot region."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pyvhost.frontend.memory import GuestRam, MiB, name_prefix
from pyvhost.frontend.peer import (
    Candidates,
    CannotMeasureError,
    choose,
    descendants,
    gone,
    peer_inode,
    socket_inode,
)
from pyvhost.tools import procfs

# A child that maps the region fd it was given and holds the socket it was given, like a
# back-end that forked after accept.
CHILD = ("import mmap, os, sys, time; fd = int(sys.argv[1]); "
         "m = mmap.mmap(fd, 0, mmap.MAP_SHARED); os.close(fd); "
         "print('ready', flush=True); time.sleep(60)")


@pytest.fixture
def forked() -> Iterator[tuple[socket.socket, GuestRam, subprocess.Popen[str]]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    boot = GuestRam(0, 2 * MiB)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(boot.fd)],
                             pass_fds=(boot.fd, theirs.fileno()), stdout=subprocess.PIPE,
                             text=True)
    theirs.close()  # only the child holds the other end now
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        yield ours, boot, child
    finally:
        child.kill()
        child.wait()
        ours.close()
        boot.close()


def test_peer_inode_is_the_other_end() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert peer_inode(a) == socket_inode(b)
        assert peer_inode(b) == socket_inode(a)
        assert procfs.socket_holders(socket_inode(b)) == [os.getpid()]


def test_the_child_that_maps_the_boot_region_is_chosen(
        forked: tuple[socket.socket, GuestRam, subprocess.Popen[str]]) -> None:
    ours, boot, child = forked
    candidates = Candidates.of(ours)
    # SO_PEERCRED names the socketpair's creator (us); the holder is the child.
    assert candidates.peercred_pid == os.getpid()
    assert candidates.holders == (child.pid,)
    measured = choose(candidates, name_prefix(), boot.name)
    assert (measured.pid, measured.how) == (child.pid, "peer socket")
    assert measured.as_dict()["socket_holders"] == [child.pid]


def test_a_pid_that_does_not_map_the_region_cannot_be_measured(
        forked: tuple[socket.socket, GuestRam, subprocess.Popen[str]]) -> None:
    ours, boot, child = forked
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(CannotMeasureError, match=rf"process {bystander.pid} \(--pid\)"):
            choose(Candidates.of(ours), name_prefix(), boot.name, bystander.pid)
        # Nobody at the other end maps a file that is not the boot region's.
        with pytest.raises(CannotMeasureError, match="no process at the other end"):
            choose(Candidates.of(ours), name_prefix(), "pyvhost-fe-0-none")
    finally:
        bystander.kill()
        bystander.wait()
    assert choose(Candidates.of(ours), name_prefix(), boot.name, child.pid).how == "--pid"


def test_per_file_holdings(forked: tuple[socket.socket, GuestRam,
                                         subprocess.Popen[str]]) -> None:
    _, boot, child = forked
    usage = procfs.measure(child.pid, name_prefix())
    assert usage.held_files() == [boot.name]
    # One mapping, and the fd CPython's mmap keeps (a dup of the one the child closed).
    assert usage.files[boot.name] == procfs.FileUsage(fds=1, mappings=1,
                                                      mapped_bytes=2 * MiB)
    assert usage.holds(boot.name) and not usage.holds("pyvhost-fe-0-other")


def test_descendants_and_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert child.pid in descendants(os.getpid())
        assert not gone(child.pid)
    finally:
        child.kill()
        child.wait()
    assert gone(child.pid)
