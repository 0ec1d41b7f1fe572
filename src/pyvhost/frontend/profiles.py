"""Front-end profiles: the message sequences real front-ends send, replayed in their order.

A :class:`Profile` is data: which protocol features a front-end asks for, which requests
it sends with need_reply, what it sends at start-up, when the device starts, on a memory
hot-plug and when it stops. A :class:`Session` plays one profile on a
:class:`~pyvhost.frontend.frontend.Frontend` and a
:class:`~pyvhost.frontend.memory.FrontendMemory`.

Every profile is checked against real wire captures (``tests/data/captures``, the golden
data): the test suite plays the profile against a recording back-end that answers what the
captured back-end answered, and compares each request, its need_reply flag, its fd count
and the values that do not depend on addresses, message by message
(tests/frontend/test_profiles.py). A profile's ``captures`` name the files it must match.

- ``qemu-7.2``: QEMU 7.2 (Debian 12) as vhost-user-net (captured against DPDK 22.11,
  SET_MEM_TABLE) and vhost-user-blk (captured against qemu-storage-daemon,
  CONFIGURE_MEM_SLOTS). A vhost-user-net device has one vhost device per queue pair, and
  each sends its own memory update: with ``queue_pairs`` > 1 every hot-plug is sent once
  per pair (the repeats pyvhost's back-end learnt to accept from real QEMU 7.2).
- ``dpdk-virtio-user``: DPDK 22.11's virtio-user PMD (testpmd ``net_virtio_user``). Its
  start-up is captured; its hot-plug sequence is not (it needs DPDK to grow its own
  memory at run time): it is DPDK 22.11's ``virtio_user_mem_event_cb`` (pause every queue
  pair with SET_VRING_ENABLE 0, SET_MEM_TABLE, resume), and it is marked as such.
- ``qemu-10.0``: QEMU 10.0.2 from Debian 12's bookworm-backports, captured the same two
  ways. What changed since 7.2: every SET_VRING_ENABLE carries need_reply, and a
  vhost-user-net device is stopped with GET_VRING_BASE before SET_STATUS 0.

What a profile does not replay: the guest driver's feature choice (the features acked are
the caller's, VERSION_1 by default), and, for queue pairs past the first, QEMU's per-pair
start-up (only their rings and memory updates are sent).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from pyvhost.protocol import messages as m
from pyvhost.protocol.constants import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    ProtocolFeature,
    Request,
    VirtioStatus,
)
from pyvhost.protocol.fds import close_all

from .errors import FrontendUsageError
from .frontend import DEFAULT_FEATURES, Frontend, Negotiated, split_ring_layout
from .memory import FrontendMemory, GuestRam

PF = ProtocolFeature
R = Request
DEVICES = ("net", "blk", "fs")
#: Where each ring goes in boot RAM: 64 KiB apart (a 256-entry split ring takes ~10 KiB).
RING_STRIDE = 64 * 1024


@dataclass(frozen=True, slots=True)
class Profile:
    """What one front-end sends, as data (see the module docstring)."""

    name: str
    title: str
    #: Golden capture files (tests/data/captures) this profile is checked against.
    captures: tuple[str, ...]
    #: Protocol features it implements: it acks ``offered & protocol_features``.
    protocol_features: int
    #: Requests sent with need_reply when REPLY_ACK is negotiated.
    acked: frozenset[int]
    #: DPDK sends SET_OWNER before anything else; QEMU after protocol negotiation.
    owner_first: bool = False
    #: QEMU: GET_QUEUE_NUM (MQ), GET_MAX_MEM_SLOTS, SET_BACKEND_REQ_FD at init.
    qemu_init: bool = True
    #: QEMU 7.2's vhost-user-net sends SET_VRING_ENABLE(1) for every ring this many times
    #: during init (virtio-net's peer attach/queue-pair setup).
    net_enable_rounds: int = 5
    #: The GET_CONFIG size QEMU's vhost-user-blk asks for (virtio-blk config, 7.2: 57).
    blk_config_size: int = 57
    #: Ring sizes: net, blk, fs.
    queue_size: dict[str, int] = field(default_factory=lambda: {"net": 256, "blk": 128,
                                                                "fs": 128})
    #: DPDK: regions at GPA == user address; pause the rings around a table update.
    gpa_is_va: bool = False
    pause_rings_on_update: bool = False
    #: Steps that come from the front-end's source, not from a capture (shown in reports).
    uncaptured: tuple[str, ...] = ()
    #: QEMU 10.0 stops a vhost-user-net device with GET_VRING_BASE first, then
    #: SET_STATUS 0; QEMU 7.2 the other way round.
    status_reset_last: bool = False


QEMU_72 = Profile(
    name="qemu-7.2", title="QEMU 7.2 (Debian 12)",
    captures=("qemu72_dpdk_setmemtable.jsonl", "qemu72_memslots.jsonl"),
    # QEMU 7.2's VHOST_USER_PROTOCOL_FEATURE_MASK (hw/virtio/vhost-user.c): every bit up
    # to STATUS; it acked all of DPDK's 0x10cbf and all of qemu-storage-daemon's 0x8f2b.
    protocol_features=(1 << 17) - 1,
    acked=frozenset({R.SET_MEM_TABLE, R.ADD_MEM_REG, R.REM_MEM_REG, R.SET_BACKEND_REQ_FD,
                     R.NET_SET_MTU, R.SET_CONFIG}),
)

DPDK_VIRTIO_USER = Profile(
    name="dpdk-virtio-user", title="DPDK 22.11 virtio-user (net_virtio_user)",
    captures=("dpdk_virtio_user_handshake.jsonl",),
    # drivers/net/virtio/virtio_user/vhost_user.c: MQ | REPLY_ACK | STATUS (0x10009 acked).
    protocol_features=int(PF.MQ | PF.REPLY_ACK | PF.STATUS),
    acked=frozenset({R.SET_MEM_TABLE, R.SET_STATUS}),
    owner_first=True, qemu_init=False, net_enable_rounds=0,
    queue_size={"net": 256, "blk": 256, "fs": 256},
    gpa_is_va=True, pause_rings_on_update=True,
    uncaptured=("hot-plug: SET_VRING_ENABLE 0 per ring, SET_MEM_TABLE, SET_VRING_ENABLE 1 "
                "per ring (DPDK 22.11 virtio_user_mem_event_cb)",),
)

QEMU_100 = Profile(
    name="qemu-10.0", title="QEMU 10.0.2 (Debian 12 bookworm-backports)",
    captures=("qemu100_dpdk_setmemtable.jsonl", "qemu100_memslots.jsonl"),
    protocol_features=QEMU_72.protocol_features,
    # Captured: 10.0 also asks a REPLY_ACK for every SET_VRING_ENABLE.
    acked=QEMU_72.acked | {R.SET_VRING_ENABLE},
    status_reset_last=True,
)

PROFILES: dict[str, Profile] = {p.name: p for p in (QEMU_72, QEMU_100, DPDK_VIRTIO_USER)}


def get(name: str) -> Profile:
    """The profile called ``name``; FrontendUsageError names the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise FrontendUsageError(f"unknown front-end profile {name!r}; known: "
                                 f"{', '.join(sorted(PROFILES))}") from None


