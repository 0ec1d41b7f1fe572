"""A blocking vhost-user front-end that sends what QEMU 7.2 sends.

:class:`Frontend` connects to a back-end's Unix socket, negotiates features in QEMU's
order, sets the memory table (SET_MEM_TABLE, or ADD_MEM_REG / REM_MEM_REG when
CONFIGURE_MEM_SLOTS is negotiated), sets up vrings with eventfds, and checks every reply
(request code, reply flag, payload size, REPLY_ACK value). Every request's round-trip time
is recorded per request name in :attr:`Frontend.timings`.

It owns the socket, the decoder and the kick/call eventfds. It does not own guest memory
(:class:`~pyvhost.frontend.memory.GuestRam` objects belong to the caller, who must keep
them open while the back-end's table holds them), and bytes go over the socket only
through :mod:`pyvhost.protocol.transport`.

Which requests carry ``need_reply``: QEMU 7.2 sets it (when REPLY_ACK is negotiated) on
SET_MEM_TABLE, ADD_MEM_REG and REM_MEM_REG, and on SET_FEATURES / SET_VRING_ADDR only while
dirty logging is on. By default (``ack_all=True``) this front-end sets it on every request
that has no explicit reply, so that every request is confirmed and timed; the memory
update messages are the same either way. ``ack_all=False`` sets it only where QEMU 7.2 does.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pyvhost.closing import Closing
from pyvhost.errors import PeerError
from pyvhost.protocol import messages as m
from pyvhost.protocol.codec import Decoder, Message, encode, has_explicit_reply
from pyvhost.protocol.constants import (
    FLAG_NEED_REPLY,
    VHOST_MEMORY_BASELINE_NREGIONS,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ProtocolFeature,
    Request,
    VirtioFeature,
    VirtioStatus,
    bit_names,
)
from pyvhost.protocol.fds import close_all
from pyvhost.protocol.transport import TransportError, peer_pid, recv_chunk, send_message

from .errors import (
    BackendClosedError,
    BackendError,
    BackendTimeoutError,
    FrontendConnectError,
    FrontendUsageError,
    NackError,
)
from .memory import GuestRam

PF = ProtocolFeature

#: The protocol features this front-end implements, and so asks for by default.
SUPPORTED_PROTOCOL_FEATURES = PF.MQ | PF.REPLY_ACK | PF.CONFIGURE_MEM_SLOTS | PF.STATUS
#: Virtio features acked by default (intersected with what the back-end offers).
DEFAULT_FEATURES = int(VirtioFeature.VERSION_1)
#: Requests QEMU 7.2 sends with need_reply when REPLY_ACK is negotiated (no dirty logging).
QEMU_ACKED_REQUESTS = frozenset({Request.SET_MEM_TABLE, Request.ADD_MEM_REG,
                                 Request.REM_MEM_REG, Request.NET_SET_MTU,
                                 Request.SET_CONFIG})
#: The requests that change the back-end's memory table.
MEMORY_REQUESTS = ("SET_MEM_TABLE", "ADD_MEM_REG", "REM_MEM_REG")
#: virtio 1.2, 2.7: "Queue Size value is always a power of 2. The maximum Queue Size
#: value is 32768."
MAX_QUEUE_SIZE = 32768
_EMPTY = m.Empty()


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The outcome of :meth:`Frontend.negotiate`."""

    features_offered: int
    features: int
    protocol_features_offered: int
    protocol_features: int
    queue_num: int | None
    max_mem_slots: int | None

    @property
    def protocol_feature_names(self) -> list[str]:
        return bit_names(self.protocol_features, ProtocolFeature)

    @property
    def mem_slots(self) -> bool:
        return bool(self.protocol_features & PF.CONFIGURE_MEM_SLOTS)


@dataclass(frozen=True, slots=True)
class Vring:
    """A split virtqueue set up on the back-end: its addresses and its eventfds.

    The eventfds belong to the :class:`Frontend`, which closes them.
    """

    index: int
    size: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    kick_fd: int
    call_fd: int


