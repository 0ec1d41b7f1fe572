"""``pyvhost lab`` against real QEMU 7.2 (TCG) guests on a real ``pyvhost net`` process.

Each test runs the lab's own code (:mod:`pyvhost.lab.scenario`) or its command, and checks
what it measured: pings answered by the other guest, the back-end's memory table beside
QEMU's, the fds and mappings of the back-end process read from /proc, and QEMU's own
refusal past the 8-region limit. Every report is validated against the ``pyvhost.lab/1``
JSON Schema, and every error against ``pyvhost.error/1``. Everything the lab starts it
ends by pid (its context manager), pass or fail; the command is stopped with SIGINT or
SIGTERM, which the lab tears down on.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from click.testing import CliRunner
from rich.console import Console

from pyvhost import schemas
from pyvhost.backend.control import fetch_status
from pyvhost.cli.lab import _Printer, lab
from pyvhost.lab.config import LabConfig
from pyvhost.lab.document import report_json
from pyvhost.lab.image import GuestImage
from pyvhost.lab.qemu import QBOOT
from pyvhost.lab.scenario import Lab, run_lab
from pyvhost.tools.process import pyvhost_argv
from support.procs import Procs, need

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
MiB = 1 << 20


@pytest.fixture
def image(guest_image: GuestImage) -> GuestImage:
    need("qemu-system-x86_64", "qemu-system-x86")
    if not QBOOT.is_file():
        pytest.skip(f"{QBOOT} missing (Debian package qemu-system-data)")
    return guest_image


def valid(doc: dict[str, Any], schema_id: str = "pyvhost.lab/1") -> dict[str, Any]:
    """``doc``, after checking it against its JSON Schema."""
    jsonschema.Draft202012Validator(schemas.load(schema_id)).validate(doc)
    assert doc["schema"] == schema_id
    return doc


def run_report(config: LabConfig, image: GuestImage) -> dict[str, Any]:
    """The lab's JSON document of a run of ``config``."""
    return valid(report_json(run_lab(config, image=image)))


def _gone(pids: list[int], rundir: str) -> list[int]:
    """The pids still alive (killed now: the lab this test started left them) and, as -1,
    a run directory left behind (removed now)."""
    survivors = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        survivors.append(pid)
        os.kill(pid, signal.SIGKILL)
    if os.path.exists(rundir):
        shutil.rmtree(rundir, ignore_errors=True)
        survivors.append(-1)
    return survivors


def _started(out: str) -> tuple[str, list[int]]:
    """The run directory and the pids (QEMUs, then pyvhost net) the lab's progress named."""
    lines = out.splitlines()
    rundir = next(line.split("run directory ", 1)[1].strip() for line in lines
                  if "run directory " in line)
    pids = [int(p) for line in lines if "QEMU pids " in line
            for p in line.split("QEMU pids ", 1)[1].replace(",", " ").split()]
    pids += [int(line.split("pyvhost net (pid ", 1)[1].split(")")[0])
             for line in lines if "pyvhost net (pid " in line]
    return rundir, pids


def _last_json(out: str) -> dict[str, Any]:
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, out[-3000:]
    doc: dict[str, Any] = json.loads(lines[-1])
    return doc


def _adds(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in report["steps"] if s["action"] == "add" and s["qemu"]
            and s["qemu"]["ok"]]


def _check_step_usage(report: dict[str, Any], step: dict[str, Any]) -> None:
    """The back-end holds one fd and one mapping per region of all its tables, and its
    other fds are what they were with the VMs up before any hot-plug."""
    b = step["backend"]
    regions = len(b["regions"]) + sum(b["other_vms_regions"].values())
    base = report["backend"]["baseline"]
    assert b["guest_ram_mappings"] == regions, step
    assert b["guest_ram_fds"] == regions, step
    assert b["fds"] - b["guest_ram_fds"] == base["fds"] - base["guest_ram_fds"], step
    # Every region the back-end holds is one QEMU sends (its flat view), and no other.
    sent = {(r["guest_phys_addr"], r["memory_size"])
            for r in step["qemu_memory"]["vhost_user_regions"]}
    held = {(r["guest_phys_addr"], r["memory_size"]) for r in b["regions"]}
    assert held == sent, step
    assert all(r["fds_held"] == 1 for r in b["regions"]), step


