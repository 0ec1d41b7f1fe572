"""The MAC address table of a learning switch: which port a MAC address was last seen on.

Owns learning (a source MAC seen on a port), lookup (a destination MAC's port, unless its
entry aged out) and flushing (a port left). It knows ports only as opaque objects and never
touches a frame or a socket. Time comes from an injected clock so that tests can age
entries without sleeping.

Guest-controlled values: a MAC address is whatever 6 bytes a guest put in a frame. The
table holds at most ``max_entries`` of them (a guest sending from random source addresses
must not grow our memory without bound); when full, an unknown source is not learned and
its frames are still forwarded (flooded back to it, like a switch whose table is full).

Cost: ``_seen`` is kept in order of last sighting, oldest first, so :meth:`expire` stops
at the first live entry. A full table is then no lever for a guest: a frame from a new
source costs O(1), not a walk over every entry (which made each such frame cost about a
millisecond at 8192 entries, and stalled every other port of the switch with it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

P = TypeVar("P")

#: IEEE 802.1D's recommended default ageing time.
DEFAULT_AGING = 300.0
DEFAULT_MAX_ENTRIES = 8192


class MacTable(Generic[P]):
    """MAC address -> (port, last seen). ``now`` values come from ``clock``."""

    __slots__ = ("_port", "_seen", "aging", "clock", "max_entries", "version")

    def __init__(self, aging: float = DEFAULT_AGING, *,
                 clock: Callable[[], float] = time.monotonic,
                 max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if aging <= 0:
            raise ValueError(f"MAC aging time must be positive, not {aging}")
        self.aging = aging
        self.clock = clock
        self.max_entries = max_entries
        self._port: dict[bytes, P] = {}
        self._seen: dict[bytes, float] = {}
        #: Changes whenever a MAC's port does (learned, moved, aged out, flushed); not
        #: when a sighting only refreshes an entry. Equal versions: equal mappings.
        self.version = 0

    def __len__(self) -> int:
        return len(self._port)

    def learn(self, mac: bytes, port: P, now: float) -> bool:
        """Record that ``mac`` was the source of a frame from ``port``. Returns whether the
        entry is new or moved to another port. Group addresses are never learned."""
        if mac[0] & 1:
            return False
        old = self._port.get(mac)
        seen = self._seen
        if old is port:
            if seen[mac] != now:  # move to the end: the newest sighting (once per batch)
                del seen[mac]
                seen[mac] = now
            return False
        if old is None and len(self._port) >= self.max_entries:
            self.expire(now)
            if len(self._port) >= self.max_entries:
                return False
        self._port[mac] = port
        seen.pop(mac, None)
        seen[mac] = now
        self.version += 1
        return True

    def lookup(self, mac: bytes, now: float) -> P | None:
        """The port ``mac`` was last seen on, or None (unknown, or aged out)."""
        port = self._port.get(mac)
        if port is None:
            return None
        if now - self._seen[mac] > self.aging:
            del self._port[mac]
            del self._seen[mac]
            self.version += 1
            return None
        return port

    def seen(self, mac: bytes) -> float | None:
        """When ``mac`` was last seen (its entry aged or not), or None."""
        return self._seen.get(mac)

    def owner(self, mac: bytes) -> P | None:
        """The port ``mac`` is recorded on, aged or not (right after :meth:`learn` with the
        same ``now``, whether it was learned)."""
        return self._port.get(mac)

    def expire(self, now: float) -> int:
        """Drop every entry older than the aging time; returns how many. Looks at the
        entries oldest first and stops at the first live one (with a clock that never
        goes back, every older entry comes before it)."""
        old = []
        for mac, seen in self._seen.items():
            if now - seen <= self.aging:
                break
            old.append(mac)
        for mac in old:
            del self._port[mac]
            del self._seen[mac]
        if old:
            self.version += 1
        return len(old)

    def flush(self, port: P) -> int:
        """Forget every address learned on ``port`` (it left); returns how many."""
        gone = [mac for mac, p in self._port.items() if p is port]
        for mac in gone:
            del self._port[mac]
            del self._seen[mac]
        if gone:
            self.version += 1
        return len(gone)

    def entries(self, now: float) -> Iterator[tuple[bytes, P, float]]:
        """(mac, port, age in seconds) of every live entry."""
        for mac, port in list(self._port.items()):
            age = now - self._seen[mac]
            if age <= self.aging:
                yield mac, port, age
