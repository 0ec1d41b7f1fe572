"""A front-end shrinks guest memory under a live ring: real processes.

``pyvhost net --reflect`` serves two guests (pyvhost's own front-end and virtio-net
driver, :mod:`support.netdriver`), both passing traffic. Guest A then truncates the memfd
of its boot RAM, where its rings live, and kicks. On the compiled data path the back-end
survives: A's connection is closed and its fds and mappings are released, B's frames keep
coming back, and A's next connection is served. On the pure-Python path nothing can catch
the SIGBUS: the process dies of it (as DPDK 22.11 does).
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
from pathlib import Path

import pytest

from pyvhost.tools import procfs
from pyvhost.tools.process import pyvhost_argv
from support.netdriver import TIMEOUT, mac
from support.procs import Procs, Started, wait_for_socket

from .rings import boot_ram_fd, kick_tx, reflect_round, reflected_guest, region_names

PEER = mac(0xFE)


def start_reflector(procs: Procs, short_dir: Path, *, pure: bool) -> tuple[Started, Path, Path]:
    """``pyvhost net --reflect`` on two sockets in ``short_dir``, once it says it runs the
    data path asked for (pure Python, or compiled); returns it and the two sockets."""
    a, b = short_dir / "a.sock", short_dir / "b.sock"
    env = {k: v for k, v in os.environ.items() if k != "PYVHOST_PURE"}
    if pure:
        env["PYVHOST_PURE"] = "1"
    s = procs.start(pyvhost_argv("net", "--reflect", "--socket", str(a), "--socket", str(b),
                                 "--no-stats"), "pyvhost", env=env,
                    stop_signal=signal.SIGINT)
    wait_for_socket(b, s.proc)
    s.wait_output("data path: python" if pure else "data path: compiled")
    return s, a, b


def held(pid: int, names: list[str]) -> tuple[int, int]:
    """fds and mappings of process ``pid`` on the files called ``names``."""
    fds = sum(len(procfs.matching_fds(pid, n)) for n in names)
    maps = sum(len(procfs.matching_mappings(pid, n)) for n in names)
    return fds, maps


def wait_held(pid: int, names: list[str], expected: tuple[int, int]) -> None:
    from backend.rawclient import wait_until
    wait_until(lambda: held(pid, names) == expected,
               f"the back-end to hold {expected} fds/mappings of {names}", TIMEOUT)


@pytest.mark.skipif(importlib.util.find_spec("pyvhost.datapath._native") is None,
                    reason="the compiled data path is not built")
@pytest.mark.usefixtures("net_workers")
def test_compiled_path_survives_a_shrunken_region(procs: Procs, short_dir: Path) -> None:
    be, a_path, b_path = start_reflector(procs, short_dir, pure=False)
    rng = random.Random(7)
    a = reflected_guest(str(a_path), mac(1))
    b = reflected_guest(str(b_path), mac(2))
    try:
        reflect_round(a, PEER, 32, 0, rng)
        reflect_round(b, PEER, 32, 0, rng)
        a_names = region_names(a)
        assert held(be.pid, a_names) == (2, 2)  # boot RAM and DIMM: one fd, one mapping each
        # A shrinks the file its rings live in to nothing, and kicks.
        os.ftruncate(boot_ram_fd(a), 0)
        kick_tx(a)
        be.wait_output("SIGBUS at host address", timeout=TIMEOUT)
        assert be.proc.poll() is None, f"the back-end died:\n{be.output()[-3000:]}"
        # A's connection is closed: its fds and mappings are gone from the back-end.
        wait_held(be.pid, a_names, (0, 0))
        # B goes on, through the same process.
        reflect_round(b, PEER, 64, 32, rng)
        # A connects again and is served: the closed connection's socket left the loop
        # with it, although nothing happened on that socket (its fd number, free again,
        # goes to the next accept; a stale watch on it once ended the process).
        again = reflected_guest(str(a_path), mac(3))
        try:
            reflect_round(again, PEER, 16, 0, rng)
        finally:
            again.close()
        assert be.proc.poll() is None, be.output()[-3000:]
        assert "SIGBUS" in be.output()
    finally:
        a.close()
        b.close()


def test_pure_path_dies_of_a_shrunken_region(procs: Procs, short_dir: Path) -> None:
    """What the fallback does (documented in pyvhost.datapath): SIGBUS kills it."""
    be, a_path, _ = start_reflector(procs, short_dir, pure=True)
    rng = random.Random(8)
    a = reflected_guest(str(a_path), mac(1))
    try:
        reflect_round(a, PEER, 16, 0, rng)
        os.ftruncate(boot_ram_fd(a), 0)
        kick_tx(a)
        be.proc.wait(TIMEOUT)
        assert be.proc.returncode == -signal.SIGBUS, be.output()[-3000:]
    finally:
        a.close()
