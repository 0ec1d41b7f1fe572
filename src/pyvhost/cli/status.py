"""``pyvhost status``: ask a running back-end (``pyvhost net --control PATH``) for its state.

It prints tables for people (connections with their dirty logging, each one's memory
table, dirty log, queues and counters, and the switch's ports and MAC table when there is
a switch) or, with ``--json``, the back-end's answer as one ``pyvhost.status/1`` document
(the back-end's own fields, plus ``schema``). What the control socket answers is input
from another process: every field is shown as found, checked for type before it is
formatted, never trusted to exist.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pyvhost.backend.control import fetch_status
from pyvhost.units import MiB

from .common import configure_logging, console, emit_json, fail, json_option, verbosity
from .sockets import connect_failure

SCHEMA = "pyvhost.status/1"
HINT = "is the back-end running with --control PATH?"


@click.command()
@click.argument("control", metavar="CONTROL_SOCKET")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=5.0,
              show_default=True, help="Seconds to wait for the back-end's answer.")
@json_option(help="Print the back-end's state as one JSON object (schema pyvhost.status/1).")
@verbosity
def status(control: str, timeout: float, as_json: bool) -> None:
    """Show a running back-end's connections, memory tables, queues and counters (and
    the switch's ports and MAC table).

    \b
    Start the back-end with a control socket, then ask it:
        pyvhost net --socket /tmp/vh0.sock --reflect --control /tmp/pyvhost.ctl &
        pyvhost status /tmp/pyvhost.ctl
    \b
    Exit codes: 0 shown, 2 usage error or cannot connect (nothing at the path, not a
    socket, nobody listening, no answer, not a pyvhost back-end), 130 interrupted.
    """
    configure_logging()
    try:
        state = fetch_status(control, timeout=timeout)
    except TimeoutError:
        fail(f"{control}: no answer within {timeout:g} s (is it a pyvhost control "
             f"socket?)", "connect")
    except OSError as e:
        fail(connect_failure(control, "control socket", HINT, e), "connect")
    except ValueError as e:
        fail(f"{control}: not a pyvhost back-end's control socket: {e}", "connect")
    if as_json:
        emit_json({**state, "schema": SCHEMA})
        return
    print_status(state, console())


# -- formatting -----------------------------------------------------------------------
def _cell(value: Any) -> str:
    """A field as table text, whatever its type (the answer is not trusted)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        return ", ".join(_cell(v) for v in value) or "-"
    return str(value)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _hex(value: Any) -> str:
    n = _int(value)
    return _cell(value) if n is None else f"{n:#x}"


def _size(value: Any) -> str:
    n = _int(value)
    if n is None:
        return _cell(value)
    return f"{n / MiB:g} MiB" if n >= MiB else f"{n} B"


