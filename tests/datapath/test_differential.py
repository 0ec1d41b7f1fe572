"""The compiled data path against the pure-Python reference, on the same random rings.

Each example builds one guest memory image (random bytes, then a transmit and a receive
ring with random descriptor tables, indirect tables and available rings: valid chains
and hostile ones, loops, over-long chains, addresses outside guest memory, past 2**64 or
straddling regions, nested or chained indirect tables, bad table lengths, index jumps,
zero-length buffers, receive buffers too small, MRG_RXBUF and EVENT_IDX on and off), puts
it in two separate memories, runs the reflector's bursts on one with each path, and
asserts: the same burst results, the same exception (type and text: the same queue
broken for the same reason), the same queue state, the same notification decisions, the
same statistics, and every byte of guest memory equal (used rings and frames included).

Most examples run while the front-end logs (a live migration): each path gets its own
memfd-backed dirty log, one for both queues as QEMU shares it or one per queue, of a size
that covers guest memory or only part of it (overflows), at an offset in its file, and
per ring ``log_guest_addr`` (VHOST_VRING_F_LOG) or none: at the used ring's GPA, past the
log, or near 2**64 (the sum wraps). Both paths must leave the same bitmaps and the same
``marks`` and ``overflows`` counts.

Scale: ``EXAMPLES`` random images per run (``PYVHOST_DIFF_EXAMPLES`` overrides), each
run through up to ``MAX_BURSTS`` bursts.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Protocol

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvhost.datapath import reference
from pyvhost.devices.virtio_net import MAX_FRAME
from pyvhost.memory import GuestMemory
from pyvhost.virtq import SplitQueue, VirtqueueError

from .rings import FAR, GAP, REGION, LogFile, Ram, desc, make_queue, publish_raw, queue_state

native = pytest.importorskip("pyvhost.datapath._native",
                             reason="the compiled data path is not built")

EXAMPLES = int(os.environ.get("PYVHOST_DIFF_EXAMPLES", "4000"))
MAX_BURSTS = 4
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4

# Where the rings and indirect tables live (the rest of memory is random data).
TX_RING = (0x1000, 0x1400, 0x1600)
RX_RING = (0x2000, 0x2400, 0x2600)
INDIRECT = 0x3000  # table k at INDIRECT + 0x200 * k
N_INDIRECT = 4
TABLE = 8  # entries written per indirect table

Desc = tuple[int, int, int, int]  # addr, len, flags, next

#: Dirty log sizes in bytes (0: not logging): 8 bytes cover guest memory (FAR + REGION is
#: 64 pages), fewer only part of it, so writes past the log are counted as overflows.
LOG_BYTES = [0, 1, 3, 8, 40]
#: log_guest_addr of a ring: None (no VHOST_VRING_F_LOG), USED_GPA (the used ring's GPA,
#: as QEMU sends it), or any u64: past a small log, near 2**64 (base + offset wraps).
USED_GPA = -1
LOG_USED = [None, USED_GPA, 0x3FFFC, 0x7FFF_F000, 2**64 - 6, 2**64 - 1]

INTERESTING_ADDRS = [0x8000, REGION - 8, REGION - 100, REGION - 1, GAP - 64, GAP - 1, GAP,
                     FAR - 4, FAR, FAR + REGION - 60, FAR + REGION, 2**64 - 32, 2**64 - 1,
                     2**63, INDIRECT]


def rand_addr(r: random.Random, hostile: float) -> int:
    die = r.random()
    if die < max(hostile, 0.02):
        return r.choice(INTERESTING_ADDRS) if r.random() < 0.7 else r.randrange(2**64)
    return r.randrange(0x4000, GAP - 2048) if r.random() < 0.7 else \
        r.randrange(FAR, FAR + REGION - 2048)


def rand_length(r: random.Random, hdr: int, writable: bool, hostile: float) -> int:
    if r.random() < max(hostile, 0.05):
        return r.choice([0, 1, hdr + 13, hdr + 14, hdr + 60, 1514 + hdr, hdr + MAX_FRAME,
                         hdr + MAX_FRAME + 1, 0x10000, 0xFFFFFFFF, r.randrange(64)])
    if writable:
        return r.randrange(0, 2048) if r.random() < 0.4 else r.randrange(1024, 2048)
    return r.randrange(hdr + 14, 1600)


def rand_desc(r: random.Random, size: int, hdr: int, hostile: float, writable: float,
              indirect: float) -> Desc:
    """One descriptor: valid-looking unless the dice say otherwise (``hostile``)."""
    flags = F_WRITE if r.random() < writable else 0
    if r.random() < 0.35:
        flags |= F_NEXT
    if r.random() < indirect:
        # An indirect descriptor: mostly a well-formed one pointing at one of the tables.
        flags = F_INDIRECT | (flags if r.random() < hostile else 0)
        k = r.randrange(N_INDIRECT)
        entries = r.randrange(1, min(TABLE, size) + 1) if r.random() > hostile else \
            r.randrange(0, size + 3)
        a = INDIRECT + 0x200 * k if r.random() > hostile else rand_addr(r, 1.0)
        n = 16 * entries if r.random() > hostile else r.randrange(600)
        return a, n, flags, r.randrange(size + 2)
    bound = size + 2 if r.random() < hostile else size
    nxt = r.randrange(bound) if bound else 0
    return (rand_addr(r, hostile), rand_length(r, hdr, bool(flags & F_WRITE), hostile),
            flags, nxt)


@dataclass
class Case:
    seed: int
    hdr_len: int
    mrg_rxbuf: bool
    event_idx: bool
    has_rx: bool
    limit: int
    tx_size: int
    rx_size: int
    tx_base: int
    rx_base: int
    hostility: float
    indirect: float
    tx_jump: bool
    rx_jump: bool
    tx_flags: int
    rx_flags: int
    log_bytes: int = 0
    log_offset: int = 0
    log_shared: bool = True
    tx_log_used: int | None = None
    rx_log_used: int | None = None


@st.composite
def cases(draw: st.DrawFn) -> Case:
    hdr_len, mrg = draw(st.sampled_from([(12, False), (12, True), (10, False)]))
    return Case(
        seed=draw(st.integers(0, 2**32)),
        hdr_len=hdr_len, mrg_rxbuf=mrg, event_idx=draw(st.booleans()),
        has_rx=draw(st.integers(0, 19)) > 0, limit=draw(st.sampled_from([1, 2, 3, 5, 64])),
        tx_size=draw(st.sampled_from([1, 2, 4, 8, 16])),
        rx_size=draw(st.sampled_from([1, 2, 4, 8, 16])),
        tx_base=draw(st.one_of(st.just(0), st.integers(0, 0xFFFF))),
        rx_base=draw(st.one_of(st.just(0), st.integers(0, 0xFFFF))),
        hostility=draw(st.sampled_from([0.0, 0.02, 0.1, 0.5])),
        indirect=draw(st.sampled_from([0.0, 0.1, 0.3])),
        tx_jump=draw(st.integers(0, 9)) == 0, rx_jump=draw(st.integers(0, 9)) == 0,
        tx_flags=draw(st.integers(0, 3)), rx_flags=draw(st.integers(0, 3)),
        log_bytes=draw(st.sampled_from(LOG_BYTES)),
        log_offset=draw(st.sampled_from([0, 0x1003])), log_shared=draw(st.booleans()),
        tx_log_used=draw(st.sampled_from(LOG_USED)),
        rx_log_used=draw(st.sampled_from(LOG_USED)))


def attach_logs(case: Case, tx: SplitQueue, rx: SplitQueue) -> list[LogFile]:
    """Logging on, as the case says: the queues' logs and log_guest_addr."""
    if not case.log_bytes:
        return []
    logs = [LogFile(case.log_bytes, case.log_offset)]
    if not case.log_shared:
        logs.append(LogFile(case.log_bytes, case.log_offset))
    for q, log, used in ((tx, logs[0], case.tx_log_used), (rx, logs[-1], case.rx_log_used)):
        q.log = log.log
        assert q.ring_gpas is not None
        q.log_guest_addr = q.ring_gpas[2] if used == USED_GPA else used
    return logs


