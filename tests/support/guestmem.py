"""The guest's MemTotal as the hot-plug tests wait for it."""

from __future__ import annotations

from pyvhost.lab.guest import GuestConsole


def wait_memtotal(console: GuestConsole, want_kb: int, timeout: float = 120) -> int:
    """Poll MemTotal until it equals ``want_kb`` (or the deadline passes): returns it."""
    return console.wait_mem_total(lambda kb: kb == want_kb, timeout)[0]
