"""``pyvhost net``: a learning switch (or reflectors) over vhost-user sockets and taps."""

from __future__ import annotations

import functools
import itertools
import json
import logging
import signal
import sys
from types import FrameType

import click

from pyvhost import datapath
from pyvhost.backend import Server, VirtioDevice
from pyvhost.backend.server import RECONNECT_FIRST, RECONNECT_MAX
from pyvhost.devices.reflect import ReflectNet
from pyvhost.errors import LocalError
from pyvhost.protocol.constants import ProtocolFeature
from pyvhost.switch import Switch, SwitchPort, TapPort
from pyvhost.switch.table import DEFAULT_AGING
from pyvhost.switch.vhost import MAX_QUEUE_PAIRS

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
@click.option("--socket", "sockets", metavar="PATH", multiple=True,
              help="Unix socket to listen on for a front-end (QEMU, DPDK virtio_user); "
                   "with --client, the front-end's socket to connect to. Repeat for "
                   "several ports; each connection is one switch port.")
@click.option("--client", is_flag=True,
              help="Connect to every --socket instead of listening on it: the front-end "
                   "listens (QEMU: -chardev socket,path=PATH,server=on; DPDK: "
                   "--vdev net_virtio_user0,path=PATH,server=1). A missing socket and a "
                   "hang-up are retried until Ctrl-C, so pyvhost can start before the "
                   "front-end, and be restarted under a running VM.")
@click.option("--reconnect", "reconnect_max", metavar="SECONDS",
              type=click.FloatRange(min=RECONNECT_FIRST), default=RECONNECT_MAX,
              show_default=True,
              help=f"With --client: the longest wait between two connect attempts "
                   f"(the first retry comes after {RECONNECT_FIRST:g} s, then doubling).")
@click.option("--tap", "taps", metavar="NAME", multiple=True,
              help="Create a tap interface NAME (removed at exit) as a switch port. Repeat "
                   "for several.")
@click.option("--reflect", is_flag=True,
              help="Instead of switching: send every frame a port transmits back to it "
                   "with the MAC addresses swapped (like testpmd's macswap).")
@click.option("--mac", default="52:54:00:12:34:56", show_default=True,
              help="MAC address in the device's config space; with the switch, the n-th "
                   "connection gets this address plus n-1 (with --client: the n-th "
                   "--socket, on every reconnect).")
@click.option("--mac-aging", metavar="SECONDS", type=click.FloatRange(min=0, min_open=True),
              default=DEFAULT_AGING, show_default=True,
              help="Forget a learned MAC address after this long without a frame from it.")
@click.option("--control", metavar="PATH",
              help="Also listen on this Unix socket for status requests: each connection "
                   "gets the ports, MAC table, memory tables and counters as one JSON "
                   "line (see `pyvhost status`).")
@click.option("--stats/--no-stats", default=True, show_default=True,
              help="Print the counters as JSON on stderr at exit.")
@click.option("--mem-slots/--no-mem-slots", default=True, show_default=True,
              help="Offer the CONFIGURE_MEM_SLOTS protocol feature (ADD_MEM_REG / "
                   "REM_MEM_REG, up to 509 regions). Without it, QEMU re-sends the whole "
                   "table (SET_MEM_TABLE, at most 8 regions) on every hot-plug, as it does "
                   "to DPDK 22.11.")
@click.option("--queue-pairs", metavar="N", type=click.IntRange(1, MAX_QUEUE_PAIRS),
              default=1, show_default=True,
              help="Receive/transmit queue pairs of each switch port (VIRTIO_NET_F_MQ when "
                   "N > 1): QEMU -device virtio-net-pci,mq=on with -netdev "
                   "vhost-user,queues=N; DPDK net_virtio_user0,queues=N.")
