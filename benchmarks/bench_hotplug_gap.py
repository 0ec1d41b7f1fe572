"""Forwarding gaps during memory hot-plug under load: pyvhost beside DPDK 22.11, one run.

One command: ``python benchmarks/bench_hotplug_gap.py`` (``--quick`` for 10 cycles,
``--cycles N``, ``--repeat N`` alternating runs, ``--json FILE`` to keep the figures).

What it measures: while frames stream through a back-end at the rate one Python driver
can offer, the front-end hot-adds a DIMM-sized region (128 MiB memfd) and removes it
again, ``--cycles`` times (100 by default: 200 table updates), on the same vhost-user
connection that carries the frames. For each update: its round trip (request with
REPLY_ACK until the back-end confirms it has applied the table) and the longest gap
between two completed frames that overlaps it. A back-end that stops its data path for
the update shows a gap as long as the update; one whose data path keeps running on the
old table while the new one is built shows gaps of the data path's usual size.

How. The front-end is pyvhost's own (:mod:`pyvhost.frontend`), playing QEMU 7.2's
messages (profile ``qemu-7.2``): boot RAM of ``--boot-mib`` (256 MiB memfd) at GPA 0 with
the rings (1024 entries) and the buffers in it, one queue pair. The table updates are
what QEMU 7.2 sends on ``device_add pc-dimm`` / ``device_del``: ADD_MEM_REG / REM_MEM_REG
with CONFIGURE_MEM_SLOTS, else a SET_MEM_TABLE that re-sends every region with fresh fds
(DPDK 22.11 offers only that). 10 ms pass between updates, so each update's gaps are its
own. The traffic is driven by a child process (forked after the device start; the guest
RAM is a shared memfd, so it sees the same rings) pinned to CPU 1: it keeps the transmit
ring (1) full of 64-byte frames and the receive ring (0) full of 2 KiB buffers,
re-posting every used chain at once, kicking when the device has not set
VIRTQ_USED_F_NO_NOTIFY, and stamping (CLOCK_MONOTONIC) every poll that found frames on
the receive ring. Between two stamps no frame came back: that is a gap. The update
messages go from the parent process, also on CPU 1, and are stamped with the same clock.

Back-ends (CPU 0): ``pyvhost net --reflect`` (which sends every frame back, MACs
swapped) on its compiled data path (``pyvhost``; ``pyvhost-setmem`` is the same back-end
updated by SET_MEM_TABLE, as DPDK is), on the pure-Python one (``pyvhost-pure``,
``PYVHOST_PURE=1``), and DPDK 22.11 ``dpdk-testpmd --vdev net_vhost0 --forward-mode=
macswap`` (``dpdk``). DPDK's vhost library takes every queue's lock while it handles
SET_MEM_TABLE and unmaps and maps every region again; its PMD skips a locked queue.

Reported per back-end (medians over ``--repeat`` runs): update round trip (median and
longest), the longest gap overlapping any update, the median and the 95th percentile over
updates of each update's longest gap (and the median over the hot-adds and the removals
apart), the median gap between completions during updates, the same two gap figures over
a window with no update (``--baseline`` seconds, before the updates), and the frames/s
the loop ran at. The machine is shared: the baseline says what gaps the machine itself
causes. A control says what the measuring causes: after the updates, as many
GET_FEATURES round trips at the same pace, which the back-end only answers; the median,
the 95th percentile and the longest over them of each one's longest gap are the floor an
update's own gap stands on (this process runs on the driver's CPU ahead of it, and the
driver stamps nothing while it does).

Whose gap. On this machine a gap of milliseconds is most often neither back-end's: with
both CPUs busy, the host takes a vCPU away for 1-6 ms several times a second, and a guest
task (a kernel thread) may run on the back-end's CPU for a millisecond or more. Three
witnesses say which gaps those are. The driver keeps its own longest time between two
polls in each gap (it was away: ``driver``). A canary on the back-end's CPU, a process at
SCHED_FIFO priority 1 that wakes every :data:`CANARY_NS` and notes every wake-up later
than :data:`LATE_NS`, says when that CPU ran nothing of the guest's: no task of the guest
can delay it, only the host (or interrupts). It costs the back-end a wake-up every
0.5 ms (``--no-canary`` runs without it). And during a gap longer than
:data:`PROBE_NS` the driver reads the back-end's busiest thread's time spent waiting to
run (``/proc/PID/task/TID/schedstat``, brought up to date when it is switched in), at the
start of its look and when frames come back: another task had its CPU. A gap half of
which one of the three covers is the machine's (``driver`` or ``backend``, whose side
was away); every other gap, the short ones included, is the back-end's own (``own``): it
ran, or slept, and sent nothing back. (A thread's CPU time, as another process can read
it, is brought up to date only at the scheduler's tick, 4 ms here: too coarse to tell a
back-end busy with something else from one whose vCPU the host took.) The table gives
the longest gap of each kind; the longest own gap beside the update is what the issue's
target (no longer than the update itself) is about.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import gc
import json
import mmap
import os
import platform
import statistics
import struct
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench_switch import BACKEND_CPU, TRAFFIC_CPU, BenchError, Run, pyvhost_env, wait_for

from pyvhost import datapath
from pyvhost.backend.control import fetch_status
from pyvhost.errors import PyvhostError
from pyvhost.frontend.frontend import Frontend, Vring
from pyvhost.frontend.memory import FrontendMemory, GuestRam
from pyvhost.frontend.profiles import QEMU_72, Session
from pyvhost.protocol.constants import ProtocolFeature
from pyvhost.tools.process import exit_on_sigterm, pyvhost_argv

MiB = 1 << 20
#: Back-ends, and whether each is updated by ADD/REM_MEM_REG (True) or SET_MEM_TABLE.
KINDS: dict[str, bool] = {"pyvhost": True, "pyvhost-setmem": False, "pyvhost-pure": True,
                          "dpdk": False}
QUEUE_SIZE = 1024
RX, TX = 0, 1
#: virtio_net_hdr_v1 (VERSION_1 is negotiated): 12 bytes before each frame.
HDR_LEN = 12
FRAME = 64
BUFFER = 2048
#: Buffers in boot RAM, past the two rings (64 KiB apart from offset 0).
RX_AREA, TX_AREA = 1 * MiB, 3 * MiB
#: virtio 1.2, 2.7.10: "struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }"
DESC = struct.Struct("<QIHH")
VIRTQ_DESC_F_WRITE = 2
VIRTQ_USED_F_NO_NOTIFY = 1
#: The shared control page: byte 0 is the phase the parent sets.
WARM, RECORD, STOP = 0, 1, 2
NS = 1_000_000_000
#: A gap longer than this gets its cause looked at (the module docstring, "Whose gap").
PROBE_NS = 200_000
#: Per gap looked at, in the driver's ``looks`` record: the index of the stamp that ends
#: it, the driver's longest time between two polls in it, then the back-end's busiest
#: thread's time spent waiting to run (ns) at the start of the look and at its end, and
#: the look's start and end (ns); -1 where there was no look (the driver away).
LOOK = 6
#: The canary on the back-end's CPU: how long it sleeps, and a wake-up later than what
#: counts as that CPU taken (from the end of its sleep to the late wake-up). A pause of
#: P ns shows late by at least P - CANARY_NS, so a pause of 2 * CANARY_NS (1 ms) or more
#: covers half its gap. Each wake-up costs the back-end: woken every 0.25 ms it lost 15-25%
#: of its frames/s (BENCHMARKS.md).
CANARY_NS = 500_000
LATE_NS = 300_000
OWN, DRIVER_AWAY, BACKEND_AWAY = "own", "driver", "backend"
#: How long the front-end waits for any reply (seconds); a longer update fails the run.
UPDATE_TIMEOUT = 30.0


# -- the driver (child process) ---------------------------------------------------------

@dataclass(frozen=True)
class RingView:
    """One split ring in the driver's mapping: memoryviews over its parts."""

    desc: int
    avail_hdr: memoryview  # le16 flags, le16 idx
    avail_ring: memoryview  # le16 ring[size]
    used_hdr: memoryview  # le16 flags, le16 idx
    used_heads: memoryview  # the low le16 of each used element's le32 id (ids < 2^16)
    kick_fd: int

    @classmethod
    def of(cls, mv: memoryview, base: int, vring: Vring) -> RingView:
        q = vring.size
        avail, used = vring.avail_addr - base, vring.used_addr - base
        return cls(desc=vring.desc_addr - base,
                   avail_hdr=mv[avail:avail + 4].cast("H"),
                   avail_ring=mv[avail + 4:avail + 4 + 2 * q].cast("H"),
                   used_hdr=mv[used:used + 4].cast("H"),
                   # "struct virtq_used_elem { le32 id; le32 len; }": 4 le16 per element.
                   used_heads=mv[used + 4:used + 4 + 8 * q].cast("H")[0::4],
                   kick_fd=vring.kick_fd)


