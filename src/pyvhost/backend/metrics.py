"""Prometheus / OpenMetrics metrics of a running back-end (``pyvhost net --metrics``).

What is exported, all from the state ``pyvhost status --json`` shows (one source, so the
two always agree):

- ``pyvhost_build_info{version,datapath}``; ``pyvhost_connections`` (now),
  ``pyvhost_connections_opened_total`` / ``_closed_total``; per client-mode socket
  ``pyvhost_client_connected`` and ``pyvhost_client_connects_total``;
- per connection (label ``connection``, e.g. ``vm1.sock#3``): requests, NACKs, kicks,
  memory table updates (``pyvhost_memory_updates_total``), and what it holds now:
  ``pyvhost_memory_regions``, ``pyvhost_memory_mappings``, ``pyvhost_fds``;
- per queue (``connection``, ``queue``): ``pyvhost_queue_frames_total``,
  ``pyvhost_queue_bytes_total``, ``pyvhost_queue_errors_total`` (a guest broke it),
  ``pyvhost_queue_broken``;
- per port (``port``, ``kind``; a vhost-user port is named after its connection, a tap
  after its interface), from pyvhost's side as a switch counts: ``rx`` is what pyvhost
  received from the port (the guest transmitted it), ``tx`` what it sent out of the port:
  ``pyvhost_port_{rx,tx}_{frames,bytes}_total`` and
  ``pyvhost_port_drops_total{direction,reason}``;
- ``pyvhost_memory_update_seconds{request}``: a histogram of the time from a memory table
  request taken off the socket to the new table in force, over every connection;
- ``process_*`` (prometheus-client's process collector: resident memory, open fds, CPU).

Threads: the HTTP server answers on threads of its own, and the server loop owns every
object read here. A scrape therefore asks the loop for a snapshot
(:meth:`~.loop.SelectorLoop.call_from_thread`: taken between two turns of the loop, plain
data, waited for at most :data:`SCRAPE_TIMEOUT` seconds) and builds the metric families
from that snapshot on its own thread. A loop that does not answer fails the scrape (HTTP
500), which Prometheus records as the target being down. The histogram is
prometheus-client's own (thread-safe); the loop observes into it.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)

from pyvhost.errors import LocalError

from .buildinfo import build_info
from .connection import Connection, update_seconds
from .server import Server

#: Seconds a scrape waits for the server loop's snapshot.
SCRAPE_TIMEOUT = 5.0
#: Buckets of the memory update histogram, in seconds: pyvhost takes 0.1-1 ms for a
#: table of a few regions; a loaded machine or 509 regions take longer.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                   0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

#: A port's counters as :meth:`pyvhost.switch.PortCounters.as_dict` gives them, with its
#: ``name`` and ``kind``: rx_frames, rx_bytes, tx_frames, tx_bytes, rx_drops and tx_drops
#: (reason -> count).
PortRecord = Mapping[str, Any]
PortSource = Callable[[], Iterable[PortRecord]]


class MetricsError(LocalError):
    """The metrics endpoint can not be served (bad address, port in use)."""


def parse_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``127.0.0.1:9478``, ``[::1]:9478``, ``localhost:9478``; port 0 picks
    a free one) -> ``(host, port)``. Raises ValueError with the reason."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} is not HOST:PORT (for example 127.0.0.1:9478, "
                         "[::1]:9478, or 0.0.0.0:9478 for every address)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{value!r}: write an IPv6 address in brackets, [{host}]:PORT")
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"{value!r}: no host before the port")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: the port must be a number from 0 to 65535")
    return host, int(port_text)


def _labels(**kv: object) -> dict[str, str]:
    return {k: str(v) for k, v in kv.items()}


def families(state: Mapping[str, Any], ports: Iterable[PortRecord],
             info: Mapping[str, str]) -> list[Metric]:
    """The metric families of one snapshot: ``state`` as :meth:`Server.describe` gives
    it, the ports' counters, the build info. A pure function of plain data."""
    out: list[Metric] = [InfoMetricFamily("pyvhost_build", "pyvhost's version and the "
                                          "data path serving the queues", value=dict(info))]
    conns = list(state.get("connections", []))
    g = GaugeMetricFamily("pyvhost_connections", "Front-end connections served now")
    g.add_metric([], len(conns))
    out.append(g)
    for key, what in (("connections_opened", "opened"), ("connections_closed", "closed")):
        c = CounterMetricFamily(f"pyvhost_{key}", f"Front-end connections {what} since start")
        c.add_metric([], int(state.get(key, 0)))
        out.append(c)

    connected = GaugeMetricFamily("pyvhost_client_connected", "1 when the client-mode "
                                  "socket (--client) has a connection", labels=["socket"])
    connects = CounterMetricFamily("pyvhost_client_connects", "Connections made to a "
                                   "client-mode socket", labels=["socket"])
    for client in state.get("clients", []):
        connected.add_metric([str(client["path"])], client["state"] == "connected")
        connects.add_metric([str(client["path"])], int(client["connects"]))
    out += [connected, connects]

    per_conn = {
        "requests": CounterMetricFamily("pyvhost_requests", "vhost-user requests handled",
                                        labels=["connection"]),
        "nacks": CounterMetricFamily("pyvhost_nacks", "vhost-user requests refused (NACK "
                                     "or close)", labels=["connection"]),
        "kicks": CounterMetricFamily("pyvhost_kicks", "Kicks (eventfd wake-ups) served",
                                     labels=["connection"]),
        "memory_updates": CounterMetricFamily("pyvhost_memory_updates", "Memory table "
                                              "changes (SET_MEM_TABLE, ADD/REM_MEM_REG)",
                                              labels=["connection"]),
    }
    held = {
        "regions": GaugeMetricFamily("pyvhost_memory_regions", "Regions in the memory "
                                     "table", labels=["connection"]),
        "mappings": GaugeMetricFamily("pyvhost_memory_mappings", "Guest memory mappings "
                                      "held (the table's, and removed ones still read)",
                                      labels=["connection"]),
        "fds": GaugeMetricFamily("pyvhost_fds", "File descriptors held: the socket, "
                                 "eventfds, one per mapping", labels=["connection"]),
    }
    qlabels = ["connection", "queue"]
    queue = {
        "frames": CounterMetricFamily("pyvhost_queue_frames", "Frames through the queue "
                                      "(taken from a transmit queue, written into a "
                                      "receive queue)", labels=qlabels),
        "bytes": CounterMetricFamily("pyvhost_queue_bytes", "Bytes of those frames "
                                     "(Ethernet frames, no virtio-net header)",
                                     labels=qlabels),
        "errors": CounterMetricFamily("pyvhost_queue_errors", "Times the guest broke the "
                                      "queue (bad descriptor, address outside memory)",
                                      labels=qlabels),
    }
    broken = GaugeMetricFamily("pyvhost_queue_broken", "1 while the queue is broken "
                               "(until the front-end sets it up again)", labels=qlabels)
    for conn in conns:
        name = str(conn["name"])
        counters = conn.get("counters", {})
        for key, family in per_conn.items():
            family.add_metric([name], int(counters.get(key, 0)))
        for key, gauge in held.items():
            gauge.add_metric([name], int(conn.get("held", {}).get(key, 0)))
        for q in conn.get("queues", []):
            labels = [name, str(q["index"])]
            for key, family in queue.items():
                family.add_metric(labels, int(q.get(key, 0)))
            broken.add_metric(labels, q.get("broken") is not None)
    out += [*per_conn.values(), *held.values(), *queue.values(), broken]

    plabels = ["port", "kind"]
    port_counters = {
        key: CounterMetricFamily(f"pyvhost_port_{key}", doc, labels=plabels)
        for key, doc in (
            ("rx_frames", "Frames pyvhost received from the port (its guest or tap sent them)"),
            ("rx_bytes", "Bytes of those frames (Ethernet, no virtio-net header)"),
            ("tx_frames", "Frames pyvhost sent out of the port (to its guest or tap)"),
            ("tx_bytes", "Bytes of those frames (Ethernet, no virtio-net header)"))}
    drops = CounterMetricFamily("pyvhost_port_drops", "Frames dropped at the port, by "
                                "direction and reason", labels=[*plabels, "direction",
                                                                 "reason"])
    for port in ports:
        labels = [str(port["name"]), str(port.get("kind", ""))]
        for key, family in port_counters.items():
            family.add_metric(labels, int(port.get(key, 0)))
        for direction in ("rx", "tx"):
            for reason, n in sorted(port.get(f"{direction}_drops", {}).items()):
                drops.add_metric([*labels, direction, str(reason)], int(n))
    out += [*port_counters.values(), drops]
    return out


