"""The witness: another VM on the back-end, which every hostile case must leave unharmed.

It is a connection of its own, opened before the first case and started the way QEMU 7.2
starts a device (boot RAM, rings, DRIVER_OK). :meth:`Witness.check` asks it two things:

- **control**: does it still get an answer (GET_FEATURES, within the case timeout)?
- **frames**, where the device has rings a driver can fill (virtio-net): a frame put on
  its transmit queue (1) must be used by the device within the case timeout, and, if the
  back-end sent the witness's frames back on its receive queue (0) before any case ran (a
  reflector, testpmd forwarding a port to itself), the frame must come back again.

A back-end whose control thread stalls but whose data path runs on (DPDK's polling
cores) is told apart from one whose data path stopped (a crashed worker, a lock held by a
hostile connection): the check says which. For blk and fs only the control messages are
checked: their requests need a device-specific driver this suite does not carry.

:meth:`Witness.settle` waits, before a leak is measured, until the back-end has finished
letting go of what the case's connection brought: a back-end releases a closed
connection's fds and mappings on its own schedule (qemu-storage-daemon a little after the
hang-up), and a count taken mid-way is not a leak.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from pyvhost.devices.virtio_net import HDR_LEGACY, HDR_V1, RX, TX, VIRTIO_NET_F_MRG_RXBUF
from pyvhost.errors import PyvhostError
from pyvhost.protocol.constants import VirtioFeature
from pyvhost.tools import procfs

from ..driver import DriverQueue
from ..errors import FrontendUsageError
from ..memory import GuestRam, name_prefix
from .attacker import Attacker

#: Where the witness's buffers go in its 2 MiB of boot RAM (GPA 0), past its rings:
#: receive buffers from 1 MiB, transmit buffers from 1.25 MiB (up to 1.5 MiB).
RX_AREA = 1 << 20
TX_AREA = RX_AREA + (256 << 10)
BUFFER = 2048
RX_BUFFERS = 16
TX_BUFFERS = 128
#: An IEEE 802 "local experimental" EtherType, and a locally administered unicast MAC:
#: frames nobody else sends.
ETHERTYPE = 0x88B5
MAC = bytes.fromhex("02707976686f")  # 02:"pyvho"
MARKER = b"pyvhost witness "
_SEQ = struct.Struct(">Q")
#: :meth:`Witness.settle`: the counts must stay the same this long (seconds), polled this
#: often, and it gives up after SETTLE_TIMEOUT (a back-end whose counts never rest, e.g.
#: one serving other clients meanwhile, is measured as it is then).
SETTLE_QUIET = 0.3
SETTLE_POLL = 0.05
SETTLE_TIMEOUT = 3.0


@dataclass(frozen=True, slots=True)
class FrameCheck:
    """What the witness's frames did before any case ran."""

    #: The device used the witness's transmitted frames: frames are checked after each case.
    used: bool
    #: They came back on its receive queue: that is checked too.
    back: bool
    detail: str = ""

    def to_json(self) -> dict[str, object]:
        return {"checked": self.used, "frames_back": self.back, "detail": self.detail}


