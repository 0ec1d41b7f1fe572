"""The one-command benchmarks (benchmarks/): each one's --help, and the code that turns
raw samples into figures (gaps, CPU shares, testpmd's rates, option filtering), fed with
made-up samples. No timing is measured or asserted here: the benchmarks' figures go to
BENCHMARKS.md, never into a test."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_cross_cpu as xcpu  # noqa: E402
import bench_hotplug_gap as gap  # noqa: E402
import bench_idle as idle  # noqa: E402
import bench_switch as sw  # noqa: E402

from pyvhost import datapath  # noqa: E402
from pyvhost.frontend.peer import descendants  # noqa: E402
from pyvhost.tools.process import end_process, pyvhost_argv  # noqa: E402
from support.procs import need  # noqa: E402


@pytest.mark.parametrize("script", ["bench_switch.py", "bench_idle.py",
                                    "bench_hotplug_gap.py", "bench_cross_cpu.py"])
def test_help(script: str) -> None:
    out = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "--json" in out and "--quick" in out


def started_by(pid: int) -> dict[int, str]:
    """The processes below ``pid``: pid -> command line."""
    out = {}
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            out[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(
                b"\0", b" ").decode(errors="replace")
    return out


def test_sigterm_ends_a_benchmark_and_every_process_it_started() -> None:
    """A benchmark killed mid-run (``kill``, a CI timeout) ends its pyvhost net and its
    testpmd and removes its work directory, as Ctrl-C does: Python's default for SIGTERM
    would leave them running."""
    need("dpdk-testpmd", "dpdk")
    bench = subprocess.Popen([sys.executable, str(BENCHMARKS / "bench_switch.py"),
                              "--topology", "loop", "--kinds", "pyvhost,dpdk",
                              "--sizes", "64", "--queue-pairs", "1", "--seconds", "60"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    kids: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 60
        while not (any("pyvhost net" in c for c in kids.values())
                   and any("testpmd" in c for c in kids.values())):
            assert bench.poll() is None, "the benchmark exited before its run"
            assert time.monotonic() < deadline, f"no pyvhost net and testpmd: {kids}"
            time.sleep(0.2)
            kids = started_by(bench.pid)
        socket = next(w for c in kids.values() if "pyvhost net" in c
                      for w in c.split() if w.endswith(".sock"))
        os.kill(bench.pid, signal.SIGTERM)
        assert bench.wait(90) == 128 + signal.SIGTERM
        for pid, cmd in kids.items():
            assert not Path(f"/proc/{pid}").exists(), f"left running: {pid} {cmd}"
        assert not Path(socket).parent.exists(), "its work directory was left behind"
    finally:
        end_process(bench, signal.SIGKILL, 30)
        for pid in kids:  # what a failed run left behind (started by the benchmark)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _hugetlbfs_mounts() -> list[str]:
    return [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[2] == "hugetlbfs"]


def test_hugepages_runs_testpmd_on_hugepages_and_gives_them_back() -> None:
    """``--hugepages``: both back-ends measured with testpmd on 2 MiB hugepages (its
    memory files on the benchmark's own hugetlbfs while it runs); afterwards the pool is
    its size before and the mount is gone."""
    need("dpdk-testpmd", "dpdk")
    if os.geteuid() != 0:
        pytest.fail("bench_switch.py --hugepages needs root (run the suite as root, as CI does)")
    nr = Path("/proc/sys/vm/nr_hugepages")
    pool, mounts = nr.read_text(), _hugetlbfs_mounts()
    bench = subprocess.Popen([sys.executable, str(BENCHMARKS / "bench_switch.py"),
                              "--hugepages", "--topology", "loop", "--kinds", "pyvhost,dpdk",
                              "--sizes", "64", "--seconds", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        seen: set[str] = set()
        deadline = time.monotonic() + 120
        while bench.poll() is None and time.monotonic() < deadline:
            for mount in set(_hugetlbfs_mounts()) - set(mounts):
                with contextlib.suppress(OSError):
                    seen.update(f.name for f in Path(mount).iterdir())
            time.sleep(0.2)
        out = bench.communicate(timeout=60)[0].decode(errors="replace")
    finally:
        end_process(bench, signal.SIGKILL, 30)
    assert bench.returncode == 0, out
    assert "testpmd memory 2 MiB hugepages" in out
    rows = [line for line in out.splitlines() if line.startswith("| 64 B, 1 qp |")]
    assert [r.split("|")[2].strip() for r in rows] == ["pyvhost", "dpdk"]
    assert all(r.split("|")[3].strip() not in ("failed", "0") for r in rows), out
    # testpmd's memory files (--file-prefix pyvhost-bsw-...) were on the benchmark's mount.
    assert any(name.startswith("pyvhost-bsw-") and "map_" in name for name in seen), seen
    assert nr.read_text() == pool
    assert _hugetlbfs_mounts() == mounts


# -- bench_hotplug_gap --------------------------------------------------------------------

def test_gaps_overlapping_takes_the_gaps_that_touch_the_window() -> None:
    stamps = [0, 10, 20, 100, 110]
    # (20, 100) spans the whole window; (10, 20) ends inside it; (100, 110) starts after.
    assert gap.gaps_overlapping(stamps, 15, 50) == [10, 80]
    assert gap.gaps_overlapping(stamps, 30, 40) == [80]
    assert gap.gaps_overlapping(stamps, 200, 300) == []


def test_summarize_reports_the_stall_of_an_update() -> None:
    # A completion every 10 µs with 4 frames, except a 5 ms hole during the second update.
    stamps = [t for t in range(0, 20_000_000, 10_000) if not 10_000_000 < t < 15_000_000]
    counts = [4] * len(stamps)
    updates = [(9_000_000, 9_500_000), (10_000_100, 14_999_900), (17_000_000, 17_300_000)]
    s = gap.summarize(stamps, counts, (0, 4_000_000), updates)
    assert s["updates"] == 3
    assert s["gap_ms_max_during_updates"] == pytest.approx(5.0)
    assert s["gap_ms_median_of_update_max"] == pytest.approx(0.01)
    # Inclusive 95th percentile of (0.01, 5.0, 0.01) ms: 0.01 + 0.9 * (5.0 - 0.01).
    assert s["gap_ms_p95_of_update_max"] == pytest.approx(4.501)
    # Updates 0 and 2 are hot-adds, 1 the removal with the hole.
    assert s["gap_ms_median_of_add_max"] == pytest.approx(0.01)
    assert s["gap_ms_median_of_remove_max"] == pytest.approx(5.0)
    assert s["gap_ms_max_baseline"] == pytest.approx(0.01)
    assert s["gap_us_median_baseline"] == pytest.approx(10.0)
    assert s["update_ms_median"] == pytest.approx(0.5)
    assert s["update_ms_max"] == pytest.approx(4.9998)
    assert s["update_slowest"] == 1
    assert s["frames_per_s_baseline"] == pytest.approx(400_000, rel=0.01)


def _look(end: int, away: int, waited: tuple[int, int] = (-1, -1), t0: int = -1,
          t1: int = -1) -> list[int]:
    return [end, away, *waited, t0, t1]


def test_cause_tells_the_machine_from_the_backend() -> None:
    ms = 1_000_000
    # The driver was away for most of the gap: the machine's, whatever the back-end did.
    assert gap.cause(4 * ms, _look(1, 3 * ms, (0, 0), 0, 3 * ms)) == "driver"
    # The canary saw the back-end's CPU taken for 2.5 ms of 4: the host had the vCPU.
    assert gap.cause(4 * ms, _look(1, 10_000, (0, 0), 0, 3 * ms), taken=int(2.5 * ms)) \
        == "backend"
    # The back-end's thread waited 2.5 ms of a 3 ms look to run: another task had its CPU.
    assert gap.cause(4 * ms, _look(1, 10_000, (0, int(2.5 * ms)), 0, 3 * ms)) == "backend"
    # Neither: it ran, or slept, and sent nothing back. Its own gap.
    assert gap.cause(4 * ms, _look(1, 10_000, (0, 100_000), 0, 3 * ms), taken=ms) == "own"
    # No look at it (the driver saw the gap only at its end) and the driver was there.
    assert gap.cause(4 * ms, _look(1, 10_000)) == "own"


def test_overlap_adds_the_late_intervals_inside_a_window() -> None:
    late = [10, 20, 30, 40, 100, 200]
    assert gap.overlap(late, 0, 50) == 20
    assert gap.overlap(late, 15, 35) == 10
    assert gap.overlap(late, 150, 1000) == 50
    assert gap.overlap(late, 41, 99) == 0
    assert gap.overlap([], 0, 100) == 0


def test_summarize_splits_the_gaps_by_whose_they_are() -> None:
    ms = 1_000_000
    # A completion every 10 µs, with holes: 2 ms in the baseline (the driver away), 3 ms
    # during update 0 (the back-end's CPU taken: the canary late), 0.5 ms during update 1
    # (the back-end's own), and 1.5 ms during update 2 (it waited to run).
    holes = [(1 * ms, 3 * ms), (30 * ms, 33 * ms), (40 * ms, 40 * ms + 500_000),
             (50 * ms, 51 * ms + 500_000)]
    stamps = [t for t in range(0, 60 * ms, 10_000) if not any(a < t < b for a, b in holes)]
    end = {t: i for i, t in enumerate(stamps)}
    looks = (_look(end[3 * ms], 1_900_000)
             + _look(end[40 * ms + 500_000], 5_000, (0, 0), 40 * ms, 40 * ms + 450_000)
             + _look(end[51 * ms + 500_000], 5_000, (0, 1_200_000), 50 * ms + 200_000,
                     51 * ms + 500_000))
    late = [30 * ms + 250_000, 32 * ms + 900_000]
    s = gap.summarize(stamps, [1] * len(stamps), (0, 5 * ms),
                      [(31 * ms, 32 * ms), (40 * ms + 100_000, 40 * ms + 200_000),
                       (50 * ms + 100_000, 50 * ms + 300_000)], looks, late)
    assert s["gap_ms_max_during_updates"] == pytest.approx(3.0)
    assert s["gap_ms_max_backend_away_during_updates"] == pytest.approx(3.0)
    assert s["gap_ms_max_own_during_updates"] == pytest.approx(0.5)
    assert s["gap_ms_max_driver_away_during_updates"] == 0
    assert s["gaps_over_1ms_machine_during_updates"] == 2
    assert s["gaps_over_1ms_own_during_updates"] == 0
    assert s["gap_ms_max_baseline"] == pytest.approx(2.0)
    assert s["gap_ms_max_own_baseline"] == pytest.approx(0.01)
    assert s["gaps_over_1ms_machine_baseline"] == 1
    # Without its witnesses, every gap is the back-end's own.
    bare = gap.summarize(stamps, [1] * len(stamps), (0, 5 * ms),
                         [(31 * ms, 32 * ms)])
    assert bare["gap_ms_max_own_during_updates"] == pytest.approx(3.0)


def test_a_quick_gap_run_reports_whose_the_gaps_are(tmp_path: Path) -> None:
    """A real ``--quick`` run of both back-ends: every figure is there, each back-end's
    own longest gap is one of its gaps, and no gap is counted twice. No figure is
    asserted: the machine is shared."""
    need("dpdk-testpmd", "dpdk")
    out = tmp_path / "gap.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "bench_hotplug_gap.py"), "--quick",
                    "--kinds", "pyvhost,dpdk", "--json", str(out)], check=True,
                   capture_output=True, timeout=600)
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"pyvhost", "dpdk"}
    for r in results.values():
        assert {key for _, key, _ in gap.ROWS} <= set(r)
        assert 0 < r["gap_ms_max_own_during_updates"] <= r["gap_ms_max_during_updates"]
        assert max(r["gap_ms_max_own_during_updates"],
                   r["gap_ms_max_driver_away_during_updates"],
                   r["gap_ms_max_backend_away_during_updates"]) \
            == r["gap_ms_max_during_updates"]
        assert 0 < r["gap_ms_max_own_baseline"] <= r["gap_ms_max_baseline"]


def test_a_gap_run_without_the_canary_says_so() -> None:
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_hotplug_gap.py"), "--quick",
                           "--kinds", "pyvhost", "--no-canary"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "canary on the back-end's CPU: no" in done.stdout
    assert "of them the back-end's own" in done.stdout


def test_summarize_refuses_a_window_without_frames() -> None:
    with pytest.raises(ValueError):
        gap.summarize([0, 10], [1, 1], (0, 10), [(100, 200)])


def test_gap_table_has_the_ratio_column() -> None:
    row = {key: 2.0 for _, key, _ in gap.ROWS}
    text = gap.table({"pyvhost": row, "dpdk": {k: 2 * v for k, v in row.items()}})
    assert "| DPDK / pyvhost |" in text.splitlines()[0]
    assert text.splitlines()[2].endswith("| 2.0x |")
    assert len(text.splitlines()) == 2 + len(gap.ROWS)


# -- bench_idle ---------------------------------------------------------------------------

def test_idle_summary_and_table() -> None:
    s = idle.summarize((1.0, 100, 1.0, 10.0), (1.05, 120, 1.0, 20.0))
    assert s["cpu_percent"] == pytest.approx(0.5)
    assert s["cpu_percent_stat"] == 0
    assert s["wakeups_per_s"] == pytest.approx(2.0)
    dpdk = idle.summarize((0.0, 0, 0.0, 0.0), (10.0, 50, 10.0, 10.0))
    text = idle.table({"pyvhost": s, "dpdk": dpdk})
    assert "| pyvhost | 0.500 | 0.00 | 2.0 | 200x |" in text


# -- bench_switch -------------------------------------------------------------------------

def test_net_options_reads_this_pyvhost_net() -> None:
    help_text = subprocess.run(pyvhost_argv("net", "--help"), capture_output=True,
                               text=True, check=True).stdout
    options = sw.net_options(help_text)
    assert options["--socket"] is True and options["--queue-pairs"] is True
    assert options["--reflect"] is False and options["--mem-slots"] is False
    # The usage examples above "Options:" are not options of pyvhost net.
    assert "--vdev" not in options and "--nb-cores" not in options


def test_split_pyvhost_args_skips_what_net_lacks() -> None:
    options = {"--queue-pairs": True, "--reflect": False, "--mac": True}
    kept, dropped = sw.split_pyvhost_args(
        ["--workers", "2", "--queue-pairs", "2", "--poll-us=50", "--reflect", "--nope",
         "--mac=02:00:00:00:00:01"], options)
    assert kept == ["--queue-pairs", "2", "--reflect", "--mac=02:00:00:00:00:01"]
    assert dropped == ["--workers", "--poll-us", "--nope"]


SHOW_PORT_STATS = """
  ######################## NIC statistics for port 0  ########################
  RX-packets: 1000       RX-missed: 0          RX-bytes:  64000
  Throughput (since last show)
  Rx-pps:       338157          Rx-bps:    173136384
  Tx-pps:       338150          Tx-bps:    173132800
  ############################################################################
  ######################## NIC statistics for port 1  ########################
  Throughput (since last show)
  Rx-pps:        11843          Rx-bps:      6063616
  Tx-pps:        11840          Tx-bps:      6062080
  ############################################################################
"""


def test_port_rates_sums_the_ports() -> None:
    assert sw.port_rates(SHOW_PORT_STATS, 1) == 338157
    assert sw.port_rates(SHOW_PORT_STATS, 2) == 350000
    with pytest.raises(sw.BenchError):
        sw.port_rates(SHOW_PORT_STATS, 3)


def test_switch_figures_and_table() -> None:
    f = sw.figures(1_000_000, 64, cpu_s=2.0, span=2.0, samples=1)
    assert f["gbit_per_s"] == pytest.approx(0.512)
    assert f["cpu_s_per_mframe"] == pytest.approx(1.0)
    c = sw.figures(4_000_000, 64, cpu_s=2.0, span=2.0, samples=1)
    text = sw.table({"64 B, 1 qp": {"pyvhost": f, "dpdk": c}}, ["pyvhost", "pyvhost-pure",
                                                                 "dpdk"])
    lines = text.splitlines()
    assert lines[2].startswith("| 64 B, 1 qp | pyvhost | 1,000,000 |")
    assert lines[2].endswith("| 4.0x | 4.0x |")
    assert lines[3] == "| 64 B, 1 qp | pyvhost-pure | failed | | | | | |"
    assert sw.queue_options(1) == [] and sw.queue_options(2) == ["--rxq=2", "--txq=2"]


def test_cross_cpu_levels_split_where_the_samples_jump() -> None:
    assert xcpu.levels([]) == []
    assert xcpu.levels([60.0, 70.0, 65.0]) == [[60.0, 65.0, 70.0]]
    assert xcpu.levels([340.0, 60.0, 330.0, 70.0]) == [[60.0, 70.0], [330.0, 340.0]]
    figures = xcpu.summary([340.0, 60.0, 330.0, 70.0])
    assert figures["median_ns"] == 200.0
    assert figures["levels"] == [
        {"count": 2, "median_ns": 65.0, "min_ns": 60.0, "max_ns": 70.0},
        {"count": 2, "median_ns": 335.0, "min_ns": 330.0, "max_ns": 340.0}]
    assert "2 levels" in xcpu.report(figures)
    assert "one level" in xcpu.report(xcpu.summary([60.0, 70.0]))


def test_cross_cpu_runs_its_program_and_writes_json(tmp_path: Path) -> None:
    """Two real samples between two CPUs: the program builds, pins and answers (the
    figures themselves are the machine's; none is asserted)."""
    need("cc", "gcc")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.fail("this test needs two CPUs to pin the two threads to")
    out = tmp_path / "x.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_cross_cpu.py"),
                           "--samples", "2", "--interval", "0", "--round-trips", "2000",
                           "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    assert len(figures["samples_ns"]) == 2 and all(s > 0 for s in figures["samples_ns"])
    assert sum(g["count"] for g in figures["levels"]) == 2
    assert "ns per round trip" in done.stdout


def test_cross_cpu_refuses_a_cpu_it_may_not_use() -> None:
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_cross_cpu.py"),
                           "--cpus", "0,4096"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "4096" in done.stderr


def test_switch_pair_ratios_take_each_round_apart() -> None:
    def fig(fps: float) -> dict[str, float]:
        return {"frames_per_s": fps}
    rounds = {0: {"pyvhost": fig(5.0), "dpdk": fig(10.0)},
              1: {"pyvhost": fig(3.0)},                       # its DPDK run failed
              2: {"pyvhost": fig(9.0), "dpdk": fig(6.0)}}
    assert sw.pair_ratios(rounds, "pyvhost") == [0.5, 1.5]
    text = sw.pair_lines({"64 B, 1 qp": rounds}, ["pyvhost", "dpdk"])
    assert "| 64 B, 1 qp | pyvhost | 100% | 50%, 150% |" in text
    assert "no round with both" in sw.pair_lines({"x": {1: rounds[1]}}, ["pyvhost", "dpdk"])


def _window(fps: float, before: float, after: float) -> dict[str, float]:
    return {"seconds": 0.5, "frames_per_s": fps, "cpu_s": 0.5, "rt_before_ns": before,
            "rt_after_ns": after, "start": 0.0, "end": 0.5}


def test_switch_placement_compares_back_ends_at_the_same_level() -> None:
    """``--placement``: a window counts for a level only when the round trips before and
    after it are of that level; each back-end's median at a level is set beside DPDK's at
    the same level, never beside DPDK's at the other."""
    windows = {"64 B, 1 qp": {
        "pyvhost": [_window(4e6, 60, 55), _window(6e6, 58, 61), _window(2e6, 330, 320),
                    _window(9e9, 60, 330)],              # straddles the levels: left out
        "dpdk": [_window(10e6, 57, 59), _window(5e6, 340, 310), _window(3e6, 310, 335)],
    }}
    samples = [w[k] for ws in windows["64 B, 1 qp"].values() for w in ws
               for k in ("rt_before_ns", "rt_after_ns")]
    groups = sw.split_levels(samples)
    assert len(groups) == 2
    assert sw.level_of(61, groups) == 0 and sw.level_of(320, groups) == 1
    assert sw.level_of(10_000, groups) == 1
    assert [len(ws) for ws in sw.by_level(windows["64 B, 1 qp"]["pyvhost"], groups).values()] \
        == [2, 1]
    rows = {(r["kind"], r["level"]): r for r in sw.level_rows(windows, groups)}
    assert rows[("pyvhost", 0)]["windows"] == 2
    assert rows[("pyvhost", 0)]["frames_per_s"] == 5e6
    assert rows[("pyvhost", 0)]["over_dpdk"] == 0.5        # 5 M beside DPDK's 10 M
    assert rows[("pyvhost", 1)]["over_dpdk"] == 0.5        # 2 M beside DPDK's median 4 M
    assert rows[("dpdk", 1)]["over_dpdk"] is None
    # 0.5 CPU-s over 2 M and over 3 M frames: 0.25 and 0.1667 µs, median 0.2083.
    assert rows[("pyvhost", 0)]["cpu_us_per_frame"] == pytest.approx((0.25 + 0.5 / 3) / 2)
    text = sw.level_lines(list(rows.values()))
    assert "| 64 B, 1 qp |" in text and "50%" in text


def test_switch_placement_levels_ignore_the_few_samples_between_them() -> None:
    """Hundreds of samples: a few taken while the host moved a vCPU fall between the two
    levels, so the sorted samples never jump by 2x; the levels are still two. One level
    (no 2x spread between the 5th and 95th percentiles) stays one."""
    samples = [55.0 + i % 10 for i in range(300)] + [320.0 + i % 40 for i in range(200)] \
        + [90.0, 120.0, 160.0, 210.0, 260.0]
    assert len(xcpu.levels(samples)) == 1        # bridged: no single 2x jump
    groups = sw.split_levels(samples)
    assert [len(g) for g in groups] == [302, 203]
    assert groups[0][-1] == 120.0 and groups[1][0] == 160.0   # the line: about 140 ns
    assert sw.split_levels([50.0 + i for i in range(40)]) == [[50.0 + i for i in range(40)]]
    assert sw.split_levels([]) == []


_NATIVE = "/x/src/pyvhost/datapath/_native.cpython-311-x86_64-linux-gnu.so"
_POP = "__pyx_f_7pyvhost_8datapath_7_native_pop"
#: ``perf script -F time,ip,sym,dso --ns`` as perf 6.1 prints it.
PERF_SCRIPT = "\n".join([
    f"   100.100000000:      7f91068d8b5c {_POP} ({_NATIVE})",
    "   100.200000000:      7f9107eff1c7 _PyEval_EvalFrameDefault (/r/lib/libpython3.11.so.1.0)",
    "   100.700000000:      7f9107d8b874 __memmove_avx512_unaligned_erms "
    "(/usr/lib/x86_64-linux-gnu/libc.so.6)",
    f"   101.200000000:      7f91068d8b5c {_POP} ({_NATIVE})",
    "   101.300000000:      ffffffff8100 [unknown] ([kernel.kallsyms])",
    f"    99.000000000:      7f91068d8b5c {_POP} ({_NATIVE})",
    "not a sample line",
])


def test_switch_profile_splits_perf_samples_by_level() -> None:
    """``--profile``: perf's lines parsed (Cython names and objects shortened), each sample
    given to the window whose span holds its time (one before every window is left out),
    and the windows of each level summed into shares; a window that straddles the levels
    counts for none."""
    samples = sw.perf_samples(PERF_SCRIPT)
    assert samples[0] == (100.1, "pop (_native)")
    assert samples[1][1] == "_PyEval_EvalFrameDefault (libpython3.11)"
    assert samples[2][1] == "__memmove_avx512_unaligned_erms (libc)"
    assert samples[4][1] == "[unknown] ([kernel.kallsyms])"
    assert len(samples) == 6
    assert sw.pyx_name("__pyx_pw_7pyvhost_8datapath_7_native_9Forwarder_5again") == "again"
    windows = [{**_window(1e6, 60, 58), "start": 100.0, "end": 100.5},
               {**_window(1e6, 58, 330), "start": 100.5, "end": 101.0},
               {**_window(1e6, 330, 320), "start": 101.0, "end": 101.5}]
    profs = sw.window_profiles(samples, windows)
    assert profs == [{"pop (_native)": 1, "_PyEval_EvalFrameDefault (libpython3.11)": 1},
                     {"__memmove_avx512_unaligned_erms (libc)": 1},
                     {"pop (_native)": 1, "[unknown] ([kernel.kallsyms])": 1}]
    groups = sw.split_levels([60, 58, 58, 330, 330, 320])
    rows = sw.level_profiles({"64 B, 1 qp": {"pyvhost": windows}},
                             {"64 B, 1 qp": {"pyvhost": profs}}, groups)
    assert [(r["level"], r["samples"]) for r in rows] == [(0, 2), (1, 2)]
    assert rows[0]["objects"] == {"_native": 0.5, "libpython3.11": 0.5}
    assert rows[1]["functions"] == {"pop (_native)": 0.5, "[unknown] ([kernel.kallsyms])": 0.5}
    text = sw.profile_lines(rows)
    assert "| 64 B, 1 qp | 1 | pyvhost | 2 | [kernel.kallsyms] 50%, _native 50% |" in text
    assert "pop (_native) 50.0%" in text


def test_switch_placement_samples_between_windows(tmp_path: Path) -> None:
    """A real ``--placement --profile`` run: both back-ends measured in windows, each with
    a round trip measured before and after it, and the per-level table printed; perf's
    samples of each back-end split by level (no figure is asserted: the machine's speed
    is what it is)."""
    need("dpdk-testpmd", "dpdk")
    need("perf", "linux-perf")
    out = tmp_path / "placement.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_switch.py"),
                           "--topology", "loop", "--kinds", "pyvhost,dpdk", "--sizes", "64",
                           "--seconds", "2", "--window", "0.5", "--placement",
                           "--profile", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "The two CPUs' round trip between windows" in done.stdout
    placement = json.loads(out.read_text())["placement"]
    assert placement["window"] == 0.5
    for kind in ("pyvhost", "dpdk"):
        ws = placement["windows"]["64 B, 1 qp"][kind]
        assert len(ws) >= 3, ws
        for w in ws:
            assert w["frames_per_s"] > 0 and w["rt_before_ns"] > 0 and w["rt_after_ns"] > 0
        # Consecutive windows share their sample: one's "after" is the next's "before".
        assert all(a["rt_after_ns"] == b["rt_before_ns"] for a, b in itertools.pairwise(ws))
    assert placement["levels_ns"], placement
    assert {r["kind"] for r in placement["by_level"]} <= {"pyvhost", "dpdk"}
    # --profile: each back-end's samples of the windows of a level, where that level has
    # windows of it; pyvhost's in its compiled data path among them.
    assert "Where each back-end's CPU time went, per level" in done.stdout
    profiled = {(r["kind"], r["level"]): r for r in placement["profile_by_level"]}
    for r in placement["by_level"]:
        prof = profiled[(r["kind"], r["level"])]
        assert prof["samples"] > 0, prof
        assert sum(prof["objects"].values()) == pytest.approx(1.0)
    for (kind, _), prof in profiled.items():
        if kind == "pyvhost" and datapath.name() == "compiled":
            assert "_native" in prof["objects"], prof