def _check_hot_adds(report: dict[str, Any], dimms: int, request: str) -> None:
    adds = _adds(report)
    assert len(adds) >= dimms
    for n, step in enumerate(adds, 1):
        assert step["ok"], [c for c in step["checks"] if not c["ok"]]
        _check_step_usage(report, step)
        # Boot RAM (one region on a booted q35 guest) plus one region per DIMM.
        assert len(step["backend"]["regions"]) == 1 + n
        assert step["guest"]["mem_total_delta_kib"] == 128 * 1024
        assert step["timing"]["backend_request"] == request
        # QEMU waits for the back-end's ack: the update happens inside device_add.
        assert step["timing"]["backend_inside_command"] is True
        # VM 2's table is untouched by VM 1's hot-plug.
        assert step["backend"]["other_vms_regions"] == {"2": 1}
    ping = report["continuous_ping"]
    assert ping["lost"] == 0 and ping["sent"] == ping["received"]
    # At least pings_per_step answers after each step went through the new tables.
    assert ping["received"] >= 3 * len(adds)
    assert all(p["received"] == p["sent"] == 3 for p in report["pings"])
    after = report["backend"]["after_vms"]
    assert after["fds"] == report["backend"]["before_vms"]["fds"]
    assert after["guest_ram_fds"] == after["guest_ram_mappings"] == 0
    assert report["summary"]["frames_dropped"] == 0


def test_two_guests_ping_each_other_through_pyvhost_net(image: GuestImage) -> None:
    config = LabConfig(vms=2, dimms=0)
    with Lab(config, image=image) as lab:
        lab.start_net()
        lab.boot()
        before = lab.switch_counters()
        results = lab.ping_all()
        assert [(r.from_vm_number, r.to_vm_number) for r in results] == [(1, 2), (2, 1)]
        for r in results:
            assert (r.exit_code, r.sent, r.received) == (0, 3, 3), r
        # The frames went through the switch: it learned each guest's MAC on that guest's
        # connection, and each port carried the echo requests and replies both ways.
        state: dict[str, Any] = fetch_status(lab.control)
        conns = {c["peer_pid"]: c["name"] for c in state["connections"]}
        names = [conns[vm.qemu.pid] for vm in lab.vms]
        table = {e["mac"]: e["port"] for e in state["switch"]["mac_table"]}
        assert table[config.mac(0)] == names[0]
        assert table[config.mac(1)] == names[1]
        ports = {p["name"]: p for p in state["switch"]["ports"]}
        for name in names:
            assert ports[name]["rx_frames"] >= 6 and ports[name]["tx_frames"] >= 6
        # Nothing dropped from the first ping on (a frame flooded to a guest whose NIC
        # was not started yet is dropped at boot: that is not the ping's).
        dropped = {p.vm_number: (p.rx_drops, p.tx_drops) for p in before}
        assert {p.vm_number: (p.rx_drops, p.tx_drops)
                for p in lab.switch_counters()} == dropped


