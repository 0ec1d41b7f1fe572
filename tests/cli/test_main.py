"""The ``pyvhost`` group: ``python -m pyvhost``, usage errors, ``-v``/``-q`` after any
subcommand, and every command's ``--help`` stating its exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pyvhost import __version__
from support.cli import assert_one_line_error, run_pyvhost
from support.schemas import validate

# The commands this suite owns, each with a run that fails fast at a missing socket.
COMMANDS = {
    "status": ("status", "/nonexistent/pyvhost.ctl"),
    "probe": ("probe", "--socket", "/nonexistent/vh.sock"),
    "mem status": ("mem", "status", "--qmp", "/nonexistent/vm.qmp"),
    "mem add": ("mem", "add", "--qmp", "/nonexistent/vm.qmp", "--size", "128M"),
    "mem remove": ("mem", "remove", "--qmp", "/nonexistent/vm.qmp", "d0"),
    "mem resize": ("mem", "resize", "--qmp", "/nonexistent/vm.qmp", "v0", "--size", "0"),
}


def test_python_m_pyvhost_version() -> None:
    done = run_pyvhost("--version")
    assert done.code == 0, done
    assert done.stdout.strip() == f"pyvhost, version {__version__}"


def test_no_command_and_unknown_command_are_usage_errors() -> None:
    done = run_pyvhost()
    assert done.code == 2 and "Usage:" in done.stderr, done
    done = run_pyvhost("frobnicate")
    assert_one_line_error(done, 2, "No such command 'frobnicate'")
    assert done.stdout == ""
    doc = validate(run_pyvhost("frobnicate", "--json").json(), "pyvhost.error/1")
    assert doc["error"]["kind"] == "usage" and doc["exit_code"] == 2


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_verbosity_after_the_subcommand(name: str) -> None:
    """-v and -q are taken after the subcommand (and mix with -v before it): the run gets
    as far as its socket, and fails there, not at option parsing."""
    args = COMMANDS[name]
    done = run_pyvhost(*args, "-v", "-q", "--quiet", "--verbose")
    assert_one_line_error(done, 2, "/nonexistent/")
    assert "No such option" not in done.stderr
    doc = validate(run_pyvhost("-q", *args, "-v", "--json").json(), "pyvhost.error/1")
    assert (doc["command"], doc["error"]["kind"], doc["exit_code"]) == (name, "connect", 2)


@pytest.mark.parametrize("args", [(), ("status",), ("probe",), ("demo",), ("mem",),
                                  ("mem", "status"), ("mem", "add"), ("mem", "remove"),
                                  ("mem", "resize")])
def test_help_states_the_exit_codes(args: tuple[str, ...]) -> None:
    done = run_pyvhost(*args, "--help")
    assert done.code == 0, done
    text = " ".join(done.stdout.split())
    assert "Exit codes: 0" in text and "130 interrupted" in text, done
    assert "-v, --verbose" in text or not args, done


def test_usage_error_of_a_subcommand() -> None:
    done = run_pyvhost("probe", "--socket", "/x.sock", "--cycles", "many")
    assert_one_line_error(done, 2, "--cycles")
    doc = validate(run_pyvhost("probe", "--socket", "/x.sock", "--cycles", "many",
                               "--json").json())
    assert (doc["command"], doc["error"]["kind"]) == ("probe", "usage")


_DEL_AFTER_INTERRUPT = """
import sys
from pyvhost.cli.common import report_error

class HalfBuilt:
    # What a Ctrl-C inside asyncio's event loop constructor leaves: an object whose
    # __del__ fails when the process lets go of it.
    def __del__(self) -> None:
        raise AttributeError("no attribute '_ssock'")

obj = HalfBuilt()
if sys.argv[1] == "interrupted":
    report_error("interrupted", "interrupted")
del obj
"""


@pytest.mark.parametrize("interrupted", [True, False])
def test_an_interrupt_is_one_line_even_when_a_destructor_fails(interrupted: bool) -> None:
    """After "interrupted", what Python would print for a failing __del__ ("Exception
    ignored ...", a traceback) is not shown; without an interrupt it still is, so the
    hook is not hiding real errors."""
    done = subprocess.run([sys.executable, "-c", _DEL_AFTER_INTERRUPT,
                           "interrupted" if interrupted else "plain"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    if interrupted:
        assert done.stderr.splitlines() == ["error: interrupted"], done.stderr
    else:
        assert "Exception ignored" in done.stderr and "_ssock" in done.stderr, done.stderr
