"""Ctrl-C during ``pyvhost mem add`` and ``remove`` against real QEMU (7.2, or
$PYVHOST_QEMU's): the add is undone as a failed one is (nothing left in QEMU: no memory
device, no backend), the remove says what it leaves (a DIMM already unplugged loses its
backend too), each with exit 130 and one line.

The interrupt lands at a known point through a QMP proxy between ``pyvhost mem`` and
QEMU (tests/support/qmpproxy.py) that holds a command, e.g. ``device_add``: either kept
from QEMU (not yet run) or run by QEMU with its answer kept from pyvhost (in flight,
done in QEMU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest

from pyvhost.lab.qemu import Qemu, QemuConfig
from support.cli import Done, started
from support.qmpproxy import Hold, qmp_proxy

from .conftest import BootVm, StartQemu, objects, run_json

pytestmark = pytest.mark.qemu


def _memory(q: Qemu) -> tuple[list[str], list[str], set[str]]:
    """What QEMU has: memory devices, memdevs (query-memdev) and /objects."""
    devices = cast(list[dict[str, Any]], q.control.cmd("query-memory-devices"))
    memdevs = cast(list[dict[str, Any]], q.control.cmd("query-memdev"))
    return ([d["data"]["id"] for d in devices], [m.get("id", "") for m in memdevs],
            objects(q))


def _interrupted(q: Qemu, short_dir: Path, command: str, hold: Hold, *args: str) -> Done:
    """``pyvhost mem ARGS`` through the proxy, SIGINT once it holds ``command``."""
    proxy_path = short_dir / "proxy.sock"
    with qmp_proxy(proxy_path, q.qmp_path, command, hold) as proxy, \
            started("mem", *args, "--qmp", str(proxy_path), "--timeout", "120") as run:
        run.wait_until(proxy.held.is_set, f"{command} held", timeout=120)
        return run.interrupt(timeout=180)


def _assert_one_line_130(done: Done, *words: str) -> str:
    assert done.code == 130, done
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1, done
    for word in words:
        assert word in done.stderr, done
    return done.stderr


def test_ctrl_c_before_device_add_undoes_the_object_add(start_qemu: StartQemu,
                                                        short_dir: Path) -> None:
    q = start_qemu(QemuConfig())
    before = _memory(q)
    done = _interrupted(q, short_dir, "device_add", "request", "add", "--size", "128M",
                        "--id", "d1")
    _assert_one_line_130(done, "interrupted during device_add of d1",
                         "undone: object-del d1-mem")
    devices, memdevs, objs = _memory(q)
    assert (devices, memdevs, objs) == before and "d1-mem" not in objs
    # The monitor is fine afterwards: the same add, not interrupted, works.
    code, doc = run_json("add", "--qmp", str(q.qmp_path), "--size", "128M", "--id", "d1")
    assert code == 0 and doc["outcome"]["ok"], doc


@pytest.mark.slow
def test_ctrl_c_with_device_add_in_flight_undoes_both_and_remove_finishes(
        boot_vm: BootVm, short_dir: Path) -> None:
    # A booted guest: the DIMM QEMU added must be ejected by the guest to be undone.
    q = boot_vm()
    before = _memory(q)
    done = _interrupted(q, short_dir, "device_add", "answer", "add", "--size", "128M",
                        "--id", "d1")
    _assert_one_line_130(done, "interrupted during device_add of d1",
                         "undone: device_del d1, object-del d1-mem")
    assert _memory(q) == before
    # A remove interrupted once the guest released the DIMM (object-del held back): a
    # device_del cannot be taken back, so the backend goes too, as the remove would.
    code, doc = run_json("add", "--qmp", str(q.qmp_path), "--size", "128M", "--id", "d1")
    assert code == 0 and doc["outcome"]["ok"], doc
    done = _interrupted(q, short_dir, "object-del", "request", "remove", "d1")
    _assert_one_line_130(done, "interrupted after d1 was unplugged",
                         "d1-mem was deleted too")
    assert _memory(q) == before