def build(case: Case, content: bytes) -> tuple[Ram, SplitQueue, SplitQueue]:
    """Both rings, indirect tables and available rings, from ``case.seed``."""
    r = random.Random(case.seed ^ 0x5A5A)
    h, hostile = case.hdr_len, case.hostility
    ram = Ram(content)
    tx, txr = make_queue(ram, 1, case.tx_size, TX_RING, event_idx=case.event_idx,
                         base=case.tx_base)
    rx, rxr = make_queue(ram, 0, case.rx_size, RX_RING, event_idx=case.event_idx,
                         base=case.rx_base)
    for ring, writable in ((txr, 0.03), (rxr, 0.97)):
        for i in range(ring.size):
            desc(ram, ring.layout.desc, i, *rand_desc(r, ring.size, h, hostile, writable,
                                                   case.indirect))
    for k in range(N_INDIRECT):
        writable = 0.03 if k % 2 == 0 else 0.97
        for i in range(TABLE):
            desc(ram, INDIRECT + 0x200 * k, i, *rand_desc(r, TABLE, h, hostile, writable,
                                                          hostile / 2))
    for ring, base, jump in ((txr, case.tx_base, case.tx_jump),
                             (rxr, case.rx_base, case.rx_jump)):
        heads = [r.randrange(ring.size) if r.random() > hostile else r.randrange(0x10000)
                 for _ in range(ring.size)]
        avail = r.randrange(0x10000) if jump else r.randrange(ring.size + 1)
        publish_raw(ram, ring, heads, base + avail)
        ring.set_used_event(r.randrange(0x10000) if r.random() < 0.5 else
                            base + r.randrange(ring.size + 1))
    txr.set_avail_flags(case.tx_flags)
    rxr.set_avail_flags(case.rx_flags)
    return ram, tx, rx


