"""The wire format of the test guest's command channel, and reading an answer out of what
the guest printed. Pure functions: no socket, no thread, no clock (:mod:`.guest` has those;
the guest's side is ``serve`` in ``guest_tool.sh``).

The host sends one line per attempt::

    ID/ATTEMPT LIMIT BASE64(COMMAND) MD5

``ID`` is ``NONCE.N`` (a per-connection nonce and a counter), ``ATTEMPT`` counts the times
this command was sent, ``LIMIT`` is when the guest kills the command (seconds) and ``MD5``
the hex MD5 of ``ID/ATTEMPT LIMIT BASE64``. The guest answers ``PYVHOST-BEGIN ID/ATTEMPT``
as soon as it has read the line, and when the command is done its output (stdout and
stderr) and ``\\nPYVHOST-END ID/ATTEMPT CODE``. A line whose MD5 does not match (bytes lost
or changed on the way in: seen on the emulated UART of a loaded host) is not run; the guest
answers ``PYVHOST-GARBLED`` instead. The guest runs each ``ID`` at most once: a later
attempt of the command it ran last gets the same output and code again, so sending a
command again is always safe, whether the first line was lost, garbled, or only its answer
was.

:func:`scan` reads a transcript for one command: its answer (the first attempt whose BEGIN
and END both arrived whole), whether the guest acknowledged any attempt, and whether
something says the last line sent, or its answer, was damaged (a reason to send again).
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass

BEGIN = "PYVHOST-BEGIN"
END = "PYVHOST-END"
GARBLED = "PYVHOST-GARBLED"
#: Other lines the guest prints on its channel or console (``/init``'s progress).
OTHER_MARKERS = ("PYVHOST-READY", "PYVHOST-MODULES", "PYVHOST-NET", "PYVHOST-ERROR")


def command_line(attempt_id: str, limit: int, command: str) -> bytes:
    """The line that sends ``command`` as ``attempt_id`` (``NONCE.N/ATTEMPT``)."""
    if not re.fullmatch(r"[0-9a-z]+\.\d+/\d+", attempt_id):
        raise ValueError(f"{attempt_id!r} is not NONCE.N/ATTEMPT")
    encoded = base64.b64encode(command.encode()).decode()
    body = f"{attempt_id} {int(limit)} {encoded}"
    return f"{body} {checksum(body)}\n".encode()


def checksum(body: str) -> str:
    """What the guest's ``md5sum`` prints for ``body`` (its first word)."""
    return hashlib.md5(body.encode(), usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class Answer:
    """A command's answer: its exit code and output, and where it ends in the text."""

    attempt: int
    code: int
    output: str
    end: int  # offset just past the END marker's newline, in the scanned text


@dataclass(frozen=True)
class Scan:
    """What the text since the first attempt says about one command."""

    answer: Answer | None
    acknowledged: frozenset[int]  # the attempts the guest read (their BEGIN arrived whole)
    trouble: str | None  # why to send again: damage seen after the last attempt was sent


def scan(text: str, command_id: str, nonce: str, since: int) -> Scan:
    """Read ``text`` (everything printed since the command's first attempt was sent) for
    command ``command_id`` (``NONCE.N``); ``since`` is where the last attempt was sent, in
    ``text``: only what arrived after it can be a reason to send again."""
    cid = re.escape(command_id)
    begins: dict[int, int] = {}
    for m in re.finditer(rf"{BEGIN} {cid}/(\d+)\n", text):
        begins.setdefault(int(m.group(1)), m.end())
    trouble: str | None = None
    for m in re.finditer(rf"{END} {cid}/(\d+) (\d+)\n", text):
        attempt = int(m.group(1))
        start = begins.get(attempt)
        if start is not None and start <= m.start():
            # The guest prints "\n" before END, so output without a final newline still
            # leaves the marker on its own line: take that one "\n" back off.
            output = text[start:m.start()].removesuffix("\n")
            return Scan(Answer(attempt, int(m.group(2)), output, m.end()),
                        frozenset(begins), None)
        if m.start() >= since and trouble is None:
            trouble = f"an answer to attempt {attempt} arrived without its {BEGIN} line"
    if trouble is None:
        trouble = _damage(text, since, command_id, nonce, bool(begins))
    return Scan(None, frozenset(begins), trouble)


_WELL_FORMED = re.compile(rf"(?:{BEGIN} (\S+)|{END} (\S+) \d+)$")


def _damage(text: str, since: int, command_id: str, nonce: str,
            acknowledged: bool) -> str | None:
    """A complete line after ``since`` that says the last attempt (or its answer) was
    damaged. Before the guest acknowledged the command nothing but markers and kernel lines
    arrive, so any unexpected marker counts; after, the command's output does, which may
    say anything, so only a broken BEGIN or END marker, or this command's id outside one,
    counts (an END line lost whole is not seen: the command then times out)."""
    complete = text[since:text.rfind("\n") + 1]
    own_id = re.compile(rf"(?<![\w.]){re.escape(command_id)}/\d+")
    for line in complete.splitlines():
        if GARBLED in line:
            return f"the guest refused a garbled command line ({line.strip()[:80]!r})"
        marker = _WELL_FORMED.search(line)
        if marker is not None:
            marker_id = marker.group(1) or marker.group(2)
            if not acknowledged and not re.fullmatch(rf"{nonce}\.\d+(/\d+)?", marker_id):
                return f"a marker with an id never sent ({line.strip()[:80]!r})"
            continue
        if own_id.search(line) or BEGIN in line or END in line:
            return f"a damaged marker ({line.strip()[:80]!r})"
        if not acknowledged and "PYVHOST-" in line and not any(
                other in line for other in OTHER_MARKERS):
            return f"a damaged marker ({line.strip()[:80]!r})"
    return None
