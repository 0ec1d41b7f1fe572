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
