"""GuestConsole against a scripted fake guest on a socketpair: framing, noise, timeouts, EOF,
and a channel that loses or garbles lines both ways.

The fake speaks the guest's side of :mod:`pyvhost.lab.channel` in Python (the real one,
``guest_tool.sh serve``, is run under busybox in ``test_guest_serve.py``): it checks each
line's MD5, acknowledges, runs a command once per id and answers a repeat of it with the
same output. Hooks damage what passes in either direction.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from pyvhost.lab import channel
from pyvhost.lab.guest import GuestCommandError, GuestConsole, GuestGoneError, GuestTimeoutError

Run = Callable[[str], tuple[int, str]]
#: (number of the line, from 1; the line with its "\n") -> what the guest reads instead.
Incoming = Callable[[int, bytes], bytes | None]
#: (attempt id, what the guest writes) -> what reaches the host instead.
Outgoing = Callable[[str, bytes], bytes]


def _echo(cmd: str) -> tuple[int, str]:
    return (3, "") if cmd == "exit 3" else (0, f"ran {cmd}\nline 2")


class FakeGuest:
    """The guest's side of the channel, with hooks that damage the traffic."""

    def __init__(self, sock: socket.socket, run: Run = _echo, *,
                 incoming: Incoming | None = None, outgoing: Outgoing | None = None,
                 delay: float = 0.0, beats: int = 0, beat_every: float = 0.1) -> None:
        self.sock = sock
        self.run = run
        self.incoming = incoming or (lambda n, line: line)
        self.outgoing = outgoing or (lambda aid, data: data)
        self.delay = delay  # seconds before reading each line: a busy guest
        # A command that takes a while: this many RUNNING lines, one every beat_every s.
        self.beats, self.beat_every = beats, beat_every
        self.lines: list[bytes] = []   # every line as the guest read it
        self.ran: list[str] = []       # every command it ran (once per id)
        self.garbled = 0
        self._last: tuple[str, int, str] | None = None  # (id, code, output)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        buf, n = b"", 0
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
                n += 1
                damaged = self.incoming(n, line + b"\n")
                if damaged is None:
                    continue
                time.sleep(self.delay)
                self._answer(damaged.removesuffix(b"\n"))

    def _answer(self, line: bytes) -> None:
        self.lines.append(line)
        words = line.decode(errors="replace").split(" ")
        body = " ".join(words[:3])
        if len(words) != 4 or hashlib.md5(body.encode()).hexdigest() != words[3]:
            self.garbled += 1
            self._send("", f"PYVHOST-GARBLED {words[0][:40]}\r\n".encode())
            return
        aid, _limit, enc, _sum = words
        self._send(aid, f"PYVHOST-BEGIN {aid}\r\n".encode())
        base = aid.rpartition("/")[0]
        if self._last is None or self._last[0] != base:
            cmd = base64.b64decode(enc).decode()
            self.ran.append(cmd)
            for _ in range(self.beats):
                time.sleep(self.beat_every)
                self._send(aid, f"{channel.RUNNING} {aid}\r\n".encode())
            code, output = self.run(cmd)
            self._last = (base, code, output)
        _, code, output = self._last
        # A tty's "\r\n", which the host drops (the END line counts the bytes without it).
        end = channel.end_line(aid, code, output.encode())
        self._send(aid, (output.encode() + end).replace(b"\n", b"\r\n"))

    def _send(self, aid: str, data: bytes) -> None:
        out = self.outgoing(aid, data)
        if out:
            with contextlib.suppress(OSError):  # the host closed: the test is over
                self.sock.sendall(out)

    def say(self, text: str) -> None:
        self.sock.sendall(text.encode())


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

    def noisy(aid: str, data: bytes) -> bytes:
        # Kernel lines around the answer, and an older command's late answer before it.
        if data.startswith(b"PYVHOST-BEGIN"):
            return (b"[   12.345] virtio_net virtio0 eth0: noise\r\nPYVHOST-BEGIN old.7/1\r\n"
                    b"stale" + channel.end_line("old.7/1", 137, b"stale").replace(b"\n", b"\r\n")
                    + data)
        return data + b"[   12.400] after\r\n"

    fake = FakeGuest(guest, outgoing=noisy)
    with GuestConsole(host, name="g") as console:
        fake.say("booting\r\nPYVHOST-READY channel=/dev/ttyS0\r\n")
        assert console.wait_ready(10) == "PYVHOST-READY channel=/dev/ttyS0"
        assert console.run("echo hi", timeout=10) == (0, "ran echo hi\nline 2")
        assert console.run("exit 3", timeout=10) == (3, "")
        with pytest.raises(GuestCommandError, match="exited 3"):
            console.check("exit 3", timeout=10)
        assert "\r" not in console.transcript()
        assert "booting" in console.transcript()
        assert console.resends == []
    ids = [line.split(b" ")[0] for line in fake.lines]
    assert len(set(ids)) == len(ids) == 3
    assert all(i.endswith(b"/1") for i in ids)
    assert int(fake.lines[0].split(b" ")[1]) > 10  # the guest's own limit is after the host's


