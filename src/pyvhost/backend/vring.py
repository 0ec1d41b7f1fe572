"""Per-vring state a back-end connection keeps beside the virtqueue itself.

The eventfds (kick, call, err) are owned here and closed when replaced or reset.
"""

from __future__ import annotations

import contextlib
import os

from pyvhost.virtq import SplitQueue

_ONE = (1).to_bytes(8, "little")


class Vring:
    """One vring: the split queue, its eventfds, and whether it is started and enabled.

    "The back-end starts the ring upon receiving a kick (SET_VRING_KICK)" and stops it on
    GET_VRING_BASE. "If VHOST_USER_F_PROTOCOL_FEATURES has not been negotiated, the ring
    starts directly in the enabled state. If [it] has been negotiated, the ring is
    initialized in a disabled state and is enabled by VHOST_USER_SET_VRING_ENABLE".
    """

    __slots__ = ("call_fd", "enabled", "err_fd", "kick_fd", "queue", "started")

    def __init__(self, index: int) -> None:
        self.queue = SplitQueue(index)
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.started = False
        self.enabled = False

    @property
    def ready(self) -> bool:
        return (self.started and self.enabled and self.queue.attached
                and self.queue.broken is None)

    def signal_call(self) -> None:
        if self.call_fd is not None:
            _signal(self.call_fd)

    def signal_err(self) -> None:
        if self.err_fd is not None:
            _signal(self.err_fd)

    def replace_fd(self, which: str, fd: int | None) -> None:
        old = getattr(self, which)
        if old is not None and old != fd:
            _close(old)
        setattr(self, which, fd)

    def close(self) -> None:
        for which in ("kick_fd", "call_fd", "err_fd"):
            self.replace_fd(which, None)
        self.started = False


def _signal(fd: int) -> None:
    try:
        os.write(fd, _ONE)
    except BlockingIOError:
        pass  # counter saturated: the driver is already signalled
    except OSError:
        pass  # the front-end closed its end; nothing to tell


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