def split_ring_layout(size: int) -> tuple[int, int, int, int]:
    """Offsets of the descriptor table, available ring and used ring, and the total size.

    virtio 1.2, 2.7: descriptor table 16 bytes per entry (alignment 16), available ring
    ``6 + 2 * size`` bytes (alignment 2), used ring ``6 + 8 * size`` bytes (alignment 4).
    The used ring is put on a 4096-byte boundary, which also satisfies legacy layouts.
    """
    if size <= 0 or size > MAX_QUEUE_SIZE or size & (size - 1):
        raise FrontendUsageError(f"queue size {size} must be a power of 2 up to "
                                 f"{MAX_QUEUE_SIZE}")
    desc = 0
    avail = desc + 16 * size
    used = -(-(avail + 6 + 2 * size) // 4096) * 4096
    return desc, avail, used, used + 6 + 8 * size


def _same_region(a: m.MemoryRegion, b: m.MemoryRegion) -> bool:
    # REM_MEM_REG: "The memory region to be removed is identified by its guest address,
    # user address and size. The mmap offset is ignored." QEMU's reg_equal() compares
    # the same three fields.
    return (a.guest_phys_addr == b.guest_phys_addr and a.userspace_addr == b.userspace_addr
            and a.memory_size == b.memory_size)


class Frontend(Closing):
    """A blocking vhost-user front-end on one Unix socket connection."""

    def __init__(self, *, ack_all: bool = True) -> None:
        self.ack_all = ack_all
        #: When set, exactly these requests carry need_reply (with REPLY_ACK): a front-end
        #: profile's own choice (DPDK's virtio-user acks SET_STATUS, QEMU does not).
        self.acked_requests: frozenset[int] | None = None
        self.path: str | None = None
        self.timeout: float | None = None
        self._sock: socket.socket | None = None
        self._decoder = Decoder(replies=True)
        self._broken: BackendError | None = None
        #: What the back-end offered / what was acked (0 until negotiated).
        self.features_offered = 0
        self.features = 0
        self.protocol_features_offered = 0
        #: Negotiated protocol features (set once SET_PROTOCOL_FEATURES was sent).
        self.protocol_features = 0
        self.queue_num: int | None = None
        self.max_mem_slots: int | None = None
        #: Round-trip time of every request in nanoseconds, by request name. For a request
        #: that gets no reply it is the time to send it.
        self.timings: dict[str, list[int]] = {}
        # The back-end's memory table as we told it, in the order it learnt the regions;
        # one per vhost device on this connection (QEMU's vhost-user-net has one vhost
        # device per queue pair, and each sends its own memory updates).
        self._tables: dict[int, list[m.MemoryRegion]] = {0: []}
        self._device = 0
        self._vrings: dict[int, Vring] = {}

    # -- connection ------------------------------------------------------------------------
    def connect(self, path: str | os.PathLike[str], timeout: float = 5.0) -> None:
        """Connect to the back-end listening on ``path``; ``timeout`` bounds every later
        send and every wait for a reply too."""
        if self._sock is not None:
            raise FrontendUsageError(f"already connected to {self.path}")
        where = os.fspath(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(where)
        except OSError as e:
            sock.close()
            raise self._connect_error(where, e, timeout) from e
        except BaseException:
            sock.close()
            raise
        # A fresh connection starts a fresh session (a reconnect after close() included).
        self._decoder = Decoder(replies=True)
        self._broken = None
        self._sock, self.path, self.timeout = sock, where, timeout

    def adopt(self, sock: socket.socket, where: str, timeout: float = 5.0) -> None:
        """Use an already connected socket, e.g. one accepted from a back-end that connects
        to us (``--listen``: QEMU's ``server=on`` chardev). The Frontend owns it from now on.
        """
        if self._sock is not None:
            sock.close()
            raise FrontendUsageError(f"already connected to {self.path}")
        sock.settimeout(timeout)
        self._decoder = Decoder(replies=True)
        self._broken = None
        self._sock, self.path, self.timeout = sock, where, timeout

    @property
    def sock(self) -> socket.socket:
        """The connection (for looking up its peer; bytes go through :meth:`send_raw`)."""
        if self._sock is None:
            raise FrontendUsageError("not connected")
        return self._sock

    @staticmethod
    def _connect_error(path: str, e: OSError, timeout: float) -> FrontendConnectError:
        if isinstance(e, FileNotFoundError):
            return FrontendConnectError(
                f"no vhost-user socket at {path}: is the back-end running, and is this "
                "the path it listens on?")
        if isinstance(e, ConnectionRefusedError):
            return FrontendConnectError(
                f"{path}: connection refused: the file exists but nothing listens on it "
                "(a stale socket of a back-end that exited?)")
        if isinstance(e, TimeoutError):
            return FrontendConnectError(f"{path}: connect timed out after {timeout} s")
        return FrontendConnectError(f"can not connect to {path}: {e.strerror or e}")

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def peer_pid(self) -> int | None:
        """The back-end's pid (SO_PEERCRED of the connection), if the kernel tells."""
        return None if self._sock is None else peer_pid(self._sock)

    def close(self) -> None:
        """Close the connection and the eventfds. Guest memory stays with its owner."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        self._decoder.close()
        for vring in self._vrings.values():
            close_all((vring.kick_fd, vring.call_fd))
        self._vrings.clear()
        self._tables = {0: []}

    # -- the request core ----------------------------------------------------------------
    def _wants_ack(self, request: Request) -> bool:
        # REPLY_ACK: "With this protocol extension negotiated, the sender (QEMU) can set
        # the need_reply [Bit 3] flag to any command." ... "For the message types that
        # already solicit a reply from the back-end, the presence of
        # VHOST_USER_PROTOCOL_F_REPLY_ACK or need_reply bit being set brings no
        # behavioural change." - so never on GET_* requests.
        if not self.protocol_features & PF.REPLY_ACK or has_explicit_reply(request):
            return False
        if self.acked_requests is not None:
            return request in self.acked_requests
        return self.ack_all or request in QEMU_ACKED_REQUESTS

    def request(self, request: Request, payload: m.Payload = _EMPTY,
                fds: Sequence[int] = ()) -> m.Payload | None:
        """Send any request with this connection's reply rules (need_reply, checks, timing);
        the payload of its explicit reply, if it has one. For front-end profiles that send
        requests the convenience methods do not cover."""
        return self._request(request, payload, fds)

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Put bytes on the wire as they are (hostile tests): no framing, no reply read.
        The decoder is left as it was; a connection used this way is for one case only."""
        send_message(self._usable(), data, tuple(fds))

    def _request(self, request: Request, payload: m.Payload = _EMPTY,
                 fds: Sequence[int] = ()) -> m.Payload | None:
        """Send one request; return the payload of its explicit reply, if it has one.

        A request with need_reply returns None after a zero REPLY_ACK and raises
        :class:`NackError` otherwise.
        """
        sock = self._usable()
        explicit = has_explicit_reply(request)
        ack = self._wants_ack(request)
        name = request.name
        start = time.perf_counter_ns()
        try:
            send_message(sock, encode(request, payload, flags=FLAG_NEED_REPLY if ack else 0),
                         tuple(fds))
            reply = self._read_reply(sock, request, ack=ack) if explicit or ack else None
        except TimeoutError as e:
            raise self._fail(BackendTimeoutError(
                f"{name}: no reply from the back-end within {self.timeout} s")) from e
        except (BrokenPipeError, ConnectionResetError) as e:
            raise self._fail(BackendClosedError(
                f"{name}: the back-end closed the connection ({e.strerror})")) from e
        except (TransportError, BackendError) as e:
            raise self._fail(e if isinstance(e, BackendError)
                             else BackendError(f"{name}: {e}")) from e
        except PeerError as e:  # the codec: FramingError / MessageError
            raise self._fail(BackendError(f"bad reply to {name}: {e}")) from e
        finally:
            self.timings.setdefault(name, []).append(time.perf_counter_ns() - start)
        if reply is None:
            return None
        if ack:
            # REPLY_ACK: "The payload should be set to zero on success or non-zero on
            # failure".
            assert isinstance(reply, m.U64)
            if reply.value != 0:
                raise NackError(request, reply.value)
            return None
        return reply

    def _read_reply(self, sock: socket.socket, request: Request, *, ack: bool) -> m.Payload:
        self._decoder.expect = request
        self._decoder.expect_ack = ack
        while True:
            msg = self._decoder.next_message()
            if msg is not None:
                return self._check_reply(msg, request)
            data, fds = recv_chunk(sock)
            if not data:
                raise BackendClosedError(
                    f"{request.name}: the back-end closed the connection instead of "
                    "replying")
            self._decoder.feed(data, fds)

    @staticmethod
    def _check_reply(msg: Message, request: Request) -> m.Payload:
        # The decoder already checked the version, the reply flag ("Bit 2 is the reply flag
        # - needs to be sent on each reply from the back-end"), the request code (it must
        # be the one we sent), the payload size of the reply type, and that no fds came.
        msg.fds.close()
        if msg.need_reply:
            # QEMU's vhost_user_read_header() accepts exactly REPLY | VERSION.
            raise BackendError(f"reply to {request.name} has need_reply set "
                               f"(flags {msg.flags:#x})")
        return msg.payload

    def _usable(self) -> socket.socket:
        if self._broken is not None:
            raise FrontendUsageError(f"the connection is unusable after an earlier error: "
                                     f"{self._broken}")
        if self._sock is None:
            raise FrontendUsageError("not connected")
        return self._sock

    def _fail(self, error: BackendError) -> BackendError:
        self._broken = error
        return error

    # -- negotiation ---------------------------------------------------------------------
    def _get_u64(self, request: Request) -> int:
        reply = self._request(request)
        assert isinstance(reply, m.U64)
        return reply.value

    def get_features(self) -> int:
        return self._get_u64(Request.GET_FEATURES)

    def set_features(self, features: int) -> None:
        self._request(Request.SET_FEATURES, m.U64(features))
        self.features = features

    def get_protocol_features(self) -> int:
        return self._get_u64(Request.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, protocol_features: int) -> None:
        self._request(Request.SET_PROTOCOL_FEATURES, m.U64(protocol_features))
        self.protocol_features = protocol_features

    def get_queue_num(self) -> int:
        self._require(PF.MQ, "GET_QUEUE_NUM")
        self.queue_num = self._get_u64(Request.GET_QUEUE_NUM)
        return self.queue_num

    def get_max_mem_slots(self) -> int:
        self._require(PF.CONFIGURE_MEM_SLOTS, "GET_MAX_MEM_SLOTS")
        self.max_mem_slots = self._get_u64(Request.GET_MAX_MEM_SLOTS)
        return self.max_mem_slots

    def set_owner(self) -> None:
        self._request(Request.SET_OWNER)

    def set_vring_fd(self, request: Request, index: int, fd: int | None) -> None:
        """SET_VRING_KICK / CALL / ERR for ring ``index`` with ``fd`` (None: the invalid FD
        flag, "set when there is no file descriptor in the ancillary data")."""
        self._request(request, m.VringFd(index, nofd=fd is None), () if fd is None else [fd])

    def get_config(self, size: int) -> m.Payload | None:
        """GET_CONFIG of ``size`` bytes from offset 0 (QEMU's vhost-user-blk asks 57 in 7.2)."""
        self._require(PF.CONFIG, "GET_CONFIG")
        return self._request(Request.GET_CONFIG, m.ConfigSpace(0, size, 0, bytes(size)))

    def sync(self) -> None:
        """Wait until the back-end has handled everything sent so far.

        The trick QEMU's enforce_reply() uses when REPLY_ACK is missing: GET_FEATURES
        "makes all backends send a reply", and requests are handled in order.
        """
        self.get_features()

    def _require(self, feature: ProtocolFeature, what: str) -> None:
        if not self.protocol_features & feature:
            raise FrontendUsageError(f"{what} needs protocol feature {feature.name}, which "
                                     "was not negotiated")

    def negotiate(self, features: int | None = None,
                  protocol_features: int = SUPPORTED_PROTOCOL_FEATURES) -> Negotiated:
        """Do what QEMU 7.2's vhost_user_backend_init + vhost_dev_init + start do, in order.

        GET_FEATURES; if VHOST_USER_F_PROTOCOL_FEATURES is offered: GET_PROTOCOL_FEATURES,
        SET_PROTOCOL_FEATURES (what we want & what is offered), GET_QUEUE_NUM (if MQ),
        GET_MAX_MEM_SLOTS (if CONFIGURE_MEM_SLOTS); then SET_OWNER and SET_FEATURES
        (``features`` & offered, plus VHOST_USER_F_PROTOCOL_FEATURES when offered). With
        STATUS, SET_FEATURES is followed by GET_STATUS / SET_STATUS(FEATURES_OK) as QEMU's
        vhost_user_set_features() does. (QEMU also re-reads GET_FEATURES right after
        SET_OWNER in vhost_dev_init() and sends SET_VRING_CALL per queue at init; neither
        changes the back-end's memory state, and both are left out.)
        """
        wanted = DEFAULT_FEATURES if features is None else features
        offered = self.get_features()
        self.features_offered = offered
        if offered & VHOST_USER_F_PROTOCOL_FEATURES:
            # GET_PROTOCOL_FEATURES: "Only legal if feature bit
            # VHOST_USER_F_PROTOCOL_FEATURES is present in VHOST_USER_GET_FEATURES."
            self.protocol_features_offered = self.get_protocol_features()
            self.set_protocol_features(self.protocol_features_offered & protocol_features)
            # GET_QUEUE_NUM: "This request should be sent only when
            # VHOST_USER_PROTOCOL_F_MQ is set in queried protocol features".
            if self.protocol_features & PF.MQ:
                self.get_queue_num()
            if self.protocol_features & PF.CONFIGURE_MEM_SLOTS:
                self.get_max_mem_slots()
        self.set_owner()
        acked = (wanted & offered & ~VHOST_USER_F_PROTOCOL_FEATURES) | (
            offered & VHOST_USER_F_PROTOCOL_FEATURES)
        self.set_features(acked)
        if self.protocol_features & PF.STATUS:
            status = self.get_status()
            if not status & VirtioStatus.FEATURES_OK:
                self.set_status(status | VirtioStatus.FEATURES_OK)
        return Negotiated(offered, acked, self.protocol_features_offered,
                          self.protocol_features, self.queue_num, self.max_mem_slots)

    # -- status ------------------------------------------------------------------------------
    def set_status(self, status: int) -> None:
        # SET_STATUS: "When the VHOST_USER_PROTOCOL_F_STATUS protocol feature has been
        # successfully negotiated, this message is submitted by the front-end".
        self._require(PF.STATUS, "SET_STATUS")
        self._request(Request.SET_STATUS, m.U64(status))

    def get_status(self) -> int:
        self._require(PF.STATUS, "GET_STATUS")
        return self._get_u64(Request.GET_STATUS)

    # -- memory ------------------------------------------------------------------------------
    @property
    def _table(self) -> list[m.MemoryRegion]:
        return self._tables.setdefault(self._device, [])

    @_table.setter
    def _table(self, value: list[m.MemoryRegion]) -> None:
        self._tables[self._device] = value

    @property
    def uses_mem_slots(self) -> bool:
        """Whether memory updates go as ADD_MEM_REG / REM_MEM_REG (CONFIGURE_MEM_SLOTS)."""
        return bool(self.protocol_features & PF.CONFIGURE_MEM_SLOTS)

    @property
    def memory_limit(self) -> int:
        """How many regions the back-end's table may hold (QEMU's memslots limit)."""
        if self.uses_mem_slots and self.max_mem_slots is not None:
            return self.max_mem_slots
        return VHOST_MEMORY_BASELINE_NREGIONS

    @property
    def mem_table(self) -> tuple[m.MemoryRegion, ...]:
        """The back-end's memory table as this front-end told it."""
        return tuple(self._table)

    def set_mem_table(self, regions: Sequence[GuestRam]) -> None:
        """SET_MEM_TABLE with every region and one fd each, in the same order."""
        if not regions:
            raise FrontendUsageError("SET_MEM_TABLE needs at least one region")
        if len(regions) > VHOST_MEMORY_BASELINE_NREGIONS:
            # "Memory regions description": num regions then region0 ... region7.
            raise FrontendUsageError(
                f"SET_MEM_TABLE carries at most {VHOST_MEMORY_BASELINE_NREGIONS} regions, "
                f"asked for {len(regions)}")
        descs = tuple(r.region() for r in regions)
        # "In the ancillary data there is an array of file descriptors for each memory
        # mapped region. The size and ordering of the fds matches the number and ordering
        # of memory regions."
        fds = [r.fd for r in regions]
        self._request(Request.SET_MEM_TABLE, m.MemoryTable(descs), fds)
        self._table = list(descs)

    def add_mem_reg(self, region: GuestRam) -> None:
        """ADD_MEM_REG: one region, "Exactly one file descriptor from which the memory is
        mapped is passed in the ancillary data"."""
        self._require(PF.CONFIGURE_MEM_SLOTS, "ADD_MEM_REG")
        if len(self._table) >= self.memory_limit:
            raise FrontendUsageError(f"the back-end allows {self.memory_limit} memory slots, "
                                     "all in use")
        desc = region.region()
        self._request(Request.ADD_MEM_REG, m.SingleMemoryRegion(desc), [region.fd])
        self._table.append(desc)

    def rem_mem_reg(self, region: GuestRam | m.MemoryRegion) -> None:
        """REM_MEM_REG with no fd: "No file descriptors SHOULD be passed in the ancillary
        data." The region need not be open any more."""
        self._require(PF.CONFIGURE_MEM_SLOTS, "REM_MEM_REG")
        desc = region.region() if isinstance(region, GuestRam) else region
        # QEMU fills the removed region with mmap_offset 0 ("The mmap offset is ignored").
        desc = m.MemoryRegion(desc.guest_phys_addr, desc.memory_size, desc.userspace_addr, 0)
        self._request(Request.REM_MEM_REG, m.SingleMemoryRegion(desc))
        self._table = [r for r in self._table if not _same_region(r, desc)]

    def update_memory(self, regions: Iterable[GuestRam], *, device: int = 0) -> list[str]:
        """Tell the back-end the guest memory map is now ``regions``, exactly as QEMU 7.2
        does when its memory map changes; return the names of the requests sent.

        ``device`` names the vhost device whose table this is: QEMU sends each memory
        update once per vhost device on the connection (one per queue pair of a
        vhost-user-net device), each against the table that device told the back-end.

        Without CONFIGURE_MEM_SLOTS (vhost_user_set_mem_table): one SET_MEM_TABLE with every
        region, by ascending GPA, the same fds each time. Nothing is sent when the map did
        not change (vhost_commit() returns early). With CONFIGURE_MEM_SLOTS
        (vhost_user_add_remove_regions): first REM_MEM_REG for each region that is gone,
        walking the table backwards, then ADD_MEM_REG for each new region by ascending GPA.
        """
        previous, self._device = self._device, device
        try:
            return self._update_memory(sorted(regions, key=lambda r: r.guest_phys_addr))
        finally:
            self._device = previous

    def _update_memory(self, wanted: list[GuestRam]) -> list[str]:
        descs = [r.region() for r in wanted]
        if len(wanted) > self.memory_limit:
            # QEMU refuses the device_add: "a used vhost backend has no free memory slots
            # left".
            raise FrontendUsageError(
                f"{len(wanted)} regions, but the back-end takes at most {self.memory_limit}"
                + ("" if self.uses_mem_slots else " (no CONFIGURE_MEM_SLOTS: SET_MEM_TABLE "
                   f"carries at most {VHOST_MEMORY_BASELINE_NREGIONS})"))
        sent: list[str] = []
        if not self.uses_mem_slots:
            same = len(descs) == len(self._table) and all(
                _same_region(a, b) for a, b in zip(descs, self._table, strict=True))
            if not same:
                self.set_mem_table(wanted)
                sent.append("SET_MEM_TABLE")
            return sent
        gone = [old for old in self._table if not any(_same_region(old, d) for d in descs)]
        for old in reversed(gone):
            self.rem_mem_reg(old)
            sent.append("REM_MEM_REG")
        for ram, desc in zip(wanted, descs, strict=True):
            if not any(_same_region(desc, old) for old in self._table):
                self.add_mem_reg(ram)
                sent.append("ADD_MEM_REG")
        return sent

    # -- vrings ----------------------------------------------------------------------------
    def setup_vring(self, index: int, size: int, ram: GuestRam, offset: int = 0, *,
                    call: bool = True, enable: bool | None = None) -> Vring:
        """Set up split vring ``index`` of ``size`` entries in ``ram`` at ``offset``.

        Sends SET_VRING_NUM, SET_VRING_BASE (0), SET_VRING_ADDR (front-end virtual
        addresses of the rings in our mapping of ``ram``), SET_VRING_KICK and SET_VRING_CALL
        with fresh eventfds, and SET_VRING_ENABLE(1) when VHOST_USER_F_PROTOCOL_FEATURES was
        negotiated. ``call=False`` leaves SET_VRING_CALL out (a front-end that sent it
        earlier; the eventfd is still made and kept); ``enable`` True/False forces or
        leaves out SET_VRING_ENABLE.
        """
        if not 0 <= index <= 0xFF:
            raise FrontendUsageError(f"vring index {index} does not fit the 8 bits of "
                                     "SET_VRING_KICK/CALL")
        desc_off, avail_off, used_off, total = split_ring_layout(size)
        if offset < 0 or offset % 4096 or offset + total > ram.memory_size:
            raise FrontendUsageError(f"a ring of {size} entries ({total} bytes) at offset "
                                     f"{offset:#x} does not fit {ram!r} (offset must be "
                                     "4 KiB aligned)")
        base = ram.userspace_addr + offset
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        vring = Vring(index, size, base + desc_off, base + avail_off, base + used_off,
                      kick, call_fd)
        try:
            self._request(Request.SET_VRING_NUM, m.VringState(index, size))
            self._request(Request.SET_VRING_BASE, m.VringState(index, 0))
            # "a ring address is an IOVA if VIRTIO_F_IOMMU_PLATFORM has been negotiated.
            # Otherwise it is a user address."
            self._request(Request.SET_VRING_ADDR, m.VringAddr(
                index, 0, vring.desc_addr, vring.used_addr, vring.avail_addr, 0))
            self._request(Request.SET_VRING_KICK, m.VringFd(index, nofd=False), [kick])
            if call:
                self._request(Request.SET_VRING_CALL, m.VringFd(index, nofd=False),
                              [call_fd])
        except BaseException:
            close_all((kick, call_fd))
            raise
        old = self._vrings.pop(index, None)
        if old is not None:
            close_all((old.kick_fd, old.call_fd))
        self._vrings[index] = vring
        # SET_VRING_ENABLE: "This request should be sent only when
        # VHOST_USER_F_PROTOCOL_FEATURES has been negotiated."
        if enable if enable is not None else bool(
                self.features & VHOST_USER_F_PROTOCOL_FEATURES):
            self.set_vring_enable(index, True)
        return vring

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._request(Request.SET_VRING_ENABLE, m.VringState(index, int(enable)))

    def get_vring_base(self, index: int) -> int:
        """GET_VRING_BASE: stops the ring ("stop ring upon receiving
        VHOST_USER_GET_VRING_BASE") and returns its next available index."""
        reply = self._request(Request.GET_VRING_BASE, m.VringState(index, 0))
        assert isinstance(reply, m.VringState)
        if reply.index != index:
            raise self._fail(BackendError(f"GET_VRING_BASE for vring {index} answered for "
                                          f"vring {reply.index}"))
        return reply.num

    @property
    def vrings(self) -> dict[int, Vring]:
        return dict(self._vrings)


def describe_protocol_features(value: int) -> list[str]:
    """Names of protocol feature bits (unknown ones as ``bitN``)."""
    return bit_names(value, ProtocolFeature)


__all__ = ["DEFAULT_FEATURES", "MEMORY_REQUESTS", "QEMU_ACKED_REQUESTS",
           "SUPPORTED_PROTOCOL_FEATURES", "Frontend", "Negotiated", "Vring",
           "describe_protocol_features", "split_ring_layout"]
