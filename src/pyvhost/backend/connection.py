"""One front-end connection of a back-end: negotiation, memory, vrings and replies.

Every request the back-end handles is declared once, where its handler is, with
``@REQUEST_TABLE.handles(request, needs_owner=..., needs=...)``: the one table of which
request is allowed when (:mod:`.registry`), checked against the codec at import. Handlers
either succeed or raise a :class:`~pyvhost.errors.PeerError`; the dispatcher turns an
error into a NACK when the front-end asked for a reply and REPLY_ACK was negotiated ("the
back-end must respond with a u64 payload: zero for success, non-zero otherwise"), and
otherwise closes the connection, because a front-end that can not be told of a failure
would go on with a state the back-end does not share. Framing errors always close. A
closed connection never affects another one.

Every fd that arrives is closed when its message is handled, unless a handler took it
(kick/call/err eventfds; memory region fds and the dirty log's are closed right after
mapping).

Live migration (vhost-user.rst, Migration): for a device that writes guest memory only
through the virtqueue's methods (:attr:`VirtioDevice.logs_dirty_pages`), the connection
offers VHOST_F_LOG_ALL and PROTOCOL_F_LOG_SHMFD. SET_LOG_BASE maps the front-end's log
(:class:`~pyvhost.memory.DirtyLog`; a replaced log is unmapped at once), SET_FEATURES with
VHOST_F_LOG_ALL turns logging on and off, and SET_VRING_ADDR with VHOST_VRING_F_LOG says
where each used ring is logged. While logging is on, every queue carries the log and marks
what it writes; GET_VRING_BASE stops a ring and answers where the destination resumes.

Threads: without workers everything runs on the server's loop. With ``workers`` (``pyvhost
net --workers N``) each queue pair's kicks are served on a worker thread
(:meth:`Connection.kick_loop`), under the queue locks of :mod:`.queuelock`; the handlers
of :data:`RING_REQUESTS` and :meth:`Connection.close` hold every lock of the connection
(ADD_MEM_REG only while it re-attaches the rings: see its handler), and a close a worker
asks for (a guest-memory fault) runs on the loop.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from enum import Enum

from pyvhost.errors import PeerError
from pyvhost.memory import (
    DirtyLog,
    GuestAddressError,
    GuestMemory,
    MemoryFaultError,
    MemoryManager,
)
from pyvhost.protocol import messages as m
from pyvhost.protocol.codec import (
    REQUESTS,
    Decoder,
    FramingError,
    Message,
    MessageError,
    encode_ack,
    encode_reply,
    has_explicit_reply,
)
from pyvhost.protocol.constants import (
    FLAG_NEED_REPLY,
    MAX_CONFIG_SIZE,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ProtocolFeature,
    Request,
    VirtioFeature,
    VirtioStatus,
    bit_names,
    request_name,
)
from pyvhost.protocol.transport import TransportError, peer_pid, recv_chunk, send_message
from pyvhost.virtq import VirtqueueError

from . import queuelock
from .device import DeviceConfigError, DeviceHost, QueueContext, QueueCounters, VirtioDevice
from .loop import Loop
from .queuelock import QueueLock
from .registry import RequestTable
from .vring import Vring
from .workers import WorkerPool

log = logging.getLogger(__name__)

#: Protocol features pyvhost offers; the intersection with the front-end's is negotiated.
#: LOG_SHMFD only for devices that log their writes (:attr:`VirtioDevice.logs_dirty_pages`),
#: RARP only for those that announce (:attr:`VirtioDevice.announces`).
OFFERED_PROTOCOL_FEATURES = (ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK
                             | ProtocolFeature.CONFIG | ProtocolFeature.STATUS
                             | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.LOG_SHMFD
                             | ProtocolFeature.RARP)
LOG_ALL = int(VirtioFeature.LOG_ALL)
#: Connections' places in the lock order (:mod:`.queuelock`), in order of creation.
_ORDER = itertools.count(1)
#: Requests whose handlers change a vring, the memory table or the dirty log: with worker
#: threads they run holding every queue lock of the connection, so no burst is in flight
#: meanwhile (GET_VRING_BASE answers once the ring's burst is finished). SEND_RARP is not
#: one: it forwards a frame into other ports, whose locks it takes itself.
RING_REQUESTS = frozenset({
    Request.SET_FEATURES, Request.RESET_OWNER, Request.SET_MEM_TABLE,
    Request.REM_MEM_REG, Request.SET_VRING_NUM, Request.SET_VRING_ADDR,
    Request.SET_VRING_BASE, Request.GET_VRING_BASE, Request.SET_VRING_KICK,
    Request.SET_VRING_CALL, Request.SET_VRING_ERR, Request.SET_VRING_ENABLE,
    Request.SET_LOG_BASE})


def protocol_features_for(device: VirtioDevice) -> ProtocolFeature:
    """The protocol features offered to the front-end of ``device``: the library's, less
    what the device withholds, and CONFIG only for a device whose front-end reads its
    config space through the back-end (QEMU's vhost-user-net serves its own and warns
    about an offered CONFIG at every start), LOG_SHMFD only for a device that logs every
    guest page it writes, RARP only for a device that can announce a migrated guest."""
    offered = OFFERED_PROTOCOL_FEATURES & ~device.withheld_protocol_features
    if not device.serves_config:
        offered &= ~ProtocolFeature.CONFIG
    if not device.logs_dirty_pages:
        offered &= ~ProtocolFeature.LOG_SHMFD
    if not device.announces:
        offered &= ~ProtocolFeature.RARP
    return offered


class RequestError(PeerError):
    """A request that is valid on the wire but not allowed now or not supported."""


class Phase(Enum):
    CONNECTED = "connected"  # before SET_OWNER
    OWNED = "owned"
    CLOSED = "closed"


class Connection(DeviceHost):
    """The back-end side of one vhost-user socket."""

    def __init__(self, sock: socket.socket, device: VirtioDevice, loop: Loop,
                 name: str = "conn", *, owner_implied: bool = False,
                 workers: WorkerPool | None = None) -> None:
        self.sock = sock
        self.device = device
        self.loop = loop
        self.name = name
        self.order = next(_ORDER)
        #: Kicks served on worker threads (``--workers`` > 1), else on ``loop``: then
        #: every vring has a lock (:mod:`.queuelock`), else nothing is locked.
        self.workers = workers
        self.threaded = workers is not None
        receive = set(device.receive_queues())
        #: The queues :meth:`enter_device` serves (the device's receive queues).
        self._receive = tuple(sorted(i for i in receive if 0 <= i < device.num_queues))
        self.locks = [QueueLock((1 if i in receive else 0, self.order, i))
                      for i in range(device.num_queues)]
        #: The worker of each queue pair (index // 2), given at its first kick fd.
        self._kick_loops: dict[int, Loop] = {}
        #: Why a worker closed this connection; the close itself runs on ``loop``.
        self._doomed: str | None = None
        self.peer_pid = peer_pid(sock)
        self.phase = Phase.CONNECTED
        #: A connection the back-end made (client mode) may resume a session the
        #: front-end started with an earlier back-end: DPDK's virtio_user (server=1) never
        #: sends SET_OWNER again after a reconnect, and first stops its old device on the
        #: new socket (SET_VRING_ENABLE 0, GET_VRING_BASE). Such a connection counts as
        #: owned from the start; a SET_OWNER that does come (QEMU's) is accepted once.
        self.owner_implied = owner_implied
        self.decoder = Decoder()
        self.memory = MemoryManager()
        self.vrings = [Vring(i) for i in range(device.num_queues)]
        #: VHOST_F_LOG_ALL: "Once it complies to this logging, it may declare the
        #: VHOST_F_LOG_ALL vhost feature" - only a device whose writes are all logged.
        self.offered_features = (device.device_features() | VHOST_USER_F_PROTOCOL_FEATURES
                                 | (LOG_ALL if device.logs_dirty_pages else 0))
        self.acked_features = 0
        self.features_set = False
        self.protocol_features = ProtocolFeature(0)
        #: What GET_PROTOCOL_FEATURES answers (:func:`protocol_features_for`).
        self.offered_protocol_features = protocol_features_for(device)
        #: The front-end's dirty log (SET_LOG_BASE), mapped; the queues mark it while
        #: VHOST_F_LOG_ALL is acked (:attr:`logging`).
        self.dirty_log: DirtyLog | None = None
        #: The last request that changed the memory table: its name, the new generation,
        #: and when (time.monotonic(), CLOCK_MONOTONIC: comparable across processes on
        #: Linux) it was taken off the socket and when the new table was in force (fds
        #: closed, reply not yet sent), and the regions mapped, kept and dropped.
        #: ``pyvhost lab`` times hot-plug with it.
        self.last_memory_update: dict[str, object] | None = None
        #: The memory table change that took longest from receipt to in force, so far.
        self.slowest_memory_update: dict[str, object] | None = None
        #: Seconds the request being handled has waited for the queues' bursts (their
        #: locks, with workers): part of a table update's time that is not its own work.
        self._waited = 0.0
        #: Told of every memory table change (the server's metrics and hooks).
        self.memory_observer: Callable[[Connection, dict[str, object]], None] | None = None
        #: Told once when the connection closes, on any path: the front-end hung up, a
        #: request was refused, or a kick met a guest-memory fault (no socket event then).
        self.close_observer: Callable[[Connection], None] | None = None
        self.status = 0
        self.close_reason: str | None = None
        self.counters: dict[str, int] = {"requests": 0, "nacks": 0, "kicks": 0,
                                         "memory_updates": 0}
        self.queue_counters = [QueueCounters() for _ in range(device.num_queues)]
        self._again: set[int] = set()
        #: Busy-poll a queue for this long (seconds) after a kick that found work: its
        #: kicks stay off (VRING_USED_F_NO_NOTIFY, or avail_event left behind) and the
        #: loop serves it again on every turn until the window passes without work
        #: (``pyvhost net --poll-us``); then the burst that saw the ring empty turned
        #: kicks back on. 0: kicks only.
        self.poll_s = 0.0
        self._poll_until: dict[int, float] = {}
        sock.setblocking(False)
        device.attach(self)

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    @property
    def logging(self) -> bool:
        """Whether the front-end asked for dirty logging (VHOST_F_LOG_ALL acked)."""
        return bool(self.acked_features & LOG_ALL)

    def _apply_log(self) -> None:
        """Hand every queue the log while logging is on, else none. Runs on the loop
        thread, as the queues' writes do: no write sees a log closed under it."""
        log = self.dirty_log if self.logging else None
        for vring in self.vrings:
            vring.queue.log = log

    def _drop_log(self) -> None:
        log, self.dirty_log = self.dirty_log, None
        self._apply_log()
        if log is not None:
            log.close()

    # -- I/O -----------------------------------------------------------------------------
    def on_readable(self) -> None:
        """Read what the socket has, handle every whole message. Never raises PeerError."""
        if self.phase is Phase.CLOSED:
            return
        try:
            data, fds = recv_chunk(self.sock)
        except BlockingIOError:
            return
        except (TransportError, ConnectionError, OSError) as e:
            self.close(f"receive failed: {e}")
            return
        if not data:
            self.close("front-end closed the connection")
            return
        try:
            self.decoder.feed(data, fds)
            while not self.closed:
                try:
                    msg = self.decoder.next_message()
                except MessageError as e:
                    self._refuse(e.request, e.flags, e.reason)
                    continue
                if msg is None:
                    break
                self._dispatch(msg)
        except FramingError as e:
            self.close(f"framing error: {e}")

    def _send(self, data: bytes) -> None:
        try:
            send_message(self.sock, data)
        except BlockingIOError:
            # The front-end does not read its replies; it can not be served.
            self.close("front-end stopped reading replies (socket buffer full)")
        except OSError as e:
            self.close(f"send failed: {e}")

    # -- dispatch ------------------------------------------------------------------------
    def _dispatch(self, msg: Message) -> None:
        self.counters["requests"] += 1
        received, before = time.monotonic(), self.memory.current
        cpu = time.thread_time()
        self._waited = 0.0
        with msg.fds:
            try:
                handler = self._check_allowed(msg.request)
                if self.threaded and msg.request in RING_REQUESTS:
                    # Every burst of this connection finishes first (the loop's thread
                    # holds no other queue lock: this is in order).
                    with queuelock.hold(self.locks) as ok:
                        self._waited += time.monotonic() - received
                        assert ok
                        reply = handler(self, msg)
                else:
                    reply = handler(self, msg)
            except (PeerError, DeviceConfigError) as e:
                self._refuse(msg.request, msg.flags, str(e))
                return
            except Exception as e:  # a bug here must not take the other connections down
                log.exception("%s: internal error handling %s", self.name, msg.name)
                self.close(f"internal error handling {msg.name}: {e!r}")
                return
        if self.closed:
            return
        if self.memory.current is not before:
            self._memory_updated(msg.name, before, received, time.thread_time() - cpu)
        if reply is not None:
            self._send(encode_reply(msg.request, reply))
        elif msg.need_reply and self.reply_ack:
            self._send(encode_ack(msg.request, True))

    def _memory_updated(self, request: str, before: GuestMemory, received: float,
                        cpu: float) -> None:
        """Record, log and report a table change (one INFO line per change). ``cpu`` is
        the CPU time this thread spent on the request: with ``waited`` (waiting for the
        bursts), what a slow update's time went to; the rest of it this process was not
        running (another process or the host had the CPU)."""
        in_force = time.monotonic()
        after = self.memory.current
        old = {id(r) for r in before.regions}
        kept = sum(1 for r in after.regions if id(r) in old)
        record: dict[str, object] = {
            "request": request, "generation": after.generation, "received": received,
            "in_force": in_force, "regions": len(after), "mapped": len(after) - kept,
            "kept": kept, "dropped": len(before) - kept, "cpu_s": round(cpu, 6),
            "waited_s": round(self._waited, 6)}
        self.last_memory_update = record
        slowest = self.slowest_memory_update
        if slowest is None or in_force - received > update_seconds(slowest):
            self.slowest_memory_update = record
        self.counters["memory_updates"] += 1
        log.info("%s: %s: %d region%s in the table (%d mapped, %d kept, %d dropped), "
                 "in force after %.3f ms", self.name, request, len(after),
                 "" if len(after) == 1 else "s", len(after) - kept, kept,
                 len(before) - kept, (in_force - received) * 1e3)
        if self.memory_observer is not None:
            self.memory_observer(self, record)

    def _check_allowed(self, request: int) -> Callable[[Connection, Message], m.Payload | None]:
        """The handler of ``request`` if it is allowed now; else RequestError."""
        entry = REQUEST_TABLE.get(request)
        if entry is None:
            raise RequestError(f"{request_name(request)} is not supported by this back-end")
        rule = entry.rule
        if rule.needs_owner and self.phase is not Phase.OWNED and not self.owner_implied:
            raise RequestError(f"{request_name(request)} before SET_OWNER")
        if rule.needs is not None and not self.protocol_features & rule.needs:
            raise RequestError(f"{request_name(request)} needs protocol feature "
                               f"{rule.needs.name}, which was not negotiated")
        return entry.handler

    @property
    def reply_ack(self) -> bool:
        """Whether need_reply asks for an ack: "With this protocol extension [REPLY_ACK]
        negotiated, the sender (QEMU) can set the need_reply [Bit 3] flag to any command."
        Before that, a front-end reads no ack, and one would desync its stream."""
        return bool(self.protocol_features & ProtocolFeature.REPLY_ACK)

    def _refuse(self, request: int, flags: int, reason: str) -> None:
        """NACK if the front-end waits for a reply to this request, else close."""
        self.counters["nacks"] += 1
        msg = f"{request_name(request)} refused: {reason}"
        if flags & FLAG_NEED_REPLY and self.reply_ack and not has_explicit_reply(request):
            log.warning("%s: %s (NACK)", self.name, msg)
            self._send(encode_ack(request, False))
        else:
            self.close(msg)

    # -- lifetime ------------------------------------------------------------------------
    def close(self, reason: str) -> None:
        """Drop everything this connection holds. Idempotent. With workers, called on a
        worker thread (a guest-memory fault in a burst) or with a queue lock held (a tap's
        frames written into this connection on the loop's thread), it stops the
        connection's bursts at once and closes it on the loop's thread, holding no other
        lock, at the end of the loop's turn."""
        if self.phase is Phase.CLOSED:
            return
        if self.workers is not None and (self.workers.on_worker_thread()
                                         or queuelock.holding_any()):
            if self._doomed is None:
                self._doomed = reason
                self.loop.call_soon_threadsafe(lambda: self.close(reason))
            return
        self.phase = Phase.CLOSED
        self.close_reason = reason
        log.debug("%s: closed: %s", self.name, reason)  # the server logs the disconnect
        with self._locked(range(len(self.locks))) as ok:
            # No burst is in flight; the phase stops the next one. (This thread holds no
            # other queue lock: the locks are taken in order, never refused.)
            assert ok
            self._stop_all_rings()
            self._drop_log()
            self.memory.clear()
        if self.workers is not None:
            self.workers.release(self.order)
        self.decoder.close()
        try:
            self.device.reset()
        finally:
            self.sock.close()
            if self.close_observer is not None:
                self.close_observer(self)

    def _stop_all_rings(self) -> None:
        for vring in self.vrings:
            if vring.kick_fd is not None:
                self.kick_loop(vring.queue.index).unwatch(vring.kick_fd)
            vring.close()
            vring.queue.detach()

    # -- threads and locks ---------------------------------------------------------------
    def kick_loop(self, index: int) -> Loop:
        """The loop that serves queue ``index``'s kicks: its pair's worker (given now if
        it has none yet), or the connection's loop without workers."""
        if self.workers is None:
            return self.loop
        pair = index // 2
        loop = self._kick_loops.get(pair)
        if loop is None:
            loop = self._kick_loops[pair] = self.workers.assign(self.order, pair)
        return loop

    def worker_of(self, index: int) -> str | None:
        """The name of the worker that serves queue ``index`` (None: the main loop)."""
        loop = self._kick_loops.get(index // 2)
        return getattr(loop, "name", None)

    @contextlib.contextmanager
    def _locked(self, indices: Iterable[int]) -> Iterator[bool]:
        """Hold the locks of queues ``indices`` (see :func:`queuelock.hold`); nothing to
        hold without workers."""
        if not self.threaded:
            yield True
            return
        n = len(self.locks)
        with queuelock.hold(self.locks[i] for i in indices if 0 <= i < n) as ok:
            yield ok

    def _kick_set(self, index: int) -> tuple[int, ...]:
        queues = self.device.kick_queues(index)
        return queues if index in queues else (index, *queues)

    # -- kicks ---------------------------------------------------------------------------
    def on_kick(self, index: int) -> None:
        if not self.threaded:
            self._on_kick(index)
            return
        # The kick fd is read under its queue's lock: a control handler replaces and
        # closes it only under the same lock, so the number read is never another fd's.
        queues = self._kick_set(index)
        with self._locked(queues) as ok:
            if ok:
                self._on_kick(index, queues)

    def _on_kick(self, index: int, queues: tuple[int, ...] | None = None) -> None:
        vring = self.vrings[index]
        if vring.kick_fd is None:
            return
        try:
            os.read(vring.kick_fd, 8)
        except BlockingIOError:
            pass
        except OSError as e:
            log.warning("%s: kick fd of queue %d failed: %s", self.name, index, e)
            return
        self.counters["kicks"] += 1
        self._serve(index, queues)

    def serve_queue(self, index: int) -> None:
        """Hand queue ``index`` to the device with the current memory held (and, with
        workers, the locks of the queues its kick serves)."""
        if not self.threaded:
            self._serve(index)
            return
        queues = self._kick_set(index)
        with self._locked(queues) as ok:
            if ok:
                self._serve(index, queues)

    def serve_soon(self, index: int) -> None:
        """Serve queue ``index`` on its own loop: now without workers (as ever), else
        on the next turn of its worker."""
        if not self.threaded:
            self.serve_queue(index)
        else:
            self.kick_loop(index).call_soon(lambda: self.serve_queue(index))

    def _serve(self, index: int, queues: tuple[int, ...] | None = None) -> None:
        if not self.vrings[index].ready:
            return
        device = self.device
        if not self.poll_s:
            self._run(index, lambda ctx: device.handle_kick(ctx, index), queues)
            return
        counters = self.queue_counters[index]

        def serve(ctx: QueueContext) -> None:
            before = counters.frames
            device.handle_kick(ctx, index)
            now = time.monotonic()
            if counters.frames != before:
                self._poll_until[index] = now + self.poll_s
            q = ctx.queue(index)
            if now < self._poll_until.get(index, 0.0) and q is not None \
                    and q.broken is None:
                q.enable_kicks(False)  # polled: the driver need not kick meanwhile
                self.serve_again(index)

        self._run(index, serve, queues)

    def run_device(self, index: int, fn: Callable[[QueueContext], None]) -> None:
        """See :meth:`DeviceHost.run_device`; with workers, the locks of the device's
        receive queues are held for the call (taken after the caller's own, in the
        lock order; if that can not be, ``fn`` is not called: as for a closed one)."""
        if not self.threaded:
            self._run(index, fn)
            return
        queues = self.device.receive_queues()
        with self._locked(queues) as ok:
            if ok:
                self._run(index, fn, queues)

    def enter_device(self) -> QueueContext | None:
        """What :meth:`run_device` gives ``fn``, for a caller that holds several
        connections at once (the switch's egress ports, once per burst): a context of
        the device's ready receive queues, the memory held and, with workers, their locks
        taken (after the caller's own, in the lock order); None where ``run_device``
        would not call ``fn``. The caller must give it back with :meth:`leave_device`
        on every path, and handle what goes wrong meanwhile itself (a guest error of
        this connection's: through ``run_device``, as the switch does)."""
        taken = None
        if self.threaded:
            n = len(self.locks)
            taken = queuelock.take(self.locks[i] for i in self._receive if i < n)
            if taken is None:
                return None
        if self.phase is Phase.CLOSED or self._doomed is not None:
            if taken:
                queuelock.release(taken)
            return None
        try:
            mem = self.memory.acquire()
        except BaseException:
            if taken:
                queuelock.release(taken)
            raise
        vrings = self.vrings
        ready = {i: vrings[i].queue for i in self._receive if vrings[i].ready}
        ctx = QueueContext(mem, ready, self._notify, self.queue_counters)
        ctx.locks = taken
        return ctx

    def leave_device(self, ctx: QueueContext) -> None:
        """Release what :meth:`enter_device` took: the memory, then the locks."""
        try:
            ctx.mem.release()
        finally:
            if ctx.locks:
                queuelock.release(ctx.locks)
                ctx.locks = None

    def _run(self, index: int, fn: Callable[[QueueContext], None],
             queues: Iterable[int] | None = None) -> None:
        """``fn`` with a context of the ready queues (with workers: of ``queues``, whose
        locks the caller holds), the memory held, guest errors handled."""
        if self.phase is Phase.CLOSED or self._doomed is not None:
            return
        # The snapshot is held for the call (MemoryManager.hold, without a generator).
        mem = self.memory.acquire()
        try:
            if queues is None:
                ready = {v.queue.index: v.queue for v in self.vrings if v.ready}
            else:
                vrings = self.vrings
                ready = {i: vrings[i].queue for i in queues if vrings[i].ready}
            ctx = QueueContext(mem, ready, self._notify, self.queue_counters)
            try:
                fn(ctx)
            except MemoryFaultError as e:
                # Guest memory faulted under its mapping (a region's file shrank): no
                # access to this memory is safe any more. Drop the connection, and with
                # it the mappings, once this hold ends; the others are unharmed.
                log.error("%s: %s", self.name, e)
                self.close(f"guest memory fault: {e}")
            except (VirtqueueError, GuestAddressError, PeerError) as e:
                # A device may serve other queues than the one kicked (ReflectNet serves
                # its tx queue on an rx kick): report the queue that broke, not the kicked.
                broke = [i for i in ready if self.vrings[i].queue.broken is not None]
                for i in broke or [index]:
                    self._break_queue(i, self.vrings[i].queue.broken or str(e))
            except Exception as e:  # a device bug breaks this queue, not the process
                log.exception("%s: device failed on queue %d", self.name, index)
                self._break_queue(index, f"device error: {e!r}")
        finally:
            mem.release()

    def serve_again(self, index: int) -> None:
        if index in self._again or self.phase is Phase.CLOSED:
            return
        self._again.add(index)

        def again() -> None:
            self._again.discard(index)
            self.serve_queue(index)

        self.kick_loop(index).call_soon(again)

    def _notify(self, index: int) -> None:
        vring = self.vrings[index]
        try:
            if vring.queue.should_notify():
                vring.signal_call()
        except VirtqueueError:
            pass

    def _break_queue(self, index: int, reason: str) -> None:
        """A guest broke queue ``index``: stop it, tell the front-end, keep the rest."""
        vring = self.vrings[index]
        if vring.queue.broken is None:
            vring.queue.broken = reason
        self.queue_counters[index].errors += 1
        log.warning("%s: queue %d broken: %s", self.name, index, reason)
        # virtio: "The device SHOULD set DEVICE_NEEDS_RESET when it enters an error state
        # that a reset is needed." vhost-user reports it with SET_VRING_ERR's eventfd.
        self.status |= VirtioStatus.DEVICE_NEEDS_RESET
        vring.signal_err()

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise RequestError(f"vring index {index} out of range (device has "
                               f"{len(self.vrings)} queues)")
        return self.vrings[index]

    def _memory_changed(self) -> None:
        """Re-translate every ring after a table change; tell the device."""
        mem = self.memory.current
        for vring in self.vrings:
            if vring.queue.configured:
                try:
                    vring.queue.attach(mem)
                except VirtqueueError as e:
                    self._break_queue(vring.queue.index, str(e))
        self.device.memory_changed(mem)

    # -- state for status output ---------------------------------------------------------
    def held(self) -> dict[str, int]:
        """What this connection holds now: regions in its table, mappings (those and the
        ones a reader still keeps), and fds (the socket, eventfds, one per mapping: the
        dup CPython's mmap keeps)."""
        mappings = len(self.memory.current) + self.memory.pending_unmap
        eventfds = sum((v.kick_fd is not None) + (v.call_fd is not None)
                       + (v.err_fd is not None) for v in self.vrings)
        sock = 0 if self.phase is Phase.CLOSED else 1
        log = 0 if self.dirty_log is None or self.dirty_log.closed else 1
        return {"regions": len(self.memory.current), "mappings": mappings + log,
                "fds": sock + eventfds + mappings + log, "log_mappings": log}

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "peer_pid": self.peer_pid,
            "phase": self.phase.value,
            "features": self.acked_features,
            "protocol_features": bit_names(int(self.protocol_features), ProtocolFeature),
            "status": self.status,
            "memory_generation": self.memory.current.generation,
            "memory": self.memory.current.describe(),
            "last_memory_update": self.last_memory_update,
            "slowest_memory_update": self.slowest_memory_update,
            "logging": self.logging,
            "dirty_log": None if self.dirty_log is None else self.dirty_log.describe(),
            "queues": [{"index": v.queue.index, "size": v.queue.size, "started": v.started,
                        "enabled": v.enabled, "broken": v.queue.broken,
                        "last_avail_idx": v.queue.last_avail_idx,
                        "used_idx": v.queue.used_idx, "worker": self.worker_of(i),
                        "frames": q.frames,
                        "bytes": q.bytes, "errors": q.errors}
                       for i, (v, q) in enumerate(zip(self.vrings, self.queue_counters,
                                                      strict=True))],
            "held": self.held(),
            "counters": dict(self.counters),
            "device": self.device.describe(),
        }


