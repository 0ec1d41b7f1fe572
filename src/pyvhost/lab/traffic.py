"""The lab's traffic: pings between the guests, and a TCP stream, run in the guests over
their consoles.

Owns the guests' ping loop (a shell script each pinging VM keeps running in the
background, one ``ping -c 1`` at a time) and reading its counters and its log (when each
ping ended, answered or not: the longest gap); the one-off pings between two VMs; and the
stream a migration is checked with (:class:`Stream`). It measures traffic and judges
nothing (:mod:`.checks` does).
"""

from __future__ import annotations

import hashlib
import re
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass

from .config import LabError
from .guest import GuestConsole
from .records import PingCounts, TrafficWait

PING_INTERVAL = 0.2
PING_WAIT = 5  # seconds a ping waits for its reply before it counts as lost
# The guest's ping loop: one `ping -c 1` at a time, so a stop never cuts a ping in flight
# and every ping sent is either answered within PING_WAIT seconds or counted lost. Its
# log has a line per ping: when it ended, 1 answered or 0 lost, when it was sent (uptimes):
# a lost ping is placed by when it was sent, PING_WAIT s before its line is written.
PING_LOOP = f"""\
peer=$1; stop=/tmp/lab-ping.stop; out=/tmp/lab-ping.count
n=0; ok=0
while [ ! -e $stop ]; do
    n=$((n + 1))
    t0=$(cut -d' ' -f1 /proc/uptime)
    if ping -c 1 -W {PING_WAIT} "$peer" >/dev/null 2>&1; then ok=$((ok + 1)); r=1; else r=0; fi
    echo "$n $ok" >$out
    echo "$(cut -d' ' -f1 /proc/uptime) $r $t0" >>/tmp/lab-ping.log
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

    def uptimes(self) -> dict[int, float]:
        """Each pinging VM's clock (``/proc/uptime``): where a window of its log starts."""
        return {vm: uptime(con) for vm, con in self.consoles.items()}

    def window(self, since: Mapping[int, float],
               during: Mapping[int, tuple[float, float]] | None = None) -> PingWindow:
        """The pings each VM's loop sent since its uptime ``since[vm]``, counted by when
        they were sent: sent, lost, and the longest time between two answered ones
        (seconds; the first is measured from ``since``).

        ``during[vm]`` (from, to) is a span inside the window (a migration's command, in
        the VM's clock): first every ping sent before its end is waited for (a lost one
        ends PING_WAIT s after it was sent), then those of them that were lost are
        counted in ``lost_during`` and those sent after it that were answered in
        ``answered_after``."""
        sent = lost = lost_during = answered_after = 0
        gap = 0.0
        for vm, con in self.consoles.items():
            start = since[vm]
            span = during.get(vm) if during is not None else None
            if span is not None:
                self._settle(vm, con, span[1])
            out = con.check(f"awk '$3 >= {start:.2f}' /tmp/lab-ping.log 2>/dev/null || true")
            last = start
            for line in out.splitlines():
                ping = _ping_line(line)
                if ping is None:
                    continue
                ended, answered, sent_at = ping
                sent += 1
                if answered:
                    gap = max(gap, ended - last)
                    last = ended
                    if span is not None and sent_at >= span[1]:
                        answered_after += 1
                else:
                    lost += 1
                    if span is not None and span[0] <= sent_at <= span[1]:
                        lost_during += 1
            gap = max(gap, uptime(con) - last)
        return PingWindow(sent, lost, round(gap, 3), lost_during, answered_after)

    def _settle(self, vm: int, con: GuestConsole, until: float) -> None:
        """Wait until VM ``vm``'s loop logged a ping sent at or after its uptime
        ``until``: the pings are sent one at a time, so every one sent before has
        ended."""
        deadline = time.monotonic() + PING_WAIT + 30
        while con.run(f"awk '$3 >= {until:.2f} {{ f = 1 }} END {{ exit !f }}' "
                      "/tmp/lab-ping.log")[0] != 0:
            if time.monotonic() > deadline:
                raise LabError(f"VM {vm + 1}'s ping loop logged no ping sent after "
                               f"uptime {until:.2f} within {PING_WAIT + 30} s")
            time.sleep(0.3)

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


def uptime(console: GuestConsole) -> float:
    """The guest's ``/proc/uptime`` (seconds since it booted)."""
    return float(console.check("cut -d' ' -f1 /proc/uptime").split()[0])


def _ping_line(line: str) -> tuple[float, bool, float] | None:
    """A line of the ping loop's log, "ENDED RESULT SENT" (uptimes; RESULT 1 answered,
    0 lost): (ended, answered, sent), or None for a line that is not one."""
    words = line.split()
    if len(words) != 3 or words[1] not in ("0", "1"):
        return None
    try:
        return float(words[0]), words[1] == "1", float(words[2])
    except ValueError:
        return None


@dataclass(frozen=True)
class PingWindow:
    """The continuous ping over a window (a migration): pings sent in it, those lost, and
    the longest time without an answer (seconds); of a span inside it (the migration's
    command), the pings sent in it and lost, and those sent after it and answered."""

    sent: int
    lost: int
    longest_gap: float
    lost_during: int = 0
    answered_after: int = 0


