"""The README's main job (``pyvhost demo``) and ``pyvhost status``, run as a user would."""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path

from pyvhost.frontend.frontend import Frontend
from pyvhost.frontend.memory import FrontendMemory
from pyvhost.tools.process import pyvhost_argv
from support.procs import Procs
from support.schemas import validate

PYVHOST = pyvhost_argv()


def test_demo_shows_exact_tables_and_no_leak() -> None:
    result = subprocess.run([*PYVHOST, "demo", "--json", "--dimms", "3", "--cycles", "30"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = validate(json.loads(result.stdout), "pyvhost.demo/1")
    steps = out["steps"]
    # boot, three hot-adds, one removal: the back-end's table follows exactly.
    assert [len(s["memory"]) for s in steps] == [1, 2, 3, 4, 3]
    assert [s["region_fds"] for s in steps] == [1, 2, 3, 4, 3]
    assert [s["mappings"] for s in steps] == [1, 2, 3, 4, 3]
    assert all(r["fds_held"] == 1 for s in steps for r in s["memory"])
    # Every SET_MEM_TABLE re-sent all regions with fresh fds, yet the process's fd count
    # moved by exactly one per region added or removed.
    fds = [s["fds"] for s in steps]
    assert [b - a for a, b in itertools.pairwise(fds)] == [1, 1, 1, -1]
    assert steps[-1]["memory"][0]["guest_phys_addr"] == 0
    assert out["probe"]["verdict"] == "no leak"
    assert out["probe"]["cycles"] == 30


def test_status_reports_the_memory_table(procs: Procs, tmp_path: Path) -> None:
    sock, ctl = tmp_path / "vh.sock", tmp_path / "ctl.sock"
    backend = procs.pyvhost_net(sock, ctl, "--reflect")
    memory = FrontendMemory()
    fe = Frontend()
    try:
        fe.connect(sock)
        fe.negotiate()
        memory.add_boot_ram(8 << 20)
        memory.add_dimm(4 << 20)
        fe.update_memory(memory.regions)
        result = subprocess.run([*PYVHOST, "status", "--json", str(ctl)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        state = validate(json.loads(result.stdout), "pyvhost.status/1")
        assert state["pid"] == backend.pid
        (conn,) = state["connections"]
        assert [(r["guest_phys_addr"], r["memory_size"]) for r in conn["memory"]] == [
            (0, 8 << 20), (4 << 30, 4 << 20)]
        human = subprocess.run([*PYVHOST, "status", str(ctl)], capture_output=True,
                               text=True, timeout=60)
        assert human.returncode == 0 and "0x100000000" in human.stdout, human.stdout
    finally:
        fe.close()
        memory.close()
    missing = subprocess.run([*PYVHOST, "status", str(tmp_path / "nope.sock")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "nope.sock" in missing.stderr
