"""``pyvhost net --metrics``: Prometheus / OpenMetrics scraped during real traffic (DPDK
testpmd ``txonly`` -> a 2-port switch -> testpmd ``rxonly``), counters that grow and agree
with ``pyvhost status --json``; the address parser and the families built from a state."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyvhost import __version__, datapath
from pyvhost.backend.metrics import families, parse_address
from pyvhost.tools.process import pyvhost_argv
from pyvhost.tools.procfs import count_fds, mappings
from support.procs import Procs, Started

from .conftest import TIMEOUT, Samples, fetch, metrics_url, samples, scrape, start_net, value
from .conftest import wait_listening as wait_net

SOURCE_MAC, SINK_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"
PORT_COUNTERS = ("rx_frames", "rx_bytes", "tx_frames", "tx_bytes")


def _status(ctl: Path) -> dict[str, Any]:
    done = subprocess.run(pyvhost_argv("status", "--json", str(ctl)), capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    state: dict[str, Any] = json.loads(done.stdout)
    return state


def _conn(state: dict[str, Any], socket_name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in state["connections"]
                                   if c["name"].startswith(socket_name + "#")]
    assert len(found) == 1, state["connections"]
    return found[0]


def _port_metrics(got: Samples, port: str) -> dict[str, float]:
    return {k: value(got, f"pyvhost_port_{k}_total", port=port, kind="vhost-user")
            for k in PORT_COUNTERS}


def _queue_metrics(got: Samples, conn: str, queue: int) -> tuple[float, float]:
    return (value(got, "pyvhost_queue_frames_total", connection=conn, queue=str(queue)),
            value(got, "pyvhost_queue_bytes_total", connection=conn, queue=str(queue)))


def _settled_fds(pid: int, expected: int | None) -> int:
    """The process's fd count once a scrape's connection is closed: the count seen twice
    in a row (or until it is ``expected``; fails at the deadline)."""
    deadline = time.monotonic() + TIMEOUT
    last = -1
    while True:
        n = count_fds(pid)
        if n == expected or (expected is None and n == last):
            return n
        assert time.monotonic() < deadline, f"{n} fds, expected {expected}"
        last = n
        time.sleep(0.2)


def _enter(p: Started) -> None:
    p.send("")
    assert p.proc.wait(TIMEOUT) == 0, p.output()[-3000:]


def _quiet(url: str, port: str) -> Samples:
    """Scrapes until ``port``'s counters stop moving (the switch forwarded what was left)."""
    deadline = time.monotonic() + TIMEOUT
    last = scrape(url)
    while True:
        time.sleep(0.5)
        got = scrape(url)
        if _port_metrics(got, port) == _port_metrics(last, port):
            return got
        assert time.monotonic() < deadline, "the switch did not go quiet"
        last = got


