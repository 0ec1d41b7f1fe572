"""What this build of the back-end is: pyvhost's version and the data path that serves
the queues.

``pyvhost net`` logs both when it starts, and ``--metrics`` exports them as
``pyvhost_build_info``. Today there is one data path, the reference one in Python
(:mod:`pyvhost.virtq`, the devices). A compiled data path reports itself here, in
:func:`datapath_name`, and nowhere else: every place that shows the data path asks this
module.
"""

from __future__ import annotations

from pyvhost import __version__

#: The reference data path: split virtqueues and devices in pure Python.
PYTHON = "python"


def datapath_name() -> str:
    """The name of the data path that serves the queues in this process."""
    return PYTHON


def build_info() -> dict[str, str]:
    """``{"version": ..., "datapath": ...}``: for the start-up log line and metrics."""
    return {"version": __version__, "datapath": datapath_name()}