# ---------------------------------------------------------------------------------------
# Handlers: (connection, message) -> reply payload or None. They raise PeerError to refuse.
# ---------------------------------------------------------------------------------------

#: The one table of what is handled and allowed when; requests missing here are refused.
#: QEMU 7.2 sends GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM and
#: GET_MAX_MEM_SLOTS before SET_OWNER; DPDK sends SET_OWNER first.
REQUEST_TABLE: RequestTable[Connection] = RequestTable()


def _u64(msg: Message) -> int:
    assert isinstance(msg.payload, m.U64)
    return msg.payload.value


@REQUEST_TABLE.handles(Request.GET_FEATURES, needs_owner=False)
def _get_features(c: Connection, msg: Message) -> m.Payload:
    return m.U64(c.offered_features)


@REQUEST_TABLE.handles(Request.SET_FEATURES)
def _set_features(c: Connection, msg: Message) -> None:
    features = _u64(msg)
    extra = features & ~c.offered_features
    if extra:
        raise RequestError(f"front-end acked features the back-end did not offer: "
                           f"{extra:#x}")
    was_logging, device_features = c.logging, c.acked_features & ~LOG_ALL
    first = not c.features_set
    c.acked_features = features
    c.features_set = True
    event_idx = bool(features & VirtioFeature.RING_EVENT_IDX)
    for vring in c.vrings:
        vring.queue.event_idx = event_idx
        # Without VHOST_USER_F_PROTOCOL_FEATURES rings are enabled from the start.
        if not features & VHOST_USER_F_PROTOCOL_FEATURES:
            vring.enabled = True
    # "To start/stop logging of data/used ring writes, the front-end may send messages
    # VHOST_USER_SET_FEATURES with VHOST_F_LOG_ALL ... set to 1/0". QEMU sends the log
    # (SET_LOG_BASE) first, except for a device it starts while it already migrates; the
    # queues mark it from when both are there.
    c._apply_log()
    if c.logging != was_logging:
        log.info("%s: dirty logging %s%s", c.name, "on" if c.logging else "off",
                 "" if c.dirty_log is not None or not c.logging else " (no log yet)")
    # VHOST_F_LOG_ALL is the connection's business; the device hears of its own bits, and
    # only when they change (QEMU toggles logging with the same features otherwise).
    if first or features & ~LOG_ALL != device_features:
        c.device.features_acked(features & ~LOG_ALL)


