"""``pyvhost status`` against a real ``pyvhost net`` back-end: every exit code it can
return, its tables, its JSON (schema pyvhost.status/1) and output a pipe does not cut."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvhost.frontend.frontend import SUPPORTED_PROTOCOL_FEATURES, Frontend
from pyvhost.frontend.memory import FrontendMemory
from pyvhost.protocol import messages as m
from pyvhost.protocol.constants import ProtocolFeature, Request, VirtioFeature
from support.cli import assert_one_line_error, run_pyvhost, started
from support.memfd import memfd
from support.procs import Procs, wait_for_socket
from support.schemas import validate

from .conftest import LONG

MiB = 1 << 20
#: What a hostile or broken control socket might answer: every field of the wrong type.
HOSTILE = {"pid": "x", "listening": 7, "clients": [1, {"path": "[/x] [bold]"}],
           "connections": [{"name": 5, "memory": "x", "queues": [None, {"index": "a"}],
                            "counters": [], "device": {"counters": {"x": {"y": 1}}},
                            "last_memory_update": 3, "features": -1, "logging": "on",
                            "dirty_log": {"mmap_size": "big", "atomic": 3, "marks": [1]}},
                           {"memory": [{"guest_phys_addr": "zero", "memory_size": None}]}],
           "switch": {"ports": [1, {"name": []}, {"name": "[/port]", "kind": "[red]"}],
                      "mac_table": {}, "departed": None}}


@pytest.fixture
def frontend() -> Iterator[tuple[Frontend, FrontendMemory]]:
    memory, fe = FrontendMemory(), Frontend()
    try:
        yield fe, memory
    finally:
        fe.close()
        memory.close()


def _serve(procs: Procs, *args: str, control: Path, sockets: tuple[Path, ...]) -> None:
    argv = [a for s in sockets for a in ("--socket", str(s))]
    backend = procs.pyvhost("net", *argv, "--control", str(control), *args)
    for path in (*sockets, control):
        wait_for_socket(path, backend.proc)


def test_switch_tables_json_and_a_pipe(procs: Procs, short_dir: Path, long_name: str,
                                       frontend: tuple[Frontend, FrontendMemory]) -> None:
    vm0, vm1 = short_dir / long_name, short_dir / "vm1.sock"
    ctl = short_dir / ("ctl-" + long_name)
    assert len(str(vm0)) == LONG and len(str(ctl)) > 80
    _serve(procs, control=ctl, sockets=(vm0, vm1))
    fe, memory = frontend
    fe.connect(vm0)
    fe.negotiate()
    memory.add_boot_ram(8 * MiB)
    memory.add_dimm(4 * MiB)
    fe.update_memory(memory.regions)

    human = run_pyvhost("status", str(ctl))  # stdout is a pipe
    assert human.code == 0, human
    lines = human.stdout.splitlines()
    # The full socket path on one line, and no line cut to 80 columns.
    assert any(str(vm0) in line for line in lines), human
    for title in ("connections", "memory table", "queues", "requests", "switch ports",
                  "MAC table"):
        assert title in human.stdout, (title, human)
    table = next(line for line in lines if "0x100000000" in line)
    assert "0x100400000" in table and "4 MiB" in table, table  # GPA end and size
    assert "{" not in human.stdout, "a Python dict in the human output"

    doc = validate(run_pyvhost("status", "--json", str(ctl)).json(), "pyvhost.status/1")
    (conn,) = doc["connections"]
    assert [(r["guest_phys_addr"], r["memory_size"]) for r in conn["memory"]] == [
        (0, 8 * MiB), (4 << 30, 4 * MiB)]
    assert sorted(doc["listening"]) == sorted([str(vm0), str(vm1)])
    assert [p["kind"] for p in doc["switch"]["ports"]] == ["vhost-user"]


def test_reflector_and_client_mode_hold_the_schema(procs: Procs, short_dir: Path) -> None:
    ctl, vm0 = short_dir / "ctl", short_dir / "vm0.sock"
    _serve(procs, "--reflect", control=ctl, sockets=(vm0,))
    with Frontend() as fe:
        fe.connect(vm0)
        fe.negotiate()
        doc = validate(run_pyvhost("status", "--json", str(ctl)).json(), "pyvhost.status/1")
    assert doc["connections"][0]["device"]["stats"] is not None
    assert "switch" not in doc
    # --client towards a front-end that is not there yet: a waiting client.
    ctl2 = short_dir / "ctl2"
    backend = procs.pyvhost("net", "--client", "--socket", str(short_dir / "qemu.sock"),
                            "--reflect", "--control", str(ctl2))
    wait_for_socket(ctl2, backend.proc)
    doc = validate(run_pyvhost("status", "--json", str(ctl2)).json(), "pyvhost.status/1")
    (client,) = doc["clients"]
    assert client["path"] == str(short_dir / "qemu.sock") and client["connection"] is None
    human = run_pyvhost("status", str(ctl2))
    assert human.code == 0 and "client sockets" in human.stdout, human


def test_dirty_logging_per_connection(procs: Procs, short_dir: Path,
                                      frontend: tuple[Frontend, FrontendMemory]) -> None:
    """Off, then on with the log held, as QEMU starts a migration: SET_LOG_BASE with the
    log's memfd (LOG_SHMFD negotiated), then SET_FEATURES with VHOST_F_LOG_ALL."""
    ctl, vm0 = short_dir / "ctl", short_dir / "vm0.sock"
    _serve(procs, "--reflect", control=ctl, sockets=(vm0,))
    fe, memory = frontend
    fe.connect(vm0)
    fe.negotiate(protocol_features=SUPPORTED_PROTOCOL_FEATURES | ProtocolFeature.LOG_SHMFD)
    memory.add_boot_ram(8 * MiB)
    fe.update_memory(memory.regions)

    def connections_row() -> str:
        human = run_pyvhost("status", str(ctl))
        assert human.code == 0, human
        header = next(line for line in human.stdout.splitlines() if "dirty log" in line)
        row = next(line for line in human.stdout.splitlines()
                   if line.count("│") > 5 and "vm0" in line)
        return header + "\n" + row + "\n" + human.stdout

    assert connections_row().split("\n")[1].rstrip(" │").endswith("off")
    log_size = 4096  # one bit per 4 KiB page: 128 MiB of guest memory
    fd = memfd(log_size, name="pyvhost-test-status-log")
    try:
        assert fe.request(Request.SET_LOG_BASE, m.LogDescription(log_size, 0), [fd]) == \
            m.U64(0)
        fe.set_features(fe.features | VirtioFeature.LOG_ALL)
    finally:
        os.close(fd)
    text = connections_row()
    assert text.split("\n")[1].rstrip(" │").endswith("on"), text
    assert ": dirty log 4096 B at offset 0x0, covers 128 MiB of guest memory; 0 ranges " \
        "marked, 0 past its end" in text, text
    doc = validate(run_pyvhost("status", "--json", str(ctl)).json(), "pyvhost.status/1")
    (conn,) = doc["connections"]
    assert conn["logging"] is True and conn["dirty_log"]["covers"] == 128 * MiB


