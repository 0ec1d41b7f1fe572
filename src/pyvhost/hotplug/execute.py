"""Run a :class:`~.plan.Plan` through QMP, verify it, and undo it on any failure.

Owns the order of QMP commands and the waiting: ``DEVICE_DELETED`` for ``device_del``,
``ACPI_DEVICE_OST`` for the guest's answer, ``MEMORY_DEVICE_SIZE_CHANGE`` for a virtio-mem
resize. After a failed step the undo steps of the
done ones run, last first, and ``qom-list /objects`` is checked so that no backend is left
behind (QEMU 7.2 keeps an ``object-add``ed backend after a failed ``device_add``).
Ctrl-C (or SIGTERM) during an add is a failure too: the step in flight is looked up in
QEMU (its command may have run although its answer never came), what was done is undone
with further interrupts held, and :class:`~pyvhost.interrupts.Interrupted` says what.
A command QEMU does not answer within the timeout (or a connection QEMU closes) in the
middle of a change is handled the same way: the step in flight is looked up under a
fresh, short time limit (:data:`RECHECK`; on a new connection if QEMU closed the old
one), an add is undone, a remove or resize says the state it is in; when QEMU cannot be
asked at all, :class:`StateUnknownError` says what may be left and how to clear it.

It must not decide whether a plan is wise (:mod:`.plan` does) and runs a refused plan only
when forced (tests use that to see QEMU's own verdict past the planner).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyvhost.errors import LocalError, PyvhostError
from pyvhost.interrupts import Interrupted, deferred_interrupts

from .plan import Plan, Step
from .qmp import Monitor, QmpCommandError, QmpConnectError, QmpTimeoutError

T = TypeVar("T")

# ACPI 6.x, _OST status codes for an eject request (source 0x03).
EJECT_STATUS = {
    0x00: "success",
    0x01: "non-specific failure",
    0x80: "ejection not supported by the guest OS",
    0x81: "device in use by an application",
    0x82: "device busy (memory not offlinable: was it onlined movable?)",
    0x83: "ejection dependency busy or not supported",
    0x84: "ejection in progress",
}
EJECT = 3  # _OST source: eject request
# Final answers: the guest will not eject (QEMU 7.2 + Linux 6.1, memory onlined non-movable:
# status 0x84 "in progress", then 0x82 "busy"; the request then stays pending in QEMU).
EJECT_REFUSED = frozenset({0x01, 0x80, 0x81, 0x82, 0x83})


#: The time limit of a look-up after a command that was not answered in time (at most the
#: timeout): QEMU runs one connection's commands in order, so a look-up that answers comes
#: after the unanswered command has run, or been given up by QEMU.
RECHECK = 10.0
#: The least time an undo waits for the guest to release a DIMM it was just given: a
#: short --timeout bounds QEMU's answers, not the guest's ACPI eject, which takes a TCG
#: guest several seconds right after the DIMM arrived.
UNDO_WAIT = 30.0


class PlanRefusedError(LocalError):
    """The plan has refusals and was not forced."""


class StateUnknownError(QmpConnectError):
    """A command of a change was not answered (or QEMU closed the connection), and QEMU
    did not answer a look-up after it either: the message says what may be left in QEMU
    and how to check and clear it."""


@dataclass
class Outcome:
    """What running a plan did."""

    ok: bool
    done: list[str] = field(default_factory=list)  # commands that succeeded
    failed_step: str | None = None
    error: str | None = None
    rolled_back: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)  # backends left in /objects
    acpi_ost: list[dict[str, Any]] = field(default_factory=list)
    timed_out: bool = False
    seconds: float = 0.0
    device: dict[str, Any] | None = None  # the memory device as QEMU reports it after add


def _wait_deleted(monitor: Monitor, device_id: str, timeout: float,
                  ost: list[dict[str, Any]]) -> bool:
    """Wait for DEVICE_DELETED of ``device_id``; record its ACPI_DEVICE_OST events.

    Stops early (False) when the guest answers the eject with a failure status: Linux does
    not try again, so waiting longer would only delay the report.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        event = monitor.next_event(min(left, 1.0))
        if event is None:
            continue
        data = event.get("data", {})
        info = data.get("info", {})
        if event.get("event") == "ACPI_DEVICE_OST" and info.get("device") == device_id:
            ost.append(dict(info))
            if info.get("source") == EJECT and info.get("status") in EJECT_REFUSED:
                return False
        elif event.get("event") == "DEVICE_DELETED" and (
                data.get("device") == device_id
                or data.get("path") == f"/machine/peripheral/{device_id}/virtio-backend"):
            # A virtio-mem-pci device sends two: its virtio-backend child's, then its own.
            # QEMU 10.0.2 never sends its own once HMP "info mtree -f" ran (as read_state
            # does), although the device is gone and its memdev can be deleted (measured):
            # the child's ends the wait, and execute_remove verifies the device is gone.
            return True


