"""What every ``pyvhost`` command shares: one rule for exit codes, one JSON error shape,
output that survives pipes and journald, ``-v``/``-q`` anywhere, and Ctrl-C.

The rule (``--help`` of every command and the README say the same):

====  ===============================================================================
code  meaning
====  ===============================================================================
0     done; the check found nothing wrong
1     the check found a problem: a leak, a refused plan, a lost ping, a failed check
2     usage error, cannot connect, or the command could not run
3     the peer (QEMU, the back-end) failed a step; what was done was undone
4     the guest did not finish in time (an unplug, a resize), or refused
130   interrupted (Ctrl-C, or SIGTERM for a command that is not a daemon)
====  ===============================================================================

Every ``--json`` output is one JSON object with a ``schema`` field. A command that
produced its result prints its own document (``pyvhost.mem.add/1``, ...); a command that
could not prints the one error document, ``pyvhost.error/1``::

    {"schema": "pyvhost.error/1", "ok": false, "command": "mem add", "exit_code": 2,
     "error": {"kind": "connect", "message": "..."}}

The schemas ship as JSON Schema files in :mod:`pyvhost.schemas`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from enum import IntEnum
from typing import Any, ClassVar, NoReturn, TypeVar

import click
from rich.console import Console
from rich.text import Text

ERROR_SCHEMA = "pyvhost.error/1"


class Exit(IntEnum):
    """The exit codes of every pyvhost command."""

    OK = 0
    PROBLEM = 1
    USAGE = 2
    PEER_FAILED = 3
    GUEST = 4
    INTERRUPTED = 130


#: Paste into a command's docstring (after a ``\\b`` line) so ``--help`` shows the rule.
EXIT_CODES_HELP = (
    "Exit codes: 0 done (nothing wrong found), 1 a problem found (leak, refusal, lost\n"
    "ping, failed check), 2 usage error or cannot connect, 3 the peer failed a step\n"
    "(undone), 4 the guest did not finish, 130 interrupted.")

#: What the ``kind`` of an error document says, and the exit code each kind has.
ERROR_KINDS: dict[str, Exit] = {
    "usage": Exit.USAGE,        # bad options or arguments
    "connect": Exit.USAGE,      # nothing (or the wrong thing) answers at the socket
    "run": Exit.USAGE,          # the command could not run (a missing program, a host limit)
    "peer": Exit.PEER_FAILED,   # QEMU or the back-end failed a step
    "guest": Exit.GUEST,        # the guest did not finish
    "interrupted": Exit.INTERRUPTED,
    "internal": Exit.USAGE,     # a bug in pyvhost; -vv shows the traceback
}


class CommandError(click.ClickException):
    """Ends a command with an error: one line on stderr (or the error document with
    ``--json``) and the exit code of its ``kind``."""

    def __init__(self, message: str, kind: str = "usage") -> None:
        super().__init__(message)
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        self.kind = kind
        self.code = int(ERROR_KINDS[kind])
        # What click's standalone mode (CliRunner in the tests) exits with; click types
        # it as a class variable, this class gives each instance its kind's code.
        self.exit_code = self.code  # type: ignore[misc]
        # Shown after the command's context is gone: remember whose error it is, and
        # whether it asked for JSON, now.
        self.command = command_name()
        self.as_json = json_wanted()

    def show(self, file: Any = None) -> None:
        report_error(self.kind, self.message, self.command, self.as_json)


# -- output --------------------------------------------------------------------------
#: Width used when the output is not a terminal: wide enough that nothing a command
#: prints (socket paths, QEMU's messages, tables) is cut or wrapped for a pipe, a file,
#: journald or CI; a terminal keeps its own width.
PIPE_WIDTH = 1000


def console(stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr) that never cuts lines when it is not a
    terminal: full lines for ``| cat``, ``less``, files, systemd and CI."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr, highlight=False)
    return Console(stderr=stderr, highlight=False, width=PIPE_WIDTH, soft_wrap=True)


def command_name(ctx: click.Context | None = None) -> str:
    """``mem add`` for ``pyvhost mem add``: the command path without the program."""
    ctx = ctx or click.get_current_context(silent=True)
    if ctx is None:
        return ""
    return " ".join(ctx.command_path.split()[1:])


def json_wanted(ctx: click.Context | None = None) -> bool:
    """Whether this run asked for ``--json`` (also when parsing failed before the option's
    value was stored: a usage error of a ``--json`` run is a JSON document too)."""
    ctx = ctx or click.get_current_context(silent=True)
    if ctx is not None and ctx.find_root().meta.get("pyvhost.json"):
        return True
    return "--json" in sys.argv[1:]


def emit_json(doc: dict[str, Any]) -> None:
    """Print one JSON document on stdout. It must name its schema."""
    if "schema" not in doc:
        raise ValueError("a JSON document without a schema field")
    click.echo(json.dumps(doc, sort_keys=True))


def error_doc(kind: str, message: str, command: str = "") -> dict[str, Any]:
    """The ``pyvhost.error/1`` document."""
    return {"schema": ERROR_SCHEMA, "ok": False, "command": command,
            "exit_code": int(ERROR_KINDS[kind]),
            "error": {"kind": kind, "message": message}}


def report_error(kind: str, message: str, command: str | None = None,
                 as_json: bool | None = None) -> None:
    """Tell the user: the error document on stdout with ``--json``, and always one line
    on stderr (never wrapped). ``command`` and ``as_json`` default to the current
    command's."""
    if kind == "interrupted":
        # Ctrl-C can land anywhere, also inside a constructor (asyncio's event loop, in
        # qemu.qmp's client): the half-built object's __del__ then fails as the process
        # exits and Python prints "Exception ignored ..." with a traceback. The command is
        # ending on purpose; its one line is all the user gets.
        sys.unraisablehook = _ignore_unraisable
    if json_wanted() if as_json is None else as_json:
        emit_json(error_doc(kind, message, command_name() if command is None else command))
    # The message quotes paths, QEMU's and the back-end's words: plain text, not markup.
    console(stderr=True).print(Text.assemble(("error", "red"), f": {message}"),
                               soft_wrap=True, highlight=False)


