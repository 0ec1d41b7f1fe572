"""``pyvhost net``: a learning switch (or reflectors) over vhost-user sockets and taps,
run as a daemon.

It logs at INFO by default (``-v`` debug, ``-q`` warnings only; journald gets priority
prefixes and no timestamps of ours), tells the service manager when every socket listens
(``READY=1`` over ``$NOTIFY_SOCKET``) and when it stops (``STOPPING=1``), serves metrics
with ``--metrics HOST:PORT``, and prints what it served as one JSON object
(``pyvhost.net.stats/1``) on stderr at exit. Exit codes: 0 after SIGTERM (a service's
normal stop), 130 after SIGINT (Ctrl-C), 2 for usage errors and a socket it can not
listen on. Per-connection state is dropped when the connection ends: the reflector's
counters are folded into totals then.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import click

from pyvhost.backend import Connection, Server, VirtioDevice, sdnotify
from pyvhost.backend.buildinfo import build_info
from pyvhost.backend.server import RECONNECT_FIRST, RECONNECT_MAX
from pyvhost.devices.reflect import ReflectNet
from pyvhost.errors import LocalError
from pyvhost.protocol.constants import ProtocolFeature
from pyvhost.switch import Switch, SwitchPort, TapPort
from pyvhost.switch.table import DEFAULT_AGING
from pyvhost.switch.vhost import MAX_QUEUE_PAIRS

from .common import Exit, configure_logging, fail, verbosity

log = logging.getLogger("pyvhost.net")

STATS_SCHEMA = "pyvhost.net.stats/1"


def _parse_mac(value: str) -> bytes:
    parts = value.split(":")
    if len(parts) != 6:
        raise click.BadParameter(f"{value!r} is not a MAC address like 52:54:00:12:34:56")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError as e:
        raise click.BadParameter(f"{value!r} is not a MAC address") from e


def _metrics_address(ctx: click.Context, param: click.Parameter,
                     value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    from pyvhost.backend.metrics import parse_address

    try:
        return parse_address(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx, param) from e


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
              help="MAC address in the device's config space, shown in status output; "
                   "with the switch, the n-th connection gets this address plus n-1 (with "
                   "--client: the n-th --socket, on every reconnect). The guest's MAC is "
                   "the front-end's own (QEMU -device virtio-net-pci,mac=; DPDK "
                   "net_virtio_user0,mac=): a virtio-net front-end builds the config "
                   "space itself, so pyvhost does not offer it over vhost-user.")
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
@click.option("--metrics", "metrics_at", metavar="HOST:PORT", callback=_metrics_address,
              help="Serve Prometheus / OpenMetrics metrics on http://HOST:PORT/metrics: "
                   "per port and queue frames, bytes, drops and errors, memory table "
                   "updates and their latency, regions, fds and mappings held. "
                   "127.0.0.1:9478, [::1]:9478, 0.0.0.0:9478 for every address.")
@click.option("--poll-us", metavar="MICROSECONDS", type=click.IntRange(0, 1_000_000),
              default=0, show_default=True, envvar="PYVHOST_POLL_US",
              help="After a kick that found work, poll that queue for this long with its "
                   "kicks off (VRING_USED_F_NO_NOTIFY) instead of waiting for the next "
                   "kick; back to kicks once a window passes without work, so an idle "
                   "pyvhost net uses no CPU. Default 0 (kicks only): on a 2-core machine "
                   "50 us did not change the switch's rate relative to DPDK's beyond "
                   "the noise (BENCHMARKS.md), and a polling back-end takes CPU its "
                   "front-ends need; try it where the back-end has a core of its own.")
@click.option("--workers", metavar="N", type=click.IntRange(1, 64), default=1,
              show_default=True, envvar="PYVHOST_WORKERS",
              help="Serve the queues' kicks on N worker threads (each queue pair of each "
                   "connection on one of them, spread evenly; the compiled bursts release "
                   "the GIL); control messages, taps and the control socket stay on the "
                   "main loop. 1: everything on one thread, no locks. Leave the main loop "
                   "a CPU the workers do not keep busy: on a CPU shared with a busy worker "
                   "a memory-table update waited up to a scheduler slice (4 ms, "
                   "BENCHMARKS.md, with 1 and 2 on a 2-core machine).")
@verbosity
def net(sockets: tuple[str, ...], client: bool, reconnect_max: float,
        taps: tuple[str, ...], reflect: bool, mac: str, mac_aging: float,
        control: str | None, stats: bool, mem_slots: bool = True,
        queue_pairs: int = 1, metrics_at: tuple[str, int] | None = None,
        poll_us: int = 0, workers: int = 1) -> None:
    """Serve virtio-net ports on vhost-user sockets (listening, or connecting with
    --client) and taps: an L2 learning switch between all of them, until SIGTERM or
    Ctrl-C.

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
        pyvhost net --client --socket /tmp/vh0.sock --socket /tmp/vh1.sock \\
            --control /tmp/pyvhost.ctl
    \b
    As a service: logs at INFO (-v debug, -q warnings only; under journald with
    priorities and without timestamps), READY=1 to $NOTIFY_SOCKET once every socket
    listens (systemd Type=notify; see docs/net-daemon.md), STOPPING=1 at the end.
    \b
    Exit codes: 0 stopped by SIGTERM, 130 by SIGINT (Ctrl-C), 2 usage error or a
    socket it can not listen on (in use, not a socket, no permission).
    """
    configure_logging(default=logging.INFO)
    if not sockets and not taps:
        raise click.UsageError("give at least one --socket or --tap")
    if reflect and taps:
        raise click.UsageError("--reflect serves vhost-user sockets only, not --tap")
    if client and not sockets:
        raise click.UsageError("--client connects to the --socket paths: give at least one")
    if len(set(sockets)) != len(sockets):
        raise click.UsageError("a --socket path is given twice")
    mac_bytes = _parse_mac(mac)
    info = build_info()
    log.info("pyvhost %s, data path: %s", info["version"], info["datapath"])
    switch = Switch(mac_aging)
    totals = _ReflectTotals()

    def make_device(mac_index: int) -> VirtioDevice:
        """A device for a new connection, its MAC the base plus ``mac_index``: the n-th
        accepted connection, or (client mode) the --socket's index, so that every
        reconnect of one front-end gets the same address (its guest's NIC is the same)."""
        dev: VirtioDevice
        if reflect:
            dev = ReflectNet(mac_bytes)
        else:
            dev = SwitchPort(switch, _nth_mac(mac_bytes, mac_index), queue_pairs=queue_pairs)
        if not mem_slots:
            dev.withheld_protocol_features |= ProtocolFeature.CONFIGURE_MEM_SLOTS
        return dev

    accepted = itertools.count()
    server = Server(lambda: make_device(next(accepted)))
    server.poll_us = poll_us
    server.use_workers(workers)
    if reflect:
        server.on_disconnect.append(totals.fold)
    else:
        server.describers["switch"] = switch.describe
    tap_ports: list[TapPort] = []
    metrics = None
    stopped_by: list[int] = []
    served = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopped_by.append(signum)
        server.stop()

    old_int = signal.signal(signal.SIGINT, on_signal)
    old_term = signal.signal(signal.SIGTERM, on_signal)
    try:
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
            if metrics_at is not None:
                from pyvhost.backend.metrics import Metrics  # prometheus-client on demand

                metrics = Metrics(server, _port_source(server, switch, reflect))
                host, port = metrics.serve(*metrics_at)
                log.info("metrics on http://%s:%d/metrics", _host(host), port)
        except LocalError as e:
            fail(str(e), "run")
        ports = [*(f"{'client ' if client else ''}{s}" for s in sockets),
                 *(f"tap {t}" for t in taps)]
        what = (f"serving {', '.join(ports)} ({'reflect' if reflect else 'switch'})"
                + (f"; metrics on {_host(metrics.address[0])}:{metrics.address[1]}"
                   if metrics is not None and metrics.address else ""))
        log.info("%s; ready", what)
        sdnotify.ready(what)
        unfollow = _follow_connections(server, what)
        served = True
        if not stopped_by:
            server.run()
        unfollow()  # the connections closed at exit do not overwrite "stopping"
        signame = signal.Signals(stopped_by[0]).name if stopped_by else "stop"
        log.info("%s: stopping", signame)
        sdnotify.stopping(f"stopping ({signame})")
    finally:
        if metrics is not None:
            metrics.close()
        if server.workers is not None:
            server.workers.stop()  # no burst writes into a tap closed here
        for tap in tap_ports:
            tap.close()
        server.close()
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    if stats and served:
        doc: dict[str, Any] = {"schema": STATS_SCHEMA, "mode": "reflect" if reflect
                               else "switch", "datapath": info["datapath"],
                               "connections": server.opened_count}
        if reflect:
            doc["stats"] = totals.stats
        else:
            doc["switch"] = switch.describe()
        print(json.dumps(doc), file=sys.stderr, flush=True)
    if stopped_by and stopped_by[0] == signal.SIGINT:
        raise click.exceptions.Exit(Exit.INTERRUPTED)


class _ReflectTotals:
    """The reflectors' counters summed: each connection's are added when it closes (also
    at exit), so nothing of a closed connection is kept."""

    def __init__(self) -> None:
        # Every counter a reflector has, also when no front-end ever connected.
        self.stats: dict[str, int] = dict.fromkeys(ReflectNet().stats, 0)

    def fold(self, conn: Connection) -> None:
        if isinstance(conn.device, ReflectNet):
            for k, v in conn.device.stats.items():
                self.stats[k] = self.stats.get(k, 0) + v


def _port_source(server: Server, switch: Switch,
                 reflect: bool) -> Callable[[], list[dict[str, object]]]:
    """The ports' counters for metrics, read on the loop's thread."""
    if not reflect:
        return lambda: [p.describe() for p in switch.ports]

    def reflectors() -> list[dict[str, object]]:
        return [{"name": c.name, "kind": "vhost-user", **c.device.port_counters()}
                for c in server.connections if isinstance(c.device, ReflectNet)]
    return reflectors


def _follow_connections(server: Server, what: str) -> Callable[[], None]:
    """Keep the service manager's status line current (``systemctl status``) as
    front-ends come and go; returns what stops it."""
    def update(conn: Connection) -> None:
        n = len(server.connections)
        sdnotify.status(f"{what}; {n} front-end{'' if n == 1 else 's'} connected")

    def unfollow() -> None:
        server.on_connect.remove(update)
        server.on_disconnect.remove(update)

    server.on_connect.append(update)
    server.on_disconnect.append(update)
    return unfollow


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _nth_mac(base: bytes, n: int) -> bytes:
    """``base`` plus ``n`` in its last three octets (the NIC-specific part)."""
    low = (int.from_bytes(base[3:], "big") + n) & 0xFFFFFF
    return base[:3] + low.to_bytes(3, "big")
