"""The client side of a back-end's control socket (``pyvhost net --control PATH``).

The server side is :meth:`pyvhost.backend.server.Server.listen_control`: every connection
gets the server's state as one line of JSON, then the socket closes. This module reads
that line; it does not interpret it.
"""

from __future__ import annotations

import json
import socket

#: A control answer larger than this is not a pyvhost back-end's (509 regions on 64
#: ports fit in well under a megabyte).
MAX_ANSWER = 64 << 20


def fetch_status(path: str, timeout: float = 5.0) -> dict[str, object]:
    """The JSON object a back-end's control socket answers with.

    Raises OSError when nothing answers at ``path`` (or not in ``timeout`` seconds), and
    ValueError when what answers is not a JSON object.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(path)
        chunks = []
        size = 0
        while True:
            data = s.recv(65536)
            if not data:
                break
            size += len(data)
            if size > MAX_ANSWER:
                raise ValueError(f"control socket answered more than {MAX_ANSWER} bytes")
            chunks.append(data)
    try:
        state = json.loads(b"".join(chunks))
    except json.JSONDecodeError as e:
        raise ValueError(f"control socket answered something that is not JSON: {e}") from e
    if not isinstance(state, dict):
        raise ValueError("control socket answered something that is not a JSON object")
    return state
