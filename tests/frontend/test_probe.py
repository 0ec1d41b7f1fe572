"""The leak probe and ``pyvhost probe`` against scripted back-ends in this process.

The fake back-end runs in this process, so SO_PEERCRED names this process and the probe
measures it: the front-end's own regions are the same before and after the cycles, so
any growth is what the back-end kept.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable

import pytest
from click.testing import CliRunner

from pyvhost.cli import main
from pyvhost.cli.probe import probe
from pyvhost.frontend import ProbeConfig, ProbeError, run_probe
from pyvhost.frontend.memory import name_prefix
from pyvhost.frontend.probe import LatencyStats
from pyvhost.protocol.constants import ProtocolFeature
from pyvhost.tools import procfs
from pyvhost.units import MiB, parse_size
from support.cli import started
from support.schemas import validate

from .fake_backend import FakeBackend

PF = ProtocolFeature
MakeBackend = Callable[..., FakeBackend]
TABLE_ONLY = int(PF.MQ | PF.REPLY_ACK | PF.STATUS)  # what DPDK 22.11 negotiates with us


def _config(be: FakeBackend, **kwargs: object) -> ProbeConfig:
    values: dict[str, object] = {"cycles": 3, "regions": 2, "boot_size": 4 * MiB,
                                 "settle": 0.0, "timeout": 2.0}
    values.update(kwargs)
    return ProbeConfig(be.path, **values)  # type: ignore[arg-type]


def _our_region_fds() -> int:
    return procfs.measure(os.getpid(), name_prefix()).matching_fds


@pytest.mark.parametrize("features", [TABLE_ONLY, int(TABLE_ONLY | PF.CONFIGURE_MEM_SLOTS)])
def test_no_leak_from_a_clean_backend(make_backend: MakeBackend, features: int) -> None:
    be = make_backend(protocol_features=features)
    seen: list[tuple[int, int]] = []
    report = run_probe(_config(be), progress=lambda done, total: seen.append((done, total)))
    assert report.verdict == "no leak" and not report.leak
    assert report.pid == os.getpid()
    assert report.mem_slots == bool(features & PF.CONFIGURE_MEM_SLOTS)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    # The peak shows the probe sees the back-end's holdings: 2 more regions, each an fd
    # (plus mmap's dup on both sides) and a mapping on both sides.
    assert report.peak.mappings == report.before.mappings + 4
    assert report.after.mappings == report.before.mappings
    assert report.after.matching_fds == report.before.matching_fds
    name = "ADD_MEM_REG" if report.mem_slots else "SET_MEM_TABLE"
    if report.mem_slots:
        assert report.requests_sent == {"ADD_MEM_REG": 6, "REM_MEM_REG": 6}
    else:
        assert report.requests_sent == {"SET_MEM_TABLE": 12}
    assert report.latency.count == 12
    assert report.latency_by_request[name].count == (6 if report.mem_slots else 12)
    assert report.disconnected is not None and report.disconnected.matching_fds == 0
    assert _our_region_fds() == 0  # the probe released everything of its own


def test_leaky_backend_is_a_leak(make_backend: MakeBackend) -> None:
    be = make_backend(protocol_features=TABLE_ONLY, leak=True)
    report = run_probe(_config(be, timeout=0.5))
    assert report.verdict == "leak"
    # Every SET_MEM_TABLE leaks the previous table: boot + 2 regions per cycle step.
    assert report.after.mappings > report.before.mappings
    assert report.after.matching_fds > report.before.matching_fds
    assert report.after.fds > report.before.fds


def test_json_schema(make_backend: MakeBackend) -> None:
    be = make_backend(protocol_features=TABLE_ONLY)
    doc = run_probe(_config(be)).to_json()
    assert json.loads(json.dumps(doc)) == doc
    for key in ("cycles", "regions", "fds_before", "fds_after", "region_fds_before",
                "region_fds_after", "mappings_before", "mappings_after"):
        assert isinstance(doc[key], int), key
    assert doc["mem_slots"] is False and doc["reply_ack"] is True
    assert doc["protocol_features"] == ["MQ", "REPLY_ACK", "STATUS"]
    assert doc["verdict"] == "no leak" and doc["leak"] is False
    latency = doc["latency_ms"]
    assert isinstance(latency, dict)
    assert set(latency) == {"median", "p99", "max", "count", "by_request"}
    assert set(latency["by_request"]) == {"SET_MEM_TABLE"}


def test_regions_over_the_table_limit_are_refused(make_backend: MakeBackend) -> None:
    be = make_backend(protocol_features=TABLE_ONLY)
    with pytest.raises(ProbeError, match="need 9 memory slots, the back-end takes 8"):
        run_probe(_config(be, regions=8))
    assert _our_region_fds() == 0


def test_mem_slots_required_but_not_offered(make_backend: MakeBackend) -> None:
    be = make_backend(protocol_features=TABLE_ONLY)
    with pytest.raises(ProbeError, match="does not offer CONFIGURE_MEM_SLOTS"):
        run_probe(_config(be, mem_slots=True))


def test_no_mem_slots_forces_set_mem_table(make_backend: MakeBackend) -> None:
    be = make_backend()
    report = run_probe(_config(be, mem_slots=False))
    assert not report.mem_slots
    assert "CONFIGURE_MEM_SLOTS" not in report.protocol_features
    assert set(report.requests_sent) == {"SET_MEM_TABLE"}


def test_interrupt_releases_everything(make_backend: MakeBackend) -> None:
    be = make_backend()

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_probe(_config(be), progress=interrupt)
    assert be.wait_done()  # the probe hung up, and the (in-process) back-end let go
    assert _our_region_fds() == 0


def test_latency_stats() -> None:
    stats = LatencyStats.of([i * 1_000_000 for i in range(1, 101)])
    assert (stats.count, stats.median, stats.p99, stats.max) == (100, 50.5, 99.0, 100.0)
    assert LatencyStats.of([]).count == 0


@pytest.mark.parametrize(("text", "value"), [("4096", 4096), ("512K", 512 << 10),
                                             ("2M", 2 << 20), ("2MiB", 2 << 20),
                                             ("1g", 1 << 30), ("64 MB", 64 << 20)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


# -- the command line ---------------------------------------------------------------------

def test_cli_json_no_leak(make_backend: MakeBackend) -> None:
    be = make_backend(protocol_features=TABLE_ONLY)
    result = CliRunner().invoke(probe, ["--socket", be.path, "--cycles", "2", "--regions",
                                        "3", "--boot-size", "4M", "--settle", "0", "--json"])
    assert result.exit_code == 0, result.output
    doc = validate(json.loads(result.stdout), "pyvhost.probe/1")
    assert doc["verdict"] == "no leak"
    assert doc["cycles"] == 2 and doc["regions"] == 3 and doc["region_size"] == 2 * MiB


def test_cli_leak_exits_1(make_backend: MakeBackend) -> None:
    be = make_backend(protocol_features=TABLE_ONLY, leak=True)
    result = CliRunner().invoke(probe, ["--socket", be.path, "--cycles", "1", "--timeout",
                                        "0.5", "--boot-size", "4M", "--settle", "0", "--json"])
    assert result.exit_code == 1, result.output
    assert validate(json.loads(result.stdout), "pyvhost.probe/1")["verdict"] == "leak"


def test_cli_table_output(make_backend: MakeBackend) -> None:
    be = make_backend()
    result = CliRunner().invoke(probe, ["--socket", be.path, "--cycles", "2",
                                        "--boot-size", "4M", "--settle", "0"])
    assert result.exit_code == 0, result.output
    for text in ("fds on our regions", "mappings of our regions", "ADD_MEM_REG",
                 "REM_MEM_REG", "verdict: no leak"):
        assert text in result.stdout


def test_cli_missing_socket_exits_2(short_dir: str) -> None:
    path = f"{short_dir}/nobody.sock"
    result = CliRunner().invoke(probe, ["--socket", path, "--json"])
    assert result.exit_code == 2
    doc = validate(json.loads(result.stdout), "pyvhost.error/1")
    assert doc["exit_code"] == 2 and doc["error"]["kind"] == "connect"
    assert "no vhost-user socket at" in doc["error"]["message"]
    human = CliRunner().invoke(probe, ["--socket", path])
    assert human.exit_code == 2
    assert "no vhost-user socket at" in human.stderr
    assert human.stdout == ""


def test_cli_usage_errors_exit_2(make_backend: MakeBackend) -> None:
    be = make_backend(protocol_features=TABLE_ONLY)
    for args in (["--socket", be.path, "--regions", "8", "--boot-size", "4M"],
                 ["--socket", be.path, "--mem-slots"],
                 ["--socket", be.path, "--region-size", "lots"],
                 ["--socket", be.path, "--cycles", "-1"],
                 []):
        result = CliRunner().invoke(probe, args)
        assert result.exit_code == 2, (args, result.output)


def test_cli_interrupt_exits_130(make_backend: MakeBackend, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    be = make_backend()

    def interrupted(config: ProbeConfig, **_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("pyvhost.cli.probe.run_probe", interrupted)
    with pytest.raises(SystemExit) as exited:
        main(["probe", "--socket", be.path, "--json"])
    assert exited.value.code == 130
    out, err = capsys.readouterr()
    doc = validate(json.loads(out), "pyvhost.error/1")
    assert (doc["command"], doc["error"]["kind"], doc["exit_code"]) == (
        "probe", "interrupted", 130)
    assert err.strip() == "error: interrupted"


def test_cli_ctrl_c_exits_130_and_hangs_up(make_backend: MakeBackend) -> None:
    be = make_backend(protocol_features=TABLE_ONLY)
    with started("probe", "--socket", be.path, "--cycles", "1000000", "--boot-size", "4M",
                 "--settle", "0", "--json") as probing:
        probing.wait_until(lambda: be.names.count("SET_MEM_TABLE") >= 20, "20 SET_MEM_TABLE")
        done = probing.interrupt()
    assert done.code == 130, done
    assert validate(done.json(), "pyvhost.error/1")["error"]["kind"] == "interrupted"
    assert "Traceback" not in done.stderr and done.stderr.strip() == "error: interrupted"
    assert be.wait_done()  # the probe hung up


def test_help_teaches() -> None:
    result = CliRunner().invoke(probe, ["--help"])
    assert result.exit_code == 0
    for text in ("dpdk-testpmd", "--no-huge -m 512 --no-pci", "net_vhost0,iface=",
                 "--total-num-mbufs=2048", "SET_MEM_TABLE", "ADD_MEM_REG", "Exit codes"):
        assert text in result.output


# -- long runs: the series and its slope --------------------------------------------------

def test_one_fd_per_100_cycles_shows_in_the_slope(make_backend: MakeBackend) -> None:
    # regions=1: 2 SET_MEM_TABLE per cycle; a dup kept every 200th: one fd per 100 cycles.
    be = make_backend(protocol_features=TABLE_ONLY, leak_every=200)
    report = run_probe(_config(be, cycles=1000, regions=1))
    slopes = report.series.per_1000()
    assert len(report.series) == 1001
    assert 9.0 <= slopes["fds"] <= 11.0, slopes
    assert 9.0 <= slopes["region_fds"] <= 11.0, slopes
    assert slopes["mappings"] == 0.0, slopes
    assert report.verdict == "leak"
    doc = report.to_json()
    series = doc["series"]
    assert isinstance(series, dict) and len(series["fds"]) == 1001
    assert doc["growth_per_1000_cycles"] == slopes


def test_a_clean_long_run_has_a_flat_slope(make_backend: MakeBackend) -> None:
    be = make_backend(protocol_features=TABLE_ONLY)
    report = run_probe(_config(be, cycles=300, regions=2))
    assert report.series.per_1000() == {"fds": 0.0, "region_fds": 0.0, "mappings": 0.0,
                                        "mapped_bytes": 0.0}
    assert report.verdict == "no leak"


def test_a_removed_region_still_held_is_a_stale_file(make_backend: MakeBackend) -> None:
    be = make_backend(leak=True)  # keeps what REM_MEM_REG removes
    report = run_probe(_config(be, cycles=2, regions=2, timeout=0.5))
    assert report.mem_slots and len(report.stale_files) == 4
    assert all(name.startswith(name_prefix()) for name in report.stale_files)
    assert report.verdict == "leak"


def test_cli_plot_draws_a_png(make_backend: MakeBackend, short_dir: str) -> None:
    be = make_backend(protocol_features=TABLE_ONLY, leak_every=20)
    png = f"{short_dir}/series.png"
    result = CliRunner().invoke(probe, ["--socket", be.path, "--cycles", "100", "--regions",
                                        "1", "--boot-size", "4M", "--settle", "0",
                                        "--timeout", "0.5", "--plot", png])
    assert result.exit_code == 1, result.output
    found = re.search(r"growth per 1,000 cycles: fds \+([0-9.]+)", result.stdout)
    assert found is not None and 90 <= float(found.group(1)) <= 110, result.stdout
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_plot_without_matplotlib_fails_before_the_run(
        make_backend: MakeBackend, short_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    be = make_backend(protocol_features=TABLE_ONLY)
    monkeypatch.setattr("pyvhost.frontend.plot.importlib.util.find_spec", lambda name: None)
    result = CliRunner().invoke(probe, ["--socket", be.path, "--cycles", "1000", "--plot",
                                        f"{short_dir}/x.png", "--json"])
    assert result.exit_code == 2, result.output
    doc = validate(json.loads(result.stdout), "pyvhost.error/1")
    assert doc["error"]["kind"] == "run" and "pyvhost[plot]" in doc["error"]["message"]
    assert be.names == []  # nothing was sent: it failed before connecting
