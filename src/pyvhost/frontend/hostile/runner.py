"""Run the hostile cases against a back-end and judge each one.

Before the first case a **witness** connection is opened and started the way QEMU 7.2
starts a device (boot RAM, rings, DRIVER_OK, :mod:`.witness`): it stands for every other
VM the back-end serves (it must keep getting answers and, on a net device, keep moving
frames), and it also tells which process to measure (the one that maps the witness's
boot region, :mod:`pyvhost.frontend.peer`). Then, for each case: measure the process (its fds,
and what it holds of our files), open a fresh connection, run the case within its time
bound, hang up, and judge:

==============  ==============================================================================
crashed         the process is gone
harmed-others   the witness stopped getting answers, or its frames stopped flowing (during
                or after the case)
hung            a reply was owed and neither it nor a later GET_FEATURES came in time
leaked          the process kept fds or mappings: more eventfds or memfds (the kinds of fd the
                cases send) than before the case, any file
                of the case's connection still held, or a file it should have let go;
                measured once the process's counts rest (:meth:`.Witness.settle`), and a
                leak seen is measured once more after settling again before it is reported
nack            it refused the input (REPLY_ACK non-zero) and kept serving
closed          it closed the connection
pass            it answered and kept serving (it may have accepted the input: see detail)
==============  ==============================================================================

The run is bounded: each case by ``case_timeout`` (every wait), the whole run by
``time_limit`` (cases past it are "not run"). After a crash the remaining cases are "not
run", unless the caller can restart the back-end (``restart``). Exit 1 for the command when
any case crashed, hung, leaked or harmed others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pyvhost.errors import LocalError, PeerError, PyvhostError
from pyvhost.tools import procfs

from ..memory import name_prefix
from ..peer import Candidates, PeerProcess, choose, gone
from . import rings, state, wire
from .attacker import Attacker, Response
from .case import Case, Context, NotApplicable
from .witness import FrameCheck, Witness, settle

log = logging.getLogger(__name__)

#: Every case, by group: framing, fds, memory, vring, descriptors, destructive.
CASES: tuple[Case, ...] = (*wire.CASES, *state.CASES, *rings.CASES)
BY_NAME: dict[str, Case] = {c.name: c for c in CASES}
FAILING = frozenset({"crashed", "hung", "leaked", "harmed-others"})
OUTCOMES = ("pass", "nack", "closed", "crashed", "hung", "leaked", "harmed-others",
            "skipped", "not run")


class HostileError(LocalError):
    """The suite can not run as asked (unknown case, no process to measure)."""


class WitnessError(PeerError):
    """The back-end refused or broke the well-formed start of the witness's device."""


@dataclass(frozen=True, slots=True)
class HostileConfig:
    socket_path: str
    #: Where the witness connects (default: the same socket). A back-end that serves one
    #: connection at a time needs a second socket of the same process here.
    witness_socket: str | None = None
    cases: tuple[str, ...] = ()
    include_destructive: bool = False
    device: str = "net"
    case_timeout: float = 3.0
    time_limit: float = 600.0
    pid: int | None = None
    #: How long after a hang-up the process may take to let go of a case's files.
    release_timeout: float = 3.0

    def selected(self) -> list[Case]:
        unknown = [n for n in self.cases if n not in BY_NAME]
        if unknown:
            raise HostileError(f"unknown hostile case(s): {', '.join(unknown)}; known: "
                               f"{', '.join(BY_NAME)}")
        chosen = [BY_NAME[n] for n in self.cases] if self.cases else list(CASES)
        return [c for c in chosen if self.include_destructive or not c.destructive
                or c.name in self.cases]


@dataclass(frozen=True, slots=True)
class CaseResult:
    name: str
    group: str
    spec: str
    what: str
    outcome: str
    response: str
    detail: str
    seconds: float

    @property
    def failed(self) -> bool:
        return self.outcome in FAILING

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "group": self.group, "spec": self.spec, "what": self.what,
                "outcome": self.outcome, "response": self.response, "detail": self.detail,
                "seconds": round(self.seconds, 3)}


@dataclass
class HostileReport:
    socket: str
    witness_socket: str
    measured: PeerProcess | None
    results: list[CaseResult] = field(default_factory=list)
    restarts: int = 0
    #: What the witness's frames did before the first case (net), or why none are checked.
    frames: FrameCheck | None = None

    @property
    def failed(self) -> bool:
        return any(r.failed for r in self.results)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(OUTCOMES, 0)
        for r in self.results:
            out[r.outcome] += 1
        return {k: v for k, v in out.items() if v}

    def to_json(self) -> dict[str, object]:
        return {"socket": self.socket, "witness_socket": self.witness_socket,
                "measured_process": None if self.measured is None
                else self.measured.as_dict(),
                "witness_frames": None if self.frames is None else self.frames.to_json(),
                "restarts": self.restarts, "counts": self.counts(), "failed": self.failed,
                "cases": [r.to_json() for r in self.results]}