def test_six_dimms_without_mem_slots_then_qemu_refuses_the_ninth_region(
        image: GuestImage) -> None:
    report = run_report(LabConfig(vms=2, dimms=6, mem_slots=False, probe_limit=True), image)
    for features in report["protocol_features"].values():
        assert "CONFIGURE_MEM_SLOTS" not in features
    # Six DIMMs, then the probe: a 7th fits (8 regions: QEMU's limit without
    # CONFIGURE_MEM_SLOTS), an 8th would be the 9th region.
    _check_hot_adds(report, 6, "SET_MEM_TABLE")
    adds = _adds(report)
    assert len(adds) == 7
    refused, forced = report["steps"][-2:]
    assert refused["qemu"] is None
    assert [r["code"] for r in refused["planner"]["refusals"]] == ["VHOST_USER_REGION_LIMIT"]
    assert refused["planner"]["region_limit"] == 8
    assert forced["action"] == "add (forced past the planner)"
    assert forced["qemu"]["ok"] is False
    assert forced["qemu"]["failed_step"] == "device_add"
    # QEMU 7.2: "has no free memory slots left", 10.0: "has not enough free memory ..."
    assert "free memory slots left" in forced["qemu"]["error"]
    assert forced["qemu"]["orphans"] == []  # the executor's undo removed the backend
    # pyvhost was not touched: same table (generation), fds and mappings as after the 7th.
    last = adds[-1]["backend"]
    now = forced["backend"]
    assert now["table_generation"] == last["table_generation"]
    assert now["regions"] == last["regions"] and len(now["regions"]) == 8
    for key in ("fds", "guest_ram_fds", "mappings", "guest_ram_mappings"):
        assert now[key] == last[key], key
    assert forced["guest"]["mem_total_delta_kib"] == 0
    assert forced["ok"], [c for c in forced["checks"] if not c["ok"]]
    assert report["ok"], report["problems"]


def test_sixteen_dimms_with_mem_slots(image: GuestImage) -> None:
    report = run_report(LabConfig(vms=2, dimms=16, mem_slots=True), image)
    for features in report["protocol_features"].values():
        assert "CONFIGURE_MEM_SLOTS" in features
    _check_hot_adds(report, 16, "ADD_MEM_REG")
    last = _adds(report)[-1]
    assert len(last["backend"]["regions"]) == 17  # past DPDK's limit of 8
    assert report["config"]["slots"] >= 16
    assert report["ok"], report["problems"]


def test_pyvhost_lab_json_end_to_end(image: GuestImage, procs: Procs) -> None:
    lab = procs.pyvhost("lab", "--json", "--vms", "2", "--hotplug", "2x128M", "--unplug",
                        name="lab")
    try:
        code = lab.proc.wait(600)
    except subprocess.TimeoutExpired:
        pytest.fail("pyvhost lab did not finish within 600 s:\n" + lab.output()[-3000:])
    out = lab.output()
    doc = valid(_last_json(out))
    assert code == 0, doc.get("problems") or out[-3000:]
    assert doc["ok"] is True and doc["problems"] == []
    assert doc["config"]["dimms"] == 2 and doc["config"]["dimm_size"] == 128 * MiB
    assert [s["action"] for s in doc["steps"]] == ["baseline", "add", "add", "remove",
                                                   "remove"]
    assert [len(s["backend"]["regions"]) for s in doc["steps"]] == [1, 2, 3, 2, 1]
    for step in doc["steps"]:
        _check_step_usage(doc, step)
    s = doc["summary"]
    assert (s["dimms_added"], s["dimms_removed"], s["pings_lost"]) == (2, 2, 0)
    assert s["pings_sent"] > 0 and s["released_after_vms"] is True
    # After the unplugs the back-end holds what it held before the first hot-add.
    for key in ("fds", "guest_ram_fds", "guest_ram_mappings"):
        assert doc["backend"]["after"][key] == doc["backend"]["baseline"][key], key
    # The same report, as people see it.
    text = io.StringIO()
    printer = _Printer(Console(file=text, width=120), tables=True)
    for step in doc["steps"]:
        printer.step(step)
    printer.summary(doc)
    shown = text.getvalue()
    assert "pyvhost-dimm1 (slot 1)" in shown and "boot RAM (ram0)" in shown
    assert "OK: no ping lost" in shown and "FAILED" not in shown
    # The lab removed its run directory and every process it started is gone.
    assert _gone([doc["pids"]["pyvhost_net"], *doc["pids"]["qemu"]],
                 doc["run_directory"]) == []


