"""The probe's memory-slots path against a real back-end: qemu-storage-daemon.

qemu-storage-daemon's vhost-user-blk export is built on libvhost-user, which offers
CONFIGURE_MEM_SLOTS: so this is where ADD_MEM_REG / REM_MEM_REG meet a real C back-end
(DPDK 22.11 only takes SET_MEM_TABLE).
"""

from __future__ import annotations

import signal
import time

import pytest

from pyvhost.frontend import FrontendConnectError, ProbeConfig, run_probe
from pyvhost.frontend.hostile import HostileConfig, run_hostile
from pyvhost.tools.procfs import unix_listening
from support.procs import Procs, need

pytestmark = pytest.mark.qemu


def test_probe_mem_slots_against_qemu_storage_daemon(short_dir: str, procs: Procs) -> None:
    binary = need("qemu-storage-daemon", "qemu-system-common")
    sock = f"{short_dir}/qsd.sock"
    qsd = procs.start([binary, "--blockdev", "driver=null-co,node-name=null0",
                       "--export", "type=vhost-user-blk,id=e0,node-name=null0,"
                       f"addr.type=unix,addr.path={sock}"],
                      "qemu-storage-daemon", stop_signal=signal.SIGTERM)
    deadline = time.monotonic() + 30
    while True:
        if qsd.proc.poll() is not None:
            pytest.fail(f"qemu-storage-daemon exited:\n{qsd.output()}")
        try:
            report = run_probe(ProbeConfig(sock, cycles=10, regions=3, timeout=5,
                                               device="blk"))
            break
        except FrontendConnectError:  # not listening yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    info = f"{report.to_json()}\n{qsd.output()}"
    assert report.pid == qsd.pid, info
    assert report.mem_slots and report.reply_ack, info
    assert report.requests_sent == {"ADD_MEM_REG": 30, "REM_MEM_REG": 30}, info
    # libvhost-user closes a region's fd once mapped: mappings only.
    assert report.before.mappings == 1 and report.peak.mappings == 4, info
    assert report.after.mappings == report.before.mappings, info
    assert report.after.fds == report.before.fds, info
    assert report.verdict == "no leak", info


def test_hostile_cases_against_qemu_storage_daemon(short_dir: str, procs: Procs) -> None:
    """libvhost-user serves one client per export, so the witness is a second export of
    the same process (--witness-socket). What the suite finds there: the eventfds that
    came with a GET_FEATURES are never closed, and a SET_VRING_BASE for ring 0xffffffff
    kills the daemon."""
    binary = need("qemu-storage-daemon", "qemu-system-common")
    socks = [f"{short_dir}/qsd0.sock", f"{short_dir}/qsd1.sock"]
    argv = [binary]
    for i, sock in enumerate(socks):
        argv += ["--blockdev", f"driver=null-co,node-name=null{i}", "--export",
                 f"type=vhost-user-blk,id=e{i},node-name=null{i},addr.type=unix,"
                 f"addr.path={sock}"]
    qsd = procs.start(argv, "qemu-storage-daemon", stop_signal=signal.SIGTERM)
    deadline = time.monotonic() + 30
    while not all(unix_listening(s) for s in socks):
        assert qsd.proc.poll() is None and time.monotonic() < deadline, qsd.output()
        time.sleep(0.05)
    report = run_hostile(HostileConfig(socks[0], socks[1], device="blk", cases=(
        "vring-size-zero", "fds-where-none-belong", "vring-index-u32")))
    outcomes = {r.name: r.outcome for r in report.results}
    info = f"{report.to_json()}\n{qsd.output()[-2000:]}"
    assert report.measured is not None and report.measured.pid == qsd.pid, info
    # No rings the suite drives for blk: the witness is judged by its answers alone.
    assert report.frames is not None and not report.frames.used, info
    assert report.frames.detail == "blk: control messages only", info
    assert outcomes["vring-size-zero"] == "pass", info  # accepted, still serving
    assert outcomes["fds-where-none-belong"] == "leaked", info
    assert outcomes["vring-index-u32"] == "crashed", info
    assert qsd.proc.wait(10) != 0
