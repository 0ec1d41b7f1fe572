"""What this build of the back-end is: pyvhost's version and the data path that serves
the queues.

``pyvhost net`` logs both when it starts, and ``--metrics`` exports them as
``pyvhost_build_info``. The data path is :mod:`pyvhost.datapath`'s choice, made once at
import: ``compiled`` (the Cython extension) or ``python`` (the reference, also forced by
PYVHOST_PURE=1). Every place that shows the data path asks this module.
"""

from __future__ import annotations

from pyvhost import __version__, datapath


def datapath_name() -> str:
    """The name of the data path that serves the queues in this process."""
    return datapath.name()


def build_info() -> dict[str, str]:
    """``{"version": ..., "datapath": ...}``: for the start-up log line and metrics."""
    return {"version": __version__, "datapath": datapath_name()}
