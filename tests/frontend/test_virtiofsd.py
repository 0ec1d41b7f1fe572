"""The probe against QEMU 7.2's virtiofsd, the back-end that forks after accept.

In its default sandbox (``-o sandbox=namespace``) virtiofsd accepts the connection, then
forks; the CHILD serves it and maps guest memory, while SO_PEERCRED still names the
parent, which maps nothing. A probe that measured the SO_PEERCRED process reported "no
leak" with 0 mappings throughout: a pass for a process it never saw. These tests show the
probe measuring the child, and refusing to judge the parent ("cannot measure", exit 2).
virtiofsd serves one connection and exits, so each test starts its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pyvhost.frontend import CannotMeasureError, ProbeConfig, run_probe
from pyvhost.tools.process import pyvhost_argv
from pyvhost.tools.procfs import unix_listening
from support.procs import Procs, Started

pytestmark = pytest.mark.qemu

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


def start_virtiofsd(procs: Procs, where: str, *extra: str) -> tuple[str, Started]:
    if not os.access(VIRTIOFSD, os.X_OK):
        pytest.skip(f"{VIRTIOFSD} not installed (Debian package qemu-system-common)")
    workdir = Path(where)
    shared = workdir / "shared"
    shared.mkdir(exist_ok=True)
    sock = str(workdir / "vfs.sock")
    started = procs.start([VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={shared}",
                           *extra], "virtiofsd", stop_signal=signal.SIGTERM)
    deadline = time.monotonic() + 30
    while not unix_listening(sock):
        assert started.proc.poll() is None, started.output()
        assert time.monotonic() < deadline, started.output()
        time.sleep(0.05)
    return sock, started


def test_default_sandbox_measures_the_forked_child(short_dir: str, procs: Procs) -> None:
    sock, vfs = start_virtiofsd(procs, short_dir)
    report = run_probe(ProbeConfig(sock, cycles=5, regions=3, device="fs"))
    info = f"{report.to_json()}\n{vfs.output()[-2000:]}"
    measured = report.measured
    assert measured is not None, info
    # SO_PEERCRED names the parent (the process we started); the child serves.
    assert measured.peercred_pid == vfs.pid, info
    assert measured.pid != vfs.pid and measured.how == "peer socket", info
    assert set(measured.holders) >= {vfs.pid, measured.pid}, info
    # And the child is where guest memory is: boot RAM, then 3 more regions at the peak
    # (virtiofsd closes each fd right after mmap: mappings only).
    assert (report.before.mappings, report.peak.mappings) == (1, 4), info
    assert report.before.matching_fds == 0, info
    assert report.mem_slots and report.requests_sent == {"ADD_MEM_REG": 15,
                                                         "REM_MEM_REG": 15}, info
    assert report.verdict == "no leak" and not report.stale_files, info


def test_default_sandbox_parent_cannot_be_measured(short_dir: str, procs: Procs) -> None:
    """``--pid PARENT`` is what the old probe did silently: now it is exit 2, never a pass."""
    sock, vfs = start_virtiofsd(procs, short_dir)
    with pytest.raises(CannotMeasureError, match=rf"process {vfs.pid} \(--pid\) does not map"):
        run_probe(ProbeConfig(sock, cycles=5, regions=3, device="fs", pid=vfs.pid))


def test_cli_exits_2_for_the_parent(short_dir: str, procs: Procs) -> None:
    sock, vfs = start_virtiofsd(procs, short_dir)
    done = subprocess.run(pyvhost_argv("probe", "--socket", sock, "--device", "fs",
                                       "--pid", str(vfs.pid), "--json"),
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 2, (done.stdout, done.stderr)
    doc = json.loads(done.stdout)
    assert "does not map the boot region" in json.dumps(doc)
    assert "no leak" not in done.stdout


def test_chroot_sandbox_is_one_process(short_dir: str, procs: Procs) -> None:
    sock, vfs = start_virtiofsd(procs, short_dir, "-o", "sandbox=chroot")
    report = run_probe(ProbeConfig(sock, cycles=5, regions=3, device="fs"))
    info = f"{report.to_json()}\n{vfs.output()[-2000:]}"
    assert report.measured is not None and report.measured.pid == vfs.pid, info
    assert (report.before.mappings, report.peak.mappings) == (1, 4), info
    assert report.verdict == "no leak", info
