"""A QMP man in the middle for tests: the one client's messages go to QEMU's real monitor
and QEMU's back, except one command, which it holds. It makes an interrupt land at a
known point of a ``pyvhost mem`` run without any test hook in pyvhost:

- ``hold="request"``: the command is kept from QEMU (sent, never run: "not yet");
- ``hold="answer"``: QEMU runs it and its answer is kept from the client ("in flight":
  done in QEMU, the client still waiting);
- ``hold="silence"``: as ``"answer"``, and nothing QEMU sends afterwards reaches the
  client either (a monitor that stopped answering: every later command goes unanswered).

``skip`` lets that many of the command pass first (the second ``query-memory-devices``
of a run, say). ``held`` is set once that point is reached (for ``"answer"`` and
``"silence"``, once QEMU has answered).
QMP is a stream of JSON objects (QEMU ends each with CRLF; qemu.qmp sends none between
them), so both directions are split with a streaming decoder, not by lines.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

Hold = Literal["request", "answer", "silence"]


def _split(buf: str) -> tuple[list[tuple[Any, str]], str]:
    """The whole JSON messages at the start of ``buf`` (each with its text), and the rest."""
    decoder = json.JSONDecoder()
    out: list[tuple[Any, str]] = []
    i = 0
    while True:
        while i < len(buf) and buf[i].isspace():
            i += 1
        try:
            obj, end = decoder.raw_decode(buf, i)
        except json.JSONDecodeError:
            return out, buf[i:]
        out.append((obj, buf[i:end]))
        i = end


class QmpProxy:
    def __init__(self, listen: Path, target: Path, command: str, hold: Hold,
                 skip: int = 0) -> None:
        self.listen, self.target, self.command, self.hold = listen, target, command, hold
        self.skip = skip
        self.held = threading.Event()
        self.held_message: Any = None
        self._held_id: Any = None
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(listen))
        self._server.listen(1)
        self._socks: list[socket.socket] = [self._server]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            client, _ = self._server.accept()
        except OSError:
            return
        qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socks += [client, qemu]
        qemu.connect(str(self.target))
        threading.Thread(target=self._pump, args=(qemu, client, False), daemon=True).start()
        self._pump(client, qemu, True)

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        buf = ""
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                messages, buf = _split(buf + data.decode())
                for msg, text in messages:
                    if self._keep(msg, from_client):
                        dst.sendall(text.encode() + b"\r\n")
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _keep(self, msg: Any, from_client: bool) -> bool:
        """Whether to pass ``msg`` on."""
        if not isinstance(msg, dict):
            return True
        if from_client:
            if msg.get("execute") != self.command or self.held_message is not None:
                return True
            if self.skip > 0:
                self.skip -= 1
                return True
            self.held_message = msg
            if self.hold == "request":
                self.held.set()
                return False
            self._held_id = msg.get("id")
            return True
        if self.hold == "silence" and self.held.is_set():
            return False
        if self._held_id is not None and "event" not in msg and msg.get("id") == self._held_id:
            self.held_message = msg  # QEMU's answer, never delivered
            self.held.set()
            return False
        return True

    def close(self) -> None:
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self._thread.join(timeout=5)
        self.listen.unlink(missing_ok=True)


@contextlib.contextmanager
def qmp_proxy(listen: Path, target: Path, command: str, hold: Hold,
              skip: int = 0) -> Iterator[QmpProxy]:
    proxy = QmpProxy(listen, target, command, hold, skip)
    try:
        yield proxy
    finally:
        proxy.close()
