"""Exceptions of the front-end, each saying whose fault it is.

``LocalError`` subclasses: this side can not do what was asked (no socket at the path, a
request the negotiated features do not allow, more regions than the protocol carries).
``PeerError`` subclasses: the back-end misbehaved (NACK, a wrong or missing reply, it hung
up or stopped answering).
"""

from __future__ import annotations

from pyvhost.errors import LocalError, PeerError
from pyvhost.protocol.constants import request_name


class FrontendConnectError(LocalError):
    """The back-end's socket can not be reached (missing, refused, timed out)."""


class FrontendUsageError(LocalError):
    """The caller asked for something this connection can not do (state, features, limits)."""


class BackendError(PeerError):
    """The back-end broke the protocol or the connection; the connection is now unusable."""


class BackendClosedError(BackendError):
    """The back-end closed the connection."""


class BackendTimeoutError(BackendError):
    """The back-end did not answer in time."""


class NackError(PeerError):
    """The back-end answered a request with a non-zero REPLY_ACK payload (a NACK).

    The stream stays in sync after a NACK: the connection may still be used.
    """

    def __init__(self, request: int, value: int) -> None:
        super().__init__(f"back-end refused {request_name(request)} (REPLY_ACK payload "
                         f"{value:#x}, non-zero means failure)")
        self.request = request
        self.value = value


class UsedRingError(PeerError):
    """The device wrote a used ring no driver may accept (more entries than it holds, or
    a head it does not hold)."""