def _plugged_size(monitor: Monitor, device_id: str) -> int | None:
    for d in monitor.execute("query-memory-devices"):
        data = d.get("data", {})
        if data.get("id") == device_id:
            return int(data.get("size", 0))
    return None


def _wait_size(monitor: Monitor, device_id: str, size: int, timeout: float) -> bool:
    """Wait until virtio-mem ``device_id`` has ``size`` plugged (MEMORY_DEVICE_SIZE_CHANGE
    events come for each step; the size is read again after each, and once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        if _plugged_size(monitor, device_id) == size:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        monitor.next_event(min(left, 1.0))


def _collect_ost(monitor: Monitor, device_id: str, timeout: float,
                 ost: list[dict[str, Any]]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = monitor.next_event(min(deadline - time.monotonic(), 1.0))
        if event is None:
            continue
        info = event.get("data", {}).get("info", {})
        if event.get("event") == "ACPI_DEVICE_OST" and info.get("device") == device_id:
            ost.append(dict(info))
            return


def _run(monitor: Monitor, step: Step, timeout: float, out: Outcome) -> None:
    monitor.execute(step.command, dict(step.arguments))
    if step.wait_deleted is not None and not _wait_deleted(monitor, step.wait_deleted,
                                                           timeout, out.acpi_ost):
        out.timed_out = True
        refused = [o for o in out.acpi_ost if o.get("source") == EJECT
                   and o.get("status") in EJECT_REFUSED]
        if refused:
            raise TimeoutError(f"the guest refused to eject {step.wait_deleted}: "
                               f"{describe_ost(refused[-1])}")
        raise TimeoutError(f"no DEVICE_DELETED for {step.wait_deleted} within {timeout} s")
    if step.wait_size is not None and not _wait_size(monitor, *step.wait_size, timeout):
        out.timed_out = True
        raise TimeoutError(f"{step.wait_size[0]} did not reach {step.wait_size[1]} bytes "
                           f"plugged within {timeout} s")


def _orphans(monitor: Monitor, plan: Plan) -> list[str]:
    if plan.backend_id is None:
        return []
    objects = monitor.execute("qom-list", {"path": "/objects"})
    return [plan.backend_id] if any(o["name"] == plan.backend_id for o in objects) else []


def _rollback(monitor: Monitor, plan: Plan, done: int, timeout: float, out: Outcome) -> None:
    """Run the undo steps of the first ``done`` steps, last first, each failure recorded
    in ``out.rolled_back``; then ``out.orphans``. Raises :class:`StateUnknownError` when
    QEMU cannot be asked what is left."""
    for undo in plan.undo_steps(done):
        wait = max(timeout, UNDO_WAIT) if undo.wait_deleted is not None else timeout
        try:
            _run(monitor, undo, wait, out)
            out.rolled_back.append(undo.command)
        except (QmpCommandError, TimeoutError, QmpConnectError) as e:
            out.rolled_back.append(f"{undo.command} failed: {e}")
    try:
        out.orphans = _recheck(monitor, timeout, lambda: _orphans(monitor, plan))
    except QmpConnectError as e:
        undone = [u for u in out.rolled_back if " failed: " not in u]
        raise StateUnknownError(
            f"the undo of {plan.device_id} ran ({', '.join(out.rolled_back) or 'nothing'}) "
            f"but QEMU did not answer the check after it ({e}): "
            + _may_be_left(monitor, plan, done - len(undone), False)) from None


@contextlib.contextmanager
def _time_limit(monitor: Monitor, seconds: float) -> Iterator[None]:
    limit = getattr(monitor, "time_limit", None)
    if limit is None:
        yield
        return
    with limit(seconds):
        yield


def _recheck(monitor: Monitor, timeout: float, look: Callable[[], T]) -> T:
    """``look()`` under a fresh time limit of at most :data:`RECHECK` seconds; when QEMU
    had closed the connection, once more on a new one (a monitor that can reconnect).
    Raises :class:`~.qmp.QmpConnectError` when QEMU cannot be asked."""
    limit = min(timeout, RECHECK)
    with _time_limit(monitor, limit):
        try:
            return look()
        except QmpTimeoutError:
            raise
        except QmpConnectError:
            reconnect = getattr(monitor, "reconnect", None)
            if reconnect is None:
                raise
            reconnect(limit)
            return look()


def _unanswered(e: QmpConnectError, command: str) -> str:
    """What happened to ``command``, in words, for an error of the QMP layer."""
    if isinstance(e, QmpTimeoutError):
        return f"QEMU did not answer {e.command or command} within {e.seconds:g} s"
    if e.command is not None:
        return f"QEMU closed the QMP connection during {e.command}"
    return f"{command}: {e}"


def _mem_status(monitor: Monitor) -> str:
    path = getattr(monitor, "path", None) or getattr(getattr(monitor, "inner", None),
                                                      "path", None)
    return f"pyvhost mem status --qmp {path}" if path else "pyvhost mem status"


def _may_be_left(monitor: Monitor, plan: Plan, done: int, in_flight: bool) -> str:
    """What an add may have left in QEMU, when QEMU cannot be asked: the steps ``done``
    and the one ``in_flight`` (sent, its outcome unknown), with how to check and clear."""
    sent = plan.steps[:done + (1 if in_flight else 0)]
    items: list[str] = []
    for i, step in enumerate(sent):
        ident = step.arguments.get("id")
        how = "ran" if i < done else "was sent; whether QEMU ran it is unknown"
        if step.command == "object-add":
            items.append(f"memory backend {ident} ({step.command} {how})")
        elif step.command == "device_add":
            items.append(f"DIMM {ident} ({step.command} {how})")
    if not items:
        return "nothing was sent to QEMU: nothing is left"
    dimm = [s for s in sent if s.command == "device_add"]
    fix = (f"remove them with pyvhost mem remove {plan.device_id} (the DIMM, then its "
           f"backend)" if dimm else "")
    if plan.backend_id is not None:
        alone = f"pyvhost mem remove {plan.backend_id} (the backend alone, unused)"
        fix = f"{fix}, or {alone}" if fix else f"remove it with {alone}"
    return (f"what QEMU has is unknown; it may have {' and '.join(items)}: check with "
            f"{_mem_status(monitor)}, {fix}")


def _refused(plan: Plan) -> PlanRefusedError:
    """The error for running a plan the preflight refused: every refusal, code first."""
    return PlanRefusedError("; ".join(f"{r.code}: {r.message}" for r in plan.refusals))


def begin(plan: Plan, force: bool = False) -> tuple[float, Outcome]:
    """What every executor (QMP's here, libvirt's) does first: refuse a plan the preflight
    refused (unless forced); otherwise the start time and an empty outcome."""
    if plan.refused and not force:
        raise _refused(plan)
    return time.monotonic(), Outcome(ok=False)


def _run_steps(monitor: Monitor, plan: Plan, timeout: float, out: Outcome, *,
               timeout_done: bool = False) -> bool:
    """Run the plan's steps in order, each put in ``out.done`` once it ran; at the first
    that fails, record it (``out.failed_step``, ``out.error``) and stop. A step that timed
    out counts as done where ``timeout_done`` (a resize: its request stays set). Returns
    whether every step ran."""
    for step in plan.steps:
        try:
            _run(monitor, step, timeout, out)
        except (QmpCommandError, TimeoutError) as e:
            if timeout_done and isinstance(e, TimeoutError):
                out.done.append(step.command)
            out.failed_step, out.error = step.command, str(e)
            return False
        out.done.append(step.command)
    return True


def execute_add(monitor: Monitor, plan: Plan, *, timeout: float = 30.0,
                ost_timeout: float = 0.0, force: bool = False) -> Outcome:
    """object-add, device_add, verify with query-memory-devices; undo on failure.

    With ``ost_timeout`` > 0 (a running guest) it also waits that long for the guest's
    ACPI_DEVICE_OST about the new DIMM and records it; no answer is not a failure.
    """
    start, out = begin(plan, force)
    try:
        try:
            finished = _run_steps(monitor, plan, timeout, out)
            devices = monitor.execute("query-memory-devices") if finished else []
        except QmpConnectError as e:
            # Not answered in time, or the connection lost: as on an interrupt, what
            # QEMU has is looked up and what was done is undone.
            with deferred_interrupts():
                _undo_unanswered(monitor, plan, timeout, out, e)
            out.seconds = time.monotonic() - start
            return out
        if not finished:
            with deferred_interrupts():
                _rollback(monitor, plan, len(out.done), timeout, out)
            out.seconds = time.monotonic() - start
            return out
    except KeyboardInterrupt:
        # Until it is verified the add is all or nothing, as on a failure.
        raise _undo_interrupted(monitor, plan, len(out.done), timeout, out) from None
    mine = [d for d in devices if d.get("data", {}).get("id") == plan.device_id]
    expected = plan.steps[0].arguments.get("size")
    if len(mine) != 1 or mine[0]["data"].get("size") != expected:
        out.failed_step, out.error = "verify", (
            f"query-memory-devices does not show {plan.device_id} with size {expected}")
        with deferred_interrupts():
            _rollback(monitor, plan, len(out.done), timeout, out)
        out.seconds = time.monotonic() - start
        return out
    out.device = dict(mine[0]["data"])
    out.ok = True
    if ost_timeout > 0:
        try:
            _collect_ost(monitor, plan.device_id, ost_timeout, out.acpi_ost)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted after {plan.device_id} was added and verified; "
                              f"it stays (pyvhost mem remove {plan.device_id} removes "
                              f"it)") from None
    out.seconds = time.monotonic() - start
    return out


def _took_effect(monitor: Monitor, step: Step) -> bool:
    """Whether QEMU ran ``step``, whose answer never came (Ctrl-C while it was in flight):
    QEMU runs a command it has read whether or not its client waits for the answer, and
    runs a connection's commands in order, so looking now is looking after it."""
    ident = step.arguments.get("id")
    if step.command == "object-add":
        return any(o["name"] == ident for o in monitor.execute("qom-list",
                                                               {"path": "/objects"}))
    if step.command == "device_add":
        return any(d.get("data", {}).get("id") == ident
                   for d in monitor.execute("query-memory-devices"))
    return True  # unknown: try its undo (a "not found" is recorded, nothing worse)


