"""A front-end that plays QEMU's part, and the leak probe built on it.

- :mod:`.memory`     guest RAM: memfd (or file) backed shared mappings placed at GPAs
- :mod:`.frontend`   :class:`Frontend`, a blocking vhost-user client sending what QEMU 7.2 sends
- :mod:`.profiles`   what QEMU 7.2 and DPDK's virtio-user send, as data checked against captures
- :mod:`.listen`     the listening side, for back-ends that connect (client mode)
- :mod:`.driver`     a guest driver's side of a split ring in our RAM (post, kick, take used)
- :mod:`.peer`       which process serves the connection (sock_diag peer inode, /proc)
- :mod:`.slope`      per-cycle series and growth per 1,000 cycles; :mod:`.plot` draws them
- :mod:`.probe`      hot-plug cycles against a back-end, measured before, during and after
- :mod:`.hostile`    ``--hostile``: named robustness cases, a witness connection, verdicts

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
from .listen import Listener
from .memory import FrontendMemory, GuestMemoryError, GuestRam
from .peer import CannotMeasureError, PeerProcess
from .probe import LatencyStats, ProbeConfig, ProbeError, ProbeReport, run_probe

__all__ = ["BackendClosedError", "BackendError", "BackendTimeoutError",
           "CannotMeasureError", "Frontend", "FrontendConnectError", "FrontendMemory",
           "FrontendUsageError", "GuestMemoryError", "GuestRam", "LatencyStats", "Listener",
           "NackError", "Negotiated", "PeerProcess", "ProbeConfig", "ProbeError",
           "ProbeReport", "Vring", "run_probe"]
