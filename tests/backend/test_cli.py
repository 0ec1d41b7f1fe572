"""``pyvhost net --reflect`` as a real process: serving, Ctrl-C, and sockets it must not take."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvhost.tools.process import pyvhost_argv

from .harness import NetPort
from .rawclient import TIMEOUT, RawClient, wait_until


@dataclass
class Cli:
    proc: subprocess.Popen[bytes]
    stderr: Path

    def output(self) -> str:
        return self.stderr.read_text(errors="replace")

    def wait(self) -> int:
        return self.proc.wait(TIMEOUT)


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[list[Cli]]:
    """Start ``net --reflect`` processes; any still running at the end is killed by pid."""
    started: list[Cli] = []
    yield started
    for c in started:
        if c.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.proc.pid, signal.SIGKILL)
            c.proc.wait(TIMEOUT)


def start(started: list[Cli], tmp_path: Path, path: Path) -> Cli:
    log = tmp_path / f"net-{len(started)}.stderr"
    with open(log, "wb") as err:
        proc = subprocess.Popen(pyvhost_argv("net", "--socket", str(path), "--reflect"),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
    c = Cli(proc, log)
    started.append(c)
    return c


def accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def wait_serving(c: Cli, path: Path) -> None:
    def up() -> bool:
        assert c.proc.poll() is None, f"pyvhost exited early:\n{c.output()}"
        return accepts(path)

    wait_until(up, f"pyvhost listening on {path}")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)],
                         ids=["SIGTERM-0", "SIGINT-130"])
def test_serves_traffic_and_exits_on_a_signal(cli: list[Cli], tmp_path: Path,
                                              socket_dir: Path, sig: int, code: int) -> None:
    # SIGTERM is a service's normal stop (exit 0); Ctrl-C is an interruption (130).
    path = socket_dir / "net.sock"
    c = start(cli, tmp_path, path)
    wait_serving(c, path)
    port = NetPort(str(path), tag="cli")
    try:
        port.start()
        try:
            port.check_traffic(32)
        except AssertionError as e:
            # Keep the back-end's own log with the failure (it is gone with tmp_path).
            raise AssertionError(f"{e}\n--- pyvhost net stderr ---\n{c.output()}") from e
    finally:
        port.close()
    os.kill(c.proc.pid, sig)
    assert c.wait() == code, c.output()
    assert not path.exists(), "socket file left behind"
    stats = next(json.loads(line) for line in c.output().splitlines()
                 if line.startswith("{"))
    assert stats["schema"] == "pyvhost.net.stats/1"
    assert stats["stats"]["tx_frames"] == stats["stats"]["rx_frames"] == 32


def test_second_instance_on_the_same_path_is_refused(cli: list[Cli], tmp_path: Path,
                                                     socket_dir: Path) -> None:
    path = socket_dir / "net.sock"
    first = start(cli, tmp_path, path)
    wait_serving(first, path)
    second = start(cli, tmp_path, path)
    assert second.wait() == 2
    assert "in use" in second.output() and str(path) in second.output(), second.output()
    # The first instance keeps its socket and still serves.
    assert path.is_socket()
    client = RawClient.connect(str(path))
    try:
        client.sync()
    finally:
        client.close()
    os.kill(first.proc.pid, signal.SIGTERM)
    assert first.wait() == 0, first.output()
    assert not path.exists()


def test_regular_file_at_the_path_is_refused_and_kept(cli: list[Cli], tmp_path: Path,
                                                      socket_dir: Path) -> None:
    path = socket_dir / "not-a-socket"
    path.write_bytes(b"precious\n")
    c = start(cli, tmp_path, path)
    assert c.wait() == 2
    assert "not a socket" in c.output() and str(path) in c.output(), c.output()
    assert path.read_bytes() == b"precious\n"


def test_stale_socket_file_is_replaced(cli: list[Cli], tmp_path: Path,
                                       socket_dir: Path) -> None:
    path = socket_dir / "net.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # bound, never listened: what a killed back-end leaves
    assert path.is_socket() and not accepts(path)
    c = start(cli, tmp_path, path)
    wait_serving(c, path)
    os.kill(c.proc.pid, signal.SIGTERM)
    assert c.wait() == 0, c.output()
    assert not path.exists()