_SEEN_IN = {"object-add": "/objects", "device_add": "query-memory-devices"}


def _undo_unanswered(monitor: Monitor, plan: Plan, timeout: float, out: Outcome,
                     e: QmpConnectError) -> None:
    """Undo an add whose command in flight was not answered within the timeout (or QEMU
    closed the connection): look up whether QEMU ran it, undo what was done, and say it
    in ``out`` (``failed_step``, ``error``). Raises :class:`StateUnknownError` when QEMU
    cannot be asked."""
    done = len(out.done)
    in_flight = plan.steps[done] if done < len(plan.steps) else None
    command = in_flight.command if in_flight is not None else "query-memory-devices"
    out.failed_step = command if in_flight is not None else "verify"
    cause = _unanswered(e, command)
    if in_flight is None:
        cause += f" (the check of {plan.device_id})"
    try:
        ran = in_flight is not None and _recheck(monitor, timeout,
                                                 lambda: _took_effect(monitor, in_flight))
    except QmpConnectError as again:
        raise StateUnknownError(
            f"{cause}, and a look-up after it failed too ({again}): "
            + _may_be_left(monitor, plan, done, in_flight is not None)) from None
    if in_flight is not None:
        ident = in_flight.arguments.get("id")
        where = _SEEN_IN.get(in_flight.command, "QEMU")
        cause += (f"; QEMU had run it ({ident} was in {where} afterwards)" if ran else
                  f"; QEMU had not run it ({ident} was not in {where} afterwards)")
    out.error = cause
    _rollback(monitor, plan, done + int(ran), timeout, out)