@REQUEST_TABLE.handles(Request.GET_PROTOCOL_FEATURES, needs_owner=False)
def _get_protocol_features(c: Connection, msg: Message) -> m.Payload:
    return m.U64(int(c.offered_protocol_features))


@REQUEST_TABLE.handles(Request.SET_PROTOCOL_FEATURES, needs_owner=False)
def _set_protocol_features(c: Connection, msg: Message) -> None:
    features = _u64(msg)
    extra = features & ~int(c.offered_protocol_features)
    if extra:
        raise RequestError(f"front-end set protocol features the back-end did not offer: "
                           f"{extra:#x}")
    c.protocol_features = ProtocolFeature(features)


@REQUEST_TABLE.handles(Request.GET_QUEUE_NUM, needs_owner=False, needs=ProtocolFeature.MQ)
def _get_queue_num(c: Connection, msg: Message) -> m.Payload:
    return m.U64(c.device.queue_num())


@REQUEST_TABLE.handles(Request.GET_MAX_MEM_SLOTS, needs_owner=False,
                       needs=ProtocolFeature.CONFIGURE_MEM_SLOTS)
def _get_max_mem_slots(c: Connection, msg: Message) -> m.Payload:
    return m.U64(c.memory.max_slots)


@REQUEST_TABLE.handles(Request.SET_OWNER, needs_owner=False)
def _set_owner(c: Connection, msg: Message) -> None:
    if c.phase is Phase.OWNED:
        # "This is the first message sent by the front-end ... " - a second one is a bug
        # in the front-end, but harmless; DPDK and QEMU never send it twice.
        raise RequestError("SET_OWNER sent twice")
    c.phase = Phase.OWNED