class BackendThread:
    """The back-end's busiest thread as the driver sees it: its ``/proc/PID/task/TID/
    schedstat``, of which :meth:`read` gives the "time spent waiting on a runqueue"
    (brought up to date when the thread is switched in). Until :meth:`pick` every thread
    is watched; it keeps the one that ran most since then (the data path's: pyvhost's
    loop or worker, DPDK's forwarding lcore; over a second, the CPU time's tick
    granularity does not matter)."""

    def __init__(self, pid: int) -> None:
        self.fds: dict[int, int] = {}
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                self.fds[int(tid)] = os.open(f"/proc/{pid}/task/{tid}/schedstat", os.O_RDONLY)
        self.since = {tid: self._schedstat(fd)[0] for tid, fd in self.fds.items()}
        self.fd = -1

    @staticmethod
    def _schedstat(fd: int) -> tuple[int, int]:
        try:
            ran, waited = os.pread(fd, 128, 0).split()[:2]
            return int(ran), int(waited)
        except (OSError, ValueError):
            return -1, -1

    def pick(self) -> None:
        ran = {tid: self._schedstat(fd)[0] - self.since[tid] for tid, fd in self.fds.items()}
        if ran:
            self.fd = self.fds.pop(max(ran, key=lambda tid: ran[tid]))
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def read(self) -> int:
        """Its time spent waiting to run (ns), or -1."""
        return self._schedstat(self.fd)[1] if self.fd >= 0 else -1


