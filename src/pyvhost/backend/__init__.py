"""The vhost-user back-end: the device interface, the per-connection state machine, the loop.

- :mod:`.device`      what a device implements (it never sees a raw message)
- :mod:`.vring`       per-queue state the connection keeps (eventfds, enable, started)
- :mod:`.connection`  one front-end connection: negotiation, memory, vrings, REPLY_ACK
- :mod:`.loop`        the single-threaded event loop: watched fds, soon-callbacks, timers
- :mod:`.server`      listening, accepting and client sockets on that loop
- :mod:`.control`     the client side of a back-end's control socket
- :mod:`.buildinfo`   the version and the data path this process runs
- :mod:`.sdnotify`    READY=1 / STOPPING=1 to the service manager ($NOTIFY_SOCKET)
- :mod:`.metrics`     Prometheus / OpenMetrics over the server's state (imported on demand)
"""

from .buildinfo import datapath_name
from .connection import Connection
from .device import QueueContext, QueueCounters, VirtioDevice
from .server import Server

__all__ = ["Connection", "QueueContext", "QueueCounters", "Server", "VirtioDevice",
           "datapath_name"]