@REQUEST_TABLE.handles(Request.RESET_OWNER)
def _reset_owner(c: Connection, msg: Message) -> None:
    c._stop_all_rings()
    c.vrings = [Vring(i) for i in range(c.device.num_queues)]
    c._drop_log()
    c.memory.clear()
    c.acked_features = 0
    c.features_set = False
    c.status = 0
    c.device.reset()


@REQUEST_TABLE.handles(Request.SET_MEM_TABLE)
def _set_mem_table(c: Connection, msg: Message) -> None:
    assert isinstance(msg.payload, m.MemoryTable)
    c.memory.set_table(msg.payload.regions, msg.fds)
    c._memory_changed()


@REQUEST_TABLE.handles(Request.ADD_MEM_REG, needs=ProtocolFeature.CONFIGURE_MEM_SLOTS)
def _add_mem_reg(c: Connection, msg: Message) -> None:
    # Not in RING_REQUESTS: with workers, the bursts go on while the region is mapped and
    # the new snapshot built and swapped in (MemoryManager.add_region). That is safe
    # because an added region changes no mapping a ring or a burst uses: every region of
    # the old snapshot is in the new one, mapped where it was, and a burst translates
    # descriptors with the snapshot it holds, old or new. Only re-attaching the rings to
    # the new snapshot waits for the bursts (every queue lock of the connection).
    assert isinstance(msg.payload, m.SingleMemoryRegion)
    if not c.memory.add_region(msg.payload.region, msg.fds.peek(0)).added:
        # QEMU 7.2 sends ADD_MEM_REG once per queue pair; the repeat changes nothing.
        log.debug("%s: ADD_MEM_REG repeats a region of the table", c.name)
        return
    waiting = time.monotonic()
    with c._locked(range(len(c.locks))) as ok:
        if c.threaded:
            c._waited += time.monotonic() - waiting
        assert ok
        c._memory_changed()


