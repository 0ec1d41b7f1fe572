"""Run a live migration through QMP: read what the preflight needs of each QEMU, have the
destination listen, start the source's migration and follow it to its end within a
timeout, and report QEMU's own times (total time, downtime, setup) beside ours.

Owns the order of the migration's QMP commands and the waiting. A migration that does not
finish within the timeout, or that is interrupted (Ctrl-C, SIGTERM), is cancelled
(``migrate_cancel``, waited for to its end): the source keeps running as before and the
destination, which has not started, can be stopped (QEMU quits a destination whose
incoming migration broke off). It must not decide whether to migrate (:mod:`.migrate` does)
and never stops the source after a migration (its user does, once they are content).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyvhost.errors import PyvhostError
from pyvhost.interrupts import Interrupted, deferred_interrupts

from .migrate import LOG_ALL, LOG_SHMFD, MigrationFacts, VhostLogging
from .qmp import Monitor, QmpCommandError
from .state import VmState

#: Statuses that end a migration (query-migrate).
FINAL = frozenset({"completed", "failed", "cancelled"})
#: What QEMU 7.2 answers migrate-incoming on a destination started with -incoming URI
#: (it listens already), and on one that is not waiting for a migration at all.
ALREADY_LISTENING = ("has already been started", "For use with '-incoming defer'")


def read_facts(monitor: Monitor, state: VmState) -> MigrationFacts:
    """What one QEMU says about migrating: run state, migration status and blockers, its
    chardevs' connections, and its started vhost-user devices' back-end features."""
    run_state = str(monitor.execute("query-status").get("status"))
    info = monitor.execute("query-migrate") or {}
    connected = {str(c.get("label")): not str(c.get("filename", "")).startswith("disconnected:")
                 for c in monitor.execute("query-chardev")}
    logging: dict[str, VhostLogging] = {}
    for dev in state.vhost_user:
        try:
            status = monitor.execute("x-query-virtio-status",
                                     {"path": f"{dev.qom_path}/virtio-backend"})
        except QmpCommandError:
            continue  # not a virtio device QMP can show, or QEMU without the command
        vhost = status.get("vhost-dev") if isinstance(status, dict) else None
        if not isinstance(vhost, dict):
            continue  # shown only once the guest started the device
        features = vhost.get("features", {})
        names = [*features.get("dev-features", []), *features.get("transports", [])]
        protocols = vhost.get("protocol-features", {}).get("protocols", [])
        logging[dev.id] = VhostLogging(
            offers_log_all=any(str(n).startswith(LOG_ALL) for n in names),
            offers_log_shmfd=any(str(p).startswith(LOG_SHMFD) for p in protocols),
            log_enabled=bool(vhost.get("log-enabled")), log_size=int(vhost.get("log-size", 0)))
    status = info.get("status") if isinstance(info, dict) else None
    return MigrationFacts(
        run_state=run_state, migration_status=None if status is None else str(status),
        blocked_reasons=tuple(str(r) for r in info.get("blocked-reasons", [])),
        chardev_connected=connected, logging=logging)


@dataclass(frozen=True)
class Progress:
    """One look at the source's query-migrate: seconds since ``migrate``, its status, and
    its RAM figures (bytes; pages dirtied per second; Mbit/s)."""

    seconds: float
    status: str
    transferred: int
    remaining: int
    total: int
    dirty_pages_rate: int
    mbps: float
    dirty_sync_count: int


@dataclass
class MigrationOutcome:
    """What running a migration did. Times in seconds: ``total_time``, ``downtime`` and
    ``setup_time`` are QEMU's (query-migrate); ``seconds`` is ours, from ``migrate`` sent
    to the end seen; ``resumed_after`` from then to the destination running."""

    ok: bool
    status: str
    uri: str
    incoming: str = "migrate-incoming"  # or "listening": started with -incoming URI
    error: str | None = None
    timed_out: bool = False
    cancelled: bool = False
    total_time: float | None = None
    downtime: float | None = None
    setup_time: float | None = None
    transferred: int | None = None
    ram_total: int | None = None
    dirty_sync_count: int | None = None
    seconds: float = 0.0
    destination_state: str | None = None
    resumed_after: float | None = None
    progress: list[Progress] = field(default_factory=list)


def _progress(seconds: float, info: dict[str, Any]) -> Progress:
    ram = info.get("ram", {}) if isinstance(info.get("ram"), dict) else {}
    return Progress(round(seconds, 3), str(info.get("status")), int(ram.get("transferred", 0)),
                    int(ram.get("remaining", 0)), int(ram.get("total", 0)),
                    int(ram.get("dirty-pages-rate", 0)), float(ram.get("mbps", 0.0)),
                    int(ram.get("dirty-sync-count", 0)))


def _ms(info: dict[str, Any], key: str) -> float | None:
    value = info.get(key)
    return None if value is None else float(value) / 1000


def _wait_final(src: Monitor, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = src.execute("query-migrate") or {}
        if info.get("status") in FINAL or time.monotonic() > deadline:
            return info
        time.sleep(0.1)


def _cancel_interrupted(src: Monitor) -> Interrupted:
    """Ctrl-C during a migration: cancel it (``migrate_cancel``, further interrupts held)
    and wait until QEMU says it ended, so the source runs on as it was; the exception to
    raise says so. ``migrate`` itself may have been in flight: QEMU runs a connection's
    commands in order, so the cancel comes after it."""
    with deferred_interrupts():
        try:
            info: dict[str, Any] = src.execute("query-migrate") or {}
            if info.get("status") not in FINAL:
                src.execute("migrate_cancel")
                if info.get("status") not in (None, "none"):
                    info = _wait_final(src, 30)
            run_state = str(src.execute("query-status").get("status"))
        except PyvhostError as e:
            return Interrupted(f"interrupted during the migration; could not make sure it "
                               f"is cancelled: {e} (see query-migrate on the source)")
    status = info.get("status")
    if status == "completed":
        return Interrupted("interrupted after the migration completed: the VM is on the "
                           f"destination; the source is {run_state}")
    if status in (None, "none"):
        return Interrupted(f"interrupted before the migration started; the source is "
                           f"{run_state}")
    return Interrupted(f"interrupted: migration cancelled (QEMU: {status}); the source is "
                       f"{run_state}")


def run_migration(src: Monitor, dst: Monitor, uri: str, *, timeout: float,
                  on_progress: Callable[[Progress], None] | None = None,
                  interval: float = 0.1, report_every: float = 1.0) -> MigrationOutcome:
    """Migrate the VM of ``src`` to ``dst`` over ``uri``; wait at most ``timeout`` seconds
    for it to complete (else cancel it), then for the destination to run.

    QMP errors of ``migrate-incoming`` or ``migrate`` propagate (:class:`QmpCommandError`:
    nothing was started). ``on_progress`` is told of a :class:`Progress` about every
    ``report_every`` seconds, and of the last one."""
    out = MigrationOutcome(ok=False, status="none", uri=uri)
    try:
        dst.execute("migrate-incoming", {"uri": uri})
    except QmpCommandError as e:
        if not any(text in e.desc for text in ALREADY_LISTENING):
            raise
        out.incoming = "listening"  # -incoming URI on its command line: it listens
    t0 = time.monotonic()
    last_report = -report_every
    try:
        src.execute("migrate", {"uri": uri})
        while True:
            info: dict[str, Any] = src.execute("query-migrate") or {}
            now = time.monotonic() - t0
            step = _progress(now, info)
            if now - last_report >= report_every or step.status in FINAL:
                out.progress.append(step)
                last_report = now
                if on_progress is not None:
                    on_progress(step)
            if step.status in FINAL:
                break
            if now > timeout:
                src.execute("migrate_cancel")
                info = _wait_final(src, 30)
                out.timed_out = info.get("status") != "completed"
                out.cancelled = out.timed_out
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        raise _cancel_interrupted(src) from None
    except BaseException:
        # QEMU gone, or a bug: the source goes on running as it was.
        with contextlib.suppress(Exception):
            src.execute("migrate_cancel")
        raise
    out.seconds = round(time.monotonic() - t0, 3)
    out.status = str(info.get("status"))
    ram = info.get("ram", {}) if isinstance(info.get("ram"), dict) else {}
    out.total_time, out.downtime = _ms(info, "total-time"), _ms(info, "downtime")
    out.setup_time = _ms(info, "setup-time")
    out.transferred = ram.get("transferred")
    out.ram_total = ram.get("total")
    out.dirty_sync_count = ram.get("dirty-sync-count")
    if out.status != "completed":
        out.error = (str(info.get("error-desc")) if info.get("error-desc")
                     else f"did not complete within {timeout:g} s; cancelled"
                     if out.timed_out else f"migration {out.status}")
        return out
    # The destination runs the guest once it has every page (a source that was paused
    # leaves it paused).
    done = time.monotonic()
    deadline = done + max(10.0, timeout - out.seconds)
    while True:
        state = str(dst.execute("query-status").get("status"))
        if state != "inmigrate" or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    out.destination_state = state
    if state == "running":
        out.resumed_after = round(time.monotonic() - done, 3)
    out.ok = state in ("running", "paused")
    if not out.ok:
        out.error = f"the destination is {state} after the migration"
    return out
