"""The dirty log (SET_LOG_BASE): mapping checks, marks as the spec lays them out, what a
mark may never touch, and what a log holds.

The log's bytes are read through the memfd (``os.pread``), never through the code under
test, so a mark at a wrong offset can not hide itself.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvhost.memory import DirtyLog, DirtyLogError, dirtylog
from pyvhost.memory.dirtylog import BYTE_SPAN, MAX_LOG_SIZE
from pyvhost.protocol.messages import LogDescription
from support.memfd import memfd

PAGE = 4096


def dirty_pages(fd: int, size: int, offset: int = 0) -> set[int]:
    """Pages whose bit is set in the log of ``size`` bytes at ``offset`` of ``fd``."""
    data = os.pread(fd, size, offset)
    return {8 * i + b for i, byte in enumerate(data) for b in range(8) if byte >> b & 1}


@pytest.fixture
def log_fd() -> Iterator[int]:
    fd = memfd(8192, name="pyvhost-test-log")
    yield fd
    os.close(fd)


@pytest.fixture(params=["atomic", "read-modify-write"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a mark is stored: libatomic's fetch-or, and without it."""
    if request.param == "atomic":
        if dirtylog._ATOMIC_FETCH_OR is None:
            pytest.skip("libatomic.so.1 not installed (Debian package libatomic1)")
    else:
        monkeypatch.setattr(dirtylog, "_ATOMIC_FETCH_OR", None)
    return str(request.param)


def test_marks_follow_the_spec_layout(log_fd: int, way: str) -> None:
    """"page = addr / VHOST_LOG_PAGE; log[page / 8] |= 1 << page % 8", exactly."""
    log = DirtyLog.map(LogDescription(4096, 0), log_fd)
    try:
        assert log.describe()["atomic"] is (way == "atomic")
        log.mark(0x5000, 1)                  # page 5: byte 0, bit 5
        log.mark(0x40_0000 + 100, 8)         # page 1024: byte 128, bit 0
        assert dirty_pages(log_fd, 4096) == {5, 1024}
        assert os.pread(log_fd, 1, 0) == b"\x20" and os.pread(log_fd, 1, 128) == b"\x01"
        # A range over several pages and log bytes marks every page it touches, no other.
        log.mark(0x10_0000 - 1, 2 * BYTE_SPAN)   # pages 255 .. 271
        assert dirty_pages(log_fd, 4096) == {5, 1024, *range(255, 272)}
        log.mark(0x7000, 0x1000)             # page 7, not 8: the range ends before it
        assert 7 in dirty_pages(log_fd, 4096) and 8 not in dirty_pages(log_fd, 4096)
        assert log.marks == 4 and log.overflows == 0
    finally:
        log.close()


def test_the_log_starts_at_its_offset(log_fd: int, way: str) -> None:
    """"Log starts at the supplied offset in the supplied file descriptor": GPA 0 is bit
    0 of byte ``mmap_offset``, even when the offset is not page aligned."""
    log = DirtyLog.map(LogDescription(1000, 4100), log_fd)
    try:
        log.mark(0, 1)
        assert os.pread(log_fd, 4100, 0) == bytes(4100)
        assert os.pread(log_fd, 1, 4100) == b"\x01"
        log.mark(999 * BYTE_SPAN + 7 * 4096, 1)
        assert os.pread(log_fd, 1, 4100 + 999) == b"\x80"
    finally:
        log.close()


def test_nothing_past_the_log_is_written(log_fd: int, way: str) -> None:
    """A write beyond what the log covers is counted, never stored past ``mmap_size``."""
    log = DirtyLog.map(LogDescription(16, 0), log_fd)
    try:
        log.mark(16 * BYTE_SPAN, 1)                       # first page past the log
        log.mark(15 * BYTE_SPAN, 3 * BYTE_SPAN)           # straddles the end
        log.mark(2**64 - 1, 2**64)                        # absurd, guest-controlled
        log.mark(-5, 10)
        log.mark(0, 0)
        assert os.pread(log_fd, 8192, 0) == bytes(15) + b"\xff" + bytes(8192 - 16)
        assert log.overflows == 3
    finally:
        log.close()