Event = tuple[object, ...]
Outcome = tuple[list[Event], tuple[object, ...], tuple[object, ...], dict[str, int],
                bytes, list[int], list[tuple[bytes, int, int]]]


class Path(Protocol):
    def burst(self, mem: GuestMemory, tx: SplitQueue, rx: SplitQueue | None, hdr_len: int,
              mrg_rxbuf: bool, limit: int, stats: dict[str, int]) -> int: ...


def run(case: Case, content: bytes, path: Path) -> Outcome:
    ram, tx, rx = build(case, content)
    stats = dict.fromkeys(reference.STATS, 0)
    events: list[Event] = []
    logs: list[LogFile] = []
    try:
        logs = attach_logs(case, tx, rx)
        with ram.manager.hold() as mem:
            for _ in range(MAX_BURSTS):
                try:
                    n = path.burst(mem, tx, rx if case.has_rx else None, case.hdr_len,
                                   case.mrg_rxbuf, case.limit, stats)
                except VirtqueueError as e:
                    events.append(("error", type(e).__name__, str(e)))
                    break
                events.append(("burst", n))
                # The connection's part: hand out the decisions (should_notify).
                for q in (rx, tx):
                    if q.notify_decided is not None:
                        events.append(("notify", q.index, q.should_notify()))
                if n < case.limit:
                    break
        written = [r.bytes_written for r in ram.mem.regions]
        return (events, queue_state(tx), queue_state(rx), stats, ram.image(), written,
                [log.state() for log in logs])
    finally:
        for log in logs:
            log.close()
        ram.close()


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_compiled_equals_reference(case: Case) -> None:
    content = random.Random(case.seed).randbytes(Ram.END)
    expected = run(case, content, reference.Reflector())
    got = run(case, content, native.Reflector())
    names = ("bursts/errors/notifications", "transmit queue state", "receive queue state",
             "statistics", "guest memory", "bytes written per region",
             "dirty logs (bitmap, marks, overflows)")
    for name, e, g in zip(names, expected, got, strict=True):
        if name == "guest memory" and e != g:
            assert isinstance(e, bytes) and isinstance(g, bytes)
            first = next(i for i in range(len(e)) if e[i] != g[i])
            raise AssertionError(f"guest memory differs first at offset {first:#x}: "
                                 f"reference {e[first:first + 16].hex()}, compiled "
                                 f"{g[first:first + 16].hex()}")
        assert g == e, f"{name}: compiled {g!r} != reference {e!r}"


def test_the_random_rings_reach_every_outcome() -> None:
    """The generator is not vacuous: over a fixed sample, frames are reflected, merged,
    dropped for each reason, and queues break for many different reasons."""
    outcomes: set[str] = set()

    @settings(max_examples=400, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(cases())
    def sample(case: Case) -> None:
        events, _, _, stats, _, _, logs = run(
            case, random.Random(case.seed).randbytes(Ram.END), native.Reflector())
        outcomes.update(k for k, v in stats.items() if v)
        for bitmap, marks, overflows in logs:
            if any(bitmap):
                outcomes.add("log marked")
            if overflows:
                outcomes.add("log overflow")
            if marks > overflows:
                outcomes.add("log within")
        for ev in events:
            if ev[0] == "error":
                reason = str(ev[2]).split(": ", 1)[1]
                outcomes.add("error " + reason.split(" ")[0] + " " + reason.split(" ")[1])
            if ev[0] == "notify":
                outcomes.add(f"notify {ev[2]}")

    sample()
    wanted = {"rx_frames", "drop_no_rx_buffer", "drop_too_big", "drop_malformed",
              "notify True", "notify False", "log marked", "log overflow", "log within"}
    assert wanted <= outcomes, sorted(wanted - outcomes)
    assert sum(1 for o in outcomes if o.startswith("error")) >= 6, sorted(outcomes)
