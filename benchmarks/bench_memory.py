"""Memory-table updates: pyvhost's back-end beside DPDK 22.11 testpmd's, in one run.

One command: ``python benchmarks/bench_memory.py`` (``--quick`` for a short run,
``--json FILE`` to keep the figures). It starts both back-ends, plays QEMU 7.2's hot-plug
messages at them with pyvhost's front-end, and prints a Markdown table. Measured:

1. Hot-add by SET_MEM_TABLE: the table grows from n-1 to n regions (n = 1..8; QEMU
   re-sends every region with a fresh fd). Round trip with REPLY_ACK, so the time is the
   back-end applying the table. Both back-ends; ratio DPDK / pyvhost.
2. The same at n = 4 with regions of 2 MiB, 256 MiB and 1 GiB (sparse memfds): the update
   must not grow with region size (no prefaulting). Both back-ends.
3. ADD_MEM_REG + REM_MEM_REG with 8, 64 and 509 regions in the table (CONFIGURE_MEM_SLOTS;
   DPDK 22.11 does not offer it, so pyvhost only).
4. One GPA translation with 8 and 509 regions, in-process (``GuestMemory.region_at``).

Numbers are medians of round trips over a Unix socket on a shared, noisy machine: read
the ratios, not the absolute values.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import uuid
from collections.abc import Iterator
from pathlib import Path

from pyvhost.frontend.frontend import Frontend
from pyvhost.frontend.memory import FrontendMemory
from pyvhost.memory import MemoryManager
from pyvhost.protocol.constants import ProtocolFeature
from pyvhost.protocol.messages import MemoryRegion
from pyvhost.tools.process import end_process, exit_on_sigterm, pyvhost_argv
from pyvhost.units import GiB, MiB

PF = ProtocolFeature


# -- back-ends -------------------------------------------------------------------------

def _wait_listening(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"back-end exited early ({proc.returncode})")
        if path.exists():
            return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {path}")


@contextlib.contextmanager
def backend(kind: str, workdir: Path) -> Iterator[Path]:
    """Start a back-end on a fresh socket; yield the socket path; end it by pid."""
    sock = workdir / f"{kind}.sock"
    prefix = None
    if kind == "pyvhost":
        argv = pyvhost_argv("net", "--socket", str(sock), "--reflect", "--no-stats")
    else:
        binary = shutil.which("dpdk-testpmd")
        if binary is None:
            raise SystemExit("dpdk-testpmd not found (Debian package dpdk-dev)")
        prefix = f"pyvhost-bench-{uuid.uuid4().hex[:8]}"
        argv = [binary, "-l", "0-1", "--no-huge", "-m", "512", "--no-pci", "--file-prefix",
                prefix, "--vdev", f"net_vhost0,iface={sock},queues=1", "--",
                "--nb-cores=1", "--total-num-mbufs=2048", "--stats-period=3600"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_listening(sock, proc)
        time.sleep(0.5)
        yield sock
    finally:
        end_process(proc)
        if prefix:
            shutil.rmtree(Path("/var/run/dpdk") / prefix, ignore_errors=True)


def _connect(sock: Path, mem_slots: bool) -> Frontend:
    fe = Frontend(ack_all=False)
    fe.connect(sock, timeout=600)  # DPDK takes seconds per GiB of guest RAM
    wanted = PF.MQ | PF.REPLY_ACK | PF.STATUS | (PF.CONFIGURE_MEM_SLOTS if mem_slots else 0)
    fe.negotiate(protocol_features=wanted)
    if not fe.protocol_features & PF.REPLY_ACK:
        raise SystemExit("back-end does not offer REPLY_ACK: round trips would not measure it")
    return fe


def _median_ms(samples: list[int]) -> float:
    return statistics.median(samples) / 1e6


# -- 1 and 2: SET_MEM_TABLE hot-add ----------------------------------------------------

def set_mem_table_hot_add(sock: Path, n: int, size: int, reps: int) -> float:
    """Median ms of the SET_MEM_TABLE that grows the table from n-1 to n regions."""
    fe = _connect(sock, mem_slots=False)
    memory = FrontendMemory()
    try:
        memory.add_boot_ram(size)
        for _ in range(n - 2):
            memory.add_dimm(size)
        fe.update_memory(memory.regions)
        samples: list[int] = []
        for _ in range(reps):
            if n == 1:
                # One region: the table's only region is replaced by a new one.
                old = memory.regions[0]
                memory.detach(old)
                memory.add_boot_ram(size)
                start = time.perf_counter_ns()
                fe.update_memory(memory.regions)
                samples.append(time.perf_counter_ns() - start)
                old.close()
                continue
            ram = memory.add_dimm(size)
            start = time.perf_counter_ns()
            fe.update_memory(memory.regions)
            samples.append(time.perf_counter_ns() - start)
            memory.detach(ram)
            fe.update_memory(memory.regions)
            ram.close()
        return _median_ms(samples)
    finally:
        fe.close()
        memory.close()


# -- 3: ADD_MEM_REG / REM_MEM_REG ------------------------------------------------------

def mem_slots_add_remove(sock: Path, n: int, reps: int) -> tuple[float, float]:
    """Median ms of ADD_MEM_REG and of REM_MEM_REG of the n-th region (n-1 present)."""
    fe = _connect(sock, mem_slots=True)
    memory = FrontendMemory()
    try:
        memory.add_boot_ram(2 * MiB)
        for _ in range(n - 2):
            memory.add_dimm(2 * MiB)
        fe.update_memory(memory.regions)
        add: list[int] = []
        rem: list[int] = []
        for _ in range(reps):
            ram = memory.add_dimm(2 * MiB)
            start = time.perf_counter_ns()
            fe.add_mem_reg(ram)
            add.append(time.perf_counter_ns() - start)
            start = time.perf_counter_ns()
            fe.rem_mem_reg(ram)
            rem.append(time.perf_counter_ns() - start)
            memory.detach(ram)
            ram.close()
        return _median_ms(add), _median_ms(rem)
    finally:
        fe.close()
        memory.close()


# -- 4: translation --------------------------------------------------------------------

def translation_ns(n: int) -> float:
    """Nanoseconds per GPA lookup in a table of n regions (all in one sparse memfd)."""
    fd = os.memfd_create("pyvhost-bench-xlate", os.MFD_CLOEXEC)
    os.ftruncate(fd, n * 2 * MiB)
    manager = MemoryManager()
    try:
        for i in range(n):
            desc = MemoryRegion(guest_phys_addr=i * 4 * MiB, memory_size=2 * MiB,
                                userspace_addr=(1 << 40) + i * 4 * MiB,
                                mmap_offset=i * 2 * MiB)
            manager.add_region(desc, fd)
        mem = manager.current
        addrs = [i * 4 * MiB + 4096 for i in range(0, n, max(1, n // 64))]
        loops = 20000
        t = min(timeit.repeat(lambda: [mem.region_at(a) for a in addrs], number=loops // 100,
                              repeat=5))
        return t / (loops // 100 * len(addrs)) * 1e9
    finally:
        manager.clear()
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args()
    reps = 10 if args.quick else 40
    results: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
                   f"Python {platform.python_version()}, kernel {platform.release()}",
    }
    with tempfile.TemporaryDirectory(prefix="pyvhost-bench-") as tmp:
        work = Path(tmp)
        table: dict[str, dict[str, float]] = {}
        with backend("pyvhost", work) as py_sock, backend("dpdk", work) as dpdk_sock:
            for n in range(1, 9):
                row = table.setdefault(f"SET_MEM_TABLE hot-add to {n} regions of 64 MiB", {})
                row["pyvhost"] = set_mem_table_hot_add(py_sock, n, 64 * MiB, reps)
                row["dpdk"] = set_mem_table_hot_add(dpdk_sock, n, 64 * MiB, reps)
                print(f"  n={n}: {row}", file=sys.stderr)
            for size, label in ((2 * MiB, "2 MiB"), (256 * MiB, "256 MiB"), (GiB, "1 GiB")):
                row = table.setdefault(f"SET_MEM_TABLE hot-add to 4 regions of {label}", {})
                row["pyvhost"] = set_mem_table_hot_add(py_sock, 4, size, reps)
                row["dpdk"] = set_mem_table_hot_add(dpdk_sock, 4, size,
                                                    3 if size >= GiB else reps)
                print(f"  size={label}: {row}", file=sys.stderr)
            for n in (8, 64, 509):
                add, rem = mem_slots_add_remove(py_sock, n, reps)
                table[f"ADD_MEM_REG at {n} regions"] = {"pyvhost": add}
                table[f"REM_MEM_REG at {n} regions"] = {"pyvhost": rem}
                print(f"  slots n={n}: add {add:.3f} rem {rem:.3f}", file=sys.stderr)
        results["median_ms"] = table
        results["translation_ns"] = {str(n): translation_ns(n) for n in (8, 509)}
    print(f"\nMachine: {results['machine']}; date {results['date']}\n")
    print("| update (median round trip) | pyvhost ms | DPDK 22.11 ms | DPDK / pyvhost |")
    print("|---|---:|---:|---:|")
    for name, row in table.items():
        py = row["pyvhost"]
        dpdk = row.get("dpdk")
        ratio = f"{dpdk / py:.1f}x" if dpdk else "n/a"
        dpdk_s = f"{dpdk:.3f}" if dpdk else "not offered"
        print(f"| {name} | {py:.3f} | {dpdk_s} | {ratio} |")
    xl = results["translation_ns"]
    assert isinstance(xl, dict)
    print(f"\nOne GPA translation (GuestMemory.region_at): {xl['8']:.0f} ns at 8 regions, "
          f"{xl['509']:.0f} ns at 509 regions")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    exit_on_sigterm()
    main()
