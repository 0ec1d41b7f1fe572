"""Long runs: what a back-end holds, cycle by cycle, and how fast it grows.

:class:`Series` keeps one measurement per hot-plug cycle (the process's fds, its fds on
our region files, its mappings of them, the bytes mapped) and gives each one's growth per
1,000 cycles: the least-squares slope of the series, times 1,000. A back-end that leaks one
fd every 100 cycles shows +10 per 1,000 cycles; one that holds steady shows 0 even when a
measurement catches it mid-update. Pure arithmetic; the plot is :mod:`.plot`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyvhost.tools.procfs import ProcessUsage

MEASURES = ("fds", "region_fds", "mappings", "mapped_bytes")


def slope(xs: list[int], ys: list[int]) -> float:
    """Least-squares slope of ``ys`` over ``xs``; 0 for fewer than two points."""
    n = len(xs)
    if n < 2 or n != len(ys):
        return 0.0
    mx = sum(xs) / n
    my = sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


@dataclass
class Series:
    """One row per measured cycle (cycle 0: before the first hot-plug)."""

    cycle: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    region_fds: list[int] = field(default_factory=list)
    mappings: list[int] = field(default_factory=list)
    mapped_bytes: list[int] = field(default_factory=list)

    def add(self, cycle: int, usage: ProcessUsage) -> None:
        self.cycle.append(cycle)
        self.fds.append(usage.fds)
        self.region_fds.append(usage.matching_fds)
        self.mappings.append(usage.mappings)
        self.mapped_bytes.append(usage.mapped_bytes)

    def __len__(self) -> int:
        return len(self.cycle)

    def column(self, name: str) -> list[int]:
        if name not in MEASURES:
            raise KeyError(name)
        values: list[int] = getattr(self, name)
        return values

    def per_1000(self) -> dict[str, float]:
        """Growth of each measure per 1,000 cycles (least-squares slope x 1,000)."""
        return {name: round(1000 * slope(self.cycle, self.column(name)), 3)
                for name in MEASURES}

    def to_json(self) -> dict[str, list[int]]:
        return {"cycle": list(self.cycle), **{n: list(self.column(n)) for n in MEASURES}}


__all__ = ["MEASURES", "Series", "slope"]
