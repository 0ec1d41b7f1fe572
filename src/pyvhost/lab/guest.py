"""The host side of the test guest's command channel (the guest side is ``serve`` in
``guest_tool.sh``; the wire format is :mod:`.channel`).

Owns one Unix-socket connection to a QEMU chardev (``-chardev socket,server=on,wait=off``,
wired to ``-serial`` or to a ``virtserialport``), a reader thread that keeps everything the
guest printed (the transcript, quoted in every error), marker waits, and commands. Markers
are matched anywhere in a line and IDs carry a per-connection nonce, so a stray kernel line
or the output of an earlier, timed-out command cannot be taken for an answer.

A command survives a damaged channel: when the guest says it got a garbled line, when a
marker arrives broken or with an id never sent, or when no acknowledgement comes within
:data:`ACK_TIMEOUT` seconds (the line was lost), the command is sent again as a new attempt,
until its own timeout. Its answer is byte-exact: the END line carries the output's length
and MD5, and an answer that does not match them (a newline or a line lost, bytes garbled
on a busy serial console) is fetched again as a new attempt, as is one whose END line is
lost whole: the guest prints a RUNNING line every :data:`.channel.HEARTBEAT` seconds while
the command runs, so silence for ``ack_timeout`` seconds after the acknowledgement means
the END line, not the command, went missing. The guest runs a command once however often
it is sent (and answers a repeat with the first run's output), so this is safe for commands
that are not idempotent. Each resend and re-fetch is logged at INFO (logger
``pyvhost.lab.guest``) and kept in :attr:`GuestConsole.resends`.

It does not start QEMU or speak QMP (:mod:`pyvhost.lab.qemu` does).
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import re
import secrets
import shlex
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyvhost.closing import Closing
from pyvhost.errors import PyvhostError

from . import channel
from .image import READY_MARKER

log = logging.getLogger(__name__)
TRANSCRIPT_LIMIT = 4 << 20  # characters kept; the oldest are dropped past this
# The guest kills a command this many seconds after the host gives up on it, so the host
# reports its own timeout and the channel is free again soon after.
GUEST_GRACE = 5
#: Seconds to wait for the guest to acknowledge a command (its BEGIN marker) before sending
#: it again, and, once it did, for anything more (RUNNING, the output, END) before asking
#: for the answer again; doubled after each resend. The guest acknowledges as soon as it
#: reads the line, unless it is still busy with a command the host gave up on (up to
#: GUEST_GRACE seconds), and prints a RUNNING line every channel.HEARTBEAT seconds.
ACK_TIMEOUT = 10.0
RESEND_PAUSE = 0.1


class GuestError(PyvhostError):
    """The guest did not answer as expected; the message ends with the console's last lines."""


class GuestTimeoutError(GuestError):
    """A marker or a command's answer did not arrive in time."""


class GuestGoneError(GuestError):
    """The console connection closed (QEMU exited, or the chardev went away)."""


class GuestCommandError(GuestError):
    """A command run with :meth:`GuestConsole.check` exited non-zero."""


@dataclass(frozen=True)
class MemoryBlock:
    """One of ``/sys/devices/system/memory/memoryN``."""

    index: int
    state: str          # "online" or "offline"
    online: bool
    zones: tuple[str, ...]  # valid_zones: the zone it is in when online, candidates otherwise


@dataclass(frozen=True)
class _Again:
    """Why a command is sent again, and whether the guest had acknowledged it (then only
    its answer is fetched again: the guest does not run it twice)."""

    reason: str
    acknowledged: bool


