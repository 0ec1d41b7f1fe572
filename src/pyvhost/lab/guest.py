"""The host side of the test guest's command channel (the guest side is ``guest_init.sh``).

Owns one Unix-socket connection to a QEMU chardev (``-chardev socket,server=on,wait=off``,
wired to ``-serial`` or to a ``virtserialport``), a reader thread that keeps everything the
guest printed (the transcript, quoted in every error), marker waits, and framed commands:
the host sends ``ID TIMEOUT BASE64(COMMAND)``; the guest answers ``PYVHOST-BEGIN ID``, the
output, then ``PYVHOST-END ID CODE``. Markers are matched anywhere in a line and IDs carry a
per-connection nonce, so a stray kernel line or the output of an earlier, timed-out command
cannot be taken for an answer.

It does not start QEMU or speak QMP (:mod:`pyvhost.lab.qemu` does).
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import re
import secrets
import shlex
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from pyvhost.errors import PyvhostError

from .image import READY_MARKER

TRANSCRIPT_LIMIT = 4 << 20  # characters kept; the oldest are dropped past this
# The guest kills a command this many seconds after the host gives up on it, so the host
# reports its own timeout and the channel is free again soon after.
GUEST_GRACE = 5


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


class GuestConsole:
    """Commands and markers over a connected chardev socket. Use :meth:`connect`."""

    def __init__(self, sock: socket.socket, *, name: str = "guest",
                 log: Path | None = None) -> None:
        self.name = name
        self._sock = sock
        self._log = open(log, "a", encoding="utf-8") if log is not None else None  # noqa: SIM115
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
                log: Path | None = None) -> GuestConsole:
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
                return cls(sock, name=name, log=log)

    # --- the transcript ---------------------------------------------------------------------

    def _read(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
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

        Raises :class:`GuestTimeoutError` if no answer comes within ``timeout`` seconds (the guest
        kills the command a few seconds later and the channel stays usable).
        """
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        with self._run_lock:
            self._counter += 1
            cid = f"{self._nonce}.{self._counter}"
            with self._cond:
                start = len(self._text) + self._dropped
            line = f"{cid} {int(timeout) + GUEST_GRACE} {base64.b64encode(cmd.encode()).decode()}\n"
            try:
                self._sock.sendall(line.encode())
            except OSError as e:
                raise self._fail(GuestGoneError, f"cannot send {cmd!r}: {e}") from e
            what = f"answer to {cmd!r}"
            deadline = time.monotonic() + timeout
            begin = self._wait(re.compile(rf"PYVHOST-BEGIN {re.escape(cid)}\n"), start,
                               timeout, what)
            with self._cond:
                begin_at = begin.end() + self._dropped
            left = max(0.0, deadline - time.monotonic())
            end = self._wait(re.compile(rf"PYVHOST-END {re.escape(cid)} (\d+)\n"), begin_at,
                             left, what)
            with self._cond:
                output = self._text[begin_at - self._dropped:end.start()]
                self._cursor = max(self._cursor, end.end() + self._dropped)
            # The guest prints "\n" before the END marker, so output without a final newline
            # still leaves the marker on its own line: take that one "\n" back off.
            return int(end.group(1)), output.removesuffix("\n")

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

    def __enter__(self) -> GuestConsole:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
