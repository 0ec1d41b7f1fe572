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

Live migration: the pure path marks every guest write in the dirty log while a queue
carries one (:mod:`pyvhost.virtq.split`); the compiled one does not yet
(:data:`COMPILED_LOGS`). A device whose queues carry a log is served by
:data:`LoggingReflector`, the pure path until the compiled one logs; :func:`logging_name`
says which. docs/dirty-log.md describes the hook the compiled path needs.

API: ``Reflector().burst(mem, tx, rx, hdr_len, mrg_rxbuf, limit, stats) -> int`` (see
:meth:`.reference.Reflector.burst`). The switch's forward step is ``_native.Forwarder``
(``_switch.pxi``, included by ``_native.pyx``), with its reference in
:mod:`pyvhost.switch.forward`, which picks one of them the same way
(:func:`pyvhost.switch.forward.engine`).
"""

from __future__ import annotations

import logging
import os

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


#: Whether the compiled data path marks the dirty log itself. Until it does, queues that
#: carry a log are served by the pure-Python reference, which does.
COMPILED_LOGS = False

#: The reflector's data path for queues that carry a dirty log (the VM migrates).
LoggingReflector: type[reference.Reflector] = (
    Reflector if _NAME == "python" or COMPILED_LOGS else reference.Reflector)


def name() -> str:
    """Which data path runs: ``"compiled"`` or ``"python"``."""
    return _NAME


def logging_name() -> str:
    """Which data path serves queues while the front-end logs: ``"compiled"`` once it
    marks the log itself, else ``"python"``."""
    return "compiled" if _NAME == "compiled" and COMPILED_LOGS else "python"


__all__ = ["BURST", "COMPILED_LOGS", "LoggingReflector", "Reflector", "logging_name", "name"]