@settings(max_examples=300, deadline=None)
@given(gpa=st.integers(0, 2**64), length=st.integers(0, 2**64))
def test_any_range_marks_exactly_its_pages(gpa: int, length: int) -> None:
    fd = memfd(64, name="pyvhost-test-log")
    try:
        log = DirtyLog.map(LogDescription(32, 16), fd)
        log.mark(gpa, length)
        log.close()
        data = os.pread(fd, 64, 0)
        assert data[:16] == bytes(16) and data[48:] == bytes(16)
        want = set()
        if length:
            want = set(range(gpa // 4096, min(256, (gpa + length - 1) // 4096 + 1)))
        assert dirty_pages(fd, 32, 16) == want
    finally:
        os.close(fd)


def test_a_bit_another_writer_set_is_kept(log_fd: int, way: str) -> None:
    """QEMU shares one log between every vhost device of a VM: a mark must not erase a bit
    another back-end set in the same byte."""
    os.pwrite(log_fd, b"\x04", 3)
    log = DirtyLog.map(LogDescription(64, 0), log_fd)
    try:
        log.mark(3 * BYTE_SPAN, 1)
        assert os.pread(log_fd, 1, 3) == b"\x05"
    finally:
        log.close()


def test_a_closed_log_is_not_marked(log_fd: int, way: str) -> None:
    log = DirtyLog.map(LogDescription(64, 0), log_fd)
    log.close()
    log.mark(0, 4096)  # no store through an address that is no longer mapped
    assert os.pread(log_fd, 64, 0) == bytes(64)
    assert log.marks == 0


@pytest.mark.parametrize(("desc", "why"), [
    (LogDescription(0, 0), "size 0"),
    (LogDescription(4096, 2**64 - 4095), "overflows 64 bits"),
    (LogDescription(2**64 - 1, 2), "overflows 64 bits"),
    (LogDescription(8193, 0), "past the end of its file"),
    (LogDescription(4096, 4097), "past the end of its file"),
    (LogDescription(MAX_LOG_SIZE + 1, 0), r"2\*\*52"),
], ids=["empty", "offset-wraps", "size-wraps", "file-too-small", "offset-too-far",
        "too-large"])
def test_bad_logs_are_refused(log_fd: int, desc: LogDescription, why: str) -> None:
    with pytest.raises(DirtyLogError, match=why):
        DirtyLog.map(desc, log_fd)


def test_a_log_that_is_not_a_regular_file_is_refused() -> None:
    fd = os.eventfd(0)
    try:
        with pytest.raises(DirtyLogError, match="not a regular file"):
            DirtyLog.map(LogDescription(8, 0), fd)
    finally:
        os.close(fd)


def fds_and_maps() -> tuple[int, int]:
    with open("/proc/self/maps") as f:
        maps = sum(1 for line in f if "/memfd:pyvhost-test-log " in line)
    return len(os.listdir("/proc/self/fd")), maps


def test_a_log_holds_one_fd_and_one_mapping_until_closed() -> None:
    fd = memfd(8192, name="pyvhost-test-log")
    before = fds_and_maps()
    log = DirtyLog.map(LogDescription(8192, 0), fd)
    os.close(fd)  # the connection closes the fd that came on the socket
    assert fds_and_maps() == (before[0], before[1] + 1)  # mmap's dup replaces it
    assert log.describe()["fds_held"] == 1
    log.close()
    log.close()
    assert fds_and_maps() == (before[0] - 1, before[1])
    assert log.describe()["fds_held"] == 0


def test_seals_are_reported() -> None:
    fd = memfd(4096, name="pyvhost-test-log", sealing=True)
    try:
        plain = DirtyLog.map(LogDescription(4096, 0), fd)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        sealed = DirtyLog.map(LogDescription(4096, 0), fd)
        assert not plain.shrink_sealed and sealed.shrink_sealed
        assert plain.covers == 4096 * 8 * PAGE
        plain.close()
        sealed.close()
    finally:
        os.close(fd)
