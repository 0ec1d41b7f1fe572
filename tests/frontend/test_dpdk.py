"""The probe against a real C back-end: DPDK testpmd's vhost PMD (net_vhost0).

Traps from the testbed notes, handled by the suite's ``procs.testpmd`` (tests/support):
testpmd exits when its stdin hits end of file (CI has no stdin), so it gets a pipe that
stays open; ``-m 512`` needs ``--total-num-mbufs=2048``; every process needs its own
``--file-prefix``. DPDK 22.11 does not offer CONFIGURE_MEM_SLOTS, so only SET_MEM_TABLE
mode (at most 8 regions) applies.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass

import pytest
from click.testing import CliRunner

from pyvhost.cli.probe import probe
from pyvhost.frontend import Frontend, FrontendMemory, ProbeConfig, ProbeError, run_probe
from pyvhost.tools.process import pyvhost_argv
from pyvhost.units import MiB
from support.procs import Procs, Started
from support.schemas import validate

pytestmark = pytest.mark.dpdk



@dataclass(frozen=True)
class Pmd:
    socket: str
    started: Started

    @property
    def pid(self) -> int:
        return self.started.pid

    def log_tail(self, chars: int = 3000) -> str:
        return self.started.output()[-chars:]

    def alive(self) -> bool:
        return self.started.proc.poll() is None


def _listening(path: str) -> bool:
    """Whether a Unix socket bound to ``path`` is listening (/proc/net/unix, __SO_ACCEPTCON).

    Unlike a test connect, this does not open a vhost-user session on the back-end; and
    testpmd's stdout is a file here, so fully buffered: its log can not tell readiness.
    """
    with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
                return True
    return False


@pytest.fixture
def testpmd(short_dir: str, procs: Procs) -> Pmd:
    """testpmd serving net_vhost0 on a socket; ``procs`` ends it by pid, pass or fail.

    ``procs.testpmd`` skips when dpdk-testpmd is missing, gives testpmd a stdin pipe that
    stays open, a unique --file-prefix, and removes DPDK's runtime directory afterwards.
    """
    sock = f"{short_dir}/vh.sock"
    started = procs.testpmd(f"net_vhost0,iface={sock},queues=1", name="testpmd-probe")
    pmd = Pmd(sock, started)
    deadline = time.monotonic() + 60
    while not _listening(sock):
        if not pmd.alive():
            pytest.fail(f"testpmd exited with {started.proc.returncode} during start-up:\n"
                        f"{pmd.log_tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"testpmd not listening on {sock} after 60 s:\n{pmd.log_tail()}")
        time.sleep(0.05)
    return pmd


def _check_schema(doc: dict[str, object]) -> None:
    validate(doc, "pyvhost.probe/1")
    latency = doc["latency_ms"]
    assert isinstance(latency, dict)
    for stats in [latency, *latency["by_request"].values()]:
        assert 0 < stats["median"] <= stats["p99"] <= stats["max"]


def test_probe_library_api_against_dpdk(testpmd: Pmd) -> None:
    report = run_probe(ProbeConfig(testpmd.socket, cycles=20, regions=3))
    info = f"{report.to_json()}\n{testpmd.log_tail()}"
    assert report.pid == testpmd.pid, info
    # QEMU 7.2 (the default profile) acks all DPDK 22.11 offers; no CONFIGURE_MEM_SLOTS.
    assert not report.mem_slots and report.reply_ack, info
    assert set(report.protocol_features) == {
        "MQ", "LOG_SHMFD", "RARP", "REPLY_ACK", "NET_MTU", "BACKEND_REQ", "CRYPTO_SESSION",
        "BACKEND_SEND_FD", "HOST_NOTIFIER", "STATUS"}, info
    assert report.measured is not None and report.measured.how == "peer socket", info
    assert report.requests_sent == {"SET_MEM_TABLE": 20 * 3 * 2}, info
    # What DPDK holds of ours: one fd and one mapping per region of the current table.
    assert (report.before.matching_fds, report.before.mappings) == (1, 1), info
    assert (report.peak.matching_fds, report.peak.mappings) == (4, 4), info
    # No growth: DPDK closes and unmaps what each new SET_MEM_TABLE replaces.
    assert report.after.fds == report.before.fds, info
    assert report.after.matching_fds == report.before.matching_fds, info
    assert report.after.mappings == report.before.mappings, info
    assert report.after.mapped_bytes == report.before.mapped_bytes == 64 * MiB, info
    assert report.verdict == "no leak", info
    # And it lets go of everything when the front-end hangs up.
    assert report.disconnected is not None, info
    assert (report.disconnected.matching_fds, report.disconnected.mappings) == (0, 0), info
    assert testpmd.alive()


def test_probe_cli_json_against_dpdk(testpmd: Pmd) -> None:
    cmd = pyvhost_argv("probe", "--socket", testpmd.socket, "--cycles", "20", "--regions", "3",
                       "--json")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    info = f"stdout={done.stdout!r}\nstderr={done.stderr!r}\n{testpmd.log_tail()}"
    assert done.returncode == 0, info
    assert len(done.stdout.strip().splitlines()) == 1, info
    doc = json.loads(done.stdout)
    assert isinstance(doc, dict)
    _check_schema(doc)
    assert doc["pid"] == testpmd.pid
    assert (doc["cycles"], doc["regions"], doc["region_size"]) == (20, 3, 2 * MiB)
    assert doc["mem_slots"] is False
    assert doc["fds_after"] == doc["fds_before"], info
    assert doc["region_fds_after"] == doc["region_fds_before"] == 1, info
    assert doc["mappings_after"] == doc["mappings_before"] == 1, info
    assert (doc["verdict"], doc["leak"]) == ("no leak", False), info
    latency = doc["latency_ms"]
    assert isinstance(latency, dict)
    assert set(latency["by_request"]) == {"SET_MEM_TABLE"}
    assert latency["count"] == 120


def test_dpdk_full_table_and_its_limit(testpmd: Pmd) -> None:
    report = run_probe(ProbeConfig(testpmd.socket, cycles=2, regions=7, boot_size=8 * MiB))
    assert (report.peak.matching_fds, report.peak.mappings) == (8, 8)
    assert report.verdict == "no leak"
    with pytest.raises(ProbeError, match="the back-end takes 8"):
        run_probe(ProbeConfig(testpmd.socket, cycles=1, regions=8))
    assert testpmd.alive()


def test_dpdk_does_not_offer_mem_slots(testpmd: Pmd) -> None:
    result = CliRunner().invoke(probe, ["--socket", testpmd.socket, "--mem-slots", "--json"])
    assert result.exit_code == 2, result.output
    doc = validate(json.loads(result.stdout), "pyvhost.error/1")
    assert "does not offer CONFIGURE_MEM_SLOTS" in doc["error"]["message"]


def test_dpdk_vrings_survive_hotplug(testpmd: Pmd) -> None:
    with FrontendMemory() as memory, Frontend() as fe:
        fe.connect(testpmd.socket)
        fe.negotiate()
        boot = memory.add_boot_ram(8 * MiB)
        fe.update_memory(memory)
        fe.setup_vring(0, 256, boot, offset=0)
        fe.setup_vring(1, 256, boot, offset=64 * 1024)
        # A hot-add while the rings are live: DPDK must remap and re-translate them.
        dimm = memory.add_dimm(2 * MiB)
        assert fe.update_memory(memory) == ["SET_MEM_TABLE"]
        memory.detach(dimm)
        assert fe.update_memory(memory) == ["SET_MEM_TABLE"]
        dimm.close()
        assert fe.get_vring_base(0) == 0
        assert fe.get_vring_base(1) == 0
    assert testpmd.alive(), testpmd.log_tail()
