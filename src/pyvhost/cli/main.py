"""The ``pyvhost`` command line: one click group; each subcommand lives next to what it drives.

Subcommands:

- ``pyvhost net``    serve vhost-user-net sockets (:mod:`pyvhost.cli.net`)
- ``pyvhost probe``  check a back-end for fd and mapping leaks across hot-plug
  (:mod:`pyvhost.cli.probe`)
- ``pyvhost status`` ask a running back-end for its ports and memory tables
  (:mod:`pyvhost.cli.status`)
- ``pyvhost lab``    the README's main job: real VMs on a pyvhost switch, memory
  hot-added under a continuous ping (:mod:`pyvhost.cli.lab`)
- ``pyvhost demo``   a quicker one: a back-end watched across memory hot-plug played by
  pyvhost's own front-end (:mod:`pyvhost.cli.demo`)
- ``pyvhost mem``    memory hot-plug through QMP with the checks QEMU leaves out
  (:mod:`pyvhost.cli.mem`)
"""

from __future__ import annotations

import logging

import click

from pyvhost import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pyvhost")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
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
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _register() -> None:
    from .demo import demo
    from .lab import lab
    from .mem import mem
    from .net import net
    from .probe import probe
    from .status import status

    main.add_command(net)
    main.add_command(probe)
    main.add_command(status)
    main.add_command(demo)
    main.add_command(mem)
    main.add_command(lab)


_register()