def drive(mm: mmap.mmap, base: int, rx: Vring, tx: Vring, ctl: mmap.mmap,
          backend: BackendThread) -> tuple[array[int], array[int], array[int]]:
    """Keep both rings full until the parent says STOP; return the stamps (ns) of the
    polls that found frames on the receive ring, how many each found, and the looks at
    the gaps longer than :data:`PROBE_NS` (:data:`LOOK` values each).

    The used ring is the device's: ``used->idx`` may claim any count, so the number of new
    entries is taken modulo 2^16 and anything above the ring size stops the driver (a
    benchmark, not a guest: it reports the broken ring rather than carrying on).
    """
    mv = memoryview(mm)
    q = rx.size
    rings = (RingView.of(mv, base, rx), RingView.of(mv, base, tx))
    for i in range(q):
        DESC.pack_into(mm, rings[0].desc + 16 * i, base_gpa(RX_AREA + i * BUFFER), BUFFER,
                       VIRTQ_DESC_F_WRITE, 0)
        DESC.pack_into(mm, rings[1].desc + 16 * i, base_gpa(TX_AREA + i * BUFFER),
                       HDR_LEN + FRAME, 0, 0)
        frame = (b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5"
                 + i.to_bytes(4, "big")).ljust(FRAME, b"\0")
        mm[TX_AREA + i * BUFFER:TX_AREA + i * BUFFER + HDR_LEN + FRAME] = bytes(HDR_LEN) + frame
    heads = array("H", range(q))
    last = [0, 0]
    for r in rings:
        r.avail_ring[:] = heads
        r.avail_hdr[1] = q  # every buffer is posted: avail idx = last used + q, always
        os.eventfd_write(r.kick_fd, 1)
    stamps: array[int] = array("q")
    counts: array[int] = array("l")
    looks: array[int] = array("q")
    clock = time.monotonic_ns
    # The gap in progress: the last stamp, the last poll, the longest time between two
    # polls since the stamp, and the look at the back-end (its start, its wait to run).
    stamp = poll = clock()
    away = 0
    look_t = look = -1
    picked = False
    fence = threading.Lock()
    while True:
        phase = ctl[0]
        if phase == STOP:
            return stamps, counts, looks
        now = clock()
        if now - poll > away:
            away = now - poll
        poll = now
        if phase == RECORD:
            if not picked:
                backend.pick()
                picked = True
            elif look_t < 0 and now - stamp > PROBE_NS and stamps:
                look = backend.read()
                look_t = clock()
        for n_ring, r in enumerate(rings):
            used = r.used_hdr[1]
            n = (used - last[n_ring]) & 0xFFFF
            if not n:
                continue
            if n > q:
                raise SystemExit(f"ring {n_ring}: used idx moved by {n} > ring size {q}")
            if n_ring == RX and phase == RECORD:
                t = clock()
                if t - poll > away:
                    away = t - poll  # away between this poll's start and its stamp
                if t - stamp > PROBE_NS and stamps:
                    if look_t >= 0:
                        end = backend.read()
                        looks.extend((len(stamps), away, look, end, look_t, clock()))
                    else:
                        looks.extend((len(stamps), away, -1, -1, -1, -1))
                stamps.append(t)
                counts.append(n)
                stamp, away, look_t = t, 0, -1
            # Re-post what the device used, in its order. The avail ring is kept full
            # (avail idx = last used + q), so used slot s and avail slot s coincide.
            s = last[n_ring] % q
            e = s + n
            if e <= q:
                r.avail_ring[s:e] = r.used_heads[s:e]
            else:
                r.avail_ring[s:] = r.used_heads[s:]
                r.avail_ring[:e - q] = r.used_heads[:e - q]
            last[n_ring] = used
            # x86 stores are not reordered with older stores: the entries are visible
            # before the index that publishes them.
            r.avail_hdr[1] = (used + q) & 0xFFFF
            # But a load may pass an older store: the index must be visible before the
            # flags are read ("virtio_mb()" in Linux's virtqueue_kick_prepare), else a
            # device that has just cleared VIRTQ_USED_F_NO_NOTIFY and read the old index
            # sleeps, and this driver, reading the old flags, does not kick it: a gap
            # that is the driver's. An uncontended lock's acquire and release are locked
            # instructions (sem_trywait, sem_post): a full barrier.
            fence.acquire(False)
            fence.release()
            if not r.used_hdr[0] & VIRTQ_USED_F_NO_NOTIFY:
                os.eventfd_write(r.kick_fd, 1)


def base_gpa(offset: int) -> int:
    """Boot RAM is at GPA 0: a buffer's GPA is its offset."""
    return offset


