"""The root of pyvhost's exceptions, and whose fault each one is.

Errors say whose fault it is: ``PeerError`` means the other side of a socket sent
something that breaks the vhost-user or virtio contract; ``LocalError`` means this
process (or its caller) misused an API or hit a host limit.
"""

from __future__ import annotations


class PyvhostError(Exception):
    """Root of every exception pyvhost raises on purpose."""


class PeerError(PyvhostError):
    """The peer (front-end, back-end or guest) broke the protocol."""


class LocalError(PyvhostError):
    """This side misused an API or hit a host limit."""
