"""A Linux tap device as a port of the switch, so that VMs reach the host and namespaces.

The tap is created when the port opens (``/dev/net/tun``, TUNSETIFF with
IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, then TUNSETVNETHDRSZ 12 so that every frame read or
written starts with the same 12-byte virtio-net header the vhost-user ports carry) and
brought up (SIOCSIFFLAGS IFF_UP). It is not made persistent, so the kernel removes it
when its fd closes: on :meth:`TapPort.close`, or whenever the process ends.

Offloads are on (TUNSETOFFLOAD with TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6): the kernel
hands us frames with partial checksums (NEEDS_CSUM) and TCP GSO frames of up to 64 KiB,
and takes the same from us; their headers are checked like a guest's
(:func:`~.offload.check_ingress`, with the kernel's extra liberties: DATA_VALID, GSO
without NEEDS_CSUM) and travel through the switch, to be completed or segmented for a
vhost-user port that did not negotiate them. Without TUN_F_TSO_ECN and TUN_F_UFO the
kernel segments ECN and UDP GSO itself. Reads are non-blocking, at most :data:`BATCH` per
wake-up (the selector is level-triggered: what is left wakes it again).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
import threading
from collections.abc import Sequence

from pyvhost.backend.loop import Loop
from pyvhost.errors import LocalError

from .core import MAX_ETHERNET, MIN_FRAME, NET_HDR, Port, Switch
from .offload import (
    ALL,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    HeaderError,
    adapt_egress,
    check_ingress,
)

log = logging.getLogger(__name__)

# linux/if_tun.h and linux/sockios.h
TUNSETIFF = 0x400454CA
TUNSETVNETHDRSZ = 0x400454D8
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFNAMSIZ = 16
#: struct ifreq is 40 bytes on x86_64: the name, then a 24-byte union.
_IFREQ = struct.Struct("16sH22x")

BATCH = 64
#: The largest frame taken from the tap; reads ask for one byte more, so that a longer
#: frame is seen (and dropped) rather than taken cut.
LARGEST = NET_HDR + MAX_ETHERNET


class TapPort(Port):
    """One tap interface, owned by this process."""

    kind = "tap"

    def __init__(self, ifname: str, switch: Switch, loop: Loop) -> None:
        if not ifname or len(ifname.encode()) >= IFNAMSIZ or "/" in ifname:
            raise LocalError(f"{ifname!r} is not a valid interface name "
                             f"(1 to {IFNAMSIZ - 1} bytes)")
        super().__init__(ifname)
        self.switch = switch
        self.loop = loop
        self.fd = -1
        #: Serialises writes into the tap and its closing: with worker threads several
        #: ports' bursts deliver here at once (a leaf lock: nothing is taken under it).
        self._write_lock = threading.Lock()

    def open(self) -> TapPort:
        """Create the tap, bring it up, join the switch and start reading."""
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            ifr = _IFREQ.pack(self.name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", NET_HDR))
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
            _set_up(self.name)
        except OSError as e:
            os.close(fd)
            raise LocalError(f"can not create tap {self.name}: {e.strerror}"
                             + (" (an interface of another kind has this name?)"
                                if e.errno == errno.EINVAL else "")) from e
        self.fd = fd
        self.loop.watch(fd, self._readable)
        self.switch.add_port(self)
        log.info("tap %s: created", self.name)
        return self

    def close(self) -> None:
        """Leave the switch and close the fd (the kernel removes the tap). Idempotent."""
        if self.fd < 0:
            return
        self.loop.unwatch(self.fd)
        with self._write_lock:  # no write is under way into the fd closed here
            os.close(self.fd)
            self.fd = -1
        self.switch.remove_port(self)

    # -- from the tap into the switch ------------------------------------------------------
    def _readable(self) -> None:
        counters = self.counters
        frames: list[bytes | bytearray] = []
        for _ in range(BATCH):
            try:
                data: bytes | bytearray = os.read(self.fd, LARGEST + 1)
            except BlockingIOError:
                break
            except OSError as e:
                log.warning("tap %s: read failed: %s", self.name, e)
                break
            if len(data) < MIN_FRAME:
                counters.drop_rx("malformed")
                continue
            if len(data) > LARGEST:
                counters.drop_rx("too_big")
                continue
            if data[0] or data[1]:
                try:
                    data = check_ingress(data, ALL, kernel=True)
                except HeaderError as e:
                    counters.drop_rx("malformed")
                    log.debug("tap %s: malformed header: %s", self.name, e)
                    continue
            frames.append(data)
        self.switch.receive(self, frames)

    # -- from the switch out of the tap ----------------------------------------------------
    def deliver(self, frames: Sequence[bytes | bytearray]) -> None:
        with self._write_lock:
            if self.fd < 0:
                self.counters.drop_tx("port_down", len(frames))
                return
            self._deliver(frames)

    def _deliver(self, frames: Sequence[bytes | bytearray]) -> None:
        counters = self.counters
        sent = nbytes = 0
        for frame in frames:
            if frame[1] and not frame[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM:
                # GSO without NEEDS_CSUM (from another tap): segmented, as for a guest.
                try:
                    out: Sequence[bytes | bytearray] = adapt_egress(frame, ALL)
                except HeaderError:
                    counters.drop_tx("malformed")
                    continue
            else:
                out = (frame,)
            for data in out:
                try:
                    os.write(self.fd, data)
                except BlockingIOError:
                    counters.drop_tx("no_rx_buffer")
                except OSError as e:
                    # EIO: the interface is down (e.g. just moved into another namespace);
                    # EINVAL: the kernel refused the header (counted, never fatal).
                    counters.drop_tx("port_down" if e.errno == errno.EIO else "error")
                else:
                    sent += 1
                    nbytes += len(data)
        counters.tx_frames += sent
        counters.tx_bytes += nbytes - NET_HDR * sent


def _set_up(ifname: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        got = fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, _IFREQ.pack(ifname.encode(), 0))
        flags = _IFREQ.unpack(got)[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, _IFREQ.pack(ifname.encode(), flags | IFF_UP))
