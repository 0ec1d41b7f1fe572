"""``pyvhost mem migrate-args`` and ``pyvhost mem migrate`` as processes against real QEMU
7.2 (and 10.0 in CI's QEMU 10.0 pass; TCG, no guest kernel) with vhost-user devices on a
real ``pyvhost net``: the exit codes (0, 1, 2, 4, 130), the documents against their
schemas, the text for people. The migration of a booted guest is in
tests/hotplug/test_migrate_qemu.py."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from hotplug.conftest import StartQemu
from pyvhost.lab.qemu import Qemu, QemuConfig, VhostUserNet
from support.cli import assert_one_line_error, run_pyvhost, started
from support.procs import Procs, wait_for_socket
from support.schemas import validate

pytestmark = pytest.mark.qemu


def _json(*args: str) -> tuple[int, dict[str, Any]]:
    done = run_pyvhost("mem", *args, "--json")
    doc = done.json()
    schema = doc.get("schema", "")
    return done.code, validate(doc, schema)


def _pair(start_qemu: StartQemu, procs: Procs, short_dir: Path) -> tuple[Qemu, Qemu]:
    """A running source with a hot-added DIMM and a destination waiting for it (or not
    quite: the test decides), each NIC on its own socket of one pyvhost net."""
    a, b = short_dir / "a.sock", short_dir / "b.sock"
    net = procs.pyvhost("net", "--socket", str(a), "--socket", str(b), "--no-stats")
    wait_for_socket(a, net.proc, timeout=60)
    src = start_qemu(QemuConfig(vhost_user_net=(VhostUserNet(a),)))
    src.control.cmd("cont")
    code, doc = _json("add", "--qmp", str(src.qmp_path), "--size", "128M", "--id", "d1")
    assert code == 0, doc
    return src, start_qemu(replace(src.config, vhost_user_net=(VhostUserNet(b),),
                                   paused=False, extra_args=("-incoming", "defer")))


def _slow(src: Qemu, version: tuple[int, int, int]) -> None:
    """Hold the migration of ``src`` at 4 KiB/s so that it is still under way seconds
    later. This guest's 384 MiB are nearly all zero pages. QEMU 7.2 sends each as a header
    of a few bytes that does count against max-bandwidth: at 1 MiB/s the 96 Ki headers
    (about 1 MB) went through in under 2 s in one CI run, so the limit is far lower.
    QEMU 9.0 and later (10.0 here) do not count zero pages at all (QEMU 10.0 moved the
    idle guest in under 2 s at 1 MiB/s): their zero-page detection is turned off so that
    every page counts."""
    params: dict[str, object] = {"max-bandwidth": 4 << 10}
    if version >= (9, 0, 0):
        params["zero-page-detection"] = "none"
    src.control.cmd("migrate-set-parameters", **params)


def test_usage_errors(short_dir: Path) -> None:
    qmp = str(short_dir / "q.sock")
    done = run_pyvhost("mem", "migrate", "--qmp", qmp, "--to", qmp, "--uri", "unix:/x")
    assert_one_line_error(done, 2, "source's own QMP socket")
    done = run_pyvhost("mem", "migrate", "--qmp", qmp, "--to", qmp + "2", "--uri",
                       "exec:cat")
    assert done.code == 2 and "unix:/PATH or tcp:HOST:PORT" in done.stderr, done
    code, doc = _json("migrate", "--qmp", qmp, "--to", qmp + "2", "--uri", "tcp:[::1]:4444")
    assert code == 2 and doc["error"]["kind"] == "connect", doc
    code, doc = _json("migrate-args", "--qmp", qmp)
    assert code == 2 and doc["error"]["kind"] == "connect", doc


def test_migrate_args_and_the_preflight(start_qemu: StartQemu, procs: Procs,
                                        short_dir: Path) -> None:
    src, dest = _pair(start_qemu, procs, short_dir)
    human = run_pyvhost("mem", "migrate-args", "--qmp", str(src.qmp_path))
    assert human.code == 0, human
    assert "-object" in human.stdout and "-incoming defer" in human.stdout
    code, doc = _json("migrate-args", "--qmp", str(src.qmp_path), "--no-incoming")
    assert code == 0
    (dimm,) = doc["dimms"]
    assert dimm["id"] == "d1" and dimm["object"]["share"] is True
    assert json.loads(doc["args"][3])["addr"] == dimm["addr"]
    assert "-incoming" not in doc["args"]
    # The destination lacks d1: refused, nothing started.
    code, doc = _json("migrate", "--qmp", str(src.qmp_path), "--to", str(dest.qmp_path),
                      "--uri", f"unix:{short_dir}/m.sock")
    assert code == 1 and doc["outcome"] is None, doc
    assert [r["code"] for r in doc["refusals"]] == ["DEST_MISSING_DIMM"]
    human = run_pyvhost("mem", "migrate", "--qmp", str(src.qmp_path), "--to",
                        str(dest.qmp_path), "--uri", f"unix:{short_dir}/m.sock")
    assert human.code == 1 and "refused DEST_MISSING_DIMM" in human.stdout, human
    # The other way round the destination is running, not waiting, and has no DIMM d1.
    code, doc = _json("migrate", "--qmp", str(dest.qmp_path), "--to", str(src.qmp_path),
                      "--uri", f"unix:{short_dir}/m.sock", "--dry-run")
    assert code == 1
    assert {r["code"] for r in doc["refusals"]} >= {"DEST_NOT_INCOMING", "SOURCE_NOT_RUNNING"}


def test_a_migration_past_its_timeout_is_cancelled(start_qemu: StartQemu, procs: Procs,
                                                   short_dir: Path,
                                                   qemu_under_test: tuple[int, int, int]
                                                   ) -> None:
    src, _ = _pair(start_qemu, procs, short_dir)
    args = run_pyvhost("mem", "migrate-args", "--qmp", str(src.qmp_path), "--json").json()
    dest = start_qemu(replace(src.config, vhost_user_net=(VhostUserNet(short_dir / "b.sock"),),
                              paused=False, extra_args=tuple(args["args"])))
    _slow(src, qemu_under_test)  # 384 MiB of RAM can not move within the timeout
    code, doc = _json("migrate", "--qmp", str(src.qmp_path), "--to", str(dest.qmp_path),
                      "--uri", f"unix:{short_dir}/m.sock", "--timeout", "2")
    assert code == 4, doc
    o = doc["outcome"]
    assert o["timed_out"] and o["cancelled"] and not o["ok"] and o["status"] == "cancelled"
    assert o["progress"], doc
    status = src.control.cmd("query-status")
    assert isinstance(status, dict) and status["status"] == "running"  # the source runs on
    # (The destination QEMU quits, exit 1, once its incoming stream breaks off.)


def test_ctrl_c_cancels_the_migration_and_the_source_runs_on(
        start_qemu: StartQemu, procs: Procs, short_dir: Path,
        qemu_under_test: tuple[int, int, int]) -> None:
    src, _ = _pair(start_qemu, procs, short_dir)
    args = run_pyvhost("mem", "migrate-args", "--qmp", str(src.qmp_path), "--json").json()
    dest = start_qemu(replace(src.config, vhost_user_net=(VhostUserNet(short_dir / "b.sock"),),
                              paused=False, extra_args=tuple(args["args"])))
    _slow(src, qemu_under_test)  # still under way when the interrupt comes

    def migrating() -> bool:
        info = src.control.cmd("query-migrate")
        return isinstance(info, dict) and info.get("status") == "active"

    with started("mem", "migrate", "--qmp", str(src.qmp_path), "--to", str(dest.qmp_path),
                 "--uri", f"unix:{short_dir}/m.sock", "--timeout", "300") as run:
        run.wait_until(migrating, "the migration under way")
        done = run.interrupt()
    assert done.code == 130, done
    assert "Traceback" not in done.stderr, done
    # One line on stderr (the progress went to stdout).
    assert done.stderr.splitlines() == [
        "error: interrupted: migration cancelled (QEMU: cancelled); the source is running"
    ], done
    assert "migrating to" in done.stdout, done
    info = src.control.cmd("query-migrate")
    assert isinstance(info, dict) and info["status"] == "cancelled", info
    status = src.control.cmd("query-status")
    assert isinstance(status, dict) and status["status"] == "running"  # the source runs on
    # (The destination QEMU quits, exit 1, once its incoming stream breaks off.)


def test_migrate_under_libvirt_is_refused_with_what_to_use() -> None:
    # Refused before connecting: no libvirtd is needed to see it.
    done = run_pyvhost("mem", "migrate", "--libvirt", "web01", "--connect",
                       "qemu:///system")
    assert_one_line_error(done, 2, "libvirt migrates a domain itself",
                          "virsh migrate --live web01", "migrate-args --libvirt web01")
    code, doc = _json("migrate", "--libvirt", "web01")
    assert code == 2 and doc["error"]["kind"] == "usage", doc
    done = run_pyvhost("mem", "migrate", "--qmp", "/nonexistent.sock")
    assert_one_line_error(done, 2, "--to SOCK and --uri URI")
    done = run_pyvhost("mem", "migrate-args")
    assert_one_line_error(done, 2, "--qmp SOCK or --libvirt DOMAIN")