@REQUEST_TABLE.handles(Request.REM_MEM_REG, needs=ProtocolFeature.CONFIGURE_MEM_SLOTS)
def _rem_mem_reg(c: Connection, msg: Message) -> None:
    assert isinstance(msg.payload, m.SingleMemoryRegion)
    if not c.memory.remove_region(msg.payload.region).removed:
        log.debug("%s: REM_MEM_REG repeats a removal", c.name)
        return
    c._memory_changed()


@REQUEST_TABLE.handles(Request.SET_VRING_NUM)
def _set_vring_num(c: Connection, msg: Message) -> None:
    assert isinstance(msg.payload, m.VringState)
    vring = c._vring(msg.payload.index)
    if msg.payload.num > c.device.max_queue_size:
        raise RequestError(f"queue {msg.payload.index}: size {msg.payload.num} exceeds the "
                           f"device's maximum {c.device.max_queue_size}")
    vring.queue.set_size(msg.payload.num)


@REQUEST_TABLE.handles(Request.SET_VRING_ADDR)
def _set_vring_addr(c: Connection, msg: Message) -> None:
    p = msg.payload
    assert isinstance(p, m.VringAddr)
    vring = c._vring(p.index)
    if vring.queue.size == 0:
        raise RequestError(f"queue {p.index}: SET_VRING_ADDR before SET_VRING_NUM")
    if p.flags & ~m.VringAddr.F_LOG:
        # Linux's vhost refuses the same (EOPNOTSUPP): no other flag is defined.
        raise RequestError(f"queue {p.index}: unknown vring flags {p.flags:#x}")
    queue = vring.queue
    log_used = bool(p.flags & m.VringAddr.F_LOG)
    if log_used and p.log + queue.ring_sizes()[2] > 1 << 64:
        # log_guest_addr is the front-end's: the used ring's last byte must have a GPA.
        raise RequestError(f"queue {p.index}: log_guest_addr {p.log:#x} + the used ring's "
                           "size overflows 64 bits")
    previous = (queue.desc_va, queue.avail_va, queue.used_va)
    queue.set_addresses(p.descriptor, p.available, p.used)
    # Translate now: a ring outside the memory table is refused here, not at first kick.
    try:
        queue.attach(c.memory.current)
    except VirtqueueError:
        # All-or-nothing: a refused address must not stay behind, to break the ring at
        # the next memory update.
        queue.desc_va, queue.avail_va, queue.used_va = previous
        with contextlib.suppress(VirtqueueError):
            queue.attach(c.memory.current)
        raise
    queue.broken = None
    # "Modifications to 'used' vring should be marked if VHOST_VRING_F_LOG is part of
    # ring's flags"; QEMU sends the flag with every ring when migration starts.
    queue.log_guest_addr = p.log if log_used else None
    if not vring.started:
        # A ring about to start (SET_VRING_KICK comes next) resumes where its used ring
        # says, if the front-end's SET_VRING_BASE disagrees (see resume_from_used_ring).
        replaced = queue.resume_from_used_ring()
        if replaced is not None:
            log.info("%s: queue %d: SET_VRING_BASE %d, but the used ring is at %d: "
                     "resuming there", c.name, p.index, replaced, queue.last_avail_idx)