def _ignore_unraisable(unraisable: Any) -> None:
    """``sys.unraisablehook`` for a process that is ending on an interrupt."""


def fail(message: str, kind: str = "usage") -> NoReturn:
    """End the command with an error of ``kind`` (see :data:`ERROR_KINDS`)."""
    raise CommandError(message, kind)


# -- options every command takes ----------------------------------------------------
F = TypeVar("F", bound=Callable[..., Any])


def _store_json(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.find_root().meta["pyvhost.json"] = True
    return value


def json_option(help: str = "Print one JSON object on stdout (its schema field names "
                              "it); progress and logs go to stderr.") -> Callable[[F], F]:
    """``--json``, remembered for the error handler."""
    return click.option("--json", "as_json", is_flag=True, callback=_store_json, help=help)


def _count(name: str) -> Callable[[click.Context, click.Parameter, int], None]:
    def store(ctx: click.Context, param: click.Parameter, value: int) -> None:
        meta = ctx.find_root().meta
        meta[name] = meta.get(name, 0) + (value or 0)
    return store


def verbosity(f: F) -> F:
    """``-v``/``-q`` on a command, so that ``pyvhost net -v`` works as ``pyvhost -v net``
    does. Counts add up across the group and the subcommand."""
    f = click.option("-q", "--quiet", count=True, expose_value=False,
                     callback=_count("pyvhost.quiet"),
                     help="Less log output, one level per -q (-q drops INFO).")(f)
    f = click.option("-v", "--verbose", count=True, expose_value=False,
                     callback=_count("pyvhost.verbose"),
                     help="More log output, one level per -v (-vv: the QMP library's "
                          "own lines too).")(f)
    return f


# -- logging ----------------------------------------------------------------------------
class _JournalFormatter(logging.Formatter):
    """``<N>`` syslog priority prefixes, which journald reads from a service's stderr
    (SyslogLevelPrefix=, on by default); journald stamps the time itself."""

    _PRIORITY: ClassVar[dict[int, int]] = {
        logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
        logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        prio = self._PRIORITY.get(record.levelno, 6)
        return f"<{prio}>{record.name}: {super().format(record)}"


def under_journald() -> bool:
    """Whether stderr is connected to the journal: systemd sets JOURNAL_STREAM to the
    ``device:inode`` of the stream it gave the service ("systemd.exec(5)")."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return dev.isdigit() and ino.isdigit() and (st.st_dev, st.st_ino) == (int(dev), int(ino))


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record comes (a command run in-process
    by click's CliRunner gets a stderr that is closed when the run ends)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(ctx: click.Context | None = None, default: int = logging.WARNING) -> int:
    """Set up logging on stderr for this run; returns the level. ``default`` is the level
    with neither -v nor -q (a daemon such as ``pyvhost net`` logs INFO by default)."""
    ctx = ctx or click.get_current_context(silent=True)
    meta = ctx.find_root().meta if ctx is not None else {}
    verbose, quiet = int(meta.get("pyvhost.verbose", 0)), int(meta.get("pyvhost.quiet", 0))
    level = min(logging.CRITICAL, max(logging.DEBUG, default - 10 * verbose + 10 * quiet))
    handler = _StderrHandler()
    if under_journald():
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, _StderrHandler):  # an earlier run's (others' stay: pytest's)
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # qemu.qmp logs its own protocol errors (and tracebacks) at ERROR; pyvhost reports
    # them translated, so the library's own lines show only at -vv. The same for asyncio,
    # which only qemu.qmp runs here: a connect cut short by Ctrl-C leaves a task whose
    # exception asyncio logs, traceback and all, as the interpreter exits.
    for name in ("qemu", "asyncio"):
        logging.getLogger(name).setLevel(logging.DEBUG if level <= logging.DEBUG else
                                         logging.CRITICAL + 1)
    return level
