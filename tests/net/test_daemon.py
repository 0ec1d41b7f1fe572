"""``pyvhost net`` under the rule every command shares, as a daemon: what it logs at each
level (and how under journald), its exit codes, and its exit statistics."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import jsonschema
import pytest

from backend.harness import NetPort
from pyvhost import datapath, schemas
from support.procs import Procs, Started

from .conftest import TIMEOUT, start_net, wait_listening

_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def _serve_one_port(net: Started, path: Path, *, broken: bool = False) -> None:
    """One QEMU-like connection (two ADD_MEM_REG), four frames reflected, optionally
    broken queues (the region holding the rings removed under them: REM_MEM_REG), then
    a hang-up."""
    port = NetPort(str(path), tag="log").start()
    try:
        port.check_traffic(4)
        if broken:
            port.remove_region(port.ring_mem)
            net.wait_output("queue 1 broken", timeout=TIMEOUT)
    finally:
        port.close()


def _stop(procs: Procs, net: Started) -> str:
    assert procs.stop(net) == 0, net.output()
    return net.output()


def test_logs_connections_tables_and_queue_errors_at_info_by_default(
        procs: Procs, short_dir: Path) -> None:
    path = short_dir / "net.sock"
    net = start_net(procs, "--socket", str(path), "--reflect")
    wait_listening(net, path)
    _serve_one_port(net, path, broken=True)
    net.wait_output("front-end disconnected")
    out = _stop(procs, net)
    pid = os.getpid()
    assert f"data path: {datapath.name()}" in out
    assert f"net.sock#1: front-end connected (pid {pid})" in out, out
    assert re.search(r"net\.sock#1: ADD_MEM_REG: 1 region in the table \(1 mapped, 0 kept, "
                     r"0 dropped\), in force after [\d.]+ ms", out), out
    assert re.search(r"ADD_MEM_REG: 2 regions in the table \(1 mapped, 1 kept", out), out
    assert "REM_MEM_REG: 1 region in the table (0 mapped, 1 kept, 1 dropped)" in out, out
    assert "net.sock#1: queue 1 broken: " in out, out
    assert (f"net.sock#1: front-end disconnected (pid {pid}): front-end closed the "
            "connection") in out, out
    assert "SIGTERM: stopping" in out
    assert " DEBUG " not in out


def test_v_after_the_subcommand_logs_debug(procs: Procs, short_dir: Path) -> None:
    path = short_dir / "net.sock"
    net = start_net(procs, "--socket", str(path), "--reflect", "-v")
    wait_listening(net, path)
    _serve_one_port(net, path)
    net.wait_output("front-end disconnected")
    out = _stop(procs, net)
    assert " DEBUG pyvhost.backend.connection: net.sock#1: closed: " in out, out


def test_q_logs_warnings_only(procs: Procs, short_dir: Path) -> None:
    path = short_dir / "net.sock"
    net = start_net(procs, "--socket", str(path), "--reflect", "-q")
    wait_listening(net, path)
    _serve_one_port(net, path, broken=True)
    out = _stop(procs, net)
    assert " WARNING pyvhost.backend.connection: net.sock#1: queue 1 broken" in out, out
    assert " INFO " not in out, out


def test_under_journald_lines_carry_priorities_and_no_timestamp(
        procs: Procs, short_dir: Path, tmp_path: Path) -> None:
    # systemd sets JOURNAL_STREAM to the device:inode of the service's stderr; the log
    # file Procs writes is that stream here (opened by name, same inode).
    log = tmp_path / "net-journal.log"
    log.write_bytes(b"")
    st = log.stat()
    env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    path = short_dir / "net.sock"
    net = start_net(procs, "--socket", str(path), "--reflect", name="net-journal", env=env)
    wait_listening(net, path)
    _serve_one_port(net, path, broken=True)
    net.wait_output("front-end disconnected")
    out = _stop(procs, net)
    lines = [line for line in out.splitlines() if not line.startswith("{")]
    assert lines, out
    for line in lines:
        assert re.match(r"<[2-7]>pyvhost\.[\w.]+: ", line), line
        assert not _TIMESTAMP.search(line), line
    assert any(line.startswith("<6>pyvhost.backend.server: net.sock#1: front-end connected")
               for line in lines), out
    assert any(line.startswith("<4>pyvhost.backend.connection: net.sock#1: queue 1 broken")
               for line in lines), out


def test_client_port_state_changes_are_logged(procs: Procs, short_dir: Path) -> None:
    path = short_dir / "qemu.sock"
    net = start_net(procs, "--client", "--socket", str(path), "--reflect")
    net.wait_output("waiting for the front-end (socket does not exist yet)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as front_end:
        front_end.bind(str(path))
        front_end.listen(1)
        front_end.settimeout(TIMEOUT)
        conn, _ = front_end.accept()
        net.wait_output("qemu.sock: connected as qemu.sock#1")
        conn.close()
        net.wait_output("front-end disconnected")
    out = _stop(procs, net)
    assert "qemu.sock#1: front-end closed the connection" in out or "lost" in out, out


@pytest.mark.parametrize(("reflect", "key"), [(True, "stats"), (False, "switch")],
                         ids=["reflect", "switch"])
def test_exit_statistics_are_one_schema_object(procs: Procs, short_dir: Path,
                                               reflect: bool, key: str) -> None:
    path = short_dir / "net.sock"
    net = start_net(procs, "--socket", str(path), *(["--reflect"] if reflect else []))
    wait_listening(net, path)
    if reflect:
        _serve_one_port(net, path)
    else:
        NetPort(str(path), tag="sw").start().close()
    net.wait_output("front-end disconnected")
    out = _stop(procs, net)
    docs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(docs) == 1, out
    doc = docs[0]
    jsonschema.validate(doc, schemas.load("pyvhost.net.stats/1"))
    assert doc["schema"] == "pyvhost.net.stats/1" and doc["connections"] == 1
    assert doc["mode"] == ("reflect" if reflect else "switch") and key in doc
    if reflect:
        assert doc["stats"]["tx_frames"] == doc["stats"]["rx_frames"] == 4


def test_no_stats_prints_none(procs: Procs, short_dir: Path) -> None:
    path = short_dir / "net.sock"
    net = start_net(procs, "--socket", str(path), "--no-stats")
    wait_listening(net, path)
    assert not [line for line in _stop(procs, net).splitlines() if line.startswith("{")]


@pytest.mark.parametrize(("args", "message"), [
    ([], "give at least one --socket or --tap"),
    (["--socket", "{d}/a.sock", "--metrics", "9478"], "is not HOST:PORT"),
    (["--socket", "{d}/a.sock", "--metrics", "localhost:http"], "must be a number"),
    (["--socket", "{d}/a.sock", "--metrics", "127.0.0.1:70000"], "must be a number"),
    (["--socket", "{d}/a.sock", "--metrics", "::1:9478"], "in brackets"),
    (["--socket", "{d}/a.sock", "--socket", "{d}/a.sock"], "given twice"),
    (["--socket", "{d}/missing-dir/a.sock"], "can not listen on"),
    (["--socket", "{d}/" + "x" * 120], "can not listen on"),
    (["--socket", "{d}/a.sock", "--metrics", "no-such-host.invalid:9478"],
     "can not resolve"),
], ids=["nothing", "metrics-no-host", "metrics-port-name", "metrics-port-range",
        "metrics-ipv6-brackets", "socket-twice", "no-directory", "path-too-long",
        "metrics-unknown-host"])
def test_usage_errors_and_sockets_it_can_not_listen_on_exit_2(
        procs: Procs, short_dir: Path, args: list[str], message: str) -> None:
    net = start_net(procs, *(a.format(d=short_dir) for a in args))
    assert net.proc.wait(TIMEOUT) == 2, net.output()
    assert message in net.output(), net.output()
    assert not (short_dir / "a.sock").exists(), "socket file left behind"


def test_metrics_port_in_use_exits_2(procs: Procs, short_dir: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        path = short_dir / "a.sock"
        net = start_net(procs, "--socket", str(path), "--metrics", f"127.0.0.1:{port}")
        assert net.proc.wait(TIMEOUT) == 2, net.output()
    assert f"--metrics 127.0.0.1:{port}: can not listen: the port is in use" in net.output()
    assert not path.exists(), "socket file left behind"
    assert '"schema"' not in net.output()  # no statistics: it never served
