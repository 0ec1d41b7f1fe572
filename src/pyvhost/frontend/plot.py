"""``--plot FILE.png``: the back-end's fds and mappings over hot-plug cycles.

matplotlib is an optional extra (``pip install 'pyvhost[plot]'``); without it this module
raises :class:`PlotUnavailableError` with that advice, and nothing else of pyvhost needs it.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from pyvhost.errors import LocalError

from .slope import Series


class PlotUnavailableError(LocalError):
    """matplotlib is not installed, or the file can not be written."""


def require() -> None:
    """Raise :class:`PlotUnavailableError` now if matplotlib is missing: a long run should
    not end in that error."""
    if importlib.util.find_spec("matplotlib") is None:
        raise PlotUnavailableError("--plot needs matplotlib: pip install 'pyvhost[plot]'")


def draw(series: Series, path: str | os.PathLike[str], title: str) -> None:
    """Two panels over cycles: fds (all, and on our region files), mappings of ours."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotUnavailableError("--plot needs matplotlib: pip install "
                                   "'pyvhost[plot]'") from e
    slopes = series.per_1000()
    fig: Any
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    top.plot(series.cycle, series.fds, label=f"open fds ({slopes['fds']:+g}/1000 cycles)")
    top.plot(series.cycle, series.region_fds,
             label=f"fds on our regions ({slopes['region_fds']:+g}/1000)")
    top.set_ylabel("fds")
    top.legend(loc="upper left")
    bottom.plot(series.cycle, series.mappings, color="tab:green",
                label=f"mappings of our regions ({slopes['mappings']:+g}/1000)")
    bottom.set_ylabel("mappings")
    bottom.set_xlabel("hot-plug cycle")
    bottom.legend(loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(os.fspath(path), dpi=100)
    except OSError as e:
        raise PlotUnavailableError(f"can not write {os.fspath(path)}: {e.strerror}") from e
    finally:
        plt.close(fig)


__all__ = ["PlotUnavailableError", "draw", "require"]