def test_cannot_connect_exits_2(short_dir: Path) -> None:
    missing, regular = short_dir / "[/nope].ctl", short_dir / "file"
    stale = short_dir / "stale"
    regular.write_text("not a socket\n")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listened: what a killed process leaves
    for path, words in ((missing, ("no control socket at", "--control")),
                        (regular, ("is not a socket", "a regular file")),
                        (stale, ("connection refused", "nothing listens"))):
        assert_one_line_error(run_pyvhost("status", str(path)), 2, str(path), *words)
        done = run_pyvhost("status", str(path), "--json")
        doc = validate(done.json(), "pyvhost.error/1")
        assert (doc["command"], doc["error"]["kind"], doc["exit_code"]) == (
            "status", "connect", 2)
    assert regular.read_text() == "not a socket\n"
    assert_one_line_error(run_pyvhost("status"), 2, "Missing argument")
    assert_one_line_error(run_pyvhost("status", str(missing), "--timeout", "0"), 2,
                          "--timeout")


def test_not_a_backend_exits_2_and_ctrl_c_exits_130(short_dir: Path) -> None:
    path = str(short_dir / "silent")
    with socket.socket(socket.AF_UNIX) as silent:
        silent.bind(path)
        silent.listen(4)
        # Something that accepts and never answers: no answer within --timeout.
        assert_one_line_error(run_pyvhost("status", path, "--timeout", "0.3"), 2,
                              "no answer within 0.3 s")
        silent.accept()[0].close()
        # Something that answers what is not JSON.
        silent.settimeout(60)
        with started("status", path, "--json") as asking:
            conn, _ = silent.accept()
            conn.sendall(b"220 mail.example.org ESMTP\r\n")
            conn.close()
            done = asking.wait()
        assert done.code == 2 and "not a pyvhost back-end" in done.stderr, done
        validate(done.json(), "pyvhost.error/1")
        # JSON of the wrong shape everywhere: shown as found, no traceback.
        with started("status", path) as asking:
            conn, _ = silent.accept()
            conn.sendall(json.dumps(HOSTILE).encode())
            conn.close()
            done = asking.wait()
        assert done.code == 0 and "Traceback" not in done.stderr, done
        assert "no front-end connected" not in done.stdout and "switch ports" in done.stdout
        assert "[/x] [bold]" in done.stdout and "[/port]" in done.stdout, done  # not markup
        # Ctrl-C while it waits for the answer.
        with started("status", path, "--json", "--timeout", "120") as asking:
            conn, _ = silent.accept()
            done = asking.interrupt()
            conn.close()
    assert done.code == 130 and "Traceback" not in done.stderr, done
    assert done.stderr.strip() == "error: interrupted", done
    doc = validate(done.json(), "pyvhost.error/1")
    assert (doc["command"], doc["error"]["kind"]) == ("status", "interrupted")