def fork_child(name: str, cpu: int, body: Callable[[], int]) -> int:
    """Fork a child pinned to ``cpu`` that runs ``body`` with the garbage collector off
    (a collection would show as a gap of ours) and exits with what it returns; returns
    the child's pid. The child never returns into the parent's code."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.sched_setaffinity(0, {cpu})
        gc.disable()
        code = body()
    except BaseException as e:
        print(f"{name}: {e!r}", file=sys.stderr)
    finally:
        os._exit(code)


def run_driver(boot: GuestRam, rx: Vring, tx: Vring, ctl: mmap.mmap, out: Path,
               backend_pid: int) -> int:
    """Fork the driver on TRAFFIC_CPU; returns its pid. It writes its stamps and its
    looks at the back-end ``backend_pid`` to ``out``."""
    def body() -> int:
        mm = mmap.mmap(boot.fd, boot.memory_size, flags=mmap.MAP_SHARED)
        stamps, counts, looks = drive(mm, boot.userspace_addr, rx, tx, ctl,
                                      BackendThread(backend_pid))
        with open(out, "wb") as f:
            array("q", [len(stamps), len(looks)]).tofile(f)
            stamps.tofile(f)
            counts.tofile(f)
            looks.tofile(f)
        return 0

    return fork_child("driver", TRAFFIC_CPU, body)


def canary(ctl: mmap.mmap) -> array[int]:
    """Sleep :data:`CANARY_NS` at a time until the parent says STOP; return the late
    wake-ups, each as (when it was due, when it came) in ns: the CPU was taken in between
    (the module docstring, "Whose gap")."""
    late: array[int] = array("q")
    clock = time.monotonic_ns
    pause = CANARY_NS / NS
    last = clock()
    while ctl[0] != STOP:
        time.sleep(pause)
        now = clock()
        if now - last > CANARY_NS + LATE_NS:
            late.extend((last + CANARY_NS, now))
        last = now
    return late


def run_canary(ctl: mmap.mmap, out: Path) -> int:
    """Fork the canary on BACKEND_CPU at SCHED_FIFO priority 1; returns its pid. It writes
    its late wake-ups to ``out``, or exits 2 if it may not run at SCHED_FIFO (it would then
    be late whenever the back-end holds the CPU: no witness)."""
    def body() -> int:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        except OSError:
            return 2
        late = canary(ctl)
        with open(out, "wb") as f:
            late.tofile(f)
        return 0

    return fork_child("canary", BACKEND_CPU, body)


def read_stamps(path: Path) -> tuple[array[int], array[int], array[int]]:
    stamps, counts, looks, n = array("q"), array("l"), array("q"), array("q")
    with open(path, "rb") as f:
        n.fromfile(f, 2)
        stamps.fromfile(f, n[0])
        counts.fromfile(f, n[0])
        looks.fromfile(f, n[1])
    return stamps, counts, looks


# -- analysis (pure functions, tested) ---------------------------------------------------

def gap_ends(stamps: Sequence[int], start: int, end: int) -> list[int]:
    """The indices ``i`` of the gaps (``stamps[i - 1]`` to ``stamps[i]``) that overlap
    [start, end]."""
    lo = max(bisect.bisect_right(stamps, start) - 1, 0)
    hi = min(bisect.bisect_left(stamps, end) + 1, len(stamps))
    return [i for i in range(lo + 1, hi) if stamps[i] > start and stamps[i - 1] < end]


def gaps_overlapping(stamps: Sequence[int], start: int, end: int) -> list[int]:
    """The gaps (ns) between consecutive stamps whose interval overlaps [start, end]."""
    return [stamps[i] - stamps[i - 1] for i in gap_ends(stamps, start, end)]


def cause(gap: int, look: Sequence[int], taken: int = 0) -> str:
    """Whose a gap of ``gap`` ns is (the module docstring, "Whose gap"): from the driver's
    look at it (:data:`LOOK`) and ``taken``, the ns of it during which the canary saw the
    back-end's CPU taken. :data:`DRIVER_AWAY`, :data:`BACKEND_AWAY` or :data:`OWN`."""
    _, away, waited0, waited1, t0, t1 = look
    if 2 * away >= gap:
        return DRIVER_AWAY
    if 2 * taken >= gap:
        return BACKEND_AWAY
    if t0 >= 0 and min(waited0, waited1) >= 0 and 2 * (waited1 - waited0) >= t1 - t0:
        return BACKEND_AWAY  # it waited to run for half of the look: another task ran
    return OWN


def overlap(late: Sequence[int], start: int, end: int) -> int:
    """How many ns of [start, end] the canary's late intervals (``late``: start, end,
    start, end, ... in order, not overlapping) cover."""
    k = max(bisect.bisect_right(late, start) - 1, 0)
    k -= k % 2
    total = 0
    while k + 1 < len(late) and late[k] < end:
        total += max(0, min(end, late[k + 1]) - max(start, late[k]))
        k += 2
    return total


