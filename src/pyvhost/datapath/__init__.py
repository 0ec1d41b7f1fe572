"""The data path: the per-frame work of pyvhost's devices, one call per burst of chains.

Two implementations with one API, chosen once at import (the pattern of msgpack's
``_cmsgpack`` / ``fallback``):

- :mod:`._native`   compiled (Cython): walks, checks, copies and publishes a whole burst
  with the GIL released, no Python object per frame; survives a region that shrinks
  under its mapping (SIGBUS guard; the connection is closed).
- :mod:`.reference` pure Python, built on :class:`~pyvhost.virtq.SplitQueue`: the
  reference the compiled path is tested against, and the fallback where the extension
  is not built. It can not catch SIGBUS: a shrunken region kills the process.

``PYVHOST_PURE=1`` forces the pure one; an extension that fails to import falls back to it
with one log line. :func:`name` says which one runs.

Live migration: both paths mark every guest write in the dirty log while a queue carries
one, the pure one through :mod:`pyvhost.virtq.split`, the compiled one itself with an
atomic fetch-or on the log's bitmap (:data:`COMPILED_LOGS`; the differential tests hold
the two bitmaps equal). A device whose queues carry a log is served by
:data:`LoggingReflector`; the compiled path serves a log only through its address
(:attr:`~pyvhost.memory.DirtyLog.address`, None without libatomic), so where there is
none the pure path serves it (:func:`serves_log`). :func:`logging_name` says which path
logs. docs/dirty-log.md describes how.

API: ``Reflector().burst(mem, tx, rx, hdr_len, mrg_rxbuf, limit, stats) -> int`` (see
:meth:`.reference.Reflector.burst`). The switch's forward step is ``_native.Forwarder``
(``_switch.pxi``, included by ``_native.pyx``), with its reference in
:mod:`pyvhost.switch.forward`, which picks one of them the same way
(:func:`pyvhost.switch.forward.engine`).
"""

from __future__ import annotations

import logging
import os

from pyvhost.memory import DirtyLog
from pyvhost.memory.dirtylog import ATOMIC

from . import reference

log = logging.getLogger(__name__)

#: Chains per burst: enough to pay the call once per many frames, few enough that the
#: used ring is published (and the driver notified) often.
BURST = 256


def _pure_forced() -> bool:
    return os.environ.get("PYVHOST_PURE", "") not in ("", "0")


Reflector: type[reference.Reflector]
if _pure_forced():
    Reflector = reference.Reflector
    _NAME = "python"
else:
    try:
        from . import _native
    except ImportError as e:  # not built (no compiler at install time), or broken
        log.warning("compiled data path not available (%s): using the pure-Python one", e)
        Reflector = reference.Reflector
        _NAME = "python"
    else:
        Reflector = _native.Reflector  # type: ignore[assignment]
        _NAME = "compiled"


#: Whether the compiled data path marks the dirty log itself (``log_mark`` in
#: ``_native.pyx``). False would send queues that carry a log to the pure-Python path.
COMPILED_LOGS = True

#: Whether the compiled path serves queues that carry a log: it runs, marks, and logs have
#: an address (libatomic found: :data:`pyvhost.memory.dirtylog.ATOMIC`).
_COMPILED_LOGGING = _NAME == "compiled" and COMPILED_LOGS and ATOMIC

#: The reflector's data path for queues that carry a dirty log (the VM migrates).
LoggingReflector: type[reference.Reflector] = (
    Reflector if _NAME == "python" or _COMPILED_LOGGING else reference.Reflector)


def name() -> str:
    """Which data path runs: ``"compiled"`` or ``"python"``."""
    return _NAME


def logging_name() -> str:
    """Which data path serves queues while the front-end logs: ``"compiled"`` where it
    runs and can mark the log itself, else ``"python"``."""
    return "compiled" if _COMPILED_LOGGING else "python"


def serves_log(log: DirtyLog) -> bool:
    """Whether the compiled data path may serve a queue that carries ``log``: it runs, it
    marks logs, and this one has an address (open, libatomic found). The compiled
    switch forward step is taken only then (else the pure one, which marks)."""
    return _COMPILED_LOGGING and log.address is not None


__all__ = ["BURST", "COMPILED_LOGS", "LoggingReflector", "Reflector", "logging_name", "name",
           "serves_log"]
