"""``pyvhost status``: ask a running back-end (``--control PATH``) for its state."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from pyvhost.backend.control import fetch_status


def _mib(n: object) -> str:
    return f"{int(str(n)) / (1 << 20):g} MiB"


@click.command()
@click.argument("control", metavar="CONTROL_SOCKET")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON object.")
def status(control: str, as_json: bool) -> None:
    """Show a running back-end's ports, memory tables and counters.

    \b
    Start the back-end with a control socket, then ask it:
        pyvhost net --socket /tmp/vh0.sock --reflect --control /tmp/pyvhost.ctl &
        pyvhost status /tmp/pyvhost.ctl
    """
    try:
        state = fetch_status(control)
    except (OSError, ValueError) as e:
        raise click.ClickException(f"{control}: {e}") from e
    if as_json:
        click.echo(json.dumps(state, indent=2))
        return
    console = Console()
    listening = state.get("listening") or []
    assert isinstance(listening, list)
    console.print(f"back-end pid {state.get('pid')}"
                  + (f", listening on {', '.join(map(str, listening))}" if listening else ""))
    clients = state.get("clients", [])
    assert isinstance(clients, list)
    for client in clients:  # client mode (pyvhost net --client): connected or waiting
        detail = client.get("connection") or (
            f"{client.get('reason')}, {client.get('failed_attempts')} attempts")
        console.print(f"connecting to {client.get('path')}: {client.get('state')} "
                      f"({detail}; {client.get('connects')} connects so far)")
    connections = state.get("connections", [])
    assert isinstance(connections, list)
    if not connections:
        console.print("no front-end connected")
    for conn in connections:
        table = Table(title=f"{conn['name']} (front-end pid {conn['peer_pid']}, "
                            f"table generation {conn.get('memory_generation')})")
        for col in ("GPA start", "GPA end", "size", "front-end VA", "fds held"):
            table.add_column(col, justify="right")
        for r in conn["memory"]:
            gpa, size = r["guest_phys_addr"], r["memory_size"]
            table.add_row(f"{gpa:#x}", f"{gpa + size:#x}", _mib(size),
                          f"{r['userspace_addr']:#x}", str(r["fds_held"]))
        console.print(table)
        console.print(f"counters: {conn['counters']}  device: {conn.get('device')}")
