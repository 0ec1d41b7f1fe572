"""Reading DPDK testpmd's printed statistics."""

from __future__ import annotations

import re
from dataclasses import dataclass

_ACCUMULATED = re.compile(
    r"Accumulated forward statistics for all ports\+*\s*"
    r"RX-packets:\s*(\d+)\s+RX-dropped:\s*(\d+)\s+RX-total:\s*(\d+)\s*"
    r"TX-packets:\s*(\d+)\s+TX-dropped:\s*(\d+)\s+TX-total:\s*(\d+)")


@dataclass(frozen=True)
class ForwardStats:
    rx_packets: int
    rx_dropped: int
    tx_packets: int
    tx_dropped: int


def accumulated_stats(output: str) -> ForwardStats:
    """The "Accumulated forward statistics for all ports" block testpmd prints on exit."""
    found = _ACCUMULATED.findall(output)
    if not found:
        raise AssertionError("testpmd printed no accumulated forward statistics:\n"
                             + output[-3000:])
    rx, rxd, _rxt, tx, txd, _txt = (int(v) for v in found[-1])
    return ForwardStats(rx, rxd, tx, txd)
