"""The one adapter between the data-path tests and the test-side ring driver.

Everything these tests need of a driver goes through here, so that the day the test
support's driver ring changes, only this module changes. It builds on the one test-side
driver ring, :class:`support.ring.DriverRing`.

:class:`Ram` is guest memory of three regions of one memfd, GPA equal to the file offset:
LOW and HIGH adjacent (a buffer may straddle them), then a gap, then FAR. Nothing here
reads or writes it through the code under test (``os.pread``/``os.pwrite`` only).

For tests against a real back-end process, a guest is :class:`support.netdriver.NetDriver`
(pyvhost's own front-end playing QEMU, and a virtio-net driver).
"""

from __future__ import annotations

import os
import random
import time

from pyvhost.memory import DirtyLog
from pyvhost.protocol.messages import LogDescription, MemoryRegion
from pyvhost.virtq import SplitQueue
from support.memfd import REGION_SIZE, SharedRam, memfd
from support.netdriver import TIMEOUT, NetDriver, RamOffsets, frame_tag, make_frame, wait_any
from support.ring import DESC, U16, DriverRing, RingLayout, device_queue

REGION = REGION_SIZE
#: The gap: [GAP, FAR) is not guest memory.
GAP, FAR = 0x20000, 0x30000


class Ram(SharedRam):
    """Three regions of one memfd: :class:`SharedRam`'s LOW and HIGH, then FAR past a gap;
    ``mem`` is the device's view."""

    FARR = MemoryRegion(FAR, REGION, 0x7F00_0040_0000, FAR)
    REGIONS = (SharedRam.LOW, SharedRam.HIGH, FARR)
    END = FAR + REGION  # file size; [GAP, FAR) of the file is never mapped

    def __init__(self, content: bytes = b"") -> None:
        super().__init__("pyvhost-dp", content)

    def image(self) -> bytes:
        """Every byte of guest memory (the three regions)."""
        return self.read(0, GAP) + self.read(FAR, REGION)


class LogFile:
    """A dirty log as QEMU shares one (SET_LOG_BASE): a memfd of ``offset + size`` bytes,
    the :class:`~pyvhost.memory.DirtyLog` the back-end maps from it, and the bitmap read
    back from the file (``os.pread``, not through the code under test)."""

    def __init__(self, size: int, offset: int = 0) -> None:
        self.size, self.offset = size, offset
        self.fd = memfd(offset + size, name="pyvhost-dp-log")
        try:
            self.log = DirtyLog.map(LogDescription(size, offset), self.fd)
        except BaseException:
            os.close(self.fd)
            raise

    def state(self) -> tuple[bytes, int, int]:
        """The bitmap, and the log's ``marks`` and ``overflows``."""
        return os.pread(self.fd, self.size, self.offset), self.log.marks, self.log.overflows

    def close(self) -> None:
        self.log.close()
        os.close(self.fd)


def desc(ram: Ram, table_gpa: int, index: int, addr: int, length: int, flags: int,
         next_: int) -> None:
    """Write one descriptor (addr and length may be any 64/32-bit values)."""
    ram.write(table_gpa + 16 * index, DESC.pack(addr, length, flags, next_))


def make_queue(ram: Ram, index: int, size: int, gpas: tuple[int, int, int], *,
               event_idx: bool, base: int) -> tuple[SplitQueue, DriverRing]:
    """A device-side queue attached to ``ram`` and its driver, both at ``base``."""
    ring = DriverRing(ram, RingLayout(size, *gpas), index=index, event_idx=event_idx)
    ring.avail_idx = base
    ring.publish(base)
    return device_queue(ring, ram.mem, event_idx=event_idx, base=base), ring


def publish_raw(ram: Ram, ring: DriverRing, heads: list[int], avail_idx: int) -> None:
    """Put ``heads`` in the available ring from ``ring.avail_idx`` on, then set the avail
    idx to any value (a jump past the size included)."""
    for k, head in enumerate(heads):
        slot = (ring.avail_idx + k) % ring.size
        ram.write(ring.layout.avail_slot(slot), U16.pack(head & 0xFFFF))
    ring.publish(avail_idx)


def queue_state(q: SplitQueue) -> tuple[object, ...]:
    """What the data path may change in a queue, all of it."""
    return (q.last_avail_idx, q.used_idx, q._shadow_avail, q._signalled_used,
            q.notify_decided, q.broken)


# -- a guest on a real back-end process ----------------------------------------------------

def reflected_guest(path: str, address: bytes) -> NetDriver:
    """A guest driver connected to ``path`` (a reflector), rings in boot RAM, buffers in a
    1 MiB DIMM."""
    drv = NetDriver(path, address).start()
    drv.plug(1 << 20)
    return drv


def boot_ram_fd(drv: NetDriver) -> int:
    """The fd of the file behind the guest's boot RAM (where its rings are)."""
    assert drv.rx is not None and isinstance(drv.rx.memory, RamOffsets)
    return drv.rx.memory.ram.fd


def region_names(drv: NetDriver) -> list[str]:
    """The memfd names of the guest's regions (as /proc/PID/maps and fd links show them)."""
    return [ram.name for ram in drv.memory.regions]


def kick_tx(drv: NetDriver) -> None:
    assert drv.tx is not None
    drv.tx.kick()


def reflect_round(drv: NetDriver, peer: bytes, count: int, seq: int,
                  rng: random.Random, timeout: float = TIMEOUT) -> None:
    """Send ``count`` frames to a reflector and check each comes back once, MACs swapped,
    intact (crc)."""
    drv.post_rx()
    for i in range(count):
        assert drv.send(make_frame(peer, drv.mac, 1, seq + i, rng, size=rng.randint(60, 1514)))
    drv.flush_tx()
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        assert time.monotonic() < deadline, f"{len(got)} of {count} frames came back"
        drv.reap_tx()
        got += drv.reap_rx()
        drv.post_rx()
        if len(got) < count:
            wait_any(drv.call_fds, 0.05)
    for k, frame in enumerate(got):
        assert frame[:6] == drv.mac and frame[6:12] == peer, frame[:12].hex()
        assert frame_tag(frame) == (1, seq + k)