Restart = Callable[[], None]
Progress = Callable[[CaseResult], None]


def run_hostile(config: HostileConfig, *, restart: Restart | None = None,
                progress: Progress | None = None) -> HostileReport:
    """Run the selected cases; see the module docstring for the verdicts."""
    cases = config.selected()
    witness_path = config.witness_socket or config.socket_path
    report = HostileReport(config.socket_path, witness_path, None)
    start = time.monotonic()
    witness: Witness | None = None
    try:
        witness = _open_witness(witness_path, config)
        report.frames = witness.before
        measured = choose(Candidates.of(witness.a.sock), name_prefix(), witness.boot.name,
                          config.pid)
        report.measured = measured
        pid = measured.pid
        _rest(witness, pid)
        for case in cases:
            if time.monotonic() - start > config.time_limit:
                report.results.append(_not_run(case, "time limit of the run reached"))
                continue
            if gone(pid):
                if restart is None:
                    report.results.append(_not_run(case, f"process {pid} is gone"))
                    continue
                if witness is not None:
                    witness.close()
                witness = None
                restart()
                report.restarts += 1
                witness = _open_witness(witness_path, config)
                pid = choose(Candidates.of(witness.a.sock), name_prefix(),
                             witness.boot.name, None).pid
                _rest(witness, pid)
            result = _run_case(case, config, pid, witness)
            report.results.append(result)
            if progress is not None:
                progress(result)
            if result.outcome == "harmed-others" and witness is not None:
                # A witness that fell silent is replaced, so the next case starts clean.
                witness.close()
                witness = None
                if not gone(pid):
                    try:
                        witness = _open_witness(witness_path, config)
                    except PyvhostError:
                        witness = None
                    else:
                        _rest(witness, pid)
        return report
    finally:
        if witness is not None:
            witness.close()


def _rest(witness: Witness, pid: int) -> None:
    """Let the back-end finish starting a (new) witness before the next case's baseline
    is taken: a back-end that makes an fd of its own a moment after the witness's device
    started (qemu-storage-daemon did, now and then) would otherwise have it counted as
    the case's leak. Later baselines follow a case's own settling (:func:`_settled_leak`)."""
    witness.settle(pid)


def _open_witness(path: str, config: HostileConfig) -> Witness:
    try:
        return Witness(path, config.device, config.case_timeout)
    except PeerError as e:
        raise WitnessError(f"the witness connection could not start a device on {path}: "
                           f"{e}") from e


def _not_run(case: Case, why: str) -> CaseResult:
    return CaseResult(case.name, case.group, case.spec, case.what, "not run", "", why, 0.0)


def _measure(pid: int) -> procfs.ProcessUsage | None:
    try:
        return procfs.measure(pid, name_prefix())
    except procfs.ProcfsError:
        return None


def _run_case(case: Case, config: HostileConfig, pid: int,
              witness: Witness | None) -> CaseResult:
    t0 = time.monotonic()
    baseline = _measure(pid)
    targets = _targets(pid)
    a = Attacker(config.socket_path, device=config.device, timeout=config.case_timeout)

    def holds(name: str) -> bool:
        usage = _measure(pid)
        return usage is not None and usage.holds(name)

    ctx = Context(witness=witness.check if witness is not None else (lambda: ""),
                  holds=holds, settle=lambda: time.sleep(0.2))
    follow: Response | None = None
    try:
        try:
            response = case.run(a, ctx)
        except NotApplicable as e:
            return CaseResult(case.name, case.group, case.spec, case.what, "skipped", "",
                              str(e), time.monotonic() - t0)
        except PyvhostError as e:
            # The set-up before the hostile message failed: the back-end closed or
            # refused a well-formed request on this connection.
            response = Response("closed", detail=f"during set-up: {e}")
        if response.kind != "closed" and not case.desync and not gone(pid):
            follow = a.ping()
    finally:
        a.hang_up()
    files = sorted(a.files)
    try:
        outcome, detail = _judge(case, config, pid, witness, ctx, response, follow,
                                 baseline, files, targets)
    finally:
        a.close()
    text = str(response) + ("" if follow is None else f"; then GET_FEATURES: {follow}")
    return CaseResult(case.name, case.group, case.spec, case.what, outcome, text, detail,
                      time.monotonic() - t0)