def _on_first_attempt(damage: Callable[[bytes], bytes]) -> Outgoing:
    """Damage only what answers attempt 1: the re-fetch (attempt 2) arrives whole."""
    return lambda aid, data: damage(data) if aid.endswith("/1") else data


def test_a_kernel_line_before_the_end_marker_gets_the_answer_again(
        pair: tuple[socket.socket, socket.socket], caplog: pytest.LogCaptureFixture) -> None:
    """A kernel message without its newline got in front of attempt 1's END marker: the
    output between the markers is not what the guest printed, so it is fetched again."""
    host, guest = pair
    oops = _on_first_attempt(
        lambda data: data.replace(b"\r\nPYVHOST-END", b"\r\n[ 1.0] oops PYVHOST-END"))
    fake = FakeGuest(guest, lambda cmd: (0, "a\nb\n"), outgoing=oops)
    with caplog.at_level(logging.INFO, logger="pyvhost.lab.guest"), \
            GuestConsole(host) as console:
        assert console.run("x", timeout=10) == (0, "a\nb\n")
        (note,) = console.resends
    assert "has 17 bytes of output, the guest printed 4" in note
    assert "fetching the answer to 'x' again as attempt 2" in caplog.text
    assert fake.ran == ["x"]


def test_a_lost_newline_before_the_end_marker(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """The CI flake: '177' came back for '177\\n'. The newline the guest prints before END
    was lost, so the output's own newline was taken for it; END's length tells."""
    host, guest = pair
    lose = _on_first_attempt(lambda data: data.replace(b"\r\n\r\nPYVHOST-END",
                                                       b"\r\nPYVHOST-END"))
    fake = FakeGuest(guest, lambda cmd: (0, "177\n"), outgoing=lose)
    with GuestConsole(host) as console:
        assert console.run("wc -l", timeout=10) == (0, "177\n")
        (note,) = console.resends
    assert "has 3 bytes of output, the guest printed 4" in note
    assert fake.ran == ["wc -l"]


def test_output_with_a_changed_byte_has_the_wrong_md5(
        pair: tuple[socket.socket, socket.socket]) -> None:
    host, guest = pair
    flip = _on_first_attempt(lambda data: data.replace(b"line 2", b"line 3"))
    fake = FakeGuest(guest, outgoing=flip)
    with GuestConsole(host) as console:
        assert console.run("echo hi", timeout=10) == (0, "ran echo hi\nline 2")
        (note,) = console.resends
    assert "has output with MD5" in note
    assert fake.ran == ["echo hi"]


def test_a_lost_line_of_output(pair: tuple[socket.socket, socket.socket]) -> None:
    host, guest = pair
    drop = _on_first_attempt(lambda data: data.replace(b"\r\nline 2", b""))
    FakeGuest(guest, outgoing=drop)
    with GuestConsole(host) as console:
        assert console.run("echo hi", timeout=10) == (0, "ran echo hi\nline 2")
        (note,) = console.resends
    assert "bytes of output" in note


def test_output_that_is_not_utf8_comes_back_byte_exact(
        pair: tuple[socket.socket, socket.socket]) -> None:
    host, guest = pair
    raw = b"\xff\xfe bytes \xc3\n"

    def send_raw(aid: str, data: bytes) -> bytes:
        if data.startswith(b"PYVHOST-BEGIN"):
            return data
        return raw + channel.end_line(aid, 0, raw)

    FakeGuest(guest, outgoing=send_raw)
    with GuestConsole(host) as console:
        code, out = console.run("cat /bin/x", timeout=10)
        assert code == 0 and channel.output_bytes(out) == raw
        assert console.resends == []


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
    FakeGuest(guest, outgoing=lambda aid, data: b"")
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


# --- a damaged channel ---------------------------------------------------------------------

def _first_line(damage: Callable[[bytes], bytes | None]) -> Incoming:
    return lambda n, line: damage(line) if n == 1 else line


def test_a_line_that_lost_its_first_bytes_is_refused_and_sent_again(
        pair: tuple[socket.socket, socket.socket], caplog: pytest.LogCaptureFixture) -> None:
    """What the emulated UART of a loaded host did: the guest read a command line without
    its first bytes. The guest does not run it; the host sends it again."""
    host, guest = pair
    fake = FakeGuest(guest, incoming=_first_line(lambda line: line[5:]))
    with caplog.at_level(logging.INFO, logger="pyvhost.lab.guest"), \
            GuestConsole(host, name="g") as console:
        assert console.run("echo hi", timeout=10) == (0, "ran echo hi\nline 2")
        assert console.run("echo again", timeout=10) == (0, "ran echo again\nline 2")
        (note,) = console.resends
    assert "garbled" in note and note.endswith(")") and "/1:" in note
    assert fake.garbled == 1 and fake.ran == ["echo hi", "echo again"]
    assert [line.split(b" ")[0][-2:] for line in fake.lines[1:]] == [b"/2", b"/1"]
    assert "sending 'echo hi' again as attempt 2" in caplog.text


def test_a_line_with_a_changed_byte_is_not_run(
        pair: tuple[socket.socket, socket.socket]) -> None:
    host, guest = pair

    def flip(line: bytes) -> bytes:
        at = line.index(b" ", line.index(b" ") + 1) + 3  # inside the base64 command
        return line[:at] + bytes([line[at] ^ 0x01]) + line[at + 1:]

    fake = FakeGuest(guest, incoming=_first_line(flip))
    with GuestConsole(host) as console:
        assert console.run("rm -rf /data", timeout=10)[0] == 0
        assert len(console.resends) == 1
    assert fake.ran == ["rm -rf /data"]  # the damaged command never ran


def test_the_answer_under_an_id_never_sent_is_asked_for_again(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """The flake this channel was built against: the guest answered "PYVHOST-BEGIN C4y"
    instead of the id sent, and the host waited until the test's timeout."""
    host, guest = pair

    def wrong_id(aid: str, data: bytes) -> bytes:
        return data.replace(aid.encode(), b"C4y") if aid.endswith("/1") else data

    fake = FakeGuest(guest, incoming=None, outgoing=wrong_id)
    with GuestConsole(host) as console:
        assert console.run("touch /tmp/x", timeout=300) == (0, "ran touch /tmp/x\nline 2")
        # Asked again once, on the wrong id itself (not after the command's timeout, which
        # no attempt-2 answer could follow): one resend, two command lines in all.
        (note,) = console.resends
    assert "never sent" in note
    assert [line.split(b" ")[0][-2:] for line in fake.lines] == [b"/1", b"/2"]
    assert fake.ran == ["touch /tmp/x"]  # the repeat was answered, not run again


def test_a_lost_line_is_sent_again_after_the_ack_timeout(
        pair: tuple[socket.socket, socket.socket]) -> None:
    host, guest = pair
    fake = FakeGuest(guest, incoming=_first_line(lambda line: None))
    with GuestConsole(host, ack_timeout=0.3) as console:
        assert console.run("echo hi", timeout=10)[0] == 0
        (note,) = console.resends
    assert "not acknowledged within 0.3 s" in note
    assert fake.ran == ["echo hi"]


def test_a_lost_newline_that_glues_two_lines_together(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """Line 1 loses its newline: the guest reads nothing until line 2 arrives, then one
    long line it refuses. The third attempt gets through."""
    host, guest = pair
    held: list[bytes] = []

    def glue(n: int, line: bytes) -> bytes | None:
        if n == 1:
            held.append(line.removesuffix(b"\n"))
            return None
        if n == 2:
            return held[0] + line
        return line

    fake = FakeGuest(guest, incoming=glue)
    with GuestConsole(host, ack_timeout=0.3) as console:
        assert console.run("echo hi", timeout=10)[0] == 0
        first, second = (n.split(": ", 1)[1] for n in console.resends)
        assert first.startswith("not acknowledged") and "garbled" in second
    assert fake.garbled == 1 and fake.ran == ["echo hi"]


def test_a_damaged_end_marker_gets_the_answer_again(
        pair: tuple[socket.socket, socket.socket]) -> None:
    host, guest = pair

    def cut_end(aid: str, data: bytes) -> bytes:
        return data.replace(b"PYVHOST-END", b"PYVHOST-EN") if aid.endswith("/1") else data

    fake = FakeGuest(guest, lambda cmd: (7, "slow answer"), outgoing=cut_end)
    with GuestConsole(host) as console:
        assert console.run("long job", timeout=30) == (7, "slow answer")
        (note,) = console.resends
    assert "damaged marker" in note and "PYVHOST-EN " in note
    assert fake.ran == ["long job"]


def test_a_lost_end_line_costs_the_ack_timeout_not_the_command_timeout(
        pair: tuple[socket.socket, socket.socket], caplog: pytest.LogCaptureFixture) -> None:
    """A command that runs longer than the ack timeout, its heartbeat keeping the host
    waiting; then its END line is lost whole. The host asks for the answer again once the
    channel is silent for the ack timeout, and the guest sends the kept output."""
    host, guest = pair

    def lose_end(aid: str, data: bytes) -> bytes:
        if aid.endswith("/1") and b"PYVHOST-END" in data:
            return data[:data.index(b"PYVHOST-END")]
        return data

    fake = FakeGuest(guest, outgoing=lose_end, beats=10, beat_every=0.1)
    with caplog.at_level(logging.INFO, logger="pyvhost.lab.guest"), \
            GuestConsole(host, ack_timeout=0.5) as console:
        assert console.run("make", timeout=300) == (0, "ran make\nline 2")
        # One re-fetch, after the END was lost: none while the heartbeat went on (1 s,
        # twice the ack timeout).
        (note,) = console.resends
    assert "acknowledged, then no PYVHOST-RUNNING or PYVHOST-END line within 0.5 s" in note
    assert "fetching the answer to 'make' again as attempt 2" in caplog.text
    assert fake.ran == ["make"]
    assert "PYVHOST-RUNNING" not in console.transcript().split("PYVHOST-BEGIN")[-1]


def test_kernel_messages_inside_the_markers(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """A kernel line splits attempt 1's BEGIN marker, and one lands inside attempt 2's
    output: the host asks again each time and takes the clean answer, byte for byte."""
    host, guest = pair

    def kernel(aid: str, data: bytes) -> bytes:
        if aid.endswith(".1/1") and data.startswith(b"PYVHOST-BEGIN"):
            return data[:11] + b"\r\n[    3.141] virtio_net: link up\r\n" + data[11:]
        if aid.endswith(".1/2"):  # the first command's second attempt
            return data.replace(b"line 2", b"line 2\r\n[    3.2] hv: spurious")
        return data

    fake = FakeGuest(guest, outgoing=kernel)
    with GuestConsole(host) as console:
        assert console.run("echo hi", timeout=30) == (0, "ran echo hi\nline 2")
        first, second = console.resends
        # Attempt 1's answer is seen first either as a broken marker or as an END without
        # its BEGIN, depending on how much had arrived when the host looked.
        assert ("damaged marker" in first or "without its PYVHOST-BEGIN" in first), first
        assert "bytes of output" in second
        assert console.run("echo two", timeout=30)[0] == 0
        assert len(console.resends) == 2
    assert fake.ran == ["echo hi", "echo two"]


def test_a_busy_guest_runs_a_repeated_command_once(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """The acknowledgement comes late (the guest was busy): the host sends again, the guest
    runs the first attempt and answers the second with the same; the next command is not
    confused by that late repeat."""
    host, guest = pair
    fake = FakeGuest(guest, delay=0.5)
    with GuestConsole(host, ack_timeout=0.2) as console:
        assert console.run("start loop", timeout=30) == (0, "ran start loop\nline 2")
        assert console.resends
        fake.delay = 0
        assert console.run("count", timeout=30) == (0, "ran count\nline 2")
    assert fake.ran == ["start loop", "count"]


def test_a_link_that_garbles_everything_ends_at_the_timeout(
        pair: tuple[socket.socket, socket.socket]) -> None:
    host, guest = pair
    fake = FakeGuest(guest, incoming=lambda n, line: line[3:])
    with GuestConsole(host) as console, pytest.raises(
            GuestTimeoutError, match=r"no answer to 'true' after 1.5 s \(sent \d+ times: "):
        console.run("true", timeout=1.5)
    assert fake.ran == [] and 2 <= fake.garbled < 20  # resends are paced, not a flood


def test_command_line_is_what_the_guest_checks() -> None:
    line = channel.command_line("abc123.4/2", 65, "echo 'a b'")
    words = line.decode().removesuffix("\n").split(" ")
    assert words[:2] == ["abc123.4/2", "65"]
    assert base64.b64decode(words[2]) == b"echo 'a b'"
    assert words[3] == hashlib.md5(" ".join(words[:3]).encode()).hexdigest()
    with pytest.raises(ValueError):
        channel.command_line("abc 1/1", 5, "true")
