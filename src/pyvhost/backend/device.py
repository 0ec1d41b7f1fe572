"""The interface a virtio device implements to be served over vhost-user.

A device states its features, queues and config space, and handles kicks with batches of
descriptor chains. It never sees a vhost-user message, an fd or a memory table: the
library owns negotiation, REPLY_ACK, memory and the rings' notifications. One device
instance serves one front-end connection.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from pyvhost.memory import GuestMemory
from pyvhost.protocol.constants import ProtocolFeature
from pyvhost.virtq import SplitQueue

from .queuelock import QueueLock


class DeviceConfigError(Exception):
    """A SET_CONFIG the device refuses (turned into a NACK by the connection)."""


class QueueCounters:
    """What went through one queue of one connection, as the device counted it with
    :meth:`QueueContext.account` (frames and bytes), and how often a guest broke it
    (``errors``, counted by the connection). Kept by the connection for its whole life
    (a RESET_OWNER does not zero them), shown in status output and metrics."""

    __slots__ = ("bytes", "errors", "frames")

    def __init__(self) -> None:
        self.frames = 0
        self.bytes = 0
        self.errors = 0


class QueueContext:
    """What a device may touch while handling a kick: the held memory snapshot, the
    queues that are ready, a way to interrupt the driver, and per-queue counters."""

    __slots__ = ("_counters", "_notify", "_queues", "locks", "mem")

    def __init__(self, mem: GuestMemory, queues: dict[int, SplitQueue],
                 notify: Callable[[int], None],
                 counters: Sequence[QueueCounters] = ()) -> None:
        self.mem = mem
        self._queues = queues
        self._notify = notify
        self._counters = counters
        #: The queue locks a :meth:`DeviceHost.enter_device` took for this context.
        self.locks: list[QueueLock] | None = None

    def queue(self, index: int) -> SplitQueue | None:
        """The queue if it is started, enabled and attached to memory; else None."""
        return self._queues.get(index)

    def ready_queues(self, start: int, stop: int, step: int = 1) -> tuple[SplitQueue, ...]:
        """The ready queues among ``range(start, stop, step)``, in that order (what
        :meth:`queue` gives for each index, the Nones left out)."""
        get = self._queues.get
        return tuple(q for i in range(start, stop, step) if (q := get(i)) is not None)

    def notify(self, index: int) -> None:
        """Signal the driver for queue ``index`` if it asked to be (EVENT_IDX honoured)."""
        q = self._queues.get(index)
        if q is not None and q.notify_decided is False:
            # The data path decided, inside its burst, that the driver wants no interrupt
            # (SplitQueue.decide_notify): should_notify would hand out that False and
            # forget it; the same here, without the host's round trip.
            q.notify_decided = None
            return
        self._notify(index)

    def account(self, index: int, frames: int, nbytes: int) -> None:
        """Count ``frames`` units of work (for a net device: frames) of ``nbytes`` bytes
        that went through queue ``index`` (taken from a transmit queue, written into a
        receive queue). Call it once per batch, not per frame."""
        if 0 <= index < len(self._counters):
            c = self._counters[index]
            c.frames += frames
            c.bytes += nbytes


class DeviceHost(ABC):
    """What serves a device (its connection), as the device may use it outside a kick: a
    switch port receives frames from other ports and must write them into its own receive
    queue. The host holds its memory snapshot around the call and owns error handling: a
    guest error raised inside ``fn`` breaks the queue that broke (SET_VRING_ERR,
    DEVICE_NEEDS_RESET), never the caller."""

    #: Shown in logs and status output (the connection's name).
    name: str
    #: Where this host's queues come in the lock order (:mod:`.queuelock`): egress ports
    #: are held in increasing order.
    order: int = 0

    @abstractmethod
    def run_device(self, index: int, fn: Callable[[QueueContext], None]) -> None:
        """Call ``fn`` with a context of the ready queues; ``index`` is the queue blamed
        for an error no queue claims. Does nothing once the connection is closed."""

    def enter_device(self) -> QueueContext | None:
        """:meth:`run_device` for a caller that holds several hosts at once (a switch
        burst's egress ports): the context ``fn`` would get, for the device's receive
        queues, or None where ``fn`` would not be called. Give it back with
        :meth:`leave_device` on every path; errors meanwhile are the caller's."""
        raise NotImplementedError(f"{type(self).__name__} has no enter_device")

    def leave_device(self, ctx: QueueContext) -> None:
        """Release what :meth:`enter_device` took."""
        raise NotImplementedError(f"{type(self).__name__} has no leave_device")

    @abstractmethod
    def serve_again(self, index: int) -> None:
        """Call the device's ``handle_kick(ctx, index)`` again on the loop's next turn,
        after the other fds that are ready: a device that stops serving a busy queue to
        let other ports run asks for this instead of waiting for a kick that a driver
        with a full ring never sends."""


class VirtioDevice(ABC):
    """Base class of devices. Override what your device has."""

    #: Shown in logs and status output.
    name = "virtio"
    #: Number of virtqueues the device has.
    num_queues = 2
    #: Largest queue size the device accepts in SET_VRING_NUM.
    max_queue_size = 1024
    #: Protocol features the connection must not offer for this device, although the
    #: library implements them: CONFIGURE_MEM_SLOTS here makes QEMU re-send the whole
    #: table with SET_MEM_TABLE on every hot-plug, as with DPDK 22.11 (``pyvhost net
    #: --no-mem-slots``).
    withheld_protocol_features = ProtocolFeature(0)
    #: Whether the front-end reads this device's config space through vhost-user
    #: (GET_CONFIG / SET_CONFIG): only then is the CONFIG protocol feature offered. True
    #: for devices whose front-end has no config of its own (QEMU's vhost-user-blk and
    #: -gpio ask for it, and refuse a back-end without it). A virtio-net front-end builds
    #: the config itself: QEMU's vhost-user-net from ``mac=`` and ``mq=`` (QEMU 7.2 logs
    #: "vhost-user backend supports VHOST_USER_PROTOCOL_F_CONFIG but QEMU does not" at
    #: every start when it is offered), DPDK 22.11's virtio_user from its ``mac=`` (it
    #: negotiates only MQ, REPLY_ACK and STATUS).
    serves_config = False
    #: Whether every write the device makes to guest memory goes through the virtqueue's
    #: methods that mark the dirty log while the front-end logs (DescriptorChain.write
    #: with the queue's ``log``, write_rx_frame, SplitQueue's used-ring methods, and a
    #: data path that does the same): only then may the connection offer VHOST_F_LOG_ALL
    #: and PROTOCOL_F_LOG_SHMFD, so that QEMU can migrate the VM. A device that writes
    #: anywhere else (``ctx.mem.write``) must leave it False: QEMU then refuses to migrate
    #: ("Migration disabled: vhost lacks VHOST_F_LOG_ALL feature") instead of copying
    #: stale pages.
    logs_dirty_pages = False
    #: Whether the device implements :meth:`announce`: only then is PROTOCOL_F_RARP
    #: offered, and QEMU asks the back-end of a migration's destination (SEND_RARP) to
    #: announce the guest's MAC address where the guest can not (no GUEST_ANNOUNCE).
    announces = False

    @abstractmethod
    def device_features(self) -> int:
        """Virtio feature bits the device offers (device-specific and transport bits)."""

    def queue_num(self) -> int:
        """The answer to GET_QUEUE_NUM ("how many queues the back-end supports")."""
        return self.num_queues

    def config(self) -> bytes:
        """The device's whole config space; GET_CONFIG reads a slice of it (when
        :attr:`serves_config`)."""
        return b""

    def set_config(self, offset: int, data: bytes) -> None:
        """SET_CONFIG from the driver. Raise DeviceConfigError to refuse."""
        raise DeviceConfigError("config space is read-only")

    def attach(self, host: DeviceHost) -> None:  # noqa: B027 - optional hook
        """The connection that serves this device, given once, before any other call."""

    def announce(self, mac: bytes) -> None:
        """SEND_RARP: "broadcast a fake RARP to notify the migration is terminated for
        guest that does not support GUEST_ANNOUNCE" (devices with :attr:`announces`)."""
        raise NotImplementedError(f"{self.name} does not announce MAC addresses")

    def features_acked(self, features: int) -> None:  # noqa: B027 - optional hook
        """The front-end's SET_FEATURES (already checked against what was offered)."""

    def memory_changed(self, mem: GuestMemory) -> None:  # noqa: B027 - optional hook
        """A new memory table is in force (after SET_MEM_TABLE / ADD / REM_MEM_REG)."""

    def kick_queues(self, index: int) -> tuple[int, ...]:
        """The queues a kick of queue ``index`` reads or writes (:meth:`handle_kick`):
        with worker threads (``--workers``) their locks are held for the burst
        (:mod:`pyvhost.backend.queuelock`). The kicked queue by default."""
        return (index,)

    def receive_queues(self) -> tuple[int, ...]:
        """The queues :meth:`DeviceHost.run_device` may write outside a kick (a switch
        port's receive queues, written by other ports' bursts): their locks are held
        for such a call. Every queue by default."""
        return tuple(range(self.num_queues))

    @abstractmethod
    def handle_kick(self, ctx: QueueContext, index: int) -> None:
        """The driver kicked queue ``index``: take its chains and serve them."""

    def describe(self) -> dict[str, object]:
        """Device state for status output (counters, ...)."""
        return {"name": self.name}

    def reset(self) -> None:  # noqa: B027 - optional hook
        """The connection is gone or was reset; drop per-connection state."""
