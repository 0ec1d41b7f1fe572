"""``--hostile``: the robustness suite, against real back-ends.

pyvhost's own back-end (``pyvhost net`` in a child process) must come through every
non-destructive case without a failing verdict, its witness's frames coming back after
each; DPDK 22.11's vhost library shows the defects the testbed notes found by hand (a
rejected SET_MEM_TABLE's fds kept, the old file kept behind the same addresses, every
connection's control messages stalled by one that does not read its replies, while the
frames still flow). The destructive case (guest memory truncated under a live ring) kills
DPDK and pyvhost's pure-Python data path (SIGBUS); the compiled data path survives it,
closes that connection and keeps the witness going. It runs only on request.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import time

import pytest

from pyvhost.cli.probe import hostile_doc
from pyvhost.frontend.hostile import (
    BY_NAME,
    CASES,
    GROUPS,
    HostileConfig,
    HostileError,
    Witness,
    run_hostile,
)
from pyvhost.tools.process import pyvhost_argv
from pyvhost.tools.procfs import unix_listening
from support.procs import Procs, Started
from support.schemas import validate

DESTRUCTIVE = "destructive-memory-truncated-under-ring"


def _wait_listening(path: str, started: Started) -> None:
    deadline = time.monotonic() + 60
    while not unix_listening(path):
        assert started.proc.poll() is None, started.output()[-3000:]
        assert time.monotonic() < deadline, started.output()[-3000:]
        time.sleep(0.05)


def test_every_case_is_named_grouped_and_quotes_the_spec() -> None:
    assert len({c.name for c in CASES}) == len(CASES) >= 40
    for c in CASES:
        assert c.group in GROUPS, c.name
        assert c.name.startswith(c.group.rstrip("s")) or c.group == "descriptors", c.name
        assert len(c.spec) >= 20 and c.what, c.name
    assert {c.group for c in CASES} == set(GROUPS)


def test_destructive_cases_only_on_request() -> None:
    plain = HostileConfig("x").selected()
    assert plain and not any(c.destructive for c in plain)
    assert any(c.destructive for c in HostileConfig("x", include_destructive=True).selected())
    named = HostileConfig("x", cases=("destructive-memory-truncated-under-ring",)).selected()
    assert [c.name for c in named] == ["destructive-memory-truncated-under-ring"]
    with pytest.raises(HostileError, match="unknown hostile case"):
        HostileConfig("x", cases=("no-such-case",)).selected()


def test_pyvhost_net_survives_every_case(short_dir: str, procs: Procs) -> None:
    sock = f"{short_dir}/pv.sock"
    net = procs.pyvhost("net", "--socket", sock, "--reflect", name="pyvhost-net")
    _wait_listening(sock, net)
    report = run_hostile(HostileConfig(sock, case_timeout=5))
    outcomes = {r.name: r.outcome for r in report.results}
    info = json.dumps(report.to_json(), indent=1)[-6000:] + net.output()[-2000:]
    validate(hostile_doc(report), "pyvhost.probe.hostile/1")
    assert report.measured is not None and report.measured.pid == net.pid, info
    # The witness's frames were reflected before the first case, so after every case
    # they had to be used and come back (else the case would be harmed-others).
    assert report.frames is not None and report.frames.used and report.frames.back, info
    assert not report.failed, info
    assert len(report.results) == len([c for c in CASES if not c.destructive]), info
    assert "not run" not in outcomes.values() and "crashed" not in outcomes.values(), info
    # Refused with a NACK (REPLY_ACK), the connection still usable:
    for name in ("memory-overlap-guest-addresses", "memory-overlap-user-addresses",
                 "memory-guest-address-overflow", "memory-zero-size",
                 "memory-offset-beyond-file", "memory-same-addresses-new-file",
                 "fds-too-many", "fds-too-few", "vring-size-not-power-of-2",
                 "vring-address-unmapped", "framing-unknown-request"):
        assert outcomes[name] == "nack", (name, info)
    assert net.proc.poll() is None


def _testpmd_two_ports(procs: Procs, short_dir: str, name: str) -> tuple[str, str, Started]:
    """testpmd with two vhost ports: the cases' socket, and the witness's. One net_vhost
    port serves one device at a time (a new connection takes the port over), so the
    witness needs a port of its own; io forwarding sends its frames to the other port."""
    sock, wsock = f"{short_dir}/vh.sock", f"{short_dir}/witness.sock"
    pmd = procs.testpmd(f"net_vhost0,iface={sock},queues=1", name=name,
                        eal_args=("--vdev", f"net_vhost1,iface={wsock},queues=1"))
    _wait_listening(sock, pmd)
    _wait_listening(wsock, pmd)
    return sock, wsock, pmd


@pytest.mark.dpdk
def test_dpdk_defects_found_by_the_suite(short_dir: str, procs: Procs) -> None:
    sock, wsock, pmd = _testpmd_two_ports(procs, short_dir, "testpmd-hostile")
    names = ("memory-same-addresses-new-file", "memory-overlap-guest-addresses",
             "framing-unknown-request", "framing-replies-never-read",
             "fds-not-shareable-memory")
    report = run_hostile(HostileConfig(sock, wsock, cases=names, case_timeout=3))
    info = json.dumps(report.to_json(), indent=1) + pmd.output()[-2000:]
    outcomes = {r.name: r.outcome for r in report.results}
    details = {r.name: r.detail for r in report.results}
    validate(hostile_doc(report), "pyvhost.probe.hostile/1")
    assert report.measured is not None and report.measured.pid == pmd.pid, info
    # testpmd's forwarding core uses the witness's frames (and sends them to port 0).
    assert report.frames is not None and report.frames.used, info
    # The eventfd of a refused SET_MEM_TABLE is never closed; and sometimes testpmd dies
    # on the hang-up that follows (its forwarding thread still reads rings of the table
    # the refusal unmapped): either is a failing verdict.
    assert outcomes["fds-not-shareable-memory"] in ("leaked", "crashed"), info
    # A table naming a new file at the same addresses is acked, the old mapping kept.
    assert outcomes["memory-same-addresses-new-file"] == "leaked", info
    assert outcomes["framing-unknown-request"] == "nack", info
    # One connection that does not read its replies stalls the others' control
    # messages; the polling core goes on moving the witness's frames.
    assert outcomes["framing-replies-never-read"] == "harmed-others", info
    assert "no answer to GET_FEATURES" in details["framing-replies-never-read"], info
    assert "its frames still flow" in details["framing-replies-never-read"], info
    assert report.failed


@pytest.mark.dpdk
def test_cli_hostile_exits_1_on_dpdk_and_0_on_pyvhost(short_dir: str, procs: Procs) -> None:
    sock = f"{short_dir}/vh.sock"
    pmd = procs.testpmd(f"net_vhost0,iface={sock},queues=1", name="testpmd-hostile-cli")
    _wait_listening(sock, pmd)
    done = subprocess.run(pyvhost_argv("probe", "--socket", sock, "--hostile", "--case",
                                       "fds-not-shareable-memory", "--json"),
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 1, (done.stdout, done.stderr)
    doc = validate(json.loads(done.stdout), "pyvhost.probe.hostile/1")
    (case,) = doc["cases"]
    assert case["outcome"] in ("leaked", "crashed") and case["spec"] == BY_NAME[case["name"]].spec
    psock = f"{short_dir}/pv.sock"
    net = procs.pyvhost("net", "--socket", psock, "--reflect", name="pyvhost-net-cli")
    _wait_listening(psock, net)
    ok = subprocess.run(pyvhost_argv("probe", "--socket", psock, "--hostile", "--case",
                                     "fds-not-shareable-memory"),
                        capture_output=True, text=True, timeout=120,
                        stdin=subprocess.DEVNULL)
    assert ok.returncode == 0, (ok.stdout, ok.stderr)
    assert "nack" in ok.stdout


def _net_env(*, pure: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYVHOST_PURE"}
    if pure:
        env["PYVHOST_PURE"] = "1"
    return env


@pytest.mark.skipif(importlib.util.find_spec("pyvhost.datapath._native") is None,
                    reason="the compiled data path is not built")
def test_destructive_case_closes_the_connection_on_the_compiled_path(
        short_dir: str, procs: Procs) -> None:
    """The compiled data path catches the SIGBUS: that connection is closed, its
    memory released, the witness's frames keep coming back, and the next case runs."""
    sock = f"{short_dir}/pv.sock"
    net = procs.pyvhost("net", "--socket", sock, "--reflect", name="pyvhost-net-bus",
                        env=_net_env(pure=False))
    _wait_listening(sock, net)
    report = run_hostile(HostileConfig(sock, cases=(DESTRUCTIVE, "vring-size-zero"),
                                       case_timeout=5))
    info = json.dumps(report.to_json(), indent=1) + net.output()[-3000:]
    validate(hostile_doc(report), "pyvhost.probe.hostile/1")
    outcomes = [r.outcome for r in report.results]
    # closed, not crashed, leaked or harmed-others: the process lives, lets go of every
    # file of that connection, and the witness (checked after the case) still has its
    # frames reflected.
    assert outcomes == ["closed", "nack"], info
    assert report.frames is not None and report.frames.back, info
    assert "data path: compiled" in net.output() and "SIGBUS at host address" in net.output()
    assert net.proc.poll() is None, info