def causes(stamps: Sequence[int], looks: Sequence[int],
           late: Sequence[int] = ()) -> dict[int, str]:
    """The cause of each gap longer than :data:`PROBE_NS`, by the index of the stamp
    ending it (the gaps the driver looked at, and those the canary's late intervals
    cover); a gap not in it is the back-end's own."""
    out: dict[int, str] = {}
    looked: dict[int, Sequence[int]] = {}
    for k in range(0, len(looks) - LOOK + 1, LOOK):
        look = looks[k:k + LOOK]
        if 0 < look[0] < len(stamps):
            looked[look[0]] = look
    nobody = (0, 0, -1, -1, -1, -1)
    ends = set(looked)
    for k in range(0, len(late) - 1, 2):
        ends.update(gap_ends(stamps, late[k], late[k + 1]))
    for i in ends:
        if 0 < i < len(stamps):
            a, b = stamps[i - 1], stamps[i]
            out[i] = cause(b - a, looked.get(i, nobody), overlap(late, a, b))
    return out


def _whose(stamps: Sequence[int], ends: list[int], why: dict[int, str]) -> dict[str, float]:
    """The longest gap of each cause among ``ends`` (ms, 0 if none), and how many of
    them are longer than 1 ms."""
    out: dict[str, float] = {}
    for kind in (OWN, DRIVER_AWAY, BACKEND_AWAY):
        gaps = [stamps[i] - stamps[i - 1] for i in ends if why.get(i, OWN) == kind]
        out[f"max_{kind}"] = max(gaps, default=0) / 1e6
        out[f"over_1ms_{kind}"] = sum(g > 1_000_000 for g in gaps)
    return out


def summarize(stamps: Sequence[int], counts: Sequence[int], baseline: tuple[int, int],
              updates: Sequence[tuple[int, int]],
              looks: Sequence[int] = (), late: Sequence[int] = ()) -> dict[str, float]:
    """The figures of one run (ms, µs and frames/s as named); see the module docstring."""
    if len(stamps) < 2 or not updates:
        raise ValueError("no frames completed, or no update: nothing to summarize")
    b_ends = gap_ends(stamps, *baseline)
    per_update_ends = [gap_ends(stamps, s, e) for s, e in updates]
    b_gaps = [stamps[i] - stamps[i - 1] for i in b_ends]
    per_update = [[stamps[i] - stamps[i - 1] for i in ends] for ends in per_update_ends]
    why = causes(stamps, looks, late)
    whose = _whose(stamps, sorted({i for ends in per_update_ends for i in ends}), why)
    b_whose = _whose(stamps, b_ends, why)
    if not b_gaps or any(not g for g in per_update):
        raise ValueError("a window saw no completed frame at all: the loop stopped")
    during = [g for gs in per_update for g in gs]
    longest = [max(gs) for gs in per_update]
    round_trips = [e - s for s, e in updates]
    first = bisect.bisect_left(stamps, updates[0][0])
    last = bisect.bisect_right(stamps, updates[-1][1])
    frames = sum(counts[first:last])
    span = updates[-1][1] - updates[0][0]
    b_first = bisect.bisect_left(stamps, baseline[0])
    b_last = bisect.bisect_right(stamps, baseline[1])
    return {
        "updates": len(updates),
        "update_ms_median": statistics.median(round_trips) / 1e6,
        "update_ms_max": max(round_trips) / 1e6,
        # Which update was slowest (0 = the first hot-add, odd = a removal).
        "update_slowest": round_trips.index(max(round_trips)),
        "gap_ms_max_during_updates": max(longest) / 1e6,
        "gap_ms_median_of_update_max": statistics.median(longest) / 1e6,
        "gap_ms_p95_of_update_max": p95(longest) / 1e6,
        # The same over the hot-adds (even updates) and the removals (odd) apart: with
        # worker threads ADD_MEM_REG lets the bursts run, REM_MEM_REG waits for them.
        "gap_ms_median_of_add_max": statistics.median(longest[0::2]) / 1e6,
        "gap_ms_median_of_remove_max": statistics.median(longest[1::2] or longest) / 1e6,
        "gap_us_median_during_updates": statistics.median(during) / 1e3,
        "gap_ms_max_baseline": max(b_gaps) / 1e6,
        "gap_us_median_baseline": statistics.median(b_gaps) / 1e3,
        "frames_per_s_baseline": sum(counts[b_first:b_last]) * NS / (baseline[1] - baseline[0]),
        "frames_per_s_during_updates": frames * NS / span,
        # Whose the gaps are (the module docstring, "Whose gap").
        "gap_ms_max_own_during_updates": whose[f"max_{OWN}"],
        "gap_ms_max_driver_away_during_updates": whose[f"max_{DRIVER_AWAY}"],
        "gap_ms_max_backend_away_during_updates": whose[f"max_{BACKEND_AWAY}"],
        "gaps_over_1ms_own_during_updates": whose[f"over_1ms_{OWN}"],
        "gaps_over_1ms_machine_during_updates": whose[f"over_1ms_{DRIVER_AWAY}"]
        + whose[f"over_1ms_{BACKEND_AWAY}"],
        "gap_ms_max_own_baseline": b_whose[f"max_{OWN}"],
        "gaps_over_1ms_machine_baseline": b_whose[f"over_1ms_{DRIVER_AWAY}"]
        + b_whose[f"over_1ms_{BACKEND_AWAY}"],
    }