class NetFrames:
    """The witness's two net queues, driven the way a guest driver does."""

    def __init__(self, a: Attacker, boot: GuestRam, timeout: float) -> None:
        fe = a.fe
        if TX not in fe.vrings or RX not in fe.vrings:
            raise FrontendUsageError("the witness has no receive and transmit queue")
        self.timeout = timeout
        # "struct virtio_net_hdr": num_buffers is there with VERSION_1 or MRG_RXBUF.
        modern = fe.features & (int(VirtioFeature.VERSION_1) | VIRTIO_NET_F_MRG_RXBUF)
        self.hdr_len = HDR_V1 if modern else HDR_LEGACY
        self.boot = boot
        self.rx = DriverQueue(boot, fe.vrings[RX])
        self.tx = DriverQueue(boot, fe.vrings[TX])
        self.rx_slot: dict[int, int] = {}
        for slot in range(RX_BUFFERS):
            self._post_rx(slot)
        self.rx.kick()
        self.seq = 0
        self.baseline = FrameCheck(False, False)

    def _post_rx(self, slot: int) -> None:
        head = self.rx.add(self.rx.gpa(RX_AREA + slot * BUFFER), BUFFER, writable=True)
        self.rx_slot[head] = slot

    def calibrate(self) -> FrameCheck:
        """Send one frame before any case: what this back-end does with frames."""
        used, back, problem = self._round_trip(expect_back=True)
        detail = problem if not used else "" if back else (
            "frames are used but not sent back: only their use is checked")
        self.baseline = FrameCheck(used, used and back, detail)
        return self.baseline

    def check(self) -> str:
        """"" when frames flow as they did before the cases, else what stopped."""
        if not self.baseline.used:
            return ""
        used, back, problem = self._round_trip(expect_back=self.baseline.back)
        if problem:
            return problem
        if not used:
            return (f"a frame on the witness's transmit queue was not used within "
                    f"{self.timeout:g} s")
        if self.baseline.back and not back:
            return (f"the witness's frame did not come back on its receive queue within "
                    f"{self.timeout:g} s")
        return ""

    def _frame(self) -> bytes:
        self.seq += 1
        payload = MARKER + _SEQ.pack(self.seq)
        frame = MAC + MAC + struct.pack(">H", ETHERTYPE) + payload
        return bytes(self.hdr_len) + frame.ljust(60, b"\0")

    def _round_trip(self, *, expect_back: bool) -> tuple[bool, bool, str]:
        """Transmit one frame; (used, came back, a broken used ring)."""
        data = self._frame()
        want = data[self.hdr_len:]
        try:
            head = self._send(data)
            deadline = time.monotonic() + self.timeout
            used = back = False
            while True:
                used = used or any(h == head for h, _ in self.tx.take_used())
                back = back or self._received(want)
                if (used and (back or not expect_back)) or time.monotonic() > deadline:
                    return used, back, ""
                time.sleep(0.002)
        except PyvhostError as e:
            return False, False, f"the witness's rings: {e}"

    def _send(self, data: bytes) -> int:
        # One of TX_BUFFERS buffers by sequence number: a device that still holds an older
        # frame there reads this one instead, which does not change what is checked.
        offset = TX_AREA + (self.seq % TX_BUFFERS) * BUFFER
        self.boot.write(offset, data)
        head = self.tx.add(self.tx.gpa(offset), len(data))
        self.tx.kick()
        return head

    def _received(self, want: bytes) -> bool:
        """Take what came in on the receive queue, give the buffers back; whether a frame
        with the payload of ``want`` was among it."""
        found = False
        taken = self.rx.take_used()
        for head, length in taken:
            slot = self.rx_slot.pop(head)
            # The length is the device's: read at most the buffer it was given.
            got = self.boot.read(RX_AREA + slot * BUFFER, min(length, BUFFER))
            frame = got[self.hdr_len:]
            # A reflector swaps the MACs; both are ours. Compare from the EtherType on.
            found = found or frame[12:len(want)] == want[12:]
            self._post_rx(slot)
        if taken:
            self.rx.kick()
        return found


class Witness:
    """The other VM: a started device on its own connection, checked after every case."""

    def __init__(self, path: str, device: str, timeout: float) -> None:
        self.a = Attacker(path, device=device, timeout=timeout)
        try:
            self.boot = self.a.start()
            self.frames = NetFrames(self.a, self.boot, timeout) if device == "net" else None
            self.before = (self.frames.calibrate() if self.frames is not None
                           else FrameCheck(False, False, f"{device}: control messages only"))
        except BaseException:
            self.a.close()
            raise

    def check(self) -> str:
        """"" when the witness is unharmed, else what went wrong."""
        answer = self.a.ping()
        frames = self.frames.check() if self.frames is not None else ""
        if answer.kind == "reply":
            return frames
        text = f"the witness got no answer to GET_FEATURES ({answer})"
        if not self.before.used:
            return text
        # Say whether the data path stalled with the control path, or runs on without it.
        return text + (f"; and {frames}" if frames else "; its frames still flow")

    def settle(self, pid: int, *, quiet: float = SETTLE_QUIET,
               timeout: float = SETTLE_TIMEOUT) -> bool:
        """Wait until the back-end ``pid`` (the process serving this witness) has let go
        of what the last case brought: see :func:`settle`."""
        return settle(pid, quiet=quiet, timeout=timeout)

    def close(self) -> None:
        self.a.close()


def settle(pid: int, *, quiet: float = SETTLE_QUIET, timeout: float = SETTLE_TIMEOUT) -> bool:
    """Poll process ``pid``'s fd count and its fds on and mappings of pyvhost's files
    until they stay the same for ``quiet`` seconds (True), or ``timeout`` passes or the
    process is gone (False)."""
    deadline = time.monotonic() + timeout
    last: tuple[int, int, int] | None = None
    since = time.monotonic()
    while True:
        try:
            usage = procfs.measure(pid, name_prefix())
        except procfs.ProcfsError:
            return False
        counts = (usage.fds, usage.matching_fds, usage.mappings)
        now = time.monotonic()
        if counts != last:
            last, since = counts, now
        elif now - since >= quiet:
            return True
        if now >= deadline:
            return False
        time.sleep(SETTLE_POLL)


__all__ = ["FrameCheck", "NetFrames", "Witness", "settle"]
