"""The ring fields a driver polls while the device writes them, read from another process.

A driver on another CPU reads ``used->idx`` (and, with EVENT_IDX, ``avail_event``) at any
moment. Every value it can see must be one the device meant to publish: the old field or
the new one, never a mix and never 0 on the way. ``struct.pack_into`` wrote 0 first
(CPython zeroes the destination before packing), and DPDK 22.11's virtio_user, reading
``used->idx == 0`` in that window, took ``0 - vq_used_cons_idx`` as thousands of used
entries, freed chains it had never given out, and crashed on its broken free list.

A poller process maps the same memfd and reads the field with single 2-byte loads until it
has seen a number of changes; the writer publishes values that are never 0 until the
poller is done. Nothing here is timed: the poller stops after a count of changes, and the
hang guard is a generous bound on a machine that may be busy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

from pyvhost.virtq.split import SplitQueue
from support.memfd import SharedRam
from support.ring import DriverRing, RingLayout, device_queue

SIZE = 256
#: Changes of the field the poller must see before it reports; each is a moment at which
#: a transient value could have been read.
CHANGES = 20000
#: The values written run from FIRST up to LAST and start again at FIRST; 0 is never
#: published, so a 0 read is a value the device did not mean.
FIRST, LAST = 1, 0xFF00
HANG_GUARD_S = 600

_POLLER = r"""
import json, mmap, os, sys
fd, off, changes_wanted = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if len(os.sched_getaffinity(0)) > 1:
    # Run beside the writer, not in turns with it.
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
mm = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
field = memoryview(mm)[off:off + 2].cast("H")  # one 2-byte load per read
print("ready", flush=True)
prev = field[0]
reads = changes = zeros = 0
while changes < changes_wanted:
    v = field[0]
    reads += 1
    if v != prev:
        changes += 1
        prev = v
        if v == 0:
            zeros += 1
field.release()
print(json.dumps({"reads": reads, "changes": changes, "zeros": zeros}), flush=True)
"""


def _queue(ram: SharedRam, event_idx: bool) -> tuple[SplitQueue, DriverRing]:
    ring = DriverRing(ram, RingLayout(SIZE, 0x1000, 0x3000, 0x4000))
    return device_queue(ring, ram.mem, event_idx=event_idx, base=FIRST), ring


def _watch_while(ram: SharedRam, gpa: int, write_next: Callable[[], None]) -> dict[str, int]:
    """Call ``write_next`` until the poller watching ``gpa`` has seen CHANGES changes."""
    poller = subprocess.Popen([sys.executable, "-c", _POLLER, str(ram.fd), str(gpa),
                               str(CHANGES)], pass_fds=[ram.fd], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert poller.stdout is not None
        assert poller.stdout.readline().strip() == "ready"
        # The poller ends by itself once it has seen CHANGES changes (every write is one).
        while poller.poll() is None:
            for _ in range(500):
                write_next()
        out, _ = poller.communicate(timeout=HANG_GUARD_S)
        assert poller.returncode == 0, out
        report: dict[str, int] = json.loads(out.strip().splitlines()[-1])
        return report
    finally:
        if poller.poll() is None:
            poller.kill()
            poller.wait()


def test_used_idx_of_push_used_batch_is_never_seen_as_zero(ram: SharedRam) -> None:
    q, ring = _queue(ram, event_idx=False)

    def write_next() -> None:
        q.push_used_batch([(3, 0), (4, 0)])
        if q.used_idx >= LAST:
            q.set_base(FIRST)

    report = _watch_while(ram, ring.layout.used + 2, write_next)
    assert report["changes"] == CHANGES
    assert report["zeros"] == 0, report


def test_used_idx_of_push_used_is_never_seen_as_zero(ram: SharedRam) -> None:
    q, ring = _queue(ram, event_idx=False)

    def write_next() -> None:
        q.push_used(5, 64)
        if q.used_idx >= LAST:
            q.set_base(FIRST)

    report = _watch_while(ram, ring.layout.used + 2, write_next)
    assert report["zeros"] == 0, report


def test_avail_event_is_never_seen_as_zero(ram: SharedRam) -> None:
    # With EVENT_IDX a transient 0 in avail_event can make the driver skip the kick the
    # device is about to wait for.
    q, ring = _queue(ram, event_idx=True)

    def write_next() -> None:
        q.last_avail_idx = FIRST + (q.last_avail_idx + 1 - FIRST) % (LAST - FIRST)
        q.enable_kicks(True)

    report = _watch_while(ram, ring.layout.avail_event, write_next)
    assert report["zeros"] == 0, report


def test_the_fields_still_carry_the_values(ram: SharedRam) -> None:
    """The single-store path writes little-endian values where the driver reads them."""
    q, ring = _queue(ram, event_idx=True)
    q.push_used_batch([(7, 100), (2, 0)])
    assert ring.used_idx() == FIRST + 2
    assert ring.used_elem((FIRST + 0) % SIZE) == (7, 100)
    assert ring.used_elem((FIRST + 1) % SIZE) == (2, 0)
    q.last_avail_idx = 0x1234
    q.enable_kicks(True)
    assert os.pread(ram.fd, 2, ring.layout.avail_event) == b"\x34\x12"
    q.event_idx = False
    q.enable_kicks(False)
    assert ring.used_flags() == 1
    q.enable_kicks(True)
    assert ring.used_flags() == 0
