"""``pyvhost mem`` as a process against a real QEMU 7.2 (paused, TCG) with a vhost-user
device on a real ``pyvhost net``: every exit code (0 done, 1 refused, 2 usage or cannot
connect, 3 QEMU failed a step and it was undone, 4 the guest did not finish, 130
interrupted), every document against its schema, and output a pipe does not cut."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from hotplug.conftest import StartQemu, objects
from pyvhost.hotplug.qmp import Qmp
from pyvhost.lab.qemu import QemuConfig, VhostUserNet
from support.cli import Done, assert_one_line_error, run_pyvhost, started
from support.procs import Procs, wait_for_socket
from support.schemas import validate

from .conftest import LONG

pytestmark = pytest.mark.qemu
LONG_ID = "vhost-user-net-device-with-a-name-longer-than-a-column"


def _mem(qmp: Path, *args: str) -> tuple[Done, dict[str, Any]]:
    """``pyvhost mem SUB --qmp QMP ARGS --json``: the run and its validated document."""
    done = run_pyvhost("mem", args[0], "--qmp", str(qmp), *args[1:], "--json")
    doc = done.json()
    kind = "error" if doc.get("schema") == "pyvhost.error/1" else f"mem.{args[0]}"
    return done, validate(doc, f"pyvhost.{kind}/1")


def test_every_exit_code_against_qemu(start_qemu: StartQemu, procs: Procs, short_dir: Path,
                                      long_name: str) -> None:
    sock = short_dir / long_name
    assert len(str(sock)) == LONG
    backend = procs.pyvhost("net", "--socket", str(sock), "--reflect", "--no-stats")
    wait_for_socket(sock, backend.proc, timeout=60)
    q = start_qemu(QemuConfig(numa_nodes=2, vhost_user_net=(VhostUserNet(sock, LONG_ID),)))
    qmp = q.qmp_path

    # 0: status, as people see it through a pipe (full lines) and as JSON.
    human = run_pyvhost("mem", "status", "--qmp", str(qmp))
    assert human.code == 0, human
    row = next((line for line in human.stdout.splitlines() if LONG_ID in line), "")
    assert str(sock) in row, f"device and socket not on one full line:\n{human}"
    done, status = _mem(qmp, "status")
    assert done.code == 0
    assert [d["socket"] for d in status["vhost_user"]["devices"]] == [str(sock)]

    # 0: a dry run, then a real hot-add.
    before = objects(q)
    done, plan = _mem(qmp, "add", "--size", "128M", "--dry-run")
    assert done.code == 0 and plan["outcome"] is None and objects(q) == before, done
    done, plan = _mem(qmp, "add", "--size", "128M", "--id", "d1")
    assert done.code == 0, done
    assert "d1-mem" in objects(q)

    # 1: refused by the preflight, nothing changed.
    before = objects(q)
    done, plan = _mem(qmp, "add", "--size", "128M", "--backend", "ram")
    assert done.code == 1 and plan["outcome"] is None, done
    assert [r["code"] for r in plan["refusals"]] == ["NOT_SHARED_WITH_VHOST_USER"]
    done, plan = _mem(qmp, "resize", "d1", "--size", "0")
    assert done.code == 1, done
    assert objects(q) == before
    human = run_pyvhost("mem", "add", "--qmp", str(qmp), "--size", "128M", "--backend", "ram")
    assert human.code == 1 and "refused" in human.stdout, human

    # A path with what rich would take for markup is printed as it is.
    odd = short_dir / "[/odd] [bold]"
    odd.mkdir(parents=True)  # "[" holding "odd] [bold]"
    human = run_pyvhost("mem", "add", "--qmp", str(qmp), "--size", "128M", "--backend", "file",
                        "--mem-path", str(odd), "--dry-run")
    assert human.code in (0, 1) and str(odd) in human.stdout, human
    assert "Traceback" not in human.stderr

    # 3: QEMU refuses a step the planner would have refused; undone, nothing left behind.
    done, plan = _mem(qmp, "add", "--size", "128M", "--node", "5", "--force", "--id", "bad")
    assert done.code == 3, done
    outcome = plan["outcome"]
    assert outcome["rolled_back"] == ["object-del"] and outcome["orphans"] == [], outcome
    assert objects(q) == before

    # 4: a paused guest never releases a DIMM.
    done, plan = _mem(qmp, "remove", "d1", "--timeout", "1")
    assert done.code == 4, done
    assert plan["outcome"]["timed_out"] is True

    # 2: usage errors, with the document too.
    for args, words in ((("add", "--size", "lots"), ("--size",)),
                        (("add",), ("--size",)),
                        (("remove", "--timeout", "0", "d1"), ("--timeout",))):
        assert_one_line_error(run_pyvhost("mem", args[0], "--qmp", str(qmp), *args[1:]),
                              2, *words)
        done, error = _mem(qmp, *args)
        assert done.code == 2 and error["error"]["kind"] == "usage", done

    # 130: the monitor is held by another client (as libvirt holds it): QEMU never greets
    # a second one, pyvhost mem waits (issue 9 adds a time limit), and Ctrl-C ends it.
    with Qmp(str(qmp)), started("mem", "status", "--qmp", str(qmp), "--json") as waiting:
        waiting.wait_until(lambda: _has_socket(waiting.proc.pid), "a connect to QMP")
        done = waiting.interrupt()
    assert done.code == 130 and "Traceback" not in done.stderr, done
    assert done.stderr.strip() == "error: interrupted", done
    error = validate(done.json(), "pyvhost.error/1")
    assert (error["command"], error["error"]["kind"]) == ("mem status", "interrupted")


def _has_socket(pid: int) -> bool:
    """Whether ``pid`` has a socket open (Python has started, the connect is under way)."""
    fds = f"/proc/{pid}/fd"
    for name in os.listdir(fds):
        try:
            if stat.S_ISSOCK(os.stat(f"{fds}/{name}").st_mode):
                return True
        except FileNotFoundError:
            continue
    return False


def test_cannot_connect_exits_2(procs: Procs, short_dir: Path) -> None:
    regular, stale = short_dir / "file", short_dir / "stale.qmp"
    regular.write_text("x")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # what a QEMU that was killed leaves behind
    # A socket that answers, but not QMP: a pyvhost back-end's control socket.
    ctl = short_dir / "net.ctl"
    backend = procs.pyvhost("net", "--socket", str(short_dir / "vh.sock"), "--reflect",
                            "--control", str(ctl))
    wait_for_socket(ctl, backend.proc)
    for path, words in ((short_dir / "none.qmp", ("no QMP socket at", "-qmp unix:")),
                        (regular, ("is not a socket", "a regular file")),
                        (stale, ("connection refused", "nothing listens")),
                        (ctl, ("answered, but not as QEMU's QMP monitor",))):
        for sub in ("status", "add", "remove", "resize"):
            args = {"status": (), "add": ("--size", "128M"), "remove": ("d1",),
                    "resize": ("v1", "--size", "0")}[sub]
            done = run_pyvhost("mem", sub, "--qmp", str(path), *args)
            assert_one_line_error(done, 2, str(path), *words)
        done, error = _mem(path, "add", "--size", "128M")
        assert done.code == 2, done
        assert (error["command"], error["error"]["kind"]) == ("mem add", "connect")
    assert regular.read_text() == "x"
