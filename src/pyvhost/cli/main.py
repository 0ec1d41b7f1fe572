"""The ``pyvhost`` command line: one click group, and the exit-code rule applied to what
escapes a command (usage errors, Ctrl-C). Each subcommand is a module of this package:

- ``pyvhost net``    serve vhost-user-net sockets (:mod:`.net`)
- ``pyvhost probe``  check a back-end for fd and mapping leaks across hot-plug (:mod:`.probe`)
- ``pyvhost status`` ask a running back-end for its ports and memory tables (:mod:`.status`)
- ``pyvhost lab``    the README's main job: real VMs on a pyvhost switch, memory hot-added
  under a continuous ping (:mod:`.lab`)
- ``pyvhost demo``   a quicker one: a back-end watched across memory hot-plug played by
  pyvhost's own front-end (:mod:`.demo`)
- ``pyvhost mem``    memory hot-plug through QMP with the checks QEMU leaves out (:mod:`.mem`)
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
from typing import Any, NoReturn

import click

from pyvhost import __version__
from pyvhost.interrupts import Interrupted, raise_interrupt

from .common import (
    CommandError,
    Exit,
    command_name,
    configure_logging,
    json_wanted,
    report_error,
    verbosity,
)


class _Cli(click.Group):
    """Ctrl-C (or SIGTERM) while a command runs: one line and exit 130. Turned into
    click's Abort here, before click's own KeyboardInterrupt handler prints an empty line
    for it; :func:`main` reports it."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            # An Interrupted says what the command undid: that is the one line.
            raise click.exceptions.Abort(str(e) if isinstance(e, Interrupted) else "") \
                from None


@click.group(cls=_Cli,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pyvhost")
@verbosity
def cli() -> None:
    """Memory hot-plug that stays safe for QEMU VMs served by vhost-user back-ends.

    \b
    See it work (real VMs on a pyvhost switch, memory hot-added under traffic):
        pyvhost lab
    Quicker (a back-end watched across hot-plug, then probed):
        pyvhost demo
    Serve a virtio-net device on a vhost-user socket:
        pyvhost net --socket /tmp/vhost0.sock --reflect
    Check any back-end (pyvhost, DPDK, ...) for fd and mapping leaks across hot-plug:
        pyvhost probe --socket /tmp/vhost0.sock --cycles 100
    Ask a running back-end (started with --control) for its memory tables:
        pyvhost status /tmp/pyvhost.ctl
    \b
    -v/-q work before or after the subcommand (pyvhost net -v). Every --json output is
    one object with a schema field; errors are {"schema": "pyvhost.error/1", ...}.
    \b
    Exit codes: 0 done (nothing wrong found), 1 a problem found (leak, refusal, lost
    ping, failed check), 2 usage error or cannot connect, 3 the peer failed a step
    (undone), 4 the guest did not finish, 130 interrupted.
    """
    configure_logging()


def _command_in(argv: list[str]) -> str:
    """The subcommand ``argv`` names (``mem add``), for an error raised outside any
    command's context (Ctrl-C while options are parsed, ...)."""
    names: list[str] = []
    group: click.Command = cli
    for arg in argv:
        if not isinstance(group, click.Group):
            break
        sub = group.commands.get(arg)
        if sub is not None:
            names.append(arg)
            group = sub
    return " ".join(names)


def main(argv: list[str] | None = None) -> None:
    """The ``pyvhost`` console script: runs the command and applies the exit-code rule
    to what escapes it (usage errors, Ctrl-C and SIGTERM, bugs)."""
    args = sys.argv[1:] if argv is None else list(argv)
    as_json = "--json" in args  # for errors raised before (or after) any command's context
    # SIGTERM ends a command the way Ctrl-C does (cleanup, exit 130). A daemon such as
    # pyvhost net installs its own handler for both while it serves.
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        code = cli.main(args=args, prog_name="pyvhost", standalone_mode=False)
    except CommandError as e:
        e.show()
        sys.exit(e.code)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.format_message(), err=True)
        sys.exit(Exit.USAGE)
    except click.UsageError as e:
        as_json = as_json or json_wanted(e.ctx)
        if e.ctx is not None and not as_json:
            click.echo(e.ctx.get_usage(), err=True)
            click.echo(f"Try '{e.ctx.command_path} --help' for help.", err=True)
        report_error("usage", e.format_message(), command_name(e.ctx) if e.ctx else "",
                     as_json)
        sys.exit(Exit.USAGE)
    except click.ClickException as e:
        report_error("usage", e.format_message(), _command_in(args), as_json)
        sys.exit(Exit.USAGE)
    except (KeyboardInterrupt, click.exceptions.Abort) as e:
        message = str(e) if isinstance(e, Interrupted | click.exceptions.Abort) else ""
        report_error("interrupted", message or "interrupted", _command_in(args), as_json)
        sys.exit(Exit.INTERRUPTED)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except BrokenPipeError as e:
        if not _stdout_gone():
            _internal(e, args, as_json)
        # `pyvhost ... | head`: the reader left; nothing more to say to it.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(Exit.USAGE)
    except Exception as e:
        _internal(e, args, as_json)
    sys.exit(code if isinstance(code, int) else Exit.OK)


def _internal(e: Exception, args: list[str], as_json: bool) -> NoReturn:
    """A bug in pyvhost (or an input it failed to check): one line, not a traceback;
    -vv shows where."""
    logging.getLogger(__name__).debug("internal error", exc_info=e)
    report_error("internal", f"internal error: {type(e).__name__}: {e} (run with -vv for "
                             "the traceback)", _command_in(args), as_json)
    sys.exit(Exit.USAGE)


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports POLLERR)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError):
        return False


def _register() -> None:
    from .demo import demo
    from .lab import lab
    from .mem import mem
    from .net import net
    from .probe import probe
    from .status import status

    for command in (net, probe, status, demo, mem, lab):
        cli.add_command(command)


_register()
