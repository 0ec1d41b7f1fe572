#!/usr/bin/env python3
"""Recording proxy for the vhost-user protocol (test tool, standard library only).

The proxy listens on a Unix stream socket (``--listen``).  For every front-end
that connects, it opens a connection to the real back-end (``--upstream``) and
forwards bytes in both directions, including file descriptors passed as
``SCM_RIGHTS`` ancillary data.  Each direction is split into vhost-user
messages using the 12-byte little-endian header (u32 request, u32 flags,
u32 size) and every message is appended to a JSON-lines file (``--out``)::

    {"dir": "frontend->backend", "request": 5, "flags": 1, "size": 72,
     "hex": "<header and payload as hex>", "nfds": 2}

Forwarding is message-wise: a message is sent on only once it is complete,
with one ``sendmsg`` that carries all of its bytes and all of the file
descriptors that arrived with it, so a receiver that reads the header with
``recvmsg`` always gets them.  The proxy closes its own copies afterwards.

The proxy reads each direction the way a vhost-user receiver does: first
exactly the 12 header bytes, then exactly the payload, never more.  This
matters for descriptors.  On a Unix stream socket the kernel attaches them to
the first segment of the sender's ``sendmsg``, and a ``recvmsg`` returns
segments without descriptors and then stops after the first one that has
some; so a large read could return several queued messages with the
descriptors of the last one.  Because no read crosses a message boundary
here, descriptors that arrive during a read belong to the message being read.
(If a sender packs several messages into one ``sendmsg``, its descriptors
arrive with the first of them, as any vhost-user receiver would see it.)

A record is written (and flushed) before the message is forwarded, so the
order of lines in the file respects causality between the two directions.

If a header announces a payload larger than ``--max-payload`` the stream is
taken not to be vhost-user: that direction falls back to forwarding raw
chunks (with their descriptors) and records nothing more.

The proxy exits cleanly on SIGINT or SIGTERM: it closes all sockets, flushes
the output file and removes the listening socket.

Example::

    python3 tests/tools/vhost_capture.py --listen proxy.sock \\
        --upstream backend.sock --out capture.jsonl
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import os
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import IO, NoReturn

HEADER = struct.Struct("<III")
MAX_FDS = 16
RECV_SIZE = 65536
DEFAULT_MAX_PAYLOAD = 1 << 20

FRONTEND_TO_BACKEND = "frontend->backend"
BACKEND_TO_FRONTEND = "backend->frontend"


class ShutdownRequestedError(Exception):
    """Raised from the signal handler to leave the accept loop."""


def log(message: str) -> None:
    """Print a diagnostic line on stderr."""
    print(f"vhost_capture: {message}", file=sys.stderr, flush=True)


def close_fds(fds: Sequence[int]) -> None:
    """Close every descriptor in ``fds``, ignoring errors."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def recv_chunk(sock: socket.socket, size: int) -> tuple[bytes, list[int], bool]:
    """Receive up to ``size`` bytes and up to MAX_FDS descriptors; return data, fds, truncated."""
    fds = array.array("i")
    data, ancdata, msg_flags, _addr = sock.recvmsg(size, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    for level, kind, cmsg_data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(cmsg_data) - len(cmsg_data) % fds.itemsize
            fds.frombytes(cmsg_data[:usable])
    truncated = bool(msg_flags & socket.MSG_CTRUNC)
    return data, list(fds), truncated


def send_all(sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
    """Send ``data`` completely; ``fds`` go with the first ``sendmsg``."""
    view = memoryview(data)
    ancillary = (
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    )
    sent = sock.sendmsg([view], ancillary)
    while sent < len(view):
        sent += sock.send(view[sent:])


class Recorder:
    """Thread-safe JSON-lines writer."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def record(self, direction: str, message: bytes, nfds: int) -> None:
        """Append one message record and flush it."""
        request, flags, size = HEADER.unpack_from(message)
        line = json.dumps(
            {
                "dir": direction,
                "request": request,
                "flags": flags,
                "size": size,
                "hex": message.hex(),
                "nfds": nfds,
            }
        )
        with self._lock:
            if self._stream.closed:
                log(f"output closed, record lost: {line}")
                return
            self._stream.write(line + "\n")
            self._stream.flush()


@dataclass
class MessageReader:
    """Reads one direction of a stream message by message."""

    sock: socket.socket
    max_payload: int
    raw: bool = False
    truncated: int = 0

    def read(self) -> tuple[bytes, list[int], bool]:
        """Return (bytes, fds, is_message); empty bytes mean end of stream.

        At end of stream the bytes of an incomplete message, if any, are
        returned first with ``is_message`` false.
        """
        if self.raw:
            chunk, chunk_fds = self._recv(RECV_SIZE)
            return chunk, chunk_fds, False
        buffer = bytearray()
        fds: list[int] = []
        wanted = HEADER.size
        while len(buffer) < wanted:
            data, more_fds = self._recv(wanted - len(buffer))
            fds.extend(more_fds)
            if not data:
                return bytes(buffer), fds, False
            buffer.extend(data)
            if len(buffer) == HEADER.size:
                size = HEADER.unpack_from(buffer)[2]
                if size > self.max_payload:
                    log(f"payload size {size} too large: not vhost-user, forwarding raw")
                    self.raw = True
                    return bytes(buffer), fds, False
                wanted = HEADER.size + size
        return bytes(buffer), fds, True

    def _recv(self, size: int) -> tuple[bytes, list[int]]:
        data, fds, truncated = recv_chunk(self.sock, size)
        if truncated:
            self.truncated += 1
            log("ancillary data truncated: descriptors lost")
        return data, fds


class Connection:
    """One proxied front-end connection and its upstream connection."""

    def __init__(
        self,
        number: int,
        frontend: socket.socket,
        backend: socket.socket,
        recorder: Recorder,
        max_payload: int,
    ) -> None:
        self.number = number
        self.frontend = frontend
        self.backend = backend
        self._recorder = recorder
        self._max_payload = max_payload
        self._threads = [
            threading.Thread(
                target=self._pump,
                args=(frontend, backend, FRONTEND_TO_BACKEND),
                name=f"conn{number}-f2b",
                daemon=True,
            ),
            threading.Thread(
                target=self._pump,
                args=(backend, frontend, BACKEND_TO_FRONTEND),
                name=f"conn{number}-b2f",
                daemon=True,
            ),
        ]
        self._closed = threading.Lock()
        self._remaining = len(self._threads)

    def start(self) -> None:
        """Start both forwarding threads."""
        for thread in self._threads:
            thread.start()

    def alive(self) -> bool:
        """Whether a forwarding thread is still running."""
        return any(thread.is_alive() for thread in self._threads)

    def shutdown(self) -> None:
        """Unblock both threads (used at exit)."""
        for sock in (self.frontend, self.backend):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def join(self, timeout: float) -> None:
        """Wait for both threads."""
        for thread in self._threads:
            thread.join(timeout)

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        reader = MessageReader(src, self._max_payload)
        try:
            while True:
                try:
                    data, fds, is_message = reader.read()
                except OSError as exc:
                    log(f"conn{self.number} {direction}: recv failed: {exc}")
                    break
                if not data:
                    close_fds(fds)
                    break
                if is_message:
                    self._recorder.record(direction, data, len(fds))
                elif not reader.raw:
                    log(
                        f"conn{self.number} {direction}: {len(data)} bytes of an incomplete message"
                    )
                try:
                    send_all(dst, data, fds)
                except OSError as exc:
                    log(f"conn{self.number} {direction}: send failed: {exc}")
                    break
                finally:
                    close_fds(fds)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        finally:
            self._thread_done()

    def _thread_done(self) -> None:
        with self._closed:
            self._remaining -= 1
            last = self._remaining == 0
        if last:
            self.frontend.close()
            self.backend.close()
            log(f"conn{self.number}: closed")


def connect_upstream(path: str, wait: float) -> socket.socket:
    """Connect to the back-end, retrying for up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)
        else:
            return sock


def prepare_listen_path(path: str) -> None:
    """Remove a stale socket file at ``path``; refuse to remove anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SystemExit(f"vhost_capture: {path} exists and is not a socket")
    os.unlink(path)


def on_signal(signum: int, _frame: FrameType | None) -> NoReturn:
    """Turn SIGINT/SIGTERM into a clean shutdown of the accept loop."""
    raise ShutdownRequestedError(signal.Signals(signum).name)


def serve(args: argparse.Namespace) -> int:
    """Accept front-ends until a signal arrives (or ``--max-connections`` are done)."""
    prepare_listen_path(args.listen)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(args.listen)
    listener.listen(8)
    connections: list[Connection] = []
    with open(args.out, "a", encoding="utf-8") as stream:
        recorder = Recorder(stream)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        log(f"listening on {args.listen}, upstream {args.upstream}, writing {args.out}")
        try:
            accepted = 0
            while args.max_connections == 0 or accepted < args.max_connections:
                frontend, _addr = listener.accept()
                accepted += 1
                try:
                    backend = connect_upstream(args.upstream, args.upstream_wait)
                except OSError as exc:
                    log(f"cannot connect to upstream {args.upstream}: {exc}")
                    frontend.close()
                    continue
                conn = Connection(accepted, frontend, backend, recorder, args.max_payload)
                connections.append(conn)
                log(f"conn{accepted}: accepted")
                conn.start()
            while any(conn.alive() for conn in connections):
                time.sleep(0.1)
        except ShutdownRequestedError as exc:
            log(f"{exc}: shutting down")
        finally:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(args.listen)
            for conn in connections:
                conn.shutdown()
            for conn in connections:
                conn.join(2.0)
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--listen", required=True, help="Unix socket to listen on (front-end side)")
    parser.add_argument("--upstream", required=True, help="back-end Unix socket to connect to")
    parser.add_argument("--out", required=True, help="JSON-lines file to append records to")
    parser.add_argument(
        "--upstream-wait",
        type=float,
        default=5.0,
        help="seconds to keep retrying the upstream connect (default 5)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=0,
        help="exit after this many connections have ended (default 0: run until signalled)",
    )
    parser.add_argument(
        "--max-payload",
        type=int,
        default=DEFAULT_MAX_PAYLOAD,
        help="larger announced payloads mean the stream is not vhost-user (default 1 MiB)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    return serve(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