# -- the stream ------------------------------------------------------------------------------
STREAM_PORT = 5001
#: The sender (another VM): the numbers from 1 up, one per line, as ``seq`` prints them,
#: 1000 at a time with a pause between (a steady stream, not a flood: the machine is
#: shared), over TCP until the stop file appears; then its nc closes the connection.
STREAM_SENDER = f"""\
stop=/tmp/lab-stream.stop; i=1
while [ ! -e $stop ]; do seq $i $((i + 999)); i=$((i + 1000)); sleep 0.02; done \\
    | nc "$1" {STREAM_PORT}
echo sent >/tmp/lab-stream.sent
"""
#: The receiver (the VM that migrates): what arrives goes to md5sum and, through tee and
#: a FIFO, to wc, in the guest. nc's stdin is a FIFO it holds open itself, so it never
#: reads end-of-file and never half-closes the connection; it ends when the sender does.
#: While nc is stopped (a migration) the stream goes on until the socket's receive
#: buffer (128 KiB: the kernel does not grow the buffer of a socket nobody reads) is full.
STREAM_RECEIVER = f"""\
rm -f /tmp/lab-stream.*; mkfifo /tmp/lab-stream.fifo /tmp/lab-stream.count
wc -c </tmp/lab-stream.count >/tmp/lab-stream.bytes &
nc -l -p {STREAM_PORT} <>/tmp/lab-stream.fifo | tee /tmp/lab-stream.count \\
    | md5sum >/tmp/lab-stream.md5.part
wait
mv /tmp/lab-stream.md5.part /tmp/lab-stream.md5
"""


def seq_md5(nbytes: int) -> str:
    """The MD5 of the first ``nbytes`` bytes of ``seq 1 N`` (for a large enough N): what
    the receiver must have computed over a stream of that length."""
    h = hashlib.md5(usedforsecurity=False)
    left, i, step = nbytes, 1, 100_000
    while left > 0:
        chunk = "".join(f"{k}\n" for k in range(i, i + step)).encode()[:left]
        h.update(chunk)
        left -= len(chunk)
        i += step
    return h.hexdigest()


@dataclass(frozen=True)
class StreamResult:
    """What the receiving guest counted and hashed, and what it should have hashed."""

    received: int
    md5: str
    expected_md5: str

    @property
    def intact(self) -> bool:
        return self.received > 0 and self.md5 == self.expected_md5


class Stream:
    """A TCP stream from ``sender`` to ``receiver`` (at ``address``), checked in the
    receiving guest: run it through a migration with the receiver stopped, so that every
    frame written into its buffers meanwhile is read by the migrated guest."""

    def __init__(self, sender: GuestConsole, receiver: GuestConsole, address: str) -> None:
        self.sender = sender
        self.receiver = receiver
        self.address = address

    def start(self) -> None:
        self.receiver.check(f"cat >/tmp/lab-stream-rx.sh <<'EOF'\n{STREAM_RECEIVER}EOF")
        self.receiver.check("setsid sh /tmp/lab-stream-rx.sh </dev/null >/dev/null 2>&1 &")
        deadline = time.monotonic() + 30
        while self.receiver.run("netstat -ltn | grep -q ':5001 '")[0] != 0:
            if time.monotonic() > deadline:
                raise LabError("the stream's receiver did not listen within 30 s")
            time.sleep(0.2)
        self.sender.check(f"rm -f /tmp/lab-stream.*; cat >/tmp/lab-stream-tx.sh <<'EOF'\n"
                          f"{STREAM_SENDER}EOF")
        self.sender.check(f"setsid sh /tmp/lab-stream-tx.sh {shlex.quote(self.address)} "
                          "</dev/null >/dev/null 2>&1 &")

    def pause_receiver(self, console: GuestConsole | None = None) -> None:
        """Stop the receiving program (SIGSTOP): what arrives waits in the guest's socket,
        in the receive buffers the back-end wrote."""
        (console or self.receiver).check("kill -STOP $(pidof nc)")

    def resume_receiver(self, console: GuestConsole | None = None) -> None:
        (console or self.receiver).check("kill -CONT $(pidof nc)")

    def finish(self, receiver: GuestConsole | None = None, timeout: float = 120) -> StreamResult:
        """Stop the sender; wait for the receiver's count and hash (on ``receiver``: the
        migrated guest's console)."""
        rx = receiver or self.receiver
        self.receiver = rx
        self.sender.check("touch /tmp/lab-stream.stop")
        deadline = time.monotonic() + timeout
        while rx.run("test -e /tmp/lab-stream.md5")[0] != 0:
            if time.monotonic() > deadline:
                raise LabError(f"the stream did not end within {timeout} s")
            time.sleep(0.5)
        md5 = rx.check("cat /tmp/lab-stream.md5").split()[0]
        words = rx.check("cat /tmp/lab-stream.bytes").split()
        received = int(words[0]) if words and words[0].isdigit() else 0
        return StreamResult(received, md5, seq_md5(received))
