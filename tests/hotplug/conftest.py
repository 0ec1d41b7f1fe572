"""Fixtures: real QEMU 7.2 guests (paused, TCG) started through pyvhost.lab.qemu."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from click.testing import CliRunner

from pyvhost.hotplug.cli import mem
from pyvhost.lab.qemu import Qemu, QemuConfig
from support.procs import need

StartQemu = Callable[[QemuConfig], Qemu]


@pytest.fixture
def start_qemu(tmp_path: Path) -> Iterator[StartQemu]:
    """Start QEMU guests; every one is stopped (by pid) and its sockets removed at the end."""
    need("qemu-system-x86_64", "qemu-system-x86")
    started: list[Qemu] = []

    def start(config: QemuConfig) -> Qemu:
        q = Qemu(config, log=tmp_path / f"qemu{len(started)}.log")
        started.append(q)
        return q.start(timeout=120)

    try:
        yield start
    finally:
        for q in reversed(started):
            q.stop()


def run_mem(*args: str) -> tuple[int, str]:
    """``pyvhost mem ARGS`` in this process: (exit code, stdout)."""
    result = CliRunner().invoke(mem, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout


def run_json(*args: str) -> tuple[int, dict[str, Any]]:
    code, out = run_mem(*args, "--json")
    doc: dict[str, Any] = json.loads(out)
    return code, doc


def objects(q: Qemu) -> set[str]:
    """Child objects of /objects, as QEMU lists them."""
    listing = cast(list[dict[str, str]], q.control.cmd("qom-list", path="/objects"))
    return {o["name"] for o in listing if o["type"].startswith("child<")}