def _undo_interrupted(monitor: Monitor, plan: Plan, done: int, timeout: float,
                      out: Outcome) -> Interrupted:
    """Undo an add interrupted after ``done`` steps (the next one maybe in flight); the
    exception to raise says what was undone and what, if anything, is left."""
    in_flight = plan.steps[done] if done < len(plan.steps) else None
    where = f"during {in_flight.command}" if in_flight else "before the check"
    out.failed_step, out.error = in_flight.command if in_flight else "verify", "interrupted"
    with deferred_interrupts():
        try:
            if in_flight is not None and _took_effect(monitor, in_flight):
                done += 1
            undo = plan.undo_steps(done)
            _rollback(monitor, plan, done, timeout, out)
        except PyvhostError as e:
            return Interrupted(f"interrupted {where} of {plan.device_id}; the undo failed: "
                               f"{e} (see pyvhost mem status)")
    failed = [r for r in out.rolled_back if " failed: " in r]
    if not undo:
        text = "nothing had been changed"
    else:
        text = "undone: " + ", ".join(f"{u.command} {u.arguments.get('id')}" for u in undo)
    if failed or out.orphans:
        text += "; " + "; ".join([*failed, *(f"left behind: {o}" for o in out.orphans)])
    return Interrupted(f"interrupted {where} of {plan.device_id}; {text}")