@pytest.mark.dpdk
def test_scrape_during_traffic_grows_and_matches_status(procs: Procs, short_dir: Path) -> None:
    a, b, ctl = short_dir / "a.sock", short_dir / "b.sock", short_dir / "ctl.sock"
    sw = start_net(procs, "--socket", str(a), "--socket", str(b), "--control", str(ctl),
                   "--metrics", "127.0.0.1:0")
    wait_net(sw, a, b, ctl)
    url = metrics_url(sw)
    scrape(url)
    base_fds = _settled_fds(sw.pid, None)  # listeners, loop, log: before any front-end
    sink = procs.testpmd(f"net_virtio_user0,path={b},queues=1,mac={SINK_MAC}",
                         "--forward-mode=rxonly", name="sink", eal_args=("--main-lcore", "1"))
    sink.wait_output("Press enter to exit")
    source = procs.testpmd(f"net_virtio_user0,path={a},queues=1,mac={SOURCE_MAC}",
                           "--forward-mode=txonly", f"--eth-peer=0,{SINK_MAC}", name="source")
    source.wait_output("Press enter to exit")

    deadline = time.monotonic() + TIMEOUT
    while True:  # until frames went through to the sink
        state = _status(ctl)
        if len(state["connections"]) == 2 and _conn(state, "b.sock")["queues"][0]["frames"]:
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    pa, pb = _conn(state, "a.sock")["name"], _conn(state, "b.sock")["name"]

    # During traffic: a scrape, the status, a scrape. Every counter of the status lies
    # between the two scrapes, and the second scrape is ahead of the first.
    first = scrape(url)
    state = _status(ctl)
    second = scrape(url)
    during = fetch(url)[1]  # shown at the end (pytest -s)
    ports = {p["name"]: p for p in state["switch"]["ports"]}
    for port in (pa, pb):
        m1, m2 = _port_metrics(first, port), _port_metrics(second, port)
        for k in PORT_COUNTERS:
            assert m1[k] <= ports[port][k] <= m2[k], (port, k, m1, ports[port], m2)
    assert _port_metrics(second, pa)["rx_frames"] > _port_metrics(first, pa)["rx_frames"]
    assert _port_metrics(second, pb)["tx_frames"] > _port_metrics(first, pb)["tx_frames"]
    for conn, queue in ((pa, 1), (pb, 0)):
        q = _conn(state, conn.split("#")[0])["queues"][queue]
        (f1, b1), (f2, b2) = _queue_metrics(first, conn, queue), _queue_metrics(second, conn,
                                                                                 queue)
        assert f1 <= q["frames"] <= f2 and b1 <= q["bytes"] <= b2, (conn, queue, q)
    # txonly sends 64-byte frames.
    assert _queue_metrics(second, pa, 1)[1] == 64 * _queue_metrics(second, pa, 1)[0]

    # The source stops; once the switch is quiet, metrics and status agree exactly.
    _enter(source)
    quiet = _quiet(url, pb)
    state = _status(ctl)
    again = scrape(url)
    assert _port_metrics(again, pb) == _port_metrics(quiet, pb)
    assert [c["name"] for c in state["connections"]] == [pb]
    port_b = next(p for p in state["switch"]["ports"] if p["name"] == pb)
    assert _port_metrics(again, pb) == {k: port_b[k] for k in PORT_COUNTERS}
    for reason, n in port_b["tx_drops"].items():
        assert value(again, "pyvhost_port_drops_total", port=pb, kind="vhost-user",
                     direction="tx", reason=reason) == n
    conn_b = _conn(state, "b.sock")
    for q in conn_b["queues"]:
        assert _queue_metrics(again, pb, q["index"]) == (q["frames"], q["bytes"])
        assert value(again, "pyvhost_queue_errors_total", connection=pb,
                     queue=str(q["index"])) == q["errors"] == 0
    assert port_b["tx_frames"] == conn_b["queues"][0]["frames"]
    for key in ("regions", "mappings", "fds"):
        name = f"pyvhost_memory_{key}" if key != "fds" else "pyvhost_fds"
        assert value(again, name, connection=pb) == conn_b["held"][key] > 0, key
    # What the connection says it holds is what the process holds, from /proc: the
    # mappings of DPDK's memory (memfds), and the fds beyond those it had before.
    memfd_maps = [mp for mp in mappings(sw.pid) if mp.path.startswith("/memfd:")]
    assert len(memfd_maps) == conn_b["held"]["mappings"], memfd_maps
    _settled_fds(sw.pid, base_fds + conn_b["held"]["fds"])
    assert value(again, "pyvhost_memory_updates_total", connection=pb) == \
        conn_b["counters"]["memory_updates"] >= 1
    assert value(again, "pyvhost_requests_total", connection=pb) == \
        conn_b["counters"]["requests"]
    assert value(again, "pyvhost_connections") == 1
    assert value(again, "pyvhost_connections_opened_total") == \
        state["connections_opened"] == 2
    assert value(again, "pyvhost_connections_closed_total") == \
        state["connections_closed"] == 1
    # Both connections' SET_MEM_TABLE are in the latency histogram (DPDK sends no
    # ADD_MEM_REG), the closed one's too.
    assert value(again, "pyvhost_memory_update_seconds_count", request="SET_MEM_TABLE") >= 2
    assert value(again, "pyvhost_build_info", version=__version__,
                 datapath=datapath.name()) == 1
    assert value(again, "process_open_fds") > 0
    print("\nscraped during traffic:\n" + "\n".join(
        line for line in during.splitlines()
        if line.startswith(("pyvhost_port_", "pyvhost_queue_frames", "pyvhost_fds",
                            "pyvhost_memory_update_seconds_count", "pyvhost_build",
                            "pyvhost_memory_regions", "pyvhost_connections"))))

    # OpenMetrics when the scraper asks for it.
    content_type, text = fetch(url, openmetrics=True)
    assert content_type.startswith("application/openmetrics-text"), content_type
    assert text.rstrip().endswith("# EOF")
    _enter(sink)
    assert procs.stop(sw) == 0, sw.output()[-3000:]


@pytest.mark.parametrize(("text", "want"), [
    ("127.0.0.1:9478", ("127.0.0.1", 9478)),
    ("localhost:0", ("localhost", 0)),
    ("[::1]:9478", ("::1", 9478)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)),
])
def test_parse_address(text: str, want: tuple[str, int]) -> None:
    assert parse_address(text) == want


@pytest.mark.parametrize("text", ["9478", ":9478", "[]:1", "::1:9478", "host:", "host:-1",
                                  "host:65536", "host:x", "a b:1"])
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def test_families_of_a_state_render_as_text() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    state = {"connections": [{
        "name": "vm1.sock#1", "counters": {"requests": 20, "nacks": 1, "kicks": 7,
                                           "memory_updates": 3},
        "held": {"regions": 2, "mappings": 3, "fds": 9},
        "queues": [{"index": 0, "frames": 5, "bytes": 300, "errors": 0, "broken": None},
                   {"index": 1, "frames": 6, "bytes": 360, "errors": 1, "broken": "bad"}]}],
        "connections_opened": 4, "connections_closed": 3,
        "clients": [{"path": "/run/q.sock", "state": "waiting", "connects": 2}]}
    ports = [{"name": "vm1.sock#1", "kind": "vhost-user", "rx_frames": 6, "rx_bytes": 360,
              "tx_frames": 5, "tx_bytes": 300, "rx_drops": {"malformed": 2},
              "tx_drops": {}}]

    class Fixed:
        def collect(self) -> list[Any]:
            return families(state, ports, {"version": "9", "datapath": "python"})

    registry = CollectorRegistry()
    registry.register(Fixed())
    got = samples(text_string_to_metric_families(generate_latest(registry).decode()))
    assert value(got, "pyvhost_connections") == 1
    assert value(got, "pyvhost_connections_closed_total") == 3
    assert value(got, "pyvhost_client_connected", socket="/run/q.sock") == 0
    assert value(got, "pyvhost_nacks_total", connection="vm1.sock#1") == 1
    assert value(got, "pyvhost_memory_mappings", connection="vm1.sock#1") == 3
    assert value(got, "pyvhost_queue_errors_total", connection="vm1.sock#1", queue="1") == 1
    assert value(got, "pyvhost_queue_broken", connection="vm1.sock#1", queue="1") == 1
    assert value(got, "pyvhost_queue_broken", connection="vm1.sock#1", queue="0") == 0
    assert value(got, "pyvhost_port_drops_total", port="vm1.sock#1", kind="vhost-user",
                 direction="rx", reason="malformed") == 2
    assert value(got, "pyvhost_build_info", version="9", datapath="python") == 1