def _dicts(value: Any) -> list[dict[str, Any]]:
    """The objects of a list field (anything else in it is skipped)."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _table(title: str, columns: Iterable[str], rows: Iterable[Iterable[str]],
           right: Iterable[str] = ()) -> Table:
    """A table whose title, headers and cells are plain text: a ``[`` in a name the
    back-end sent must not be read as rich markup."""
    table = Table(title=Text(title), title_justify="left")
    right = set(right)
    for col in columns:
        table.add_column(Text(col), justify="right" if col in right else "left")
    for row in rows:
        table.add_row(*map(Text, row))
    return table


def _counter_table(title: str, counters: dict[str, Any]) -> Table:
    """One row of counters, a column each (new counters show up as new columns)."""
    names = [str(k) for k in counters]
    return _table(title, names, [[_cell(v) for v in counters.values()]], right=names)


def print_status(state: dict[str, Any], out: Console) -> None:
    """The human view of a control socket's answer."""
    listening = state.get("listening")
    out.print(Text(f"back-end pid {_cell(state.get('pid'))}"
                   + (f", listening on {_cell(listening)}" if listening else "")))
    clients = _dicts(state.get("clients"))
    if clients:  # client mode (pyvhost net --client): connected or waiting
        out.print(_table(
            "client sockets (pyvhost connects to the front-end)",
            ("socket", "state", "connection", "connects", "failed attempts", "reason",
             "retry in s"),
            ([_cell(c.get(k)) for k in ("path", "state", "connection", "connects",
                                        "failed_attempts", "reason", "retry_in")]
             for c in clients), right=("connects", "failed attempts", "retry in s")))
    connections = _dicts(state.get("connections"))
    if not connections:
        out.print("no front-end connected")
    else:
        out.print(_table(
            "connections",
            ("connection", "front-end pid", "phase", "status", "features",
             "protocol features", "regions", "table generation", "last table update",
             "dirty log"),
            ([_cell(c.get("name")), _cell(c.get("peer_pid")), _cell(c.get("phase")),
              _hex(c.get("status")), _hex(c.get("features")),
              _cell(c.get("protocol_features")), str(len(_dicts(c.get("memory")))),
              _cell(c.get("memory_generation")),
              _cell((c.get("last_memory_update") or {}).get("request")
                    if isinstance(c.get("last_memory_update"), dict) else None),
              _logging(c)]
             for c in connections),
            right=("front-end pid", "regions", "table generation")))
    for conn in connections:
        _print_connection(conn, out)
    switch = state.get("switch")
    if isinstance(switch, dict):
        _print_switch(switch, out)


def _update(record: dict[str, Any]) -> str:
    """A table update record: its request, generation and timing, from what it has."""
    text = f"{_cell(record.get('request'))} (generation {_cell(record.get('generation'))})"
    received, in_force = record.get("received"), record.get("in_force")
    if isinstance(received, (int, float)) and isinstance(in_force, (int, float)):
        text += f", in force after {(in_force - received) * 1e3:.3f} ms"
        cpu, waited = record.get("cpu_s"), record.get("waited_s")
        if isinstance(cpu, (int, float)) and isinstance(waited, (int, float)):
            text += (f" ({cpu * 1e3:.3f} ms CPU, {waited * 1e3:.3f} ms waiting for the "
                     "queues' bursts)")
    return text


def _worker(queue: dict[str, Any]) -> str:
    """The thread that serves a queue's kicks: a worker (``--workers`` > 1) or the main
    loop; ``-`` from a back-end that does not say."""
    if "worker" not in queue:
        return "-"
    return "main loop" if queue["worker"] is None else _cell(queue["worker"])


def _logging(conn: dict[str, Any]) -> str:
    """Whether the front-end has dirty logging on (VHOST_F_LOG_ALL acked: the VM is being
    live-migrated) and whether the back-end holds its log (SET_LOG_BASE)."""
    logging, held = conn.get("logging"), isinstance(conn.get("dirty_log"), dict)
    if not isinstance(logging, bool):
        return "-"  # a back-end from before dirty logging, or a hostile answer
    if logging:
        return "on" if held else "on (no log yet)"
    return "off (log held)" if held else "off"


def _print_dirty_log(name: str, log: dict[str, Any], out: Console) -> None:
    atomic = log.get("atomic")
    marking = ("atomic fetch-or" if atomic is True else
               "read-modify-write" if atomic is False else _cell(atomic))
    out.print(Text(
        f"{name}: dirty log {_size(log.get('mmap_size'))} at offset "
        f"{_hex(log.get('mmap_offset'))}, covers {_size(log.get('covers'))} of guest "
        f"memory; {_cell(log.get('marks'))} ranges marked, {_cell(log.get('overflows'))} "
        f"past its end; marks by {marking}; fds held {_cell(log.get('fds_held'))}"))


def _print_connection(conn: dict[str, Any], out: Console) -> None:
    name = _cell(conn.get("name"))
    log = conn.get("dirty_log")
    if isinstance(log, dict):
        _print_dirty_log(name, log, out)
    out.print(_table(
        f"{name}: memory table (generation {_cell(conn.get('memory_generation'))})",
        ("GPA start", "GPA end", "size", "front-end VA", "mmap offset", "fds held",
         "writes", "bytes written"),
        ([_hex(r.get("guest_phys_addr")),
          _hex((_int(r.get("guest_phys_addr")) or 0) + (_int(r.get("memory_size")) or 0)),
          _size(r.get("memory_size")), _hex(r.get("userspace_addr")),
          _hex(r.get("mmap_offset")), _cell(r.get("fds_held")), _cell(r.get("writes")),
          _cell(r.get("bytes_written"))] for r in _dicts(conn.get("memory"))),
        right=("GPA start", "GPA end", "size", "front-end VA", "mmap offset", "fds held",
               "writes", "bytes written")))
    for which in ("last", "slowest"):
        update = conn.get(f"{which}_memory_update")
        if isinstance(update, dict):
            out.print(Text(f"{name}: {which} table update: {_update(update)}"))
    queues = _dicts(conn.get("queues"))
    if queues:
        out.print(_table(
            f"{name}: queues",
            ("queue", "size", "started", "enabled", "last avail idx", "used idx", "broken",
             "worker"),
            ([*(_cell(q.get(k)) for k in ("index", "size", "started", "enabled",
                                          "last_avail_idx", "used_idx", "broken")),
              _worker(q)]
             for q in queues),
            right=("queue", "size", "last avail idx", "used idx")))
    counters = conn.get("counters")
    if isinstance(counters, dict) and counters:
        out.print(_counter_table(f"{name}: requests", counters))
    device = conn.get("device")
    if isinstance(device, dict):
        tables = ("counters", "stats")
        plain = {k: v for k, v in device.items() if k not in tables}
        out.print(Text(f"{name}: device "
                       + ", ".join(f"{k} {_cell(v)}" for k, v in plain.items())))
        for key in tables:
            inner = device.get(key)
            if isinstance(inner, dict) and inner:
                out.print(_counter_table(f"{name}: device {key}", inner))


_PORT_COLUMNS = ("port", "kind", "MAC", "rx frames", "rx bytes", "tx frames", "tx bytes",
                 "rx drops", "tx drops")
_PORT_KEYS = ("name", "kind", "mac", "rx_frames", "rx_bytes", "tx_frames", "tx_bytes",
              "rx_drops", "tx_drops")


def _print_switch(switch: dict[str, Any], out: Console) -> None:
    numbers = ("rx frames", "rx bytes", "tx frames", "tx bytes")
    out.print(_table("switch ports", _PORT_COLUMNS,
                     ([_cell(p.get(k)) for k in _PORT_KEYS] for p in _dicts(switch.get("ports"))),
                     right=numbers))
    out.print(_table(f"MAC table (aging {_cell(switch.get('mac_aging'))} s)",
                     ("MAC", "port", "age s"),
                     ([_cell(e.get(k)) for k in ("mac", "port", "age")]
                      for e in _dicts(switch.get("mac_table"))), right=("age s",)))
    departed = _dicts(switch.get("departed"))
    if departed:
        out.print(_table("departed ports (final counters)", _PORT_COLUMNS,
                         ([_cell(p.get(k)) for k in _PORT_KEYS] for p in departed),
                         right=numbers))