def net(sockets: tuple[str, ...], client: bool, reconnect_max: float,
        taps: tuple[str, ...], reflect: bool, mac: str, mac_aging: float,
        control: str | None, stats: bool, mem_slots: bool = True,
        queue_pairs: int = 1) -> None:
    """Serve virtio-net ports on vhost-user sockets (listening, or connecting with
    --client) and taps: an L2 learning switch between all of them, until Ctrl-C.

    \b
    Two DPDK testpmd front-ends and the host, switched:
        pyvhost net --socket /tmp/vh0.sock --socket /tmp/vh1.sock --tap pv0 \\
            --control /tmp/pyvhost.ctl &
        dpdk-testpmd -l 0-1 --no-huge -m 512 --no-pci --file-prefix a \\
            --vdev 'net_virtio_user0,path=/tmp/vh0.sock,queues=1' -- \\
            --nb-cores=1 --total-num-mbufs=2048 --forward-mode=txonly
        pyvhost status /tmp/pyvhost.ctl
    \b
    With QEMU (the socket must exist before QEMU starts):
        -chardev socket,id=c0,path=/tmp/vh0.sock -netdev vhost-user,id=n0,chardev=c0 \\
        -device virtio-net-pci,netdev=n0
    \b
    Client mode (--client): the front-ends listen and pyvhost connects; it reconnects
    when a front-end goes away and comes back, and after pyvhost itself is restarted.
    QEMU (server=on; QEMU waits at start until pyvhost connects):
        -chardev socket,id=c0,path=/tmp/vh0.sock,server=on \\
        -netdev vhost-user,id=n0,chardev=c0 -device virtio-net-pci,netdev=n0
    DPDK testpmd (server=1; it too waits at start until pyvhost connects):
        dpdk-testpmd ... --vdev 'net_virtio_user0,path=/tmp/vh1.sock,server=1' ...
    then, in any order:
        pyvhost -v net --client --socket /tmp/vh0.sock --socket /tmp/vh1.sock \\
            --control /tmp/pyvhost.ctl
    """
    if not sockets and not taps:
        raise click.UsageError("give at least one --socket or --tap")
    if reflect and taps:
        raise click.UsageError("--reflect serves vhost-user sockets only, not --tap")
    if client and not sockets:
        raise click.UsageError("--client connects to the --socket paths: give at least one")
    if len(set(sockets)) != len(sockets):
        raise click.UsageError("a --socket path is given twice")
    mac_bytes = _parse_mac(mac)
    switch = Switch(mac_aging)
    reflectors: list[ReflectNet] = []
    count = 0  # connections served, for the exit statistics

    def make_device(mac_index: int) -> VirtioDevice:
        """A device for a new connection, its MAC the base plus ``mac_index``: the n-th
        accepted connection, or (client mode) the --socket's index, so that every
        reconnect of one front-end gets the same address (its guest's NIC is the same)."""
        nonlocal count
        count += 1
        dev: VirtioDevice
        if reflect:
            dev = ReflectNet(mac_bytes)
            reflectors.append(dev)
        else:
            dev = SwitchPort(switch, _nth_mac(mac_bytes, mac_index), queue_pairs=queue_pairs)
        if not mem_slots:
            dev.withheld_protocol_features |= ProtocolFeature.CONFIGURE_MEM_SLOTS
        return dev

    accepted = itertools.count()
    server = Server(lambda: make_device(next(accepted)))
    if not reflect:
        server.describers["switch"] = switch.describe
    tap_ports: list[TapPort] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        server.stop()

    old_int = signal.signal(signal.SIGINT, on_signal)
    old_term = signal.signal(signal.SIGTERM, on_signal)
    try:
        for index, path in enumerate(sockets):
            if client:
                server.connect(path, factory=functools.partial(make_device, index),
                               max_interval=reconnect_max)
            else:
                server.listen(path)
        for name in taps:
            tap_ports.append(TapPort(name, switch, server).open())
        if control:
            server.listen_control(control)
        ports = [*(f"{'client ' if client else ''}{s}" for s in sockets),
                 *(f"tap {t}" for t in taps)]
        click.echo(f"pyvhost net: serving {', '.join(ports)} "
                   f"({'reflect' if reflect else 'switch'}, {datapath.name()} data path); "
                   "Ctrl-C to stop", err=True)
        server.run()
    except LocalError as e:
        raise click.ClickException(str(e)) from e
    finally:
        for tap in tap_ports:
            tap.close()
        server.close()
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        if stats and reflect:
            totals: dict[str, int] = {}
            for dev in reflectors:
                for k, v in dev.stats.items():
                    totals[k] = totals.get(k, 0) + v
            print(json.dumps({"connections": len(reflectors), "stats": totals}),
                  file=sys.stderr)
        elif stats:
            print(json.dumps({"connections": count, "switch": switch.describe()}),
                  file=sys.stderr)


def _nth_mac(base: bytes, n: int) -> bytes:
    """``base`` plus ``n`` in its last three octets (the NIC-specific part)."""
    low = (int.from_bytes(base[3:], "big") + n) & 0xFFFFFF
    return base[:3] + low.to_bytes(3, "big")
