"""Helpers of the daemon tests: start ``pyvhost net`` as a real process (ended by pid),
wait until it listens (read from /proc/net/unix: no probing connection), find its metrics
endpoint in its log, and scrape it."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from pyvhost.tools.procfs import unix_listening
from support.procs import Procs, Started

#: Every wait ends by this deadline (seconds): a bound for a busy machine, never asserted.
TIMEOUT = 60.0
_METRICS_LINE = re.compile(r"metrics on (http://\S+/metrics)")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def start_net(procs: Procs, *args: str, name: str = "net",
              env: dict[str, str] | None = None) -> Started:
    return procs.pyvhost("net", *args, name=name, env=env)


def wait_listening(p: Started, *paths: Path, timeout: float = TIMEOUT) -> None:
    """Until every path has a listening socket (from /proc/net/unix)."""
    deadline = time.monotonic() + timeout
    while not all(unix_listening(path) for path in paths):
        assert p.proc.poll() is None, f"pyvhost net exited {p.proc.returncode}:\n{p.output()}"
        assert time.monotonic() < deadline, f"not listening on {paths}:\n{p.output()}"
        time.sleep(0.05)


def metrics_url(p: Started, timeout: float = TIMEOUT) -> str:
    """The URL ``pyvhost net --metrics`` logged (port 0 picks a free port)."""
    deadline = time.monotonic() + timeout
    while True:
        found = _METRICS_LINE.search(p.output())
        if found:
            return found.group(1)
        assert p.proc.poll() is None, f"pyvhost net exited {p.proc.returncode}:\n{p.output()}"
        assert time.monotonic() < deadline, f"no metrics line:\n{p.output()}"
        time.sleep(0.05)


def fetch(url: str, *, openmetrics: bool = False) -> tuple[str, str]:
    """(content type, body) of one scrape."""
    headers = {"Accept": "application/openmetrics-text; version=1.0.0"} if openmetrics else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                timeout=30) as r:
        return r.headers.get("Content-Type", ""), r.read().decode()


def scrape(url: str) -> Samples:
    """Every sample of one scrape (Prometheus text format), by name and labels."""
    _, text = fetch(url)
    return samples(text_string_to_metric_families(text))


def samples(families: Iterable[object]) -> Samples:
    out: Samples = {}
    for family in families:
        for s in family.samples:  # type: ignore[attr-defined]
            out[s.name, frozenset(s.labels.items())] = float(s.value)
    return out


def value(got: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in got, f"no sample {name}{labels}; have: " + ", ".join(
        sorted(f"{n}{dict(lb)}" for n, lb in got if n == name))
    return got[key]