@REQUEST_TABLE.handles(Request.SET_VRING_BASE)
def _set_vring_base(c: Connection, msg: Message) -> None:
    assert isinstance(msg.payload, m.VringState)
    c._vring(msg.payload.index).queue.set_base(msg.payload.num)


@REQUEST_TABLE.handles(Request.GET_VRING_BASE)
def _get_vring_base(c: Connection, msg: Message) -> m.Payload:
    assert isinstance(msg.payload, m.VringState)
    vring = c._vring(msg.payload.index)
    # "The back-end must stop the ring when it receives VHOST_USER_GET_VRING_BASE", and
    # replies with the next available index it would have read: where the front-end (or a
    # migration's destination, through SET_VRING_BASE) resumes. A stopped ring is not
    # ready, so nothing is written to it any more. The devices use every chain they take
    # within the same turn of the loop (this handler runs between turns), so the used
    # index has caught up with it: no chain is in flight.
    if vring.kick_fd is not None:
        c.kick_loop(vring.queue.index).unwatch(vring.kick_fd)
    vring.replace_fd("kick_fd", None)
    vring.started = False
    queue = vring.queue
    if queue.used_idx != queue.last_avail_idx:
        log.warning("%s: queue %d stopped with %d chains taken and not used", c.name,
                    queue.index, (queue.last_avail_idx - queue.used_idx) & 0xFFFF)
    log.debug("%s: queue %d stopped at %d", c.name, queue.index, queue.last_avail_idx)
    return m.VringState(msg.payload.index, queue.last_avail_idx)


