"""A QMP command of ``pyvhost mem`` that QEMU does not answer within ``--timeout``, against
real QEMU (7.2, or $PYVHOST_QEMU's): an add is looked up and undone as on Ctrl-C (exit 3,
one line naming the step and what was undone, nothing left in QEMU); a monitor that
stops answering altogether gives exit 2 and says what may be left and how to remove it
(and that advice works); a remove and a resize say the state they leave (exit 4).

The answer (or the command) is held back by a QMP proxy (tests/support/qmpproxy.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest

from pyvhost.lab.qemu import Qemu, QemuConfig, VirtioMem
from support.cli import Done, run_pyvhost
from support.qmpproxy import Hold, qmp_proxy
from support.schemas import validate

from .conftest import BootVm, StartQemu, run_json

pytestmark = pytest.mark.qemu
TIMEOUT = "5"


def _memory(q: Qemu) -> tuple[list[str], list[str], set[str]]:
    """What QEMU has: memory devices, memdevs (query-memdev) and /objects."""
    devices = cast(list[dict[str, Any]], q.control.cmd("query-memory-devices"))
    memdevs = cast(list[dict[str, Any]], q.control.cmd("query-memdev"))
    listing = cast(list[dict[str, str]], q.control.cmd("qom-list", path="/objects"))
    return ([d["data"]["id"] for d in devices], sorted(m.get("id", "") for m in memdevs),
            {o["name"] for o in listing if o["type"].startswith("child<")})


def _held(q: Qemu, short_dir: Path, command: str, hold: Hold, *args: str,
          skip: int = 0) -> Done:
    """``pyvhost mem ARGS --timeout 5`` through the proxy, ``command`` held."""
    proxy_path = short_dir / "proxy.sock"
    with qmp_proxy(proxy_path, q.qmp_path, command, hold, skip) as proxy:
        done = run_pyvhost("mem", *args, "--qmp", str(proxy_path), "--timeout", TIMEOUT)
        assert proxy.held.is_set(), done
    assert "Traceback" not in done.stderr, done
    return done


def _failed_line(done: Done) -> str:
    lines = [line for line in done.stdout.splitlines() if line.startswith("failed at ")]
    assert len(lines) == 1, done
    return lines[0]


def _doc(done: Done, schema: str) -> dict[str, Any]:
    return validate(done.json(), schema)


def test_object_add_not_answered_is_undone(start_qemu: StartQemu, short_dir: Path) -> None:
    q = start_qemu(QemuConfig())
    before = _memory(q)
    # QEMU ran it, its answer never came: the backend is deleted again.
    done = _held(q, short_dir, "object-add", "answer", "add", "--size", "128M", "--id", "d1")
    assert done.code == 3, done
    line = _failed_line(done)
    assert line == ("failed at object-add: QEMU did not answer object-add within 5 s; QEMU "
                    "had run it (d1-mem was in /objects afterwards); undone: object-del "
                    "d1-mem"), done
    assert _memory(q) == before
    # Never run (the command itself held back): nothing to undo, same exit code.
    done = _held(q, short_dir, "object-add", "request", "add", "--size", "128M", "--id",
                 "d1", "--json")
    assert done.code == 3, done
    o = _doc(done, "pyvhost.mem.add/1")["outcome"]
    assert (o["ok"], o["failed_step"], o["rolled_back"], o["orphans"], o["timed_out"]) == (
        False, "object-add", [], [], False), o
    assert "QEMU had not run it (d1-mem was not in /objects afterwards)" in o["error"], o
    assert _memory(q) == before
    # The monitor is fine afterwards: the same add, not held, works.
    code, doc = run_json("add", "--qmp", str(q.qmp_path), "--size", "128M", "--id", "d1")
    assert code == 0 and doc["outcome"]["ok"], doc


def test_monitor_that_stops_answering_says_what_may_be_left(start_qemu: StartQemu,
                                                           short_dir: Path) -> None:
    q = start_qemu(QemuConfig())
    before = _memory(q)
    done = _held(q, short_dir, "object-add", "silence", "add", "--size", "128M", "--id",
                 "d1", "--json")
    assert done.code == 2, done
    err = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and len(done.stderr.splitlines()) == 1, done
    doc = _doc(done, "pyvhost.error/1")
    assert (doc["exit_code"], doc["error"]["kind"]) == (2, "connect"), doc
    message = doc["error"]["message"]
    assert message in err[0], done
    for words in ("QEMU did not answer object-add within 5 s",
                  "a look-up after it failed too",
                  "memory backend d1-mem (object-add was sent; whether QEMU ran it is unknown)",
                  "check with pyvhost mem status --qmp ",
                  "pyvhost mem remove d1-mem"):
        assert words in message, message
    # QEMU did run it; the advice removes it.
    assert "d1-mem" in _memory(q)[2]
    code, removed = run_json("remove", "--qmp", str(q.qmp_path), "d1-mem")
    assert code == 0 and removed["outcome"]["ok"], removed
    assert [s["command"] for s in removed["steps"]] == ["object-del"]
    assert _memory(q) == before


def test_remove_and_resize_not_answered_say_their_state(start_qemu: StartQemu,
                                                        short_dir: Path) -> None:
    q = start_qemu(QemuConfig(virtio_mem=(VirtioMem("vmem0"),)))
    code, doc = run_json("add", "--qmp", str(q.qmp_path), "--size", "128M", "--id", "d1")
    assert code == 0, doc
    before = _memory(q)
    # A paused guest never releases the DIMM: device_del unanswered, the DIMM still there.
    done = _held(q, short_dir, "device_del", "answer", "remove", "d1", "--json")
    assert done.code == 4, done
    o = _doc(done, "pyvhost.mem.remove/1")["outcome"]
    assert o["timed_out"] and o["failed_step"] == "device_del", o
    assert ("QEMU did not answer device_del within 5 s; d1 is still plugged: the unplug "
            "request may stay pending in QEMU") in o["error"], o
    assert "run pyvhost mem remove d1 again" in o["error"], o
    assert _memory(q) == before
    # qom-set ran, its answer held: the request is set, the (paused) guest not there yet.
    done = _held(q, short_dir, "qom-set", "answer", "resize", "vmem0", "--size", "128M",
                 "--json")
    assert done.code == 4, done
    o = _doc(done, "pyvhost.mem.resize/1")["outcome"]
    assert o["timed_out"] and o["done"] == ["qom-set"], o
    assert "the request is set (vmem0 requested-size 134217728, 0 plugged" in o["error"], o
    # Never run: nothing changed, exit 3.
    done = _held(q, short_dir, "qom-set", "request", "resize", "vmem0", "--size", "256M",
                 "--json")
    assert done.code == 3, done
    o = _doc(done, "pyvhost.mem.resize/1")["outcome"]
    assert not o["timed_out"] and o["done"] == [], o
    assert "QEMU had not run it (vmem0 still requests 134217728): nothing changed" in \
        o["error"], o


@pytest.mark.slow
def test_device_add_and_its_check_not_answered_are_undone(boot_vm: BootVm,
                                                          short_dir: Path) -> None:
    # A booted guest: the DIMM QEMU added must be ejected by the guest to be undone.
    q = boot_vm()
    before = _memory(q)
    done = _held(q, short_dir, "device_add", "answer", "add", "--size", "128M", "--id", "d1")
    assert done.code == 3, done
    assert _failed_line(done) == (
        "failed at device_add: QEMU did not answer device_add within 5 s; QEMU had run it "
        "(d1 was in query-memory-devices afterwards); undone: device_del d1, object-del "
        "d1-mem"), done
    assert _memory(q) == before
    # The check after device_add (the second query-memory-devices of the run: the first
    # reads the state) unanswered: not verified, so undone.
    done = _held(q, short_dir, "query-memory-devices", "answer", "add", "--size", "128M",
                 "--id", "d2", "--json", skip=1)
    assert done.code == 3, done
    o = _doc(done, "pyvhost.mem.add/1")["outcome"]
    assert (o["failed_step"], o["rolled_back"], o["orphans"]) == (
        "verify", ["device_del", "object-del"], []), o
    assert "QEMU did not answer query-memory-devices within 5 s (the check of d2)" in \
        o["error"], o
    assert _memory(q) == before
