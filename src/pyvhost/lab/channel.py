"""The wire format of the test guest's command channel, and reading an answer out of what
the guest printed. Pure functions: no socket, no thread, no clock (:mod:`.guest` has those;
the guest's side is ``serve`` in ``guest_tool.sh``).

The host sends one line per attempt::

    ID/ATTEMPT LIMIT BASE64(COMMAND) MD5

``ID`` is ``NONCE.N`` (a per-connection nonce and a counter), ``ATTEMPT`` counts the times
this command was sent, ``LIMIT`` is when the guest kills the command (seconds) and ``MD5``
the hex MD5 of ``ID/ATTEMPT LIMIT BASE64``. The guest answers ``PYVHOST-BEGIN ID/ATTEMPT``
as soon as it has read the line, ``PYVHOST-RUNNING ID/ATTEMPT`` every
:data:`HEARTBEAT` seconds while the command runs, and when it is done its output (stdout
and stderr, carriage returns removed) and ``\nPYVHOST-END ID/ATTEMPT CODE LENGTH MD5``:
the output's length in bytes and its MD5, so the host can tell the output it got is the
output the guest printed, byte for byte. A line whose MD5 does not match (bytes lost or
changed on the way in: seen on the emulated UART of a loaded host) is not run; the guest
answers ``PYVHOST-GARBLED`` instead. The guest runs each ``ID`` at most once: a later
attempt of the command it ran last gets the same output and code again, so sending a
command again is always safe, whether the first line was lost, garbled, or only its answer
was (a re-fetch).

:func:`scan` reads a transcript for one command: its answer (the first attempt whose BEGIN
and END arrived whole with the output between them matching END's length and MD5), which
attempts the guest acknowledged, and whether something says the last line sent, or its
answer, was damaged (a reason to send again).
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass

BEGIN = "PYVHOST-BEGIN"
END = "PYVHOST-END"
RUNNING = "PYVHOST-RUNNING"
#: Seconds between the guest's RUNNING lines (``guest_tool.sh`` has the same number): a
#: host that hears nothing for several of these knows the END line, not the command, is late.
HEARTBEAT = 2
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


def checksum(body: str | bytes) -> str:
    """What the guest's ``md5sum`` prints for ``body`` (its first word)."""
    data = body if isinstance(body, bytes) else body.encode()
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def output_bytes(output: str) -> bytes:
    """The bytes the guest printed as ``output`` (the host decodes the transcript as UTF-8
    with ``surrogateescape``, so bytes that are not UTF-8 come back as they were)."""
    return output.encode("utf-8", "surrogateescape")


def end_line(attempt_id: str, code: int, output: bytes) -> bytes:
    """The END line the guest prints after ``output`` (with the newline before it)."""
    return f"\n{END} {attempt_id} {code} {len(output)} {checksum(output)}\n".encode()


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
    acknowledged: frozenset[int]  # the attempts the guest read (BEGIN or RUNNING arrived whole)
    trouble: str | None  # why to send again: damage seen after the last attempt was sent


def scan(text: str, command_id: str, nonce: str, since: int) -> Scan:
    """Read ``text`` (everything printed since the command's first attempt was sent) for
    command ``command_id`` (``NONCE.N``); ``since`` is where the last attempt was sent, in
    ``text``: only what arrived after it can be a reason to send again."""
    cid = re.escape(command_id)
    # Where each attempt's BEGIN and RUNNING lines end: the output follows the last one
    # before its END (the guest stops its heartbeat before printing the output). A RUNNING
    # line also says the guest read that attempt, should its BEGIN have been lost.
    heard: dict[int, list[int]] = {}
    for m in re.finditer(rf"(?:{BEGIN}|{RUNNING}) {cid}/(\d+)\n", text):
        heard.setdefault(int(m.group(1)), []).append(m.end())
    acknowledged = frozenset(heard)
    trouble: str | None = None
    for m in re.finditer(rf"{END} {cid}/(\d+) (\d+) (\d+) ([0-9a-f]{{32}})\n", text):
        attempt = int(m.group(1))
        start = max((at for at in heard.get(attempt, ()) if at <= m.start()), default=None)
        if start is not None:
            # The guest prints "\n" before END, so output without a final newline still
            # leaves the marker on its own line: take that one "\n" back off.
            output = text[start:m.start()].removesuffix("\n")
            problem = _mismatch(output, int(m.group(3)), m.group(4))
            if problem is None:
                return Scan(Answer(attempt, int(m.group(2)), output, m.end()),
                            acknowledged, None)
            problem = f"the answer to attempt {attempt} {problem}"
        else:
            problem = (f"an answer to attempt {attempt} arrived without its {BEGIN} or "
                       f"{RUNNING} line")
        if m.start() >= since and trouble is None:
            trouble = problem
    if trouble is None:
        trouble = _damage(text, since, command_id, nonce, bool(acknowledged))
    return Scan(None, acknowledged, trouble)


def _mismatch(output: str, length: int, md5: str) -> str | None:
    """Why ``output`` is not what the guest printed (its END said ``length`` bytes with MD5
    ``md5``), or None when it is."""
    data = output_bytes(output)
    if len(data) != length:
        return f"has {len(data)} bytes of output, the guest printed {length}"
    if checksum(data) != md5:
        return f"has output with MD5 {checksum(data)}, the guest printed {md5}"
    return None


_WELL_FORMED = re.compile(
    rf"(?:{BEGIN} (\S+)|{RUNNING} (\S+)|{END} (\S+) \d+ \d+ [0-9a-f]{{32}})$")


def _damage(text: str, since: int, command_id: str, nonce: str,
            acknowledged: bool) -> str | None:
    """A complete line after ``since`` that says the last attempt (or its answer) was
    damaged. Before the guest acknowledged the command nothing but markers and kernel lines
    arrive, so any unexpected marker counts; after, the command's output does, which may
    say anything, so only a broken BEGIN or END marker, or this command's id outside one,
    counts (an END line lost whole is not seen here: the host notices the silence after
    the last RUNNING line)."""
    complete = text[since:text.rfind("\n") + 1]
    own_id = re.compile(rf"(?<![\w.]){re.escape(command_id)}/\d+")
    for line in complete.splitlines():
        if GARBLED in line:
            return f"the guest refused a garbled command line ({line.strip()[:80]!r})"
        marker = _WELL_FORMED.search(line)
        if marker is not None:
            marker_id = marker.group(1) or marker.group(2) or marker.group(3)
            if not acknowledged and not re.fullmatch(rf"{nonce}\.\d+(/\d+)?", marker_id):
                return f"a marker with an id never sent ({line.strip()[:80]!r})"
            continue
        if own_id.search(line) or any(m in line for m in (BEGIN, RUNNING, END)):
            return f"a damaged marker ({line.strip()[:80]!r})"
        if not acknowledged and "PYVHOST-" in line and not any(
                other in line for other in OTHER_MARKERS):
            return f"a damaged marker ({line.strip()[:80]!r})"
    return None
