"""Suite-wide fixtures and the CI rule that a skipped test fails the run."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.procs import Procs

# A run started in the background by a non-interactive shell (`./dev test &`, nohup)
# inherits SIGINT ignored, and so would every process the tests start: Python then never
# raises KeyboardInterrupt, and the tests that press Ctrl-C on pyvhost (exit 130) would
# wait for nothing. Give this process Python's own handler, as a terminal start has it:
# its children then start with SIGINT at its default (a Python handler is not inherited
# across exec).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Start real peer processes; all are ended (by pid) when the test ends, pass or fail."""
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A fresh directory for Unix sockets, removed after the test: a socket path has at
    most 107 bytes, and tmp_path can be longer."""
    d = Path(tempfile.mkdtemp(prefix="pyvhost-t-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Under CI=true a skipped test is not a pass: the run fails.
    if os.environ.get("CI") != "true":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if reporter is not None:
            reporter.write_line(f"CI=true: {skipped} test(s) skipped; a skip fails CI",
                                red=True)


#: Test folders and files that exercise the per-frame data path: they run twice in
#: ``./dev test``, on the compiled path and again with PYVHOST_PURE=1 (``-m datapath``).
DATAPATH_TESTS = ("datapath", "switch", "backend", "virtq", "memory", "net",
                  "integration/test_dpdk_reflect.py", "integration/test_dpdk_switch_txonly.py",
                  "integration/test_hotplug_cycles.py")
#: Tests that run QEMU for ``pyvhost mem`` or hot-plug memory in the lab: they run again
#: on QEMU 10.0 in ``./dev test`` (PYVHOST_QEMU, ``-m qemu_versions``).
QEMU_VERSION_TESTS = ("hotplug", "lab/test_lab.py", "lab/test_unplug.py",
                      "lab/test_dpdk_hotplug.py", "lab/test_mq_guest.py",
                      "lab/test_packets_in_new_memory.py", "cli/test_mem_migrate.py",
                      "lab/test_lab_migrate.py")
#: Left out of the QEMU 10.0 pass: they start no QEMU.
QEMU_VERSION_LEFT_OUT = (
    "cli/test_mem_migrate.py::test_usage_errors",
    "cli/test_mem_migrate.py::test_migrate_under_libvirt_is_refused_with_what_to_use")
#: Tests that need the guest to live on after several migrations, or after one under
#: load: they run on QEMU 9.0 and later only (the QEMU 10.0 pass in CI), and are
#: deselected, not skipped, on older ones. QEMU 7.2 under TCG loses guest writes during a
#: migration ("physmem: Fix migration dirty bitmap coherency with TCG memory access",
#: fixed in 9.0; docs/dirty-log.md): in a CI run on a loaded machine the guest stopped
#: answering after the 10th migration, and DPDK's migrated guest died on the destination,
#: while the back-ends' fds, mappings and logs were right. The lab's migration (a stream
#: and pings throughout) joined them on 2026-12-07: in a CI run on 7.2 the migrated guest's
#: console never answered again. A migration under traffic with the back-end writing
#: (tests/hotplug/test_migrate_qemu.py) still runs on 7.2.
NEEDS_QEMU_9 = (
    "lab/test_lab_migrate.py",
    "hotplug/test_migrate_qemu.py::test_ten_migrations_back_and_forth_leak_nothing",
    "hotplug/test_migrate_dpdk.py")
#: Tests that fail now and then for a reason not yet found: deselected (not skipped)
#: unless PYVHOST_UNSTABLE=1, so a run by hand can keep looking for it. Each one's
#: docstring says what it lost and how often. None today: the lab's migration, listed
#: here on 2026-12-06, lost a ping sent at the switchover (the source stopped, frames for
#: VM 1 dropped as port_down until the destination ran) and counted it after the window
#: it belonged to; the window now waits for it and its check accounts for it.
UNSTABLE: tuple[str, ...] = ()
UNSTABLE_ENV = "PYVHOST_UNSTABLE"
_TESTS = Path(__file__).resolve().parent


def _under(rel: str, prefixes: tuple[str, ...]) -> bool:
    return any(rel == p or rel.startswith(p + "/") for p in prefixes)


def _listed(rel: str, name: str, entries: tuple[str, ...]) -> bool:
    return _under(rel, entries) or f"{rel}::{name}" in entries


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from pyvhost.lab.qemu import qemu_binary, qemu_version

    try:
        old_qemu = qemu_version(qemu_binary()) < (9, 0, 0)
    except Exception:  # no QEMU: the QEMU tests fail and say so
        old_qemu = False
    deselected = []
    for item in list(items):
        rel = Path(item.path).resolve().relative_to(_TESTS).as_posix()
        if (old_qemu and _listed(rel, item.name, NEEDS_QEMU_9)) or (
                _listed(rel, item.name, UNSTABLE) and os.environ.get(UNSTABLE_ENV) != "1"):
            deselected.append(item)
            items.remove(item)
            continue
        if _under(rel, DATAPATH_TESTS):
            item.add_marker(pytest.mark.datapath)
        if _under(rel, QEMU_VERSION_TESTS) and not _listed(rel, item.name,
                                                             QEMU_VERSION_LEFT_OUT):
            item.add_marker(pytest.mark.qemu_versions)
    if deselected:
        config.hook.pytest_deselected(items=deselected)


def pytest_report_header(config: pytest.Config) -> list[str]:
    # Which data path the in-process tests and every pyvhost child process run: the
    # compiled one unless PYVHOST_PURE=1 (CI runs the data-path tests both ways); and which
    # QEMU the QEMU tests start (PYVHOST_QEMU selects another one than Debian's 7.2).
    from pyvhost import datapath
    from pyvhost.lab.qemu import QEMU_ENV, qemu_binary, qemu_version

    binary = qemu_binary()
    try:
        version = ".".join(map(str, qemu_version(binary)))
    except Exception as e:  # reported, not fatal: the QEMU tests say more
        version = f"not runnable ({e})"
    from support.libvirtd import LIBVIRT_ENV, libvirt_prefix

    prefix = libvirt_prefix()
    libvirt = (f"{prefix} driving ${QEMU_ENV}'s QEMU" if prefix is not None
               else "the system's, driving Debian's QEMU")
    return [f"pyvhost data path: {datapath.name()}",
            f"QEMU: {binary} {version} (${QEMU_ENV}={os.environ.get(QEMU_ENV, '')})",
            f"libvirtd: {libvirt} (${LIBVIRT_ENV}={os.environ.get(LIBVIRT_ENV, '')})",
            f"unstable tests {', '.join(UNSTABLE) or '(none)'}: "
            + ("run" if os.environ.get(UNSTABLE_ENV) == "1"
               else f"deselected (${UNSTABLE_ENV}=1 runs them)")]


@pytest.fixture(params=[1, 2], ids=["workers1", "workers2"])
def net_workers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Every ``pyvhost net`` the test starts serves its queues on the main loop
    (``--workers 1``) or on two worker threads (``PYVHOST_WORKERS``, which the option
    reads, inherited by the process)."""
    monkeypatch.setenv("PYVHOST_WORKERS", str(request.param))
    return int(request.param)