def p95(values: Sequence[int]) -> float:
    """The 95th percentile (inclusive method: within the values' range); of one value, it."""
    if len(values) < 2:
        return float(values[0])
    return statistics.quantiles(values, n=20, method="inclusive")[18]


def _realtime() -> bool:
    """Put the control side (this process, after the fork) at SCHED_FIFO priority 1.

    It shares CPU 1 with the busy driver; without priority its reply would wait for the
    driver's time slice (milliseconds), which would count as the back-end's update time.
    It sleeps or blocks in recv almost all the time, so it takes little from the driver.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except OSError:
        return False
    return True


# -- one run -----------------------------------------------------------------------------

@contextlib.contextmanager
def backend(run: Run, kind: str, sock: Path) -> Iterator[int]:
    """Start a back-end listening on ``sock`` (forwarding on BACKEND_CPU); yield its pid."""
    if kind.startswith("pyvhost"):
        proc = run.start(["taskset", "-c", str(BACKEND_CPU),
                          *pyvhost_argv("net", "--socket", str(sock), "--reflect",
                                        "--control", str(control_socket(sock)),
                                        "--no-stats", "-q")], kind, env=pyvhost_env(kind))
    else:
        proc = run.testpmd("dpdk", [f"net_vhost0,iface={sock},queues=1"],
                           ["--forward-mode=macswap"], forward_cpu=BACKEND_CPU)
    wait_for(sock.exists, f"{kind}'s socket", proc)
    yield proc.popen.pid
    if proc.popen.poll() is not None:
        raise SystemExit(f"{kind} exited ({proc.popen.returncode}):\n{proc.text()[-2000:]}")


def control_socket(sock: Path) -> Path:
    """Where pyvhost's control socket is for the vhost-user socket ``sock``."""
    return sock.with_suffix(".ctl")


def backend_slowest(ctl: Path) -> dict[str, float]:
    """pyvhost's own record of its slowest table update (``pyvhost status``): from
    receipt to in force, and of that the CPU time and the wait for the bursts, in ms. An
    update that took long with little CPU and no wait was not running: the machine."""
    try:
        state = fetch_status(str(ctl), timeout=30)
    except (OSError, ValueError) as e:
        raise BenchError(f"pyvhost's control socket: {e}") from e
    conns = state.get("connections")
    record = conns[0].get("slowest_memory_update") if isinstance(conns, list) and conns \
        and isinstance(conns[0], dict) else None
    if not isinstance(record, dict):
        raise BenchError("pyvhost's control socket: no slowest_memory_update")
    return {"backend_slowest_ms": (record["in_force"] - record["received"]) * 1e3,
            "backend_slowest_cpu_ms": record["cpu_s"] * 1e3,
            "backend_slowest_waited_ms": record["waited_s"] * 1e3}


def _hotplug(session: Session, memory: FrontendMemory, cycles: int, dimm_mib: int,
             interval_s: float, updates: list[tuple[int, int]]) -> None:
    """Add a DIMM and remove it ``cycles`` times; append each update's (start, end) ns."""
    for _ in range(cycles):
        dimm = session.add_region(dimm_mib * MiB)
        t0 = time.monotonic_ns()
        session.update_memory()
        updates.append((t0, time.monotonic_ns()))
        time.sleep(interval_s)
        memory.detach(dimm)
        t0 = time.monotonic_ns()
        session.update_memory()
        updates.append((t0, time.monotonic_ns()))
        dimm.close()
        time.sleep(interval_s)


def _null_round_trips(fe: Frontend, count: int, interval_s: float,
                      trips: list[tuple[int, int]]) -> None:
    """The control: ``count`` GET_FEATURES round trips, as far apart as the updates, each
    appended as (start, end) ns. The back-end only answers them, so their gaps are what
    the measuring costs: this process runs its round trip on the driver's CPU, ahead of
    the driver (SCHED_FIFO), which stamps nothing meanwhile."""
    for _ in range(count):
        t0 = time.monotonic_ns()
        fe.get_features()
        trips.append((t0, time.monotonic_ns()))
        time.sleep(interval_s)


