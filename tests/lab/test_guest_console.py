"""GuestConsole against a scripted fake guest on a socketpair: framing, noise, timeouts, EOF."""

from __future__ import annotations

import base64
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from pyvhost.lab.guest import GuestCommandError, GuestConsole, GuestGoneError, GuestTimeoutError

Reply = Callable[[str, str], bytes]


class FakeGuest:
    """Reads "ID TIMEOUT B64" lines; answers with what ``reply(id, command)`` returns."""

    def __init__(self, sock: socket.socket, reply: Reply) -> None:
        self.sock = sock
        self.reply = reply
        self.commands: list[tuple[str, int, str]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        buf = b""
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                cid, limit, enc = line.decode().split(" ")
                cmd = base64.b64decode(enc).decode()
                self.commands.append((cid, int(limit), cmd))
                out = self.reply(cid, cmd)
                if out:
                    self.sock.sendall(out)

    def say(self, text: str) -> None:
        self.sock.sendall(text.encode())


def framed(cid: str, output: str, code: int = 0) -> bytes:
    # What guest_init.sh prints, with the tty's "\r\n" line ends.
    text = f"PYVHOST-BEGIN {cid}\n{output}\nPYVHOST-END {cid} {code}\n"
    return text.replace("\n", "\r\n").encode()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    host, guest = socket.socketpair()
    try:
        yield host, guest
    finally:
        host.close()
        guest.close()


def test_run_returns_code_and_output_between_the_markers(
        pair: tuple[socket.socket, socket.socket]) -> None:
    host, guest = pair

    def reply(cid: str, cmd: str) -> bytes:
        if cmd == "exit 3":
            return framed(cid, "", 3)
        # Kernel lines around and inside the answer, an older command's late answer,
        # and output split across many small writes.
        return (b"[   12.345] virtio_net virtio0 eth0: noise\r\n"
                + framed("old.7", "stale", 137)
                + framed(cid, f"ran {cmd}\nline 2")
                + b"[   12.400] after\r\n")

    fake = FakeGuest(guest, reply)
    with GuestConsole(host, name="g") as console:
        fake.say("booting\r\nPYVHOST-READY channel=/dev/ttyS0\r\n")
        assert console.wait_ready(10) == "PYVHOST-READY channel=/dev/ttyS0"
        assert console.run("echo hi", timeout=10) == (0, "ran echo hi\nline 2")
        assert console.run("exit 3", timeout=10) == (3, "")
        with pytest.raises(GuestCommandError, match="exited 3"):
            console.check("exit 3", timeout=10)
        assert "\r" not in console.transcript()
        assert "booting" in console.transcript()
    ids = [c[0] for c in fake.commands]
    assert len(set(ids)) == len(ids) == 3
    assert fake.commands[0][1] > 10  # the guest's own limit is later than the host's


def test_output_with_trailing_newline_and_markers_mid_line(
        pair: tuple[socket.socket, socket.socket]) -> None:
    host, guest = pair

    def reply(cid: str, cmd: str) -> bytes:
        # A kernel message without its newline got in front of the END marker.
        return (f"PYVHOST-BEGIN {cid}\r\na\r\nb\r\n\r\n[ 1.0] oops PYVHOST-END {cid} 0\r\n"
                .encode())

    FakeGuest(guest, reply)
    with GuestConsole(host) as console:
        code, out = console.run("x", timeout=10)
        assert code == 0 and out.startswith("a\nb\n")


def test_wait_for_consumes_each_marker_once(
        pair: tuple[socket.socket, socket.socket]) -> None:
    host, guest = pair
    with GuestConsole(host) as console:
        guest.sendall(b"STEP 1\r\nSTEP 2\r\n")
        assert console.wait_for("STEP", 10) == "STEP 1"
        assert console.wait_for("STEP", 10) == "STEP 2"
        with pytest.raises(GuestTimeoutError, match=r"(?s)no 'STEP' after 0.2 s.*\| STEP 2"):
            console.wait_for("STEP", 0.2)


def test_a_silent_guest_times_out_with_the_transcript(
        pair: tuple[socket.socket, socket.socket]) -> None:
    host, guest = pair
    FakeGuest(guest, lambda cid, cmd: b"")
    with GuestConsole(host, name="quiet") as console:
        guest.sendall(b"Kernel panic - not syncing: fake\r\n")
        with pytest.raises(GuestTimeoutError,
                           match=r"(?s)quiet: no answer to 'true'.*Kernel panic"):
            console.run("true", timeout=0.3)


def test_a_closed_console_is_reported(pair: tuple[socket.socket, socket.socket]) -> None:
    host, guest = pair
    with GuestConsole(host) as console:
        guest.sendall(b"last words\r\n")
        guest.close()
        with pytest.raises(GuestGoneError, match=r"(?s)console closed.*last words"):
            console.wait_for("PYVHOST-READY", 10)
        with pytest.raises(GuestGoneError):
            console.run("true", timeout=10)


def test_connect_times_out_when_nothing_listens() -> None:
    with pytest.raises(GuestTimeoutError, match="nothing listens"):
        GuestConsole.connect("/nonexistent/pyvhost-test.sock", timeout=0.2)
