"""The continuous ping's log read over a migration's window (``PingLoops.window``), on a
log written here and read with the same shell commands the guest runs (``sh``, ``awk``
on this host): pings are placed by when they were sent, a ping lost at the switchover is
waited for (its line comes PING_WAIT s after it was sent) and counted in the window, not
after it. Real guests run it in ``test_lab_migrate.py``."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest

from pyvhost.lab.guest import GuestConsole
from pyvhost.lab.traffic import PingLoops, _ping_line


class LocalConsole:
    """What PingLoops needs of a guest's console, run by this host's ``sh`` with the
    guest's files (the ping log, /proc/uptime) moved into ``root``."""

    def __init__(self, root: Path, now: float) -> None:
        self.log = root / "lab-ping.log"
        self.clock = root / "uptime"
        self.clock.write_text(f"{now:.2f} 0.00\n")
        self.log.touch()

    def run(self, cmd: str, timeout: float = 60) -> tuple[int, str]:
        cmd = cmd.replace("/tmp/lab-ping.log", str(self.log))
        cmd = cmd.replace("/proc/uptime", str(self.clock))
        r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True,
                           timeout=timeout, check=False)
        return r.returncode, r.stdout + r.stderr

    def check(self, cmd: str, timeout: float = 60) -> str:
        code, out = self.run(cmd, timeout)
        assert code == 0, out
        return out

    def ping(self, sent: float, ended: float, answered: bool) -> None:
        with self.log.open("a") as f:
            f.write(f"{ended:.2f} {int(answered)} {sent:.2f}\n")


def loops(console: LocalConsole) -> PingLoops:
    return PingLoops({1: cast(GuestConsole, console)}, "10.99.0.1")


def test_ping_lines() -> None:
    assert _ping_line("20.67 0 15.65") == (20.67, False, 15.65)
    assert _ping_line("15.39 1 15.37") == (15.39, True, 15.37)
    for bad in ("", "15.39 1", "15.39 2 15.0", "x 1 15.0", "1 1 1 1"):
        assert _ping_line(bad) is None


def test_a_ping_lost_at_the_switchover_is_waited_for_and_counted(tmp_path: Path) -> None:
    # The CI run's log around its migration (pinger's clock): the command ran from 14.25
    # to 15.81; the ping sent at 15.65 was lost, its line written at 20.67.
    con = LocalConsole(tmp_path, now=17.04)
    for sent, ended in ((13.49, 13.52), (13.99, 14.02), (14.51, 14.53), (14.76, 14.85),
                        (15.09, 15.11), (15.37, 15.39)):
        con.ping(sent, ended, True)
    results: list[Any] = []

    def read() -> None:
        results.append(loops(con).window({1: 13.92}, {1: (13.81, 15.81)}))

    t = threading.Thread(target=read)
    t.start()
    time.sleep(1.0)
    assert t.is_alive(), "the window was read before the lost ping ended"
    con.ping(15.65, 20.67, False)   # the lost one ends...
    con.ping(20.89, 20.93, True)    # ...and the next, sent after the command, is answered
    con.clock.write_text("21.00 0.00\n")
    t.join(30)
    (w,) = results
    assert (w.sent, w.lost, w.lost_during, w.answered_after) == (7, 1, 1, 1)
    assert w.longest_gap == pytest.approx(20.93 - 15.39)


def test_pings_lost_outside_the_span_are_not_put_down_to_it(tmp_path: Path) -> None:
    con = LocalConsole(tmp_path, now=30.0)
    con.ping(10.0, 15.0, False)     # before the window: not counted at all
    con.ping(12.0, 17.0, False)     # in the window, before the span
    con.ping(17.2, 17.3, True)
    con.ping(19.0, 24.0, False)     # in the span
    con.ping(24.2, 29.2, False)     # after the span: the destination did not answer
    w = loops(con).window({1: 11.0}, {1: (18.0, 20.0)})
    assert (w.sent, w.lost, w.lost_during, w.answered_after) == (4, 3, 1, 0)
    # Without a span: sent and lost only.
    w = loops(con).window({1: 11.0})
    assert (w.sent, w.lost, w.lost_during, w.answered_after) == (4, 3, 0, 0)
