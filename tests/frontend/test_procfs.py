"""procfs measurements, taken on this test process itself."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pyvhost.frontend.memory import GuestRam
from pyvhost.tools import procfs
from pyvhost.units import MiB

PID = os.getpid()


def test_counts_our_own_fds_and_mappings() -> None:
    base = procfs.measure(PID, "pyvhost-fe-test-")
    with GuestRam(0, 4 * MiB, name="pyvhost-fe-test-a") as a, \
            GuestRam(0, 2 * MiB, name="pyvhost-fe-test-b"):
        usage = procfs.measure(PID, "pyvhost-fe-test-")
        # Each region: our fd plus the dup that CPython's mmap keeps.
        assert usage.matching_fds == base.matching_fds + 4
        assert usage.fds == base.fds + 4
        assert usage.mappings == base.mappings + 2
        assert usage.mapped_bytes == base.mapped_bytes + 6 * MiB
        fds = procfs.matching_fds(PID, "pyvhost-fe-test-a")
        assert a.fd in fds
        assert fds[a.fd] == "/memfd:pyvhost-fe-test-a (deleted)"
    assert procfs.measure(PID, "pyvhost-fe-test-") == base


def test_count_fds_follows_open_and_close() -> None:
    before = procfs.count_fds(PID)
    r, w = os.pipe()
    try:
        assert procfs.count_fds(PID) == before + 2
        assert "pipe:" in procfs.fd_targets(PID)[r]
    finally:
        os.close(r)
        os.close(w)
    assert procfs.count_fds(PID) == before


def test_parse_maps_line_keeps_paths_with_spaces() -> None:
    line = ("7f0000000000-7f0000200000 rw-s 00000000 00:01 4242                       "
            "/memfd:pyvhost-fe-1-0 (deleted)\n")
    mp = procfs.parse_maps_line(line)
    assert (mp.start, mp.end, mp.perms, mp.offset, mp.inode) == (
        0x7f0000000000, 0x7f0000200000, "rw-s", 0, 4242)
    assert mp.path == "/memfd:pyvhost-fe-1-0 (deleted)"
    assert mp.size == 2 * MiB
    anon = procfs.parse_maps_line("00400000-00401000 r-xp 00000000 00:00 0\n")
    assert anon.path == ""
    with pytest.raises(procfs.ProcfsError):
        procfs.parse_maps_line("garbage\n")


def test_a_vanished_pid_is_a_clear_error() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(procfs.ProcessGoneError, match=f"process {child.pid} is gone"):
        procfs.measure(child.pid, "x")
    with pytest.raises(procfs.ProcessGoneError):
        procfs.count_fds(child.pid)
    with pytest.raises(procfs.ProcessGoneError):
        procfs.mappings(child.pid)


def test_permission_denied_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(path: str) -> list[str]:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "listdir", denied)
    with pytest.raises(procfs.ProcfsPermissionError, match=r"permission denied.*ptrace"):
        procfs.measure(1, "x")
