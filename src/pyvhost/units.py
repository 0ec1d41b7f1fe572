"""Sizes: the binary units pyvhost reads from people and writes for them.

One parser for every size a person types (``--size 1G``, ``--hotplug 6x128M``,
``--region-size 2M``): binary units, as QEMU's ``-m`` and ``size=`` take them, a
fraction allowed where the result is a whole number of bytes (``1.5G``), as QEMU's
``qemu_strtosz`` allows. And the two ways sizes are printed: for people (``128 MiB``)
and for QEMU's command line (``128M``). Nothing here knows about guests or hot-plug.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_UNITS = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``4096``, ``512K``, ``2M``, ``2MiB``, ``1G``, ``1.5G``: bytes, binary units.

    A fraction must come to a whole number of bytes (``1.5G`` does; ``0.3K`` does not),
    so that what is asked is what QEMU is told.
    """
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size (examples: 4096, 512K, 2M, 1G, 1.5G)")
    try:
        value = Decimal(match.group(1)) * _UNITS[match.group(2).lower()]
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
        raise ValueError(f"{text!r} is not a size") from None
    if value != value.to_integral_value():
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value)


def mib(n: int | None) -> str:
    """``n`` bytes for people: ``128 MiB``, ``0.5 MiB``; ``-`` for unknown."""
    return "-" if n is None else f"{n / MiB:g} MiB"


def human(n: int) -> str:
    """``n`` bytes in the largest binary unit that divides it: ``2 MiB``, ``4097 bytes``."""
    for unit, name in ((TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} bytes"


def qemu_size(n: int) -> str:
    """``n`` bytes as QEMU's command line takes them (``128M``); must be whole MiB."""
    if n % MiB:
        raise ValueError(f"{n} is not a whole number of MiB")
    return f"{n // MiB}M"