@pytest.mark.parametrize("sig, args", [(signal.SIGINT, ()), (signal.SIGTERM, ("--json",))],
                         ids=["ctrl-c", "sigterm-json"])
def test_pyvhost_lab_interrupted_tears_everything_down(
        image: GuestImage, procs: Procs, sig: signal.Signals, args: tuple[str, ...]) -> None:
    """Ctrl-C (or SIGTERM) in the middle of hot-plug: exit 130, QEMU and pyvhost net gone
    (by the pids the lab printed), its run directory removed; with --json the error
    document says so."""
    lab = procs.pyvhost("lab", "--hotplug", "3x128M", *args, name="lab")
    out = ""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and lab.proc.poll() is None:
        out = lab.output()
        if "hot-adding DIMM 1/3" in out:
            break
        time.sleep(0.1)
    assert "hot-adding DIMM 1/3" in out, lab.output()[-3000:]
    os.kill(lab.pid, sig)
    code = lab.proc.wait(120)
    out = lab.output()
    rundir, pids = _started(out)
    survivors = _gone(pids, rundir)
    assert code == 130, out[-3000:]
    assert len(pids) == 3, out[-3000:]  # two QEMUs and pyvhost net
    assert survivors == [], out[-3000:]
    assert "interrupted: QEMU and pyvhost net are stopped" in out
    if args:
        doc = valid(_last_json(out), "pyvhost.error/1")
        assert (doc["command"], doc["exit_code"], doc["error"]["kind"]) == (
            "lab", 130, "interrupted")


def test_pyvhost_lab_without_qemu_exits_2_and_leaves_nothing(
        image: GuestImage, procs: Procs, tmp_path: Path) -> None:
    """QEMU missing (not on PATH): the lab could not run, exit 2, the error document names
    the program; pyvhost net, started before, is ended and the run directory removed."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    apt_cache = shutil.which("apt-cache")  # the guest image's kernel is looked up
    assert apt_cache is not None
    (bindir / "apt-cache").symlink_to(apt_cache)
    # Not on PATH, and not named by PYVHOST_QEMU either (CI's QEMU 10.0 run sets it).
    env = {k: v for k, v in os.environ.items() if k != "PYVHOST_QEMU"}
    started = procs.start(pyvhost_argv("lab", "--json", "--accel", "tcg"), "lab",
                          env={**env, "PATH": str(bindir)})
    code = started.proc.wait(300)
    out = started.output()
    rundir, pids = _started(out)
    assert _gone(pids, rundir) == [], out[-3000:]
    assert code == 2, out[-3000:]
    doc = valid(_last_json(out), "pyvhost.error/1")
    assert (doc["command"], doc["exit_code"], doc["error"]["kind"]) == ("lab", 2, "run")
    assert "qemu-system-x86_64 not found" in doc["error"]["message"]


@pytest.mark.parametrize("args", [["--hotplug", "6x100M"], ["--hotplug", "six"],
                                  ["--vms", "1"], ["--hotplug", "2x0"]])
def test_pyvhost_lab_refuses_bad_options_before_starting_anything(args: list[str]) -> None:
    result = CliRunner().invoke(lab, args)
    assert result.exit_code == 2, result.output
    assert "run directory" not in result.output
    # The command as people run it, with --json: the error document, nothing started.
    done = subprocess.run(pyvhost_argv("lab", "--json", *args), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    doc = valid(json.loads(done.stdout), "pyvhost.error/1")
    assert (doc["command"], doc["exit_code"], doc["error"]["kind"]) == ("lab", 2, "usage")
    assert "run directory" not in done.stderr


def test_pyvhost_lab_help_states_the_exit_codes() -> None:
    result = CliRunner().invoke(lab, ["--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for part in ("Exit codes: 0 all checks passed", "1 a ping was lost or a check failed",
                 "2 the lab could not run", "130 interrupted", "-v, --verbose", "--json"):
        assert part in text, part
