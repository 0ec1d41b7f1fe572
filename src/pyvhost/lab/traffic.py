"""The lab's traffic: pings between the guests, run in the guests over their consoles.

Owns the guests' ping loop (a shell script each pinging VM keeps running in the
background, one ``ping -c 1`` at a time) and reading its counters; and the one-off pings
between two VMs. It measures traffic and judges nothing (:mod:`.checks` does).
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Mapping

from .config import LabError
from .guest import GuestConsole
from .records import PingCounts, TrafficWait

PING_INTERVAL = 0.2
PING_WAIT = 5  # seconds a ping waits for its reply before it counts as lost
# The guest's ping loop: one `ping -c 1` at a time, so a stop never cuts a ping in flight
# and every ping sent is either answered within PING_WAIT seconds or counted lost.
PING_LOOP = f"""\
peer=$1; stop=/tmp/lab-ping.stop; out=/tmp/lab-ping.count
n=0; ok=0
while [ ! -e $stop ]; do
    n=$((n + 1))
    if ping -c 1 -W {PING_WAIT} "$peer" >/dev/null 2>&1; then ok=$((ok + 1)); fi
    echo "$n $ok" >$out
    sleep {PING_INTERVAL}
done
echo "done $n $ok" >$out
"""


def ping(console: GuestConsole, address: str, count: int = 3) -> tuple[int, int]:
    """``count`` pings to ``address`` from the guest on ``console``, one at a time like the
    ping loop's (each is lost only without a reply within PING_WAIT s): (answered, exit
    code, 0 when all were)."""
    code, out = console.run(
        f"ok=0; for i in $(seq {int(count)}); do ping -c 1 -W {PING_WAIT} "
        f"{shlex.quote(address)} >/dev/null 2>&1 && ok=$((ok + 1)); done; "
        f"echo \"answered $ok\"; [ $ok -eq {int(count)} ]",
        timeout=30 + PING_WAIT * count)
    m = re.search(r"answered (\d+)", out)
    return (int(m.group(1)) if m else 0), code


class PingLoops:
    """The continuous ping: each VM in ``consoles`` (index -> console) pings ``peer``."""

    def __init__(self, consoles: Mapping[int, GuestConsole], peer: str) -> None:
        self.consoles = dict(consoles)
        self.peer = peer
        self.running = False

    def start(self) -> None:
        for con in self.consoles.values():
            con.check(f"rm -f /tmp/lab-ping.*; cat >/tmp/lab-ping.sh <<'EOF'\n{PING_LOOP}EOF")
            con.check(f"setsid sh /tmp/lab-ping.sh {shlex.quote(self.peer)} </dev/null "
                      ">/dev/null 2>&1 &")
            self.running = True

    def counts(self, final: bool = False) -> PingCounts:
        """Pings sent and answered so far, over all the loops. ``final``: every loop must
        have stopped (else :class:`LabError`)."""
        sent = got = 0
        for vm, con in self.consoles.items():
            words = con.check("cat /tmp/lab-ping.count 2>/dev/null || echo 0 0").split()
            if final and words[:1] != ["done"]:
                raise LabError(f"VM {vm + 1}'s ping loop did not stop")
            nums = [int(w) for w in words if w.isdigit()]
            if len(nums) == 2:
                sent, got = sent + nums[0], got + nums[1]
        return PingCounts(sent, got)

    def wait_for_more(self, answers: int) -> TrafficWait:
        """Wait until ``answers`` more pings were answered (or a deadline long enough for
        them at the loop's pace passed)."""
        wanted = self.counts().received + answers
        deadline = time.monotonic() + PING_WAIT + 30 + 2 * answers
        while True:
            counts = self.counts()
            if counts.received >= wanted or time.monotonic() > deadline:
                return TrafficWait(wanted, counts)
            time.sleep(0.5)

    def stop(self) -> PingCounts:
        """Stop every loop; the final counts once each loop finished its last ping."""
        for con in self.consoles.values():
            con.check("touch /tmp/lab-ping.stop")
        deadline = time.monotonic() + PING_WAIT + 30
        while True:
            try:
                counts = self.counts(final=True)
                break
            except LabError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        self.running = False
        return counts