def measure(kind: str, cycles: int, boot_mib: int, dimm_mib: int, baseline_s: float,
            interval_s: float, work: Path, with_canary: bool = True) -> dict[str, float]:
    mem_slots = KINDS[kind]
    run = Run(work)
    sock = work / f"{kind}.sock"
    memory = FrontendMemory()
    fe = Frontend(ack_all=False)
    ctl = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_SHARED)
    child = bird = 0
    realtime = False
    out, late_out = work / f"{kind}.stamps", work / f"{kind}.late"
    late: array[int] = array("q")
    os.sched_setaffinity(0, {TRAFFIC_CPU})
    try:
        # Forked before the connection, so that it holds no copy of the socket.
        bird = run_canary(ctl, late_out) if with_canary else 0
        with backend(run, kind, sock) as backend_pid:
            fe.connect(sock, timeout=UPDATE_TIMEOUT)
            profile = replace(QEMU_72, queue_size={"net": QUEUE_SIZE, "blk": 128, "fs": 128})
            session = Session(profile, fe, memory)
            session.negotiate(None if mem_slots
                              else ~int(ProtocolFeature.CONFIGURE_MEM_SLOTS))
            if mem_slots != fe.uses_mem_slots:
                raise SystemExit(f"{kind}: CONFIGURE_MEM_SLOTS is "
                                 f"{'not ' if mem_slots else ''}negotiated")
            boot = session.add_region(boot_mib * MiB, boot=True)
            session.start(boot)
            child = run_driver(boot, fe.vrings[RX], fe.vrings[TX], ctl, out, backend_pid)
            realtime = _realtime()
            time.sleep(1.0)  # let the loop fill
            ctl[0] = RECORD
            b0 = time.monotonic_ns()
            time.sleep(baseline_s)
            b1 = time.monotonic_ns()
            updates: list[tuple[int, int]] = []
            try:
                _hotplug(session, memory, cycles, dimm_mib, interval_s, updates)
            except PyvhostError as e:
                raise BenchError(f"update {len(updates) + 1} of {2 * cycles}: {e}") from e
            # Frames after the last update close its gap: a back-end that resumes slowly
            # (DPDK after a remap) would otherwise leave its last window without an end.
            time.sleep(1.0)
            trips: list[tuple[int, int]] = []
            _null_round_trips(fe, 2 * cycles, interval_s, trips)
            time.sleep(0.2)
            slowest = (backend_slowest(control_socket(sock)) if kind.startswith("pyvhost")
                       else {})
            ctl[0] = STOP
            _, status = os.waitpid(child, 0)
            child = 0
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"{kind}: the traffic driver failed")
            stamps, counts, looks = read_stamps(out)
            if bird:
                _, status = os.waitpid(bird, 0)
                bird = 0
                if os.waitstatus_to_exitcode(status) == 0:
                    late.frombytes(late_out.read_bytes())
                else:
                    print(f"  {kind}: no canary on the back-end's CPU (SCHED_FIFO refused): "
                          "the host's pauses there count as the back-end's own",
                          file=sys.stderr)
    finally:
        for pid in (child, bird):
            if pid:
                ctl[0] = STOP
                os.waitpid(pid, 0)
        fe.close()
        memory.close()
        run.close()
        ctl.close()
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    if not realtime:
        print(f"  {kind}: SCHED_FIFO refused; update round trips include waiting for the "
              "driver's time slice", file=sys.stderr)
    try:
        figures = summarize(stamps, counts, (b0, b1), updates, looks, late)
        null = summarize(stamps, counts, (b0, b1), trips, looks, late)
        figures["gap_ms_max_own_during_null"] = null["gap_ms_max_own_during_updates"]
        figures["null_ms_median"] = null["update_ms_median"]
        figures["gap_ms_median_of_null_max"] = null["gap_ms_median_of_update_max"]
        figures["gap_ms_p95_of_null_max"] = null["gap_ms_p95_of_update_max"]
        figures["gap_ms_max_during_null"] = null["gap_ms_max_during_updates"]
        figures.update(slowest)
        return figures
    except ValueError as e:
        raise BenchError(f"{kind}: {e}") from e


# -- the report --------------------------------------------------------------------------

ROWS = (
    ("update round trip, median (ms)", "update_ms_median", 3),
    ("update round trip, longest (ms)", "update_ms_max", 3),
    ("longest gap overlapping an update (ms)", "gap_ms_max_during_updates", 3),
    ("  of them the back-end's own: the longest (ms)", "gap_ms_max_own_during_updates", 3),
    ("  the machine's (the driver away): the longest (ms)",
     "gap_ms_max_driver_away_during_updates", 3),
    ("  the machine's (the back-end's thread away): the longest (ms)",
     "gap_ms_max_backend_away_during_updates", 3),
    ("  gaps over 1 ms overlapping updates: the back-end's own",
     "gaps_over_1ms_own_during_updates", 0),
    ("  gaps over 1 ms overlapping updates: the machine's",
     "gaps_over_1ms_machine_during_updates", 0),
    ("control: the longest own gap overlapping a GET_FEATURES (ms)",
     "gap_ms_max_own_during_null", 3),
    ("control: longest gap overlapping a GET_FEATURES (ms)", "gap_ms_max_during_null", 3),
    ("median over updates of the longest gap (ms)", "gap_ms_median_of_update_max", 3),
    ("95th percentile over updates of the longest gap (ms)", "gap_ms_p95_of_update_max", 3),
    ("control: the same over GET_FEATURES round trips (ms)", "gap_ms_p95_of_null_max", 3),
    ("  the same over the hot-adds (ms)", "gap_ms_median_of_add_max", 3),
    ("  the same over the removals (ms)", "gap_ms_median_of_remove_max", 3),
    ("control: a GET_FEATURES round trip, median (ms)", "null_ms_median", 3),
    ("control: median over them of the longest gap (ms)", "gap_ms_median_of_null_max", 3),
    ("median gap between completions during updates (µs)",
     "gap_us_median_during_updates", 1),
    ("longest gap without updates (ms)", "gap_ms_max_baseline", 3),
    ("  of them the back-end's own: the longest (ms)", "gap_ms_max_own_baseline", 3),
    ("  gaps over 1 ms without updates: the machine's", "gaps_over_1ms_machine_baseline", 0),
    ("median gap without updates (µs)", "gap_us_median_baseline", 1),
    ("frames/s without updates", "frames_per_s_baseline", 0),
    ("frames/s during updates", "frames_per_s_during_updates", 0),
)