@pytest.mark.parametrize(("args", "error"), [
    (["--topology", "switch", "--placement"], "--placement: for --topology loop or switch-loop"),
    (["--topology", "loop", "--profile"], "--profile: with --placement"),
])
def test_switch_placement_and_profile_refuse_what_they_can_not_measure(
        args: list[str], error: str) -> None:
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_switch.py"),
                           "--kinds", "pyvhost,dpdk", *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert error in done.stderr


def test_switch_in_flight_runs_both_back_ends_and_is_refused_for_the_switch(
        tmp_path: Path) -> None:
    """``--in-flight 1``: each front-end port starts with one burst; both back-ends
    forward it (no figure is asserted). The switch topology has no loop to fill."""
    need("dpdk-testpmd", "dpdk")
    out = tmp_path / "sw.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_switch.py"),
                           "--topology", "switch-loop", "--kinds", "pyvhost,dpdk", "--sizes",
                           "64", "--seconds", "1", "--in-flight", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(out.read_text())
    assert doc["in_flight"] == 1
    for kind in ("pyvhost", "dpdk"):
        assert doc["results"]["64 B, 1 qp"][kind]["frames_per_s"] > 0
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_switch.py"),
                           "--topology", "switch", "--kinds", "pyvhost,dpdk", "--in-flight",
                           "1"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "--in-flight: for --topology loop or switch-loop" in done.stderr
