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

import sys

import click

from pyvhost import __version__

from .common import CommandError, Exit, configure_logging, json_wanted, report_error, verbosity


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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


def main(argv: list[str] | None = None) -> None:
    """The ``pyvhost`` console script."""
    try:
        code = cli.main(args=argv, prog_name="pyvhost", standalone_mode=False)
    except CommandError as e:
        e.show()
        sys.exit(e.code)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.format_message(), err=True)
        sys.exit(Exit.USAGE)
    except click.UsageError as e:
        if e.ctx is not None and not json_wanted(e.ctx):
            click.echo(e.ctx.get_usage(), err=True)
            click.echo(f"Try '{e.ctx.command_path} --help' for help.", err=True)
        report_error("usage", e.format_message())
        sys.exit(Exit.USAGE)
    except click.ClickException as e:
        report_error("usage", e.format_message())
        sys.exit(Exit.USAGE)
    except (KeyboardInterrupt, click.exceptions.Abort):
        report_error("interrupted", "interrupted")
        sys.exit(Exit.INTERRUPTED)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else Exit.OK)


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