def _vring_fd(c: Connection, msg: Message) -> tuple[Vring, int | None]:
    assert isinstance(msg.payload, m.VringFd)
    vring = c._vring(msg.payload.index)
    fd = None if msg.payload.nofd else msg.fds.take(0)
    if fd is not None:
        os.set_blocking(fd, False)
    return vring, fd


@REQUEST_TABLE.handles(Request.SET_VRING_KICK)
def _set_vring_kick(c: Connection, msg: Message) -> None:
    assert isinstance(msg.payload, m.VringFd)
    if msg.payload.nofd:
        raise RequestError(f"queue {msg.payload.index}: polling mode (no kick fd) is not "
                           "supported")
    vring, fd = _vring_fd(c, msg)
    assert fd is not None
    index = vring.queue.index
    loop = c.kick_loop(index)
    if vring.kick_fd is not None:
        loop.unwatch(vring.kick_fd)
    vring.replace_fd("kick_fd", fd)
    loop.watch(fd, lambda: c.on_kick(index))
    vring.started = True
    # Buffers may already be waiting (e.g. a restarted back-end): serve them now.
    c.serve_soon(index)


@REQUEST_TABLE.handles(Request.SET_VRING_CALL)
def _set_vring_call(c: Connection, msg: Message) -> None:
    vring, fd = _vring_fd(c, msg)
    vring.replace_fd("call_fd", fd)


@REQUEST_TABLE.handles(Request.SET_VRING_ERR)
def _set_vring_err(c: Connection, msg: Message) -> None:
    vring, fd = _vring_fd(c, msg)
    vring.replace_fd("err_fd", fd)


@REQUEST_TABLE.handles(Request.SET_VRING_ENABLE)
def _set_vring_enable(c: Connection, msg: Message) -> None:
    assert isinstance(msg.payload, m.VringState)
    if not c.acked_features & VHOST_USER_F_PROTOCOL_FEATURES and c.features_set:
        # "This request should be sent only when VHOST_USER_F_PROTOCOL_FEATURES has been
        # negotiated."
        raise RequestError("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES")
    if msg.payload.num not in (0, 1):
        raise RequestError(f"SET_VRING_ENABLE with state {msg.payload.num}, expected 0 or 1")
    vring = c._vring(msg.payload.index)
    vring.enabled = bool(msg.payload.num)
    if vring.enabled:
        c.serve_soon(vring.queue.index)