class Session:
    """One front-end profile played on a connection: init, start, hot-plugs, stop.

    It owns the extra eventfds it sends (SET_VRING_CALL/ERR at init, the back-end request
    socket) and closes them in :meth:`close`; the Frontend and the memory are the caller's.
    """

    def __init__(self, profile: Profile, fe: Frontend, memory: FrontendMemory, *,
                 device: str = "net", queue_pairs: int = 1,
                 features: int | None = None) -> None:
        if device not in DEVICES:
            raise FrontendUsageError(f"device {device!r} is not one of {', '.join(DEVICES)}")
        if queue_pairs < 1 or (device != "net" and queue_pairs != 1):
            raise FrontendUsageError("queue pairs: at least 1, and more only for net")
        self.profile = profile
        self.fe = fe
        self.memory = memory
        self.device = device
        self.queue_pairs = queue_pairs
        self.features = DEFAULT_FEATURES if features is None else features
        self._fds: list[int] = []
        self.negotiated: Negotiated | None = None
        fe.ack_all = False
        fe.acked_requests = profile.acked

    # -- helpers ------------------------------------------------------------------------------
    @property
    def queues(self) -> list[int]:
        """Ring indexes of the device: net 2 per queue pair, fs hiprio + 1 request queue,
        blk 1 (QEMU's num-queues=1)."""
        if self.device == "blk":
            return [0]
        if self.device == "fs":
            return [0, 1]
        return list(range(2 * self.queue_pairs))

    @property
    def _protocol_offered(self) -> bool:
        return bool(self.fe.features_offered & VHOST_USER_F_PROTOCOL_FEATURES)

    @property
    def _devices(self) -> int:
        """vhost devices on the connection: one per net queue pair, else one."""
        return self.queue_pairs if self.device == "net" else 1

    def _eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._fds.append(fd)
        return fd

    def close(self) -> None:
        fds, self._fds = self._fds, []
        close_all(fds)

    # -- phases -------------------------------------------------------------------------------
    def negotiate(self, protocol_mask: int | None = None) -> Negotiated:
        """The front-end's start-up, up to (not including) the device start.
        ``protocol_mask`` takes bits away from what the profile asks for (``--no-mem-slots``).
        """
        p, fe = self.profile, self.fe
        wanted_pf = p.protocol_features & (protocol_mask if protocol_mask is not None else -1)
        if p.owner_first:
            fe.set_owner()
        offered = fe.get_features()
        fe.features_offered = offered
        if offered & VHOST_USER_F_PROTOCOL_FEATURES:
            fe.protocol_features_offered = fe.get_protocol_features()
            fe.set_protocol_features(fe.protocol_features_offered & wanted_pf)
            if p.qemu_init:
                # GET_QUEUE_NUM: "should be sent only when VHOST_USER_PROTOCOL_F_MQ is set"
                if fe.protocol_features & PF.MQ:
                    fe.get_queue_num()
                if fe.protocol_features & PF.CONFIGURE_MEM_SLOTS:
                    fe.get_max_mem_slots()
                if fe.protocol_features & PF.BACKEND_REQ:
                    self._backend_req_fd()
        if not p.owner_first:
            fe.set_owner()
        if p.qemu_init:
            fe.get_features()  # vhost_dev_init re-reads them after SET_OWNER
            for q in self.queues:
                fe.set_vring_fd(R.SET_VRING_CALL, q, self._eventfd())
                fe.set_vring_fd(R.SET_VRING_ERR, q, self._eventfd())
            if self.device == "blk" and fe.protocol_features & PF.CONFIG:
                fe.get_config(p.blk_config_size)
            if self.device == "net" and self._protocol_offered:
                for _ in range(p.net_enable_rounds):
                    for q in self.queues:
                        fe.set_vring_enable(q, True)
        else:
            for q in self.queues:
                fe.set_vring_fd(R.SET_VRING_CALL, q, self._eventfd())
            self._set_features()
            if fe.protocol_features & PF.STATUS:
                # virtio_user_dev: ACKNOWLEDGE | DRIVER | FEATURES_OK, then read it back.
                fe.set_status(int(VirtioStatus.ACKNOWLEDGE | VirtioStatus.DRIVER
                                  | VirtioStatus.FEATURES_OK))
                fe.get_status()
                fe.get_status()
        self.negotiated = Negotiated(offered, fe.features, fe.protocol_features_offered,
                                     fe.protocol_features, fe.queue_num, fe.max_mem_slots)
        return self.negotiated

    def _backend_req_fd(self) -> None:
        # SET_BACKEND_REQ_FD: "Set the socket file descriptor for back-end initiated
        # requests." Our end is never read: the probe answers no back-end request.
        ours, theirs = _socketpair()
        self._fds.append(ours)
        try:
            self.fe.request(R.SET_BACKEND_REQ_FD, m.Empty(), [theirs])
        finally:
            os.close(theirs)

    def _set_features(self) -> None:
        fe = self.fe
        offered = fe.features_offered
        acked = (self.features & offered & ~VHOST_USER_F_PROTOCOL_FEATURES) | (
            offered & VHOST_USER_F_PROTOCOL_FEATURES)
        fe.set_features(acked)

    def add_region(self, size: int, *, boot: bool = False) -> GuestRam:
        """A new region of guest RAM, placed the way this front-end places it."""
        if self.profile.gpa_is_va:
            return self.memory.add_at_va(size)
        return self.memory.add_boot_ram(size) if boot else self.memory.add_dimm(size)

    def start(self, boot: GuestRam) -> None:
        """Start the device: features, status, the memory table, the rings (in ``boot``)."""
        p, fe = self.profile, self.fe
        if p.qemu_init:
            if self.device == "net":
                self._set_features()
                self._features_ok()
                self.update_memory()
                self._rings(boot, call=True, enable=False)
            else:
                # vhost-user-blk/fs start: guest notifiers (SET_VRING_CALL), then
                # vhost_dev_start (SET_FEATURES again), memory, rings, enable.
                self._set_features()
                for q in self.queues:
                    fe.set_vring_fd(R.SET_VRING_CALL, q, self._eventfd())
                self._set_features()
                self._features_ok()
                self.update_memory()
                self._rings(boot, call=False, enable=self._protocol_offered)
            self._driver_ok()
        else:
            self.update_memory()
            self._rings(boot, call=False, enable=False)
            for q in self.queues:
                fe.set_vring_enable(q, True)
            self._driver_ok()

    def _features_ok(self) -> None:
        # QEMU's vhost_user_set_features adds FEATURES_OK when STATUS is negotiated.
        if self.fe.protocol_features & PF.STATUS:
            status = self.fe.get_status()
            self.fe.set_status(status | VirtioStatus.FEATURES_OK)

    def _driver_ok(self) -> None:
        if self.fe.protocol_features & PF.STATUS:
            ok = int(VirtioStatus.ACKNOWLEDGE | VirtioStatus.DRIVER | VirtioStatus.DRIVER_OK
                     | VirtioStatus.FEATURES_OK)
            if self.profile.qemu_init:
                self.fe.set_status(self.fe.get_status() | ok)
            else:
                self.fe.set_status(ok)

    def _rings(self, boot: GuestRam, *, call: bool, enable: bool) -> None:
        size = self.profile.queue_size[self.device]
        _, _, _, total = split_ring_layout(size)
        stride = max(RING_STRIDE, -(-total // 4096) * 4096)
        for q in self.queues:
            offset = q * stride
            boot.write(offset, bytes(total))  # a driver zeroes its rings first
            self.fe.setup_vring(q, size, boot, offset, call=call, enable=enable)

    def update_memory(self) -> list[str]:
        """Tell the back-end about the memory as it is now (a hot-plug or an unplug), once
        per vhost device on the connection; return the requests sent."""
        fe = self.fe
        pause = self.profile.pause_rings_on_update and bool(fe.vrings)
        if pause:
            for q in self.queues:
                fe.set_vring_enable(q, False)
        sent: list[str] = []
        for dev in range(self._devices):
            sent += fe.update_memory(self.memory.regions, device=dev)
        if pause:
            for q in self.queues:
                fe.set_vring_enable(q, True)
        return sent

    def stop(self) -> list[int]:
        """Stop the device as the front-end does on shutdown; the rings' last indexes."""
        fe = self.fe
        if self.profile.qemu_init:
            if self.device == "net":
                if self.profile.status_reset_last:
                    bases = [fe.get_vring_base(q) for q in self.queues if q in fe.vrings]
                    if fe.protocol_features & PF.STATUS:
                        fe.set_status(0)
                    return bases
                if fe.protocol_features & PF.STATUS:
                    fe.set_status(0)
            else:
                if fe.protocol_features & PF.STATUS:
                    fe.set_status(0)
                if self._protocol_offered:
                    for q in self.queues:
                        fe.set_vring_enable(q, False)
        else:
            for q in self.queues:
                fe.set_vring_enable(q, False)
        return [fe.get_vring_base(q) for q in self.queues if q in fe.vrings]


def _socketpair() -> tuple[int, int]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    return a.detach(), b.detach()


def names() -> Sequence[str]:
    return sorted(PROFILES)


__all__ = ["DEVICES", "PROFILES", "Profile", "Session", "get", "names"]