def execute_remove(monitor: Monitor, plan: Plan, *, timeout: float = 30.0) -> Outcome:
    """device_del, wait for DEVICE_DELETED, object-del the backend, verify.

    When the guest refuses or never answers, nothing else is done (the backend is still in
    use); the guest's ACPI _OST statuses are in :attr:`Outcome.acpi_ost`. An interrupt
    raises :class:`~pyvhost.interrupts.Interrupted` saying what is left.
    """
    start, out = begin(plan)
    try:
        try:
            if not _run_steps(monitor, plan, timeout, out):
                out.seconds = time.monotonic() - start
                return out
            devices = monitor.execute("query-memory-devices")
        except QmpConnectError as e:
            with deferred_interrupts():
                _remove_unanswered(monitor, plan, timeout, out, e)
            out.seconds = time.monotonic() - start
            return out
    except KeyboardInterrupt:
        raise _remove_interrupted(monitor, plan, timeout) from None
    if any(d.get("data", {}).get("id") == plan.device_id for d in devices):
        out.failed_step, out.error = "verify", f"{plan.device_id} is still a memory device"
    else:
        out.orphans = _orphans(monitor, plan)
        out.ok = not out.orphans
        if out.orphans:
            out.failed_step, out.error = "verify", f"backend {plan.backend_id} still exists"
    out.seconds = time.monotonic() - start
    return out


def _remove_unanswered(monitor: Monitor, plan: Plan, timeout: float, out: Outcome,
                       e: QmpConnectError) -> None:
    """A remove whose command in flight was not answered within the timeout (or QEMU
    closed the connection): look up what QEMU has, finish what is left to do (the
    backend of a DIMM that is gone), or say the state it is in, in ``out``: the DIMM
    still there is the guest not (yet) releasing it (``timed_out``: the unplug request
    may stay pending). Raises :class:`StateUnknownError` when QEMU cannot be asked."""
    name, backend = plan.device_id, plan.backend_id
    done = len(out.done)
    command = plan.steps[done].command if done < len(plan.steps) else "query-memory-devices"
    out.failed_step = command if done < len(plan.steps) else "verify"
    cause = _unanswered(e, command)

    def look() -> tuple[bool, bool]:
        present = any(d.get("data", {}).get("id") == name
                      for d in monitor.execute("query-memory-devices"))
        return present, bool(_orphans(monitor, plan))

    try:
        present, backend_left = _recheck(monitor, timeout, look)
    except QmpConnectError as again:
        raise StateUnknownError(
            f"{cause}, and a look-up after it failed too ({again}): what QEMU has is "
            f"unknown; {name} may still be plugged, its unplug request pending"
            + (f", and its backend {backend} stays until it is gone" if backend else "")
            + f": check with {_mem_status(monitor)}; run pyvhost mem remove {name} again "
            f"to finish") from None
    if present:
        out.timed_out = True
        out.error = (f"{cause}; {name} is still plugged: the unplug request may stay "
                     f"pending in QEMU (the guest may still release the DIMM)"
                     + (f" and {backend} stays" if backend else "")
                     + f"; run pyvhost mem remove {name} again to finish")
        return
    out.done[:] = [s.command for s in plan.steps if s.command == "device_del"]
    if backend_left:
        # The DIMM is gone: its backend goes too, as the remove would have done.
        try:
            with _time_limit(monitor, min(timeout, RECHECK)):
                monitor.execute("object-del", {"id": backend})
                backend_left = bool(_orphans(monitor, plan))
        except (QmpCommandError, QmpConnectError) as again:
            out.error = (f"{cause}; {name} was unplugged, its backend {backend} stays "
                         f"(object-del: {again}): check with {_mem_status(monitor)}; "
                         f"pyvhost mem remove {backend} deletes it")
            out.orphans = [str(backend)]
            return
        if backend_left:
            out.error = f"{cause}; {name} was unplugged, its backend {backend} stays"
            out.orphans = [str(backend)]
            return
    if backend is not None:
        out.done.append("object-del")
    out.failed_step, out.ok = None, True


