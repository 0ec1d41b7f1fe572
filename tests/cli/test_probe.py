"""``pyvhost probe`` as a process, against a real ``pyvhost net`` back-end wherever the
path allows, covering every exit code: 0 no leak, 1 leak, 2 usage or cannot connect,
3 the back-end failed a step, 130 interrupted.

No real back-end here leaks, NACKs a memory table or answers wrongly on purpose: those
paths use the scripted back-end of tests/frontend (served by this test process, which
the probe then measures).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from frontend.fake_backend import FakeBackend
from pyvhost.backend.control import fetch_status
from pyvhost.protocol.constants import ProtocolFeature, Request
from support.cli import assert_one_line_error, run_pyvhost, started
from support.procs import Procs, Started, wait_for_socket
from support.schemas import validate

from .conftest import LONG

PF = ProtocolFeature
TABLE_ONLY = int(PF.MQ | PF.REPLY_ACK | PF.STATUS)  # what DPDK 22.11 negotiates
FAST = ("--boot-size", "4M", "--settle", "0")


@pytest.fixture
def scripted(short_dir: Path) -> Iterator[Callable[..., FakeBackend]]:
    made: list[FakeBackend] = []

    def make(**kwargs: Any) -> FakeBackend:
        made.append(FakeBackend(str(short_dir / f"fake{len(made)}.sock"), **kwargs))
        return made[-1]

    try:
        yield make
    finally:
        for be in made:
            be.close()


def _net(procs: Procs, sock: Path, *args: str, control: Path | None = None) -> Started:
    extra = ("--control", str(control)) if control else ()
    backend = procs.pyvhost("net", "--socket", str(sock), "--reflect", "--no-stats", *extra,
                            *args)
    wait_for_socket(sock, backend.proc)
    if control:
        wait_for_socket(control, backend.proc)
    return backend


def _regions_held(control: Path) -> int:
    conns = fetch_status(str(control))["connections"]
    assert isinstance(conns, list)
    return sum(len(c["memory"]) for c in conns)


def test_no_leak_exits_0_json_and_a_pipe(procs: Procs, short_dir: Path,
                                         long_name: str) -> None:
    sock = short_dir / long_name
    assert len(str(sock)) == LONG
    backend = _net(procs, sock)
    done = run_pyvhost("probe", "--socket", str(sock), "--cycles", "3", *FAST, "--json")
    assert done.code == 0, done
    doc = validate(done.json(), "pyvhost.probe/1")
    assert (doc["pid"], doc["verdict"], doc["socket"]) == (backend.pid, "no leak", str(sock))
    human = run_pyvhost("probe", "--socket", str(sock), "--cycles", "2", *FAST)
    assert human.code == 0, human
    assert any(str(sock) in line for line in human.stdout.splitlines()), human
    assert "verdict: no leak" in human.stdout


def test_leak_exits_1(scripted: Callable[..., FakeBackend]) -> None:
    be = scripted(protocol_features=TABLE_ONLY, leak=True)
    done = run_pyvhost("probe", "--socket", be.path, "--cycles", "2", "--timeout", "2",
                       *FAST, "--json")
    assert done.code == 1, done
    doc = validate(done.json(), "pyvhost.probe/1")
    assert doc["leak"] and doc["pid"] == os.getpid()
    assert doc["region_fds_after"] > doc["region_fds_before"]
    human = run_pyvhost("probe", "--socket", be.path, "--cycles", "1", "--timeout", "2",
                        *FAST)
    assert human.code == 1 and "verdict: leak" in human.stdout, human


def test_cannot_connect_exits_2(short_dir: Path) -> None:
    regular, stale = short_dir / "file", short_dir / "stale.sock"
    regular.write_text("x")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    for path, words in ((short_dir / "none.sock", ("no vhost-user socket at",)),
                        (regular, ("is not a socket", "a regular file")),
                        (stale, ("connection refused", "nothing listens"))):
        assert_one_line_error(run_pyvhost("probe", "--socket", str(path)), 2, str(path),
                              *words)
        doc = validate(run_pyvhost("probe", "--socket", str(path), "--json").json(),
                       "pyvhost.error/1")
        assert (doc["command"], doc["error"]["kind"]) == ("probe", "connect")


def test_cannot_run_as_asked_exits_2(procs: Procs, short_dir: Path) -> None:
    sock = short_dir / "net.sock"
    _net(procs, sock, "--no-mem-slots")
    s = str(sock)
    for args, words in (
            (("--mem-slots",), ("does not offer CONFIGURE_MEM_SLOTS",)),
            (("--regions", "8"), ("need 9 memory slots", "takes 8")),
            (("--pid", "999999999"), ("--pid 999999999: no such process",)),
            (("--region-size", "lots"), ("--region-size",)),
            (("--cycles", "-1"), ("--cycles",))):
        done = run_pyvhost("probe", "--socket", s, *args, *FAST)
        assert_one_line_error(done, 2, *words)
        doc = validate(run_pyvhost("probe", "--socket", s, *args, *FAST, "--json").json(),
                       "pyvhost.error/1")
        assert doc["error"]["kind"] == "usage", doc
    assert_one_line_error(run_pyvhost("probe"), 2, "--socket")


def test_nack_exits_3(scripted: Callable[..., FakeBackend]) -> None:
    be = scripted(protocol_features=TABLE_ONLY, nack={int(Request.SET_MEM_TABLE)})
    done = run_pyvhost("probe", "--socket", be.path, *FAST, "--json")
    assert done.code == 3, done
    doc = validate(done.json(), "pyvhost.error/1")
    assert doc["error"]["kind"] == "peer" and "refused SET_MEM_TABLE" in doc["error"]["message"]
    assert_one_line_error(run_pyvhost("probe", "--socket", be.path, *FAST), 3,
                          "the back-end failed", "SET_MEM_TABLE")


def test_backend_gone_mid_probe_exits_3(procs: Procs, short_dir: Path) -> None:
    sock, ctl = short_dir / "net.sock", short_dir / "net.ctl"
    backend = _net(procs, sock, control=ctl)
    with started("probe", "--socket", str(sock), "--cycles", "1000000", *FAST) as probing:
        probing.wait_until(lambda: _regions_held(ctl) > 1, "the probe's regions in the table")
        os.kill(backend.pid, signal.SIGKILL)
        done = probing.wait()
    assert_one_line_error(done, 3, "the back-end failed")


def test_ctrl_c_exits_130_and_the_backend_lets_go(procs: Procs, short_dir: Path) -> None:
    sock, ctl = short_dir / "net.sock", short_dir / "net.ctl"
    _net(procs, sock, control=ctl)
    with started("probe", "--socket", str(sock), "--cycles", "1000000", *FAST) as probing:
        probing.wait_until(lambda: _regions_held(ctl) > 1, "the probe's regions in the table")
        done = probing.interrupt()
    assert done.code == 130, done
    assert done.stderr.strip().splitlines()[-1] == "error: interrupted", done
    assert "Traceback" not in done.stderr
    deadline = time.monotonic() + 30
    while _regions_held(ctl) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fetch_status(str(ctl))["connections"] == [], "the probe did not hang up"


# -- the options of issue 10: --list-cases, --hostile, cannot measure, --listen -----------
def test_list_cases_json_without_a_socket() -> None:
    done = run_pyvhost("probe", "--list-cases", "--json")
    assert done.code == 0, done
    doc = validate(done.json(), "pyvhost.probe.cases/1")
    assert len(doc["cases"]) >= 40
    assert [c["name"] for c in doc["cases"] if c["destructive"]] == [
        "destructive-memory-truncated-under-ring"]
    human = run_pyvhost("probe", "--list-cases")
    assert human.code == 0 and "spec: " in human.stdout, human


def test_hostile_exits_0_on_pyvhost_net(procs: Procs, short_dir: Path) -> None:
    sock = short_dir / "net.sock"
    _net(procs, sock)
    cases = ("--case", "framing-unknown-request", "--case", "descriptors-loop")
    done = run_pyvhost("probe", "--socket", str(sock), "--hostile", *cases, "--json")
    assert done.code == 0, done
    doc = validate(done.json(), "pyvhost.probe.hostile/1")
    assert [c["outcome"] for c in doc["cases"]] == ["nack", "pass"], doc
    assert doc["witness_frames"] == {"checked": True, "frames_back": True, "detail": ""}
    human = run_pyvhost("probe", "--socket", str(sock), "--hostile", *cases)
    assert human.code == 0, human
    assert "witness: its frames are used and come back" in human.stdout, human
    assert "descriptors-loop" in human.stderr  # each case as it ends


def test_hostile_usage_and_connect_errors_exit_2(short_dir: Path) -> None:
    none = str(short_dir / "none.sock")
    for args, kind, words in (
            (("--listen",), "usage", ("does not take --listen",)),
            # Checked before connecting:
            (("--case", "no-such-case"), "usage", ("unknown hostile case", "no-such-case")),
            ((), "connect", ("no vhost-user socket at",))):
        done = run_pyvhost("probe", "--socket", none, "--hostile", *args)
        assert_one_line_error(done, 2, *words)
        doc = validate(run_pyvhost("probe", "--socket", none, "--hostile", *args,
                                   "--json").json(), "pyvhost.error/1")
        assert doc["error"]["kind"] == kind, doc


def test_hostile_witness_refused_exits_3(scripted: Callable[..., FakeBackend]) -> None:
    """The back-end NACKs the witness's well-formed memory table: it failed a step."""
    be = scripted(protocol_features=TABLE_ONLY, nack={int(Request.SET_MEM_TABLE)})
    done = run_pyvhost("probe", "--socket", be.path, "--hostile", "--json")
    assert done.code == 3, done
    doc = validate(done.json(), "pyvhost.error/1")
    assert doc["error"]["kind"] == "peer", doc
    assert "witness" in doc["error"]["message"] and "SET_MEM_TABLE" in doc["error"]["message"]