def test_destructive_case_kills_the_pure_python_path(short_dir: str, procs: Procs) -> None:
    """pyvhost's pure-Python data path dies of SIGBUS when a region's file shrinks under
    a live ring, as DPDK does: the verdict must be "crashed", and the cases after it
    "not run"."""
    sock = f"{short_dir}/pv.sock"
    net = procs.pyvhost("net", "--socket", sock, "--reflect", name="pyvhost-net-pure",
                        env=_net_env(pure=True))
    _wait_listening(sock, net)
    report = run_hostile(HostileConfig(sock, cases=(DESTRUCTIVE, "vring-size-zero")))
    outcomes = [r.outcome for r in report.results]
    assert outcomes == ["crashed", "not run"], report.to_json()
    assert "data path: python" in net.output()
    assert net.proc.wait(10) == -signal.SIGBUS


# -- the witness ----------------------------------------------------------------------------
def test_the_witness_tells_stopped_frames_from_unanswered_messages(
        short_dir: str, procs: Procs) -> None:
    """Against pyvhost net: the witness's frames come back; once its own transmit ring
    is broken (a chain at an address no region maps: pyvhost stops that queue), the
    back-end still answers it, and the check says the frames stopped."""
    sock = f"{short_dir}/pv.sock"
    net = procs.pyvhost("net", "--socket", sock, "--reflect", name="pyvhost-net-witness")
    _wait_listening(sock, net)
    w = Witness(sock, "net", 5.0)
    try:
        assert (w.before.used, w.before.back) == (True, True), w.before
        for _ in range(3):
            assert w.check() == ""
        assert w.frames is not None
        w.frames.tx.add(0xDEAD_0000_0000, 64)
        w.frames.tx.kick()
        problem = w.check()
        assert "transmit queue was not used" in problem, (problem, net.output()[-2000:])
        assert w.a.ping().kind == "reply"  # the control path is fine
    finally:
        w.close()
    assert net.proc.poll() is None