class GuestConsole(Closing):
    """Commands and markers over a connected chardev socket. Use :meth:`connect`."""

    def __init__(self, sock: socket.socket, *, name: str = "guest",
                 log: Path | None = None, ack_timeout: float = ACK_TIMEOUT) -> None:
        self.name = name
        self.ack_timeout = ack_timeout
        #: Why each command was sent again ("NONCE.N/ATTEMPT: reason"), oldest first.
        self.resends: list[str] = []
        self._sock = sock
        # The transcript keeps bytes that are not UTF-8 as surrogates (byte-exact answers);
        # the log file shows them escaped.
        self._log = (open(log, "a", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
                     if log is not None else None)
        self._text = ""          # transcript, "\r" removed
        self._dropped = 0        # characters dropped from the front of _text
        self._cursor = 0         # absolute offset: markers are searched from here
        self._eof = False
        self._cond = threading.Condition()
        self._run_lock = threading.Lock()
        self._nonce = secrets.token_hex(3)
        self._counter = 0
        self._reader = threading.Thread(target=self._read, name=f"console-{name}", daemon=True)
        self._reader.start()

    @classmethod
    def connect(cls, path: Path | str, *, timeout: float = 30, name: str = "guest",
                log: Path | None = None, ack_timeout: float = ACK_TIMEOUT) -> GuestConsole:
        """Connect to QEMU's chardev socket at ``path``, retrying until it listens."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                if time.monotonic() >= deadline:
                    raise GuestTimeoutError(f"{name}: nothing listens on {path} after "
                                       f"{timeout} s") from e
                time.sleep(0.05)
            else:
                return cls(sock, name=name, log=log, ack_timeout=ack_timeout)

    # --- the transcript ---------------------------------------------------------------------

    def _read(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            text = decoder.decode(data, final=not data).replace("\r", "")
            with self._cond:
                self._text += text
                if len(self._text) > TRANSCRIPT_LIMIT:
                    cut = len(self._text) - TRANSCRIPT_LIMIT
                    self._text = self._text[cut:]
                    self._dropped += cut
                if not data:
                    self._eof = True
                self._cond.notify_all()
            if self._log is not None and text:
                self._log.write(text)
                self._log.flush()
            if not data:
                return

    def transcript(self) -> str:
        """Everything the guest printed so far (the last 4 Mi characters)."""
        with self._cond:
            return self._text

    def _tail(self, lines: int = 40) -> str:
        with self._cond:
            tail = self._text.splitlines()[-lines:]
        return "\n".join(f"  | {line}" for line in tail) or "  | (nothing)"

    def _fail(self, exc: type[GuestError], message: str) -> GuestError:
        return exc(f"{self.name}: {message}; last console lines:\n{self._tail()}")

    def _wait(self, pattern: re.Pattern[str], start: int, timeout: float,
              what: str) -> re.Match[str]:
        """The first match of ``pattern`` at or after absolute offset ``start``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = pattern.search(self._text, max(0, start - self._dropped))
                if m is not None:
                    return m
                if self._eof:
                    raise self._fail(GuestGoneError, f"console closed while waiting for {what}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._fail(GuestTimeoutError, f"no {what} after {timeout} s")
                self._cond.wait(left)

    def wait_for(self, marker: str, timeout: float = 120) -> str:
        """Wait for ``marker`` in the output not yet consumed; returns its whole line.

        The search starts after the previous marker found (or command answered), so each
        occurrence is consumed once.
        """
        m = self._wait(re.compile(re.escape(marker) + "[^\n]*"), self._cursor, timeout,
                       repr(marker))
        with self._cond:
            line_start = self._text.rfind("\n", 0, m.start()) + 1
            self._cursor = m.end() + self._dropped
            return self._text[line_start:m.end()]

    def wait_ready(self, timeout: float = 180) -> str:
        """Wait for ``/init``'s ready marker (after its modules and eth0)."""
        return self.wait_for(READY_MARKER, timeout)

    # --- commands ---------------------------------------------------------------------------

    def run(self, cmd: str, timeout: float = 60) -> tuple[int, str]:
        """Run ``cmd`` with the guest's ``sh -c``; returns (exit code, stdout+stderr).

        Raises :class:`GuestTimeoutError` if no answer comes within ``timeout`` seconds (the
        guest kills the command a few seconds later and the channel stays usable). A line
        or an answer damaged on the way is sent again within that time (see the module).
        """
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        with self._run_lock:
            self._counter += 1
            cid = f"{self._nonce}.{self._counter}"
            deadline = time.monotonic() + timeout
            with self._cond:
                start = len(self._text) + self._dropped
            ack_wait = self.ack_timeout
            attempt = 0
            while True:
                attempt += 1
                with self._cond:
                    since = len(self._text) + self._dropped
                limit = int(max(0.0, deadline - time.monotonic())) + 1 + GUEST_GRACE
                try:
                    self._sock.sendall(channel.command_line(f"{cid}/{attempt}", limit, cmd))
                except OSError as e:
                    raise self._fail(GuestGoneError, f"cannot send {cmd!r}: {e}") from e
                found = self._await_answer(cmd, cid, attempt, start, since, timeout, deadline,
                                           ack_wait)
                if isinstance(found, tuple):
                    return found
                note = f"{cid}/{attempt}: {found.reason}"
                self.resends.append(note)
                if found.acknowledged:
                    # The guest ran it (or runs it): only the answer is asked for again.
                    log.info("%s: %s; fetching the answer to %r again as attempt %d",
                             self.name, note, cmd, attempt + 1)
                else:
                    log.info("%s: %s; sending %r again as attempt %d", self.name, note, cmd,
                             attempt + 1)
                ack_wait *= 2
                # A link that damages every line must not be flooded: 0.1 s, 0.2 s, ...
                # before each resend (the rest of a damaged burst arrives meanwhile).
                time.sleep(max(0.0, min(RESEND_PAUSE * 2 ** (attempt - 1), self.ack_timeout,
                                        deadline - time.monotonic())))

    def _await_answer(self, cmd: str, cid: str, attempt: int, start: int, since: int,
                      timeout: float, deadline: float,
                      ack_wait: float) -> tuple[int, str] | _Again:
        """(exit code, output), or why to send the command again: ``attempt`` (sent at
        absolute offset ``since``; the first at ``start``) not acknowledged within
        ``ack_wait`` seconds, acknowledged but then nothing more for ``ack_wait`` seconds
        (its heartbeat or END line lost), or damage seen after it was sent (including an
        answer whose output does not match its END line). Raises at ``deadline``."""
        now = time.monotonic()
        ack_by = min(deadline, now + ack_wait)
        heard = -1          # the transcript's length when last looked at
        quiet_by = ack_by   # when silence since then means the answer was lost
        with self._cond:
            while True:
                base = max(start, self._dropped)  # the transcript may have lost its head
                seen = channel.scan(self._text[base - self._dropped:], cid, self._nonce,
                                    max(0, since - base))
                acknowledged = attempt in seen.acknowledged
                if seen.answer is not None:
                    self._cursor = max(self._cursor, base + seen.answer.end)
                    return seen.answer.code, seen.answer.output
                if seen.trouble is not None:
                    return _Again(seen.trouble, bool(seen.acknowledged))
                if self._eof:
                    raise self._fail(GuestGoneError, f"console closed while waiting for "
                                                     f"the answer to {cmd!r}")
                now = time.monotonic()
                if now >= deadline:
                    raise self._fail(GuestTimeoutError, f"no answer to {cmd!r} after "
                                                        f"{timeout} s{self._resent(cid)}")
                total = len(self._text) + self._dropped
                if total != heard:
                    heard, quiet_by = total, now + ack_wait
                if not acknowledged:
                    if now >= ack_by:
                        return _Again(f"not acknowledged within {ack_wait:g} s",
                                      bool(seen.acknowledged))
                    wake = ack_by
                else:
                    if now >= quiet_by:
                        return _Again(f"acknowledged, then no {channel.RUNNING} or "
                                      f"{channel.END} line within {ack_wait:g} s", True)
                    wake = quiet_by
                self._cond.wait(min(wake, deadline) - now)

    def _resent(self, cid: str) -> str:
        notes = [n for n in self.resends if n.startswith(f"{cid}/")]
        return f" (sent {len(notes) + 1} times: {'; '.join(notes)})" if notes else ""

    def check(self, cmd: str, timeout: float = 60) -> str:
        """Like :meth:`run`, but a non-zero exit raises :class:`GuestCommandError`."""
        code, output = self.run(cmd, timeout)
        if code != 0:
            raise GuestCommandError(f"{self.name}: {cmd!r} exited {code}:\n{output}")
        return output

    # --- what the test guest's helpers offer -------------------------------------------------

    def meminfo(self) -> dict[str, int]:
        """``/proc/meminfo`` as numbers (kB for the sizes, e.g. ``MemTotal``)."""
        values: dict[str, int] = {}
        for line in self.check("cat /proc/meminfo").splitlines():
            key, sep, rest = line.partition(":")
            words = rest.split()
            if sep and words and words[0].isdigit():
                values[key.strip()] = int(words[0])
        if "MemTotal" not in values:
            raise self._fail(GuestError, "/proc/meminfo has no MemTotal")
        return values

    def wait_mem_total(self, done: Callable[[int], bool], timeout: float = 120,
                       interval: float = 0.5) -> tuple[int, float | None]:
        """Poll MemTotal (kB) until ``done(MemTotal)``: (the last value, when it was seen
        (``time.monotonic()``), or None if the deadline passed first)."""
        deadline = time.monotonic() + timeout
        while True:
            total = self.meminfo()["MemTotal"]
            if done(total):
                return total, time.monotonic()
            if time.monotonic() > deadline:
                return total, None
            time.sleep(interval)

    def memory_blocks(self) -> tuple[int, list[MemoryBlock]]:
        """The guest's memory block size in bytes, and its blocks by index."""
        size = 0
        blocks: list[MemoryBlock] = []
        for line in self.check("pyvhost-guest blocks").splitlines():
            words = line.split()
            if len(words) == 2 and words[0] == "block_size_bytes":
                size = int(words[1], 16)
            elif len(words) == 4 and words[0].isdigit():
                zones = tuple(z for z in words[3].split(",") if z and z != "none")
                blocks.append(MemoryBlock(int(words[0]), words[1], words[2] == "1", zones))
        blocks.sort(key=lambda b: b.index)
        return size, blocks

    def online_block(self, index: int, state: str = "online_movable") -> None:
        """Online memory block ``index`` (``online``, ``online_kernel`` or ``online_movable``)."""
        if state not in ("online", "online_kernel", "online_movable"):
            raise ValueError(f"unknown memory block state {state!r}")
        self.check(f"pyvhost-guest online {int(index)} {state}")

    def offline_block(self, index: int) -> None:
        """Offline memory block ``index`` (its pages are migrated away first, or this fails)."""
        self.check(f"pyvhost-guest offline {int(index)}")

    def hog(self, mib: int, timeout: float = 300) -> None:
        """Make ``mib`` more MiB of guest RAM busy (files in a tmpfs; the guest has no swap).

        Leave headroom (see ``MemAvailable``): past it the guest's OOM killer starts.
        Tmpfs pages are movable, so they go to ZONE_MOVABLE (hot-added memory onlined
        ``online_movable``) before the boot RAM.
        """
        self.check(f"pyvhost-guest hog {int(mib)}", timeout)

    def unhog(self) -> None:
        """Give back all the memory :meth:`hog` took."""
        self.check("pyvhost-guest unhog")

    def ip_addr(self, ifname: str = "eth0") -> str:
        """``ip addr show IFNAME``."""
        return self.check(f"ip addr show {shlex.quote(ifname)}")

    def ping(self, address: str, count: int = 3, timeout: float = 60) -> tuple[int, str]:
        """``ping -c COUNT ADDRESS`` in the guest: (exit code, output)."""
        return self.run(f"ping -c {int(count)} -W 2 {shlex.quote(address)}", timeout)

    # --- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._reader.join(5)
        if self._log is not None:
            self._log.close()