def test_hostile_ctrl_c_exits_130_and_the_backend_lets_go(procs: Procs,
                                                          short_dir: Path) -> None:
    sock, ctl = short_dir / "net.sock", short_dir / "net.ctl"
    _net(procs, sock, control=ctl)
    with started("probe", "--socket", str(sock), "--hostile", "--json") as probing:
        probing.wait_until(lambda: _regions_held(ctl) > 0, "the witness's boot region")
        done = probing.interrupt()
    assert done.code == 130, done
    doc = validate(done.json(), "pyvhost.error/1")
    assert doc["error"]["kind"] == "interrupted", doc
    deadline = time.monotonic() + 30
    while _regions_held(ctl) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fetch_status(str(ctl))["connections"] == [], "the probe did not hang up"


def test_cannot_measure_exits_2(procs: Procs, short_dir: Path) -> None:
    """--pid names a process that does not serve the connection: "cannot measure", never
    "no leak"."""
    sock = short_dir / "net.sock"
    _net(procs, sock)
    bystander = procs.start(["sleep", "120"], "bystander")
    args = ("probe", "--socket", str(sock), "--pid", str(bystander.pid), *FAST)
    assert_one_line_error(run_pyvhost(*args), 2, "cannot measure",
                          f"process {bystander.pid} (--pid) does not map the boot region")
    doc = validate(run_pyvhost(*args, "--json").json(), "pyvhost.error/1")
    assert doc["error"]["kind"] == "run" and doc["exit_code"] == 2, doc


def test_listen_for_a_client_mode_backend_exits_0(procs: Procs, short_dir: Path) -> None:
    """pyvhost net --client connects to the probe's socket, and again after the hang-up."""
    sock = short_dir / "fe.sock"
    with started("probe", "--socket", str(sock), "--listen", "--reconnect", "--cycles",
                 "2", *FAST, "--json") as probing:
        probing.wait_until(sock.exists, "the probe's listening socket")
        net = procs.pyvhost("net", "--client", "--socket", str(sock), "--reflect",
                            "--no-stats")
        done = probing.wait()
    assert done.code == 0, done
    doc = validate(done.json(), "pyvhost.probe/1")
    assert doc["listen"] and doc["pid"] == net.pid, doc
    assert doc["reconnect"] is not None and doc["reconnect"]["pid"] == net.pid, doc
    assert doc["measured_process"]["how"] == "peer socket", doc