@REQUEST_TABLE.handles(Request.SET_LOG_BASE, needs=ProtocolFeature.LOG_SHMFD)
def _set_log_base(c: Connection, msg: Message) -> m.Payload:
    # "When the back-end has VHOST_USER_PROTOCOL_F_LOG_SHMFD protocol feature, the log
    # memory fd is provided in the ancillary data of VHOST_USER_SET_LOG_BASE message, the
    # size and offset of shared memory area provided in the message." Without LOG_SHMFD
    # there is no way to share a log: the table refuses it (and the front-end, which then
    # waits for no reply, is closed on).
    assert isinstance(msg.payload, m.LogDescription)
    new = DirtyLog.map(msg.payload, msg.fds.peek(0))  # checks first; the bag closes the fd
    old, c.dirty_log = c.dirty_log, new
    c._apply_log()
    if old is not None:
        # QEMU resizes the log (a hot-plug during migration) "before releasing the
        # current log, to ensure no logging is lost": the new one is in force here.
        old.close()
    log.info("%s: dirty log of %d bytes (covers %#x of guest-physical memory)%s", c.name,
             new.size, new.covers, "" if old is None else ", the old one unmapped")
    # "VHOST_USER_SET_LOG_BASE (if VHOST_USER_PROTOCOL_F_LOG_SHMFD)" is answered: QEMU
    # 7.2 reads a reply of this request type and ignores its payload.
    return m.U64(0)


@REQUEST_TABLE.handles(Request.SET_LOG_FD)
def _set_log_fd(c: Connection, msg: Message) -> None:
    # "VHOST_USER_SET_LOG_FD is an optional message with an eventfd in ancillary data, it
    # may be used to inform the front-end that the log has been modified." pyvhost never
    # signals it (QEMU reads the log at every sync without waiting for it): the fd is
    # closed with the message.
    log.debug("%s: SET_LOG_FD: pyvhost does not signal log changes; fd closed", c.name)


@REQUEST_TABLE.handles(Request.SEND_RARP, needs=ProtocolFeature.RARP)
def _send_rarp(c: Connection, msg: Message) -> None:
    # "Ask vhost user back-end to broadcast a fake RARP to notify the migration is
    # terminated for guest that does not support GUEST_ANNOUNCE ... The first 6 bytes of
    # the payload contain the mac address of the guest". QEMU sends it to the
    # destination's back-end once the migrated guest runs, 5 times (announce rounds).
    assert isinstance(msg.payload, m.Raw)
    if len(msg.payload.data) != 8:
        raise RequestError(f"SEND_RARP payload of {len(msg.payload.data)} bytes, "
                           "expected a u64")
    mac = msg.payload.data[:6]
    if mac[0] & 1:
        raise RequestError(f"SEND_RARP for {mac.hex(':')}, a multicast address")
    log.info("%s: announcing %s (SEND_RARP)", c.name, mac.hex(":"))
    c.device.announce(mac)


@REQUEST_TABLE.handles(Request.GET_CONFIG, needs=ProtocolFeature.CONFIG)
def _get_config(c: Connection, msg: Message) -> m.Payload:
    p = msg.payload
    assert isinstance(p, m.ConfigSpace)
    if p.offset + p.size > MAX_CONFIG_SIZE:
        raise RequestError(f"GET_CONFIG range {p.offset}+{p.size} is beyond the "
                           f"{MAX_CONFIG_SIZE}-byte config space limit")
    space = c.device.config()
    data = space[p.offset:p.offset + p.size]
    return m.ConfigSpace(p.offset, p.size, p.flags, data.ljust(p.size, b"\0"))


@REQUEST_TABLE.handles(Request.SET_CONFIG, needs=ProtocolFeature.CONFIG)
def _set_config(c: Connection, msg: Message) -> None:
    p = msg.payload
    assert isinstance(p, m.ConfigSpace)
    c.device.set_config(p.offset, p.payload)


@REQUEST_TABLE.handles(Request.SET_STATUS, needs=ProtocolFeature.STATUS)
def _set_status(c: Connection, msg: Message) -> None:
    status = _u64(msg)
    if status > 0xFF:
        raise RequestError(f"device status {status:#x} does not fit 8 bits")
    c.status = status


@REQUEST_TABLE.handles(Request.GET_STATUS, needs=ProtocolFeature.STATUS)
def _get_status(c: Connection, msg: Message) -> m.Payload:
    # DPDK's front-end checks that the status it set is echoed back.
    return m.U64(c.status)


#: Requests the codec decodes that this back-end refuses ("... is not supported"), and why.
UNSUPPORTED: dict[int, str] = {
    Request.NET_SET_MTU: "PROTOCOL_F_NET_MTU is not offered",
    Request.SET_BACKEND_REQ_FD: "PROTOCOL_F_BACKEND_REQ is not offered",
    Request.SET_VRING_ENDIAN: "PROTOCOL_F_CROSS_ENDIAN is not offered (little-endian only)",
    Request.RESET_DEVICE: "PROTOCOL_F_RESET_DEVICE is not offered (RESET_OWNER resets)",
}

# The table is complete: it and the codec must agree, or pyvhost does not import.
REQUEST_TABLE.check(REQUESTS, UNSUPPORTED)


def update_seconds(record: dict[str, object]) -> float:
    """Seconds from receipt to in force of a memory update record (``last_memory_update``:
    what the metrics' histogram observes, what ``slowest_memory_update`` is the longest
    of)."""
    received, in_force = record["received"], record["in_force"]
    assert isinstance(received, float) and isinstance(in_force, float)
    return in_force - received