def _judge(case: Case, config: HostileConfig, pid: int, witness: Witness | None,
           ctx: Context, response: Response, follow: Response | None,
           baseline: procfs.ProcessUsage | None, files: Sequence[str],
           targets: list[str]) -> tuple[str, str]:
    if gone(pid):
        return "crashed", f"process {pid} exited"
    if ctx.harmed:
        time.sleep(0.5)
        if gone(pid):
            return "crashed", f"process {pid} exited ({'; '.join(ctx.harmed)})"
        return "harmed-others", "; ".join(ctx.harmed)
    harm = witness.check() if witness is not None else ""
    if harm:
        time.sleep(0.5)  # a process on its way out stops answering first
        if gone(pid):
            return "crashed", f"process {pid} exited"
        return "harmed-others", f"after the case: {harm}"
    if follow is not None and follow.kind == "silent":
        return "hung", ("no reply, and no answer to a GET_FEATURES after it"
                        if response.kind == "silent" else "answered, then went silent")
    leak = _settled_leak(case.name, witness.settle if witness is not None else settle, pid,
                         baseline, files, config.release_timeout, targets)
    if ctx.leaked or leak:
        return "leaked", "; ".join([*ctx.leaked, *([leak] if leak else [])])
    if gone(pid):
        return "crashed", f"process {pid} exited"
    if response.kind == "nack":
        return "nack", ""
    if response.kind == "closed" or (follow is not None and follow.kind == "closed"):
        return "closed", response.detail
    if response.kind == "silent" and case.reply_due:
        return "pass", "no reply to the hostile message (connection still answers)"
    return "pass", ""


#: The kinds of fd a case sends (eventfds, memfds); only these count as a leaked fd, so
#: that a process serving other sockets (Open vSwitch) is not blamed for its own pipes
#: and sockets opening and closing meanwhile.
SENT_KINDS = ("anon_inode:[eventfd]", "/memfd:")


def _targets(pid: int) -> list[str]:
    try:
        return sorted(t for t in procfs.fd_targets(pid).values()
                      if t.startswith(SENT_KINDS))
    except procfs.ProcfsError:
        return []


def _new_targets(pid: int, before: list[str]) -> str:
    """What the extra fds are (``anon_inode:[eventfd]``, ``/memfd:...``), as evidence."""
    left = list(before)
    new: list[str] = []
    for target in _targets(pid):
        if target in left:
            left.remove(target)
        else:
            new.append(target)
    return f" ({', '.join(sorted(set(new))[:4])})" if new else ""


def _settled_leak(name: str, wait_settled: Callable[[int], object], pid: int,
                  baseline: procfs.ProcessUsage | None, files: Sequence[str],
                  timeout: float, targets: list[str]) -> str:
    """:func:`_leak`, measured once ``wait_settled(pid)`` says the process's counts rest; a leak
    seen then is measured once more after settling again, and only what is still held is
    reported: a back-end still letting go of the case's connection is not leaking."""
    wait_settled(pid)
    leak = _leak(pid, baseline, files, timeout, targets)
    if leak:
        wait_settled(pid)
        log.info("%s: %s; measuring again after the back-end settled", name, leak)
        leak = _leak(pid, baseline, files, 0.0, targets)
        if not leak:
            log.info("%s: released after settling: not a leak", name)
    return leak


def _leak(pid: int, baseline: procfs.ProcessUsage | None, files: Sequence[str],
          timeout: float, targets: list[str]) -> str:
    """What the process still holds after the case's connection is gone, once it had
    ``timeout`` seconds to let go; "" when it is back to the baseline."""
    deadline = time.monotonic() + timeout
    while True:
        now = _measure(pid)
        if now is None or baseline is None:
            return ""
        held = [f for f in files if now.holds(f)]
        extra_fds = len(_targets(pid)) - len(targets)
        if not held and extra_fds <= 0:
            return ""
        if time.monotonic() > deadline:
            parts = []
            if held:
                parts.append(f"still holds {len(held)} file(s) of the closed connection")
            if extra_fds > 0:
                parts.append(f"{extra_fds} more eventfd/memfd fd(s) than before the case"
                             + _new_targets(pid, targets))
            return ", ".join(parts)
        time.sleep(0.05)


__all__ = ["BY_NAME", "CASES", "FAILING", "OUTCOMES", "CaseResult", "HostileConfig",
           "HostileError", "HostileReport", "WitnessError", "run_hostile"]
