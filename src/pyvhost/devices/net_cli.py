"""``pyvhost net``: serve virtio-net over vhost-user sockets until Ctrl-C."""

from __future__ import annotations

import json
import logging
import signal
import sys
from types import FrameType

import click

from pyvhost.backend import Server
from pyvhost.errors import LocalError

from .net import ReflectNet

log = logging.getLogger(__name__)


def _parse_mac(value: str) -> bytes:
    parts = value.split(":")
    if len(parts) != 6:
        raise click.BadParameter(f"{value!r} is not a MAC address like 52:54:00:12:34:56")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError as e:
        raise click.BadParameter(f"{value!r} is not a MAC address") from e


@click.command()
@click.option("--socket", "sockets", metavar="PATH", multiple=True, required=True,
              help="Unix socket to listen on for a front-end (QEMU, DPDK virtio_user). "
                   "Repeat for several ports.")
@click.option("--reflect", is_flag=True,
              help="Send every frame a port transmits back to it with the MAC addresses "
                   "swapped (like testpmd's macswap): a traffic sink that counts.")
@click.option("--mac", default="52:54:00:12:34:56", show_default=True,
              help="MAC address in the device's config space.")
@click.option("--control", metavar="PATH",
              help="Also listen on this Unix socket for status requests: each connection "
                   "gets the ports, their memory tables and counters as one JSON line "
                   "(see `pyvhost status`).")
@click.option("--stats/--no-stats", default=True, show_default=True,
              help="Print each connection's counters as JSON on stderr when it closes "
                   "and at exit.")
def net(sockets: tuple[str, ...], reflect: bool, mac: str, control: str | None,
        stats: bool) -> None:
    """Serve a virtio-net device on vhost-user sockets (server mode) until Ctrl-C.

    \b
    Example, with DPDK testpmd as the front-end generating traffic:
        pyvhost net --socket /tmp/vh0.sock --reflect &
        dpdk-testpmd -l 0-1 --no-huge -m 512 --no-pci --file-prefix fe \\
            --vdev 'net_virtio_user0,path=/tmp/vh0.sock,queues=1' -- \\
            --nb-cores=1 --total-num-mbufs=2048 --forward-mode=io --tx-first
    \b
    With QEMU (the socket must exist before QEMU starts):
        -chardev socket,id=c0,path=/tmp/vh0.sock -netdev vhost-user,id=n0,chardev=c0 \\
        -device virtio-net-pci,netdev=n0
    """
    if not reflect:
        raise click.UsageError("only reflector ports exist so far: pass --reflect "
                               "(the learning switch comes next)")
    mac_bytes = _parse_mac(mac)
    devices: list[ReflectNet] = []

    def factory() -> ReflectNet:
        dev = ReflectNet(mac_bytes)
        devices.append(dev)
        return dev

    server = Server(factory)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        server.stop()

    old_int = signal.signal(signal.SIGINT, on_signal)
    old_term = signal.signal(signal.SIGTERM, on_signal)
    try:
        for path in sockets:
            server.listen(path)
        if control:
            server.listen_control(control)
        click.echo(f"pyvhost net: serving {', '.join(sockets)} (reflect); Ctrl-C to stop",
                   err=True)
        server.run()
    except LocalError as e:
        raise click.ClickException(str(e)) from e
    finally:
        server.close()
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        if stats:
            totals: dict[str, int] = {}
            for dev in devices:
                for k, v in dev.stats.items():
                    totals[k] = totals.get(k, 0) + v
            print(json.dumps({"connections": len(devices), "stats": totals}), file=sys.stderr)
