"""The guest's real command loop (``guest_tool.sh serve``) under the host's busybox, talking
to the real :class:`GuestConsole` through a link that can lose and garble lines.

The same busybox binary (busybox-static) goes into the guest image, so ``sh``, ``md5sum``,
``base64`` and ``timeout`` are the ones the guest runs; only the kernel and the tty are the
host's. The commands run on the host, so they are harmless (``echo``, counting lines in a
file of the test's own directory). The loop is ended by its pid.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest

from pyvhost.lab.guest import GuestConsole, GuestTimeoutError
from pyvhost.lab.image import ImageBuildError, find_busybox
from pyvhost.tools.process import end_process

#: (number of the line, from 1; the line with its "\n") -> what reaches the guest.
Damage = Callable[[int, bytes], bytes]


@dataclass
class Served:
    console: GuestConsole
    state: Path
    link: Link


class Link:
    """Copies bytes between the console and the guest loop; host-to-guest lines go through
    ``damage`` first, guest-to-host lines through ``answers``."""

    def __init__(self, host: socket.socket, guest: socket.socket, damage: Damage,
                 answers: Damage) -> None:
        self.host, self.guest, self.damage, self.answers = host, guest, damage, answers
        self.lines = 0
        self.up_lines = 0
        self._threads = [threading.Thread(target=self._down, daemon=True),
                         threading.Thread(target=self._up, daemon=True)]
        for t in self._threads:
            t.start()

    def _down(self) -> None:
        buf = b""
        while data := _recv(self.host):
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                self.lines += 1
                with contextlib.suppress(OSError):
                    self.guest.sendall(self.damage(self.lines, line + b"\n"))

    def _up(self) -> None:
        buf = b""
        while data := _recv(self.guest):
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                self.up_lines += 1
                with contextlib.suppress(OSError):
                    self.host.sendall(self.answers(self.up_lines, line + b"\n"))


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    try:
        busybox = find_busybox()
    except ImageBuildError as e:
        pytest.skip(str(e))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    subprocess.run([str(busybox), "--install", "-s", str(bindir)], check=True)
    script = tmp_path / "pyvhost-guest"
    script.write_bytes(resources.files("pyvhost.lab").joinpath("guest_tool.sh").read_bytes())
    started: list[tuple[subprocess.Popen[bytes], GuestConsole, list[socket.socket]]] = []

    def start(damage: Damage = lambda n, line: line, ack_timeout: float = 10.0,
              answers: Damage = lambda n, line: line) -> Served:
        state = tmp_path / f"state{len(started)}"
        state.mkdir()
        console_end, link_host = socket.socketpair()
        link_guest, loop_end = socket.socketpair()
        proc = subprocess.Popen([str(busybox), "sh", str(script), "serve", str(state)],
                                stdin=loop_end.fileno(), stdout=loop_end.fileno(),
                                start_new_session=True,
                                env={"PATH": str(bindir), "HOME": str(tmp_path)})
        loop_end.close()
        console = GuestConsole(console_end, name="busybox", ack_timeout=ack_timeout)
        started.append((proc, console, [link_host, link_guest]))
        return Served(console, state, Link(link_host, link_guest, damage, answers))

    try:
        yield start
    finally:
        for proc, console, socks in started:
            end_process(proc, timeout=5)
            # What its commands left running (its own process group, started here).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            console.close()
            for s in socks:
                s.close()


def test_commands_and_exit_codes(serve: Callable[..., Served]) -> None:
    c = serve().console
    assert c.run("echo hi") == (0, "hi\n")
    assert c.run("echo -n no-newline") == (0, "no-newline")
    assert c.run("echo oops >&2; exit 3") == (3, "oops\n")
    assert c.run("echo \"$((6 * 7))\" '|&;<>' \\$HOME") == (0, "42 |&;<> $HOME\n")
    assert c.resends == []


def test_a_garbled_line_is_not_run_and_the_resend_is(serve: Callable[..., Served]) -> None:
    def cut(n: int, line: bytes) -> bytes:
        return line[7:] if n == 1 else line  # lost its first bytes, as on the UART

    s = serve(cut)
    counter = s.state / "ran"
    assert s.console.run(f"echo x >>{counter}; wc -l <{counter}") == (0, "1\n")
    assert len(s.console.resends) == 1 and "garbled" in s.console.resends[0]
    assert "PYVHOST-GARBLED" in s.console.transcript()
    assert counter.read_text() == "x\n"


def test_a_lost_line_is_sent_again(serve: Callable[..., Served]) -> None:
    s = serve(lambda n, line: b"" if n == 1 else line, ack_timeout=0.5)
    counter = s.state / "ran"
    assert s.console.run(f"echo x >>{counter}; wc -l <{counter}") == (0, "1\n")
    (note,) = s.console.resends
    assert "not acknowledged" in note


def test_a_repeat_of_a_command_is_answered_not_run_again(
        serve: Callable[..., Served]) -> None:
    """Line 1 is held up on the link past the acknowledgement timeout, so the host sends
    the command again; the guest runs attempt 1 and answers attempt 2 from that run."""
    def slow(n: int, line: bytes) -> bytes:
        if n == 1:
            time.sleep(1.5)
        return line

    s = serve(slow, ack_timeout=0.3)
    counter = s.state / "ran"
    assert s.console.run(f"echo x >>{counter}; wc -l <{counter}") == (0, "1\n")
    assert s.console.resends
    assert s.console.run("echo next") == (0, "next\n")
    assert counter.read_text() == "x\n"
    # Every attempt got the same answer from the one run.
    assert s.console.transcript().count("\n1\n\nPYVHOST-END") == len(s.console.resends) + 1


def test_children_of_a_killed_command_do_not_write_into_the_next_answer(
        serve: Callable[..., Served]) -> None:
    c = serve().console
    with pytest.raises(GuestTimeoutError, match="no answer"):
        # The loop kills `sh -c` at its limit; the child it left keeps printing a while.
        c.run("(for i in $(seq 150); do echo late; sleep 0.1; done) & sleep 60", timeout=1)
    assert c.run("echo next", timeout=60) == (0, "next\n")


def _once(match: Callable[[bytes], bool], replace: bytes = b"") -> Damage:
    """Guest-to-host damage: the first line ``match`` accepts becomes ``replace``."""
    done: list[bool] = []

    def damage(n: int, line: bytes) -> bytes:
        if not done and match(line):
            done.append(True)
            return replace
        return line

    return damage


def test_the_end_line_counts_and_checks_the_output(serve: Callable[..., Served]) -> None:
    """END carries busybox's byte count and md5sum of the output; a tty's carriage returns
    are not part of it (the host drops them)."""
    c = serve().console
    assert c.run("printf 'a\\r\\nb'") == (0, "a\nb")
    assert c.run("echo 177") == (0, "177\n")
    end = c.transcript().rstrip("\n").rsplit("\n", 1)[-1].split(" ")
    assert end[0] == "PYVHOST-END" and end[2:] == [
        "0", "4", hashlib.md5(b"177\n", usedforsecurity=False).hexdigest()]
    assert c.resends == []


def test_a_lost_newline_before_end_is_fetched_again(serve: Callable[..., Served]) -> None:
    """The CI flake ('177' for '177\\n'), made on purpose: the newline before the first END
    line is lost on the way up."""
    s = serve(answers=_once(lambda line: line == b"\n"))
    counter = s.state / "ran"
    assert s.console.run(f"echo x >>{counter}; echo 177") == (0, "177\n")
    (note,) = s.console.resends
    assert "has 3 bytes of output, the guest printed 4" in note
    assert counter.read_text() == "x\n"  # fetched again, not run again


def test_a_lost_end_line_is_fetched_again(serve: Callable[..., Served]) -> None:
    s = serve(answers=_once(lambda line: line.startswith(b"PYVHOST-END")), ack_timeout=1.0)
    counter = s.state / "ran"
    assert s.console.run(f"echo x >>{counter}; wc -l <{counter}") == (0, "1\n")
    (note,) = s.console.resends
    assert "acknowledged, then no PYVHOST-RUNNING or PYVHOST-END line" in note
    assert counter.read_text() == "x\n"


def test_a_long_command_sends_a_heartbeat(serve: Callable[..., Served]) -> None:
    """A command running longer than the ack timeout is not asked for again: its RUNNING
    lines say it runs; none of them ends up in the output."""
    c = serve(ack_timeout=3.0).console
    assert c.run("sleep 7; echo done", timeout=60) == (0, "done\n")
    assert c.resends == []
    assert c.transcript().count("PYVHOST-RUNNING") >= 2
