"""Telling the service manager how the back-end is doing: the ``sd_notify`` protocol.

systemd starts a ``Type=notify`` service with ``$NOTIFY_SOCKET`` set to an AF_UNIX
datagram socket: a path, or an abstract name written with a leading ``@``. The service
sends newline-separated ``VARIABLE=value`` assignments in one datagram ("sd_notify(3)"):
``READY=1`` once it serves (systemd then starts the units ordered after it, such as the
VMs), ``STATUS=...`` a line for ``systemctl status``, ``STOPPING=1`` when it begins to
shut down, ``MAINPID=`` the pid to watch. It is a few lines, so pyvhost writes them
itself (the PyPI ``sdnotify`` package is unmaintained since 2017).

Without ``$NOTIFY_SOCKET`` (not started by systemd, or not ``Type=notify``) every call is
a no-op. A failure to send is logged, never raised: the back-end keeps serving.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

ENVIRONMENT = "NOTIFY_SOCKET"


def notify_address(value: str | None = None) -> bytes | None:
    """The socket address in ``$NOTIFY_SOCKET`` (or ``value``): a path, or an abstract
    name (``@name`` becomes a leading NUL byte). None when unset or of a kind this module
    does not speak (systemd 254's ``vsock:`` addresses)."""
    if value is None:
        value = os.environ.get(ENVIRONMENT)
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    return None


def notify(*assignments: str) -> bool:
    """Send ``assignments`` (``"READY=1"``, ``"STATUS=..."``) in one datagram to the
    service manager. Returns whether it was sent."""
    value = os.environ.get(ENVIRONMENT)
    address = notify_address(value)
    if address is None:
        if value:
            log.warning("%s=%r is not a Unix socket address; not notifying the service "
                        "manager", ENVIRONMENT, value)
        return False
    for a in assignments:
        if "=" not in a or "\n" in a:
            raise ValueError(f"not a VARIABLE=value assignment on one line: {a!r}")
    payload = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(payload)
    except OSError as e:
        log.warning("can not notify the service manager at %s: %s", value, e)
        return False
    return True


def _line(text: str) -> str:
    return " ".join(text.split())


def ready(status: str) -> bool:
    """``READY=1`` with a status line and this process's pid."""
    return notify("READY=1", f"STATUS={_line(status)}", f"MAINPID={os.getpid()}")


def status(text: str) -> bool:
    """A new status line for ``systemctl status``."""
    return notify(f"STATUS={_line(text)}")


def stopping(status: str = "stopping") -> bool:
    """``STOPPING=1``: the service is shutting down."""
    return notify("STOPPING=1", f"STATUS={_line(status)}")