class BackendCollector:
    """A prometheus-client collector over a :class:`Server` (and its ports)."""

    def __init__(self, server: Server, ports: PortSource | None = None, *,
                 timeout: float = SCRAPE_TIMEOUT) -> None:
        self.server = server
        self.ports = ports
        self.timeout = timeout

    def _snapshot(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """On the loop's thread: plain data, safe to read on another thread."""
        ports = [dict(p) for p in self.ports()] if self.ports is not None else []
        return self.server.describe(), ports

    def describe(self) -> Iterable[Metric]:
        # Registering must not take a snapshot (the loop may not run yet).
        return ()

    def collect(self) -> Iterator[Metric]:
        state, ports = self.server.call_from_thread(self._snapshot, self.timeout)
        yield from families(state, ports, build_info())


class Metrics:
    """The registry of one back-end: the snapshot collector, the memory update latency
    histogram (observed on the loop's thread through :attr:`Server.on_memory_update`),
    and prometheus-client's process collector; :meth:`serve` starts the HTTP endpoint."""

    def __init__(self, server: Server, ports: PortSource | None = None) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(BackendCollector(server, ports))
        ProcessCollector(registry=self.registry)
        self.latency = Histogram(
            "pyvhost_memory_update_seconds", "Time from a memory table request taken off "
            "the socket to the new table in force (fds closed, before the reply)",
            ["request"], registry=self.registry, buckets=LATENCY_BUCKETS)
        server.on_memory_update.append(self._observe)
        self._httpd: Any = None
        self.address: tuple[str, int] | None = None

    def _observe(self, conn: Connection, record: dict[str, object]) -> None:
        self.latency.labels(str(record["request"])).observe(update_seconds(record))

    def serve(self, host: str, port: int) -> tuple[str, int]:
        """Serve ``/metrics`` (OpenMetrics when the scraper asks for it, else the
        Prometheus text format) on ``host:port`` from a daemon thread. Returns the bound
        address (the port chosen when ``port`` was 0)."""
        try:
            httpd, _thread = start_http_server(port, addr=host, registry=self.registry)
        except socket.gaierror as e:
            raise MetricsError(f"--metrics {host}:{port}: can not resolve {host!r}: "
                               f"{e.strerror}") from e
        except OSError as e:
            why = ("the port is in use" if e.errno == errno.EADDRINUSE
                   else e.strerror or str(e))
            raise MetricsError(f"--metrics {host}:{port}: can not listen: {why}") from e
        self._httpd = httpd
        bound = httpd.server_address
        self.address = (str(bound[0]), int(bound[1]))
        return self.address

    def close(self) -> None:
        """Stop the HTTP endpoint (before the server loop closes). Idempotent."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
