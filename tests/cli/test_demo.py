"""``pyvhost demo`` as a process: 0 no leak, 1 its probe found a leak, 2 it could not run,
130 interrupted (and everything it started is gone), its JSON against pyvhost.demo/1."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from frontend.fake_backend import FakeBackend
from pyvhost.backend.control import fetch_status
from pyvhost.protocol.constants import ProtocolFeature
from support.cli import Done, assert_one_line_error, run_pyvhost, started
from support.schemas import validate

QUICK = ("--dimms", "1", "--cycles", "3")


def test_clean_run_exits_0() -> None:
    done = run_pyvhost("demo", *QUICK, "--json")
    assert done.code == 0, done
    doc = validate(done.json(), "pyvhost.demo/1")
    assert [len(s["memory"]) for s in doc["steps"]] == [1, 2, 1]
    assert doc["probe"]["verdict"] == "no leak" and doc["probe"]["cycles"] == 3
    human = run_pyvhost("demo", *QUICK)
    assert human.code == 0, human
    assert "hot-add DIMM 1" in human.stdout and human.stdout.rstrip().endswith("no leak")


@pytest.fixture
def leaky(short_dir: Path) -> Iterator[FakeBackend]:
    be = FakeBackend(str(short_dir / "leaky.sock"),
                     protocol_features=int(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
                                           | ProtocolFeature.STATUS), leak=True)
    try:
        yield be
    finally:
        be.close()


def test_a_leak_found_by_its_probe_exits_1(leaky: FakeBackend, tmp_path: Path) -> None:
    """The demo's own back-end does not leak; here its final probe is pointed at one that
    does (a scripted back-end served by this test process, which the probe measures).
    Everything else is the real command."""
    script = tmp_path / "leaky_demo.py"
    script.write_text(
        "import dataclasses, os\n"
        "import pyvhost.cli.demo as demo\n"
        "from pyvhost.cli import main\n"
        "real = demo.run_probe\n"
        "demo.run_probe = lambda config, **kw: real(dataclasses.replace(\n"
        "    config, socket_path=os.environ['LEAKY'], pid=None, timeout=2.0), **kw)\n"
        "main()\n")
    argv = [sys.executable, str(script), "demo", *QUICK, "--json"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "LEAKY": leaky.path})
    done = Done(argv, result.returncode, result.stdout, result.stderr)
    assert done.code == 1, done
    doc = validate(done.json(), "pyvhost.demo/1")
    assert doc["probe"]["leak"] is True and doc["probe"]["pid"] == os.getpid()


def test_cannot_run_exits_2(short_dir: Path) -> None:
    # A temporary directory so deep that the back-end's socket path does not fit in a
    # sockaddr_un (107 bytes): pyvhost net cannot listen, the demo cannot run.
    deep = short_dir / ("d" * 100)
    deep.mkdir()
    done = run_pyvhost("demo", *QUICK, env={"TMPDIR": str(deep)})
    assert_one_line_error(done, 2, "the pyvhost back-end did not start")
    doc = validate(run_pyvhost("demo", *QUICK, "--json", env={"TMPDIR": str(deep)}).json(),
                   "pyvhost.error/1")
    assert (doc["command"], doc["error"]["kind"], doc["exit_code"]) == ("demo", "run", 2)
    assert list(deep.iterdir()) == [], "the demo left its directory behind"
    assert_one_line_error(run_pyvhost("demo", "--dimms", "9"), 2, "--dimms")


def test_ctrl_c_exits_130_and_ends_its_backend(short_dir: Path) -> None:
    with started("demo", "--cycles", "1000000", env={"TMPDIR": str(short_dir)}) as demo:
        controls: list[Path] = []

        def probing() -> bool:
            controls[:] = list(short_dir.glob("pyvhost-demo-*/pyvhost.ctl"))
            if not controls:
                return False
            try:
                state = fetch_status(str(controls[0]))
            except OSError:
                return False
            return bool(state["connections"])

        demo.wait_until(probing, "a front-end connected to the demo's back-end")
        backend_pid = fetch_status(str(controls[0]))["pid"]
        done = demo.interrupt()
    assert done.code == 130, done
    assert "Traceback" not in done.stderr and done.stderr.strip() == "error: interrupted"
    assert isinstance(backend_pid, int)
    assert not os.path.exists(f"/proc/{backend_pid}"), "the demo's back-end still runs"
    assert list(short_dir.iterdir()) == [], "the demo left its directory behind"
