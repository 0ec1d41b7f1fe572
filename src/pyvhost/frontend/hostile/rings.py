"""Hostile cases inside the rings: descriptor chains a device must not follow, and (only with
``--include-destructive``) guest memory truncated under a live ring.

The attacked queue is one the device reads from: virtio-net's transmit queue (1), the
only virtio-blk request queue (0), virtiofs's request queue (1). The chain is written
into the ring the QEMU 7.2 profile set up in boot RAM, through a
:class:`~pyvhost.frontend.driver.DriverQueue` (any value goes), published with the
available idx, and kicked.
"""

from __future__ import annotations

import os

from pyvhost.units import MiB

from ..driver import VIRTQ_DESC_F_INDIRECT as F_INDIRECT
from ..driver import VIRTQ_DESC_F_NEXT as F_NEXT
from ..driver import DriverQueue
from ..memory import GuestRam
from .attacker import Attacker, Response
from .case import Case, Context, NotApplicable

#: Where in boot RAM a "good" buffer goes (past the rings). Boot RAM is at GPA 0, so
#: offsets in it and the GPAs below are the same numbers.
DATA = 1 * MiB


def _queue(a: Attacker) -> int:
    return 0 if a.device == "blk" else 1


def _ring(a: Attacker) -> tuple[GuestRam, DriverQueue]:
    """Start the device (4 MiB of boot RAM); the attacked ring, driven from boot RAM."""
    boot = a.start(4 * MiB)
    q = _queue(a)
    vring = a.fe.vrings.get(q)
    if vring is None:
        raise NotApplicable(f"ring {q} not set up")
    return boot, DriverQueue(boot, vring)


def _chain(a: Attacker, descs: list[tuple[int, int, int, int]], heads: list[int] | None = None,
           avail_idx: int | None = None) -> Response:
    """Write ``descs`` (addr, len, flags, next) at the table's start, the available entries
    ``heads`` (default [0]), publish ``avail_idx`` (default len(heads)), kick, then ask."""
    _, ring = _ring(a)
    for i, (gpa, length, flags, nxt) in enumerate(descs):
        ring.write_desc(i, gpa, length, flags, nxt)
    heads = [0] if heads is None else heads
    for i, head in enumerate(heads):
        ring.set_avail(i, head)
    ring.publish(len(heads) if avail_idx is None else avail_idx)
    ring.kick()
    return a.ping()


def desc_unmapped(a: Attacker, ctx: Context) -> Response:
    return _chain(a, [(0xDEAD_0000_0000, 1514, 0, 0)])


def desc_len_huge(a: Attacker, ctx: Context) -> Response:
    return _chain(a, [(DATA, 0xFFFFFFFF, 0, 0)])


def desc_crosses_region_end(a: Attacker, ctx: Context) -> Response:
    return _chain(a, [(4 * MiB - 100, 4096, 0, 0)])


def desc_loop(a: Attacker, ctx: Context) -> Response:
    return _chain(a, [(DATA, 64, F_NEXT, 1), (DATA + 64, 64, F_NEXT, 0)])


def desc_next_out_of_range(a: Attacker, ctx: Context) -> Response:
    return _chain(a, [(DATA, 64, F_NEXT, 0xFFF0)])


def head_out_of_range(a: Attacker, ctx: Context) -> Response:
    return _chain(a, [(DATA, 64, 0, 0)], heads=[0xFFF3])


def avail_idx_jump(a: Attacker, ctx: Context) -> Response:
    return _chain(a, [(DATA, 64, 0, 0)], heads=[0], avail_idx=3 * 256 + 1)


def indirect_not_negotiated(a: Attacker, ctx: Context) -> Response:
    return _chain(a, [(DATA, 17, F_INDIRECT, 0)])


def truncated_under_ring(a: Attacker, ctx: Context) -> Response:
    boot, ring = _ring(a)
    ring.write_desc(0, DATA, 64)
    ring.set_avail(0, 0)
    ring.publish(1)
    # The file shrinks under the back-end's mapping: its next access past the end of the
    # file is a SIGBUS (ours too: we do not touch it again).
    os.ftruncate(boot.fd, 0)
    ring.kick()
    return a.ping()


_LOOP = ("The driver MUST NOT add a descriptor chain longer than 2^32 bytes in total; this "
         "implies that loops in the descriptor chain are forbidden! (virtio 1.2, 2.7.5.1)")

CASES = [
    Case("descriptors-address-unmapped", "descriptors",
         "Guest addresses map to the vhost memory region containing that guest address.",
         "a chain whose buffer is at a GPA no region maps", desc_unmapped),
    Case("descriptors-length-4g", "descriptors", _LOOP,
         "a buffer of 0xffffffff bytes in a 4 MiB region", desc_len_huge),
    Case("descriptors-crosses-region-end", "descriptors",
         "Guest addresses map to the vhost memory region containing that guest address.",
         "a buffer that runs past the end of its region", desc_crosses_region_end),
    Case("descriptors-loop", "descriptors", _LOOP, "desc 0 -> 1 -> 0 -> ...", desc_loop),
    Case("descriptors-next-out-of-range", "descriptors",
         "Queue Size value is always a power of 2. The maximum Queue Size value is 32768. "
         "(virtio 1.2, 2.7: the table has Queue Size entries)",
         "next = 0xfff0 in a 256-entry table", desc_next_out_of_range),
    Case("descriptors-head-out-of-range", "descriptors",
         "Queue Size value is always a power of 2. The maximum Queue Size value is 32768. "
         "(virtio 1.2, 2.7: the table has Queue Size entries)",
         "an available entry naming descriptor 0xfff3", head_out_of_range),
    Case("descriptors-avail-idx-jump", "descriptors",
         "idx field indicates where the driver would put the next descriptor entry in the "
         "ring (modulo the queue size). (virtio 1.2, 2.7.6)",
         "avail idx 769 on a 256-entry ring (3 rings' worth at once)", avail_idx_jump),
    Case("descriptors-indirect-not-negotiated", "descriptors",
         "The driver MUST NOT set the VIRTQ_DESC_F_INDIRECT flag unless the "
         "VIRTIO_F_INDIRECT_DESC feature was negotiated. (virtio 1.2, 2.7.5.3.1)",
         "an indirect descriptor of 17 bytes", indirect_not_negotiated),
    Case("destructive-memory-truncated-under-ring", "destructive",
         "A way for requesting shared memory represented by a file descriptor so it can be "
         "passed over a UNIX domain socket and then mapped by the other process.",
         "boot RAM (the rings) truncated to 0 bytes, then a kick", truncated_under_ring,
         destructive=True),
]

__all__ = ["CASES"]
