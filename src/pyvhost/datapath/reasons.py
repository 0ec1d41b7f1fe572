"""Why the compiled data path broke a queue: its error codes and their messages.

The native burst (:mod:`._native`) returns a code and up to two numbers; this module
turns them into the very sentences :class:`~pyvhost.virtq.SplitQueue` and
:class:`~pyvhost.memory.GuestMemory` say for the same broken invariant, so the queue is
broken with the same reason on either path (the differential test holds them equal).
The codes are repeated as a ``cdef enum`` in ``_native.pyx``: keep both in step.
"""

from __future__ import annotations

AVAIL_JUMP = 1      # a: chains the avail idx moved, b: queue size
HEAD_RANGE = 2      # a: head, b: queue size
CHAIN_LOOP = 3      # a: head, b: table length
NESTED_INDIRECT = 4
INDIRECT_NEXT = 5
INDIRECT_LEN = 6    # a: length
INDIRECT_SIZE = 7   # a: entries, b: queue size
INDIRECT_RANGE = 8  # a: GPA, b: length
BUFFER_RANGE = 9    # a: the first GPA outside guest memory (b = 1: 2**64, past the end)
ORDER = 10
NEXT_RANGE = 11     # a: next, b: table length
RING_RANGE = 12     # a: GPA of a ring, b: its length


def reason(code: int, a: int, b: int) -> str:
    """The queue's ``broken`` reason for a native error."""
    if code == AVAIL_JUMP:
        return f"avail idx moved {a} past last seen, more than the queue size {b}"
    if code == HEAD_RANGE:
        return f"head index {a} >= queue size {b}"
    if code == CHAIN_LOOP:
        return f"chain at head {a} has more than {b} descriptors in one table (a loop?)"
    if code == NESTED_INDIRECT:
        return "indirect descriptor inside an indirect table"
    if code == INDIRECT_NEXT:
        return "descriptor has both INDIRECT and NEXT"
    if code == INDIRECT_LEN:
        return f"indirect table length {a} is not a non-zero multiple of 16"
    if code == INDIRECT_SIZE:
        return f"indirect table of {a} entries exceeds the queue size {b}"
    if code == INDIRECT_RANGE:
        return (f"indirect table outside guest memory: GPA range {a:#x}+{b:#x} is not "
                "inside one region of guest memory")
    if code == BUFFER_RANGE:
        gpa = 1 << 64 if b else a
        return f"buffer outside guest memory: GPA {gpa:#x} is outside guest memory"
    if code == ORDER:
        return "device-readable descriptor after a device-writable one"
    if code == NEXT_RANGE:
        return f"next index {a} >= table size {b}"
    if code == RING_RANGE:
        return (f"ring outside guest memory: GPA range {a:#x}+{b:#x} is not inside one "
                "region of guest memory")
    return f"data path error {code} ({a}, {b})"
