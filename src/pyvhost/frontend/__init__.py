"""A front-end that plays QEMU's part, and the leak probe built on it.

- :mod:`.memory`     guest RAM: memfd (or file) backed shared mappings placed at GPAs
- :mod:`.frontend`   :class:`Frontend`, a blocking vhost-user client sending what QEMU 7.2 sends
- :mod:`.probe`      hot-plug cycles against a back-end, measured before and after

The command ``pyvhost probe`` is :mod:`pyvhost.cli.probe`; the process meter it reads
(fds and mappings by pid) is :mod:`pyvhost.tools.procfs`.
"""

from .errors import (
    BackendClosedError,
    BackendError,
    BackendTimeoutError,
    FrontendConnectError,
    FrontendUsageError,
    NackError,
)
from .frontend import Frontend, Negotiated, Vring
from .memory import FrontendMemory, GuestMemoryError, GuestRam
from .probe import LatencyStats, ProbeConfig, ProbeError, ProbeReport, run_probe

__all__ = ["BackendClosedError", "BackendError", "BackendTimeoutError", "Frontend",
           "FrontendConnectError", "FrontendMemory", "FrontendUsageError", "GuestMemoryError",
           "GuestRam", "LatencyStats", "NackError", "Negotiated", "ProbeConfig", "ProbeError",
           "ProbeReport", "Vring", "run_probe"]