def _remove_interrupted(monitor: Monitor, plan: Plan, timeout: float) -> Interrupted:
    """What an interrupted remove leaves, said as it is. A device_del cannot be taken
    back (QEMU keeps the unplug request; the guest may still release the DIMM), so
    nothing is undone; once the DIMM is gone its backend is deleted, as the remove
    would have done a moment later: a backend without its device is of no use."""
    name = plan.device_id
    with deferred_interrupts():
        try:
            if any(d.get("data", {}).get("id") == name
                   for d in monitor.execute("query-memory-devices")):
                return Interrupted(
                    f"interrupted while the guest was releasing {name}: the unplug "
                    f"request stays pending in QEMU and {plan.backend_id} stays; run "
                    f"pyvhost mem remove {name} again to finish")
            if plan.backend_id is not None and _orphans(monitor, plan):
                monitor.execute("object-del", {"id": plan.backend_id})
            return Interrupted(f"interrupted after {name} was unplugged; its backend "
                               f"{plan.backend_id} was deleted too: removed")
        except PyvhostError as e:
            return Interrupted(f"interrupted during the removal of {name}; could not look "
                               f"at what is left: {e} (see pyvhost mem status)")


def execute_resize(monitor: Monitor, plan: Plan, *, timeout: float = 60.0) -> Outcome:
    """qom-set requested-size, wait until the guest has plugged that much.

    On a QEMU error nothing changed. On a timeout nothing is undone: the request stays set
    and the guest's driver keeps working towards it (``outcome.device`` has the size
    plugged so far).
    """
    start, out = begin(plan)
    try:
        out.ok = _run_steps(monitor, plan, timeout, out, timeout_done=True)
        mine = [d for d in monitor.execute("query-memory-devices")
                if d.get("data", {}).get("id") == plan.device_id]
    except QmpConnectError as e:
        _resize_unanswered(monitor, plan, timeout, out, e)
        out.seconds = time.monotonic() - start
        return out
    out.device = dict(mine[0]["data"]) if mine else None
    out.seconds = time.monotonic() - start
    return out


def _resize_unanswered(monitor: Monitor, plan: Plan, timeout: float, out: Outcome,
                       e: QmpConnectError) -> None:
    """A resize whose qom-set, or a look at the plugged size, was not answered in time:
    whether the request is set says its state (set: the guest's driver works towards it,
    ``timed_out``; not set: nothing changed). Raises :class:`StateUnknownError` when QEMU
    cannot be asked."""
    (step,) = plan.steps
    name, size = plan.device_id, int(step.arguments["value"])
    cause = _unanswered(e, step.command)
    undo = step.undo.arguments["value"] if step.undo is not None else None

    def look() -> dict[str, Any] | None:
        mine = [d for d in monitor.execute("query-memory-devices")
                if d.get("data", {}).get("id") == name]
        return dict(mine[0]["data"]) if mine else None

    out.ok, out.failed_step = False, step.command
    try:
        out.device = _recheck(monitor, timeout, look)
    except QmpConnectError as again:
        back = f"; pyvhost mem resize {name} --size {undo} sets it back" if undo else ""
        raise StateUnknownError(
            f"{cause}, and a look-up after it failed too ({again}): what QEMU has is "
            f"unknown; {name}'s requested-size may be {size} (asked for) or as it was"
            f": check with {_mem_status(monitor)}{back}") from None
    requested = (out.device or {}).get("requested-size")
    plugged = (out.device or {}).get("size")
    if requested == size:
        out.done[:] = [step.command]
        out.timed_out = True
        out.error = (f"{cause}; the request is set ({name} requested-size {size}, "
                     f"{plugged} plugged so far): the guest's driver keeps working "
                     f"towards it")
    else:
        out.done.clear()
        out.error = (f"{cause}; QEMU had not run it ({name} still requests {requested}): "
                     f"nothing changed")


def describe_ost(info: dict[str, Any]) -> str:
    status = int(info.get("status", -1))
    text = EJECT_STATUS.get(status, "unknown status") if info.get("source") == EJECT else (
        "success" if status == 0 else "failure")
    return f"source {info.get('source')} status {status:#x}: {text}"
