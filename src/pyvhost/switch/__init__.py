"""The L2 learning switch behind ``pyvhost net``: vhost-user and tap ports, MAC learning.

- :mod:`.table` the MAC address table with aging (no frames, no fds)
- :mod:`.core`  the switch: ports, forwarding decisions, per-port counters
- :mod:`.offload` virtio-net header checks, checksum completion and TCP segmentation
- :mod:`.vhost` a vhost-user connection as a port (the ``SwitchPort`` virtio-net device)
- :mod:`.tap`   a Linux tap device as a port
"""

from .core import MIN_FRAME, NET_HDR, Port, PortCounters, Switch
from .table import MacTable
from .tap import TapPort
from .vhost import SwitchPort, VhostPort

__all__ = ["MIN_FRAME", "NET_HDR", "MacTable", "Port", "PortCounters", "Switch",
           "SwitchPort", "TapPort", "VhostPort"]