def table(results: dict[str, dict[str, float]]) -> str:
    """The Markdown table: one column per back-end, DPDK / pyvhost last."""
    kinds = list(results)
    head = "| figure | " + " | ".join(kinds)
    ratio = "dpdk" in results and "pyvhost" in results
    lines = [head + (" | DPDK / pyvhost |" if ratio else " |"),
             "|---|" + "---:|" * (len(kinds) + ratio)]
    for label, key, digits in ROWS:
        cells = [f"{results[k][key]:,.{digits}f}" for k in kinds]
        if ratio:
            py = results["pyvhost"][key]
            cells.append(f"{results['dpdk'][key] / py:.1f}x" if py else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="10 cycles, 1 s without updates, one run")
    ap.add_argument("--cycles", type=int, default=100,
                    help="DIMMs hot-added and removed (2 table updates each)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per back-end, alternating; medians shown")
    ap.add_argument("--kinds", default=",".join(KINDS),
                    help=f"back-ends, comma-separated (of {', '.join(KINDS)})")
    ap.add_argument("--boot-mib", type=int, default=256, help="boot RAM (MiB)")
    ap.add_argument("--dimm-mib", type=int, default=128, help="each DIMM (MiB)")
    ap.add_argument("--baseline", type=float, default=3.0,
                    help="seconds of traffic without updates, before them")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--no-canary", action="store_true",
                    help="run without the canary on the back-end's CPU (it wakes every "
                         "0.5 ms there): the host's pauses on that CPU then count as the "
                         "back-end's own")
    args = ap.parse_args(argv)
    if args.quick:
        args.cycles, args.baseline, args.repeat = 10, 1.0, 1
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or set(kinds) - set(KINDS):
        raise SystemExit(f"--kinds: some of {', '.join(KINDS)}")
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs 2 CPUs (one for the back-end, one for the front-end)")
    runs: dict[str, list[dict[str, float]]] = {}
    failures: dict[str, list[str]] = {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="pyvhost-bgap-") as tmp:
        for i in range(args.repeat):
            for kind in kinds:
                try:
                    r = measure(kind, args.cycles, args.boot_mib, args.dimm_mib,
                                args.baseline, 0.010, Path(tmp), not args.no_canary)
                except BenchError as e:
                    failures.setdefault(kind, []).append(str(e).splitlines()[0])
                    print(f"  {kind} #{i + 1}: FAILED {e}", file=sys.stderr)
                    continue
                runs.setdefault(kind, []).append(r)
                print(f"  {kind} #{i + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items()),
                      file=sys.stderr)
    load_after = os.getloadavg()[0]
    results = {k: medians(rs) for k, rs in runs.items()}
    print(f"\nMachine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, kernel {platform.release()}; "
          f"pyvhost's data path {datapath.name()} (pyvhost-pure: PYVHOST_PURE=1); date "
          f"{time.strftime('%Y-%m-%d %H:%M')}; {args.cycles} DIMMs of {args.dimm_mib} MiB "
          f"added and removed ({2 * args.cycles} updates) over {args.boot_mib} MiB of boot "
          f"RAM; canary on the back-end's CPU: {'no' if args.no_canary else 'yes'}; "
          f"medians of {args.repeat} alternating run(s); 1-min load average "
          f"{load_before:.1f} before, {load_after:.1f} after\n")
    print(table(results))
    for kind, r in results.items():
        if "backend_slowest_ms" in r:
            print(f"\n{kind}: its own slowest table update (`pyvhost status`, medians over "
                  f"runs): {r['backend_slowest_ms']:.3f} ms from receipt to in force, of "
                  f"which {r['backend_slowest_cpu_ms']:.3f} ms CPU and "
                  f"{r['backend_slowest_waited_ms']:.3f} ms waiting for the bursts (the "
                  "rest: the process was not running)")
    for kind, why in failures.items():
        print(f"\n{kind}: {len(why)} of {args.repeat} run(s) failed: {'; '.join(why)}")
    if args.json:
        doc: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args),
                               "loadavg": [load_before, load_after], "results": results,
                               "runs": runs, "failures": failures}
        Path(args.json).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    exit_on_sigterm()
    main()
