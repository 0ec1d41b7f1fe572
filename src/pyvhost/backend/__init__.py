"""The vhost-user back-end: the device interface, the per-connection state machine, the loop.

- :mod:`.device`      what a device implements (it never sees a raw message)
- :mod:`.vring`       per-queue state the connection keeps (eventfds, enable, started)
- :mod:`.connection`  one front-end connection: negotiation, memory, vrings, REPLY_ACK
- :mod:`.server`      a single-threaded selector loop serving many sockets at once
"""

from .connection import Connection
from .device import QueueContext, VirtioDevice
from .server import Server

__all__ = ["Connection", "QueueContext", "Server", "VirtioDevice"]
