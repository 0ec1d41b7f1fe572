"""``pyvhost mem add --libvirt`` when libvirt's attach does not return in time: Ctrl-C while
it is in flight, and an attach that outlasts ``--timeout``, against a real libvirtd
(tests/support/libvirtd.py: Debian 12's libvirt 9.0 driving QEMU 7.2, or libvirt 11.3
driving QEMU 10.0; TCG).

libvirt cannot cancel an attach, so pyvhost waits a grace period for it to return, then
detaches the DIMM if it took effect and says what the domain has; nothing may be left in
the live XML or in QEMU. The attach is held deterministically: the domain's QEMU is
stopped (SIGSTOP; it is a child of the test's own libvirtd), so libvirt's first monitor
command of the attach waits, unread, in QEMU's monitor socket; the test sees it there
(``ss``'s Recv-Q of that socket), interrupts pyvhost, waits for its progress line, and
lets QEMU go on (SIGCONT).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from pyvhost.hotplug.libvirt import GRACE
from pyvhost.tools.process import pyvhost_argv
from support.libvirtd import Domain, DomainSpec, Libvirtd
from support.procs import need

from .test_libvirt import (  # noqa: F401
    domains,
    libvirt_version,
    libvirtd,
    live_dimms,
    lv_json,
    qemu_objects,
)

pytestmark = [pytest.mark.qemu, pytest.mark.libvirt]


def memory_devices(d: Domain) -> list[str]:
    """QEMU's memory devices, asked through libvirt (the test's own look)."""
    import libvirt_qemu

    reply = json.loads(libvirt_qemu.qemuMonitorCommand(
        d.dom, json.dumps({"execute": "query-memory-devices"}), 0))
    return [m["data"].get("id", "") for m in reply["return"]]


def monitor_backlog(qemu_pid: int) -> int:
    """Bytes waiting, unread, in the stopped QEMU's QMP monitor socket: libvirt has sent
    it a command (``ss -x``'s Recv-Q of the socket that process holds)."""
    out = subprocess.run(["ss", "-xpH"], capture_output=True, text=True, check=True,
                         timeout=30).stdout
    for line in out.splitlines():
        if "monitor.sock" in line and f"pid={qemu_pid}," in line:
            return int(line.split()[2])
    raise AssertionError(f"no monitor socket of QEMU {qemu_pid} in ss -x:\n{out}")


class Command:
    """``pyvhost ARGS`` in the background, its stderr read line by line as it comes."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            pyvhost_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, text=True)
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, (
                f"exited with {self.proc.returncode} before {what}: {''.join(self.stderr)}")
            assert time.monotonic() < deadline, f"no {what} in {timeout} s"
            time.sleep(0.05)

    def said(self, words: str) -> bool:
        return any(words in line for line in self.stderr)

    def finish(self, timeout: float = 180) -> tuple[int, str, str]:
        """Its exit code, stdout and stderr (stderr is the reader thread's alone)."""
        code = self.proc.wait(timeout=timeout)
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        self._reader.join(30)
        return code, out, "".join(self.stderr)

    def end(self) -> None:
        """Ended by pid if it still runs (a failed test)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@contextmanager
def stopped_qemu(lv: Libvirtd, d: Domain) -> Iterator[Callable[[], None]]:
    """The domain's QEMU stopped (SIGSTOP) for the block; yields what lets it go on
    (SIGCONT), which also runs at the end whatever happened."""
    pid = lv.qemu_pid(d.dom.name())
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)

    def resume() -> None:
        os.kill(pid, signal.SIGCONT)

    try:
        yield resume
    finally:
        resume()


def add_with_qemu_stopped(lv: Libvirtd, d: Domain, *args: str) -> tuple[Command, int]:
    """``pyvhost mem add --libvirt`` started against the stopped QEMU, returned once
    libvirt's attach waits in QEMU's monitor socket."""
    need("ss", "iproute2")
    pid = lv.qemu_pid(d.dom.name())
    assert pid is not None
    # The tail of the test's own last command ("\r\n") may still be unread when QEMU
    # stopped: the attach is what comes on top of that.
    before = monitor_backlog(pid)
    cmd = Command("mem", "add", "--libvirt", d.dom.name(), "--connect", lv.uri, "--size",
                  "128M", *args)
    cmd.wait_until(lambda: monitor_backlog(pid) > before,
                   "the attach in QEMU's monitor socket")
    return cmd, pid


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_ctrl_c_during_the_attach_waits_for_it_and_detaches_it(
        libvirtd: Libvirtd, domains: Any) -> None:  # noqa: F811
    d = domains(DomainSpec("pv-intr"))
    objects, devices = qemu_objects(d), memory_devices(d)
    with stopped_qemu(libvirtd, d) as resume:
        cmd, _ = add_with_qemu_stopped(libvirtd, d, "--id", "intr", "--timeout", "120")
        try:
            cmd.proc.send_signal(signal.SIGINT)
            cmd.wait_until(lambda: cmd.said("waiting up to"), "the progress line")
            resume()
            code, out, err = cmd.finish()
        finally:
            cmd.end()
    print(err)  # pytest -s: the progress lines
    assert code == 130, err
    line = one_error_line(err)
    assert "interrupted during attach-device of ua-intr" in line, err
    assert "with ua-intr attached; undone: detach-device ua-intr" in line, err
    assert "nothing of it is left in the live XML" in line, err
    assert f"interrupted during attach-device: waiting up to {GRACE:g} s" in err, err
    assert out == ""
    assert live_dimms(d) == [] and memory_devices(d) == devices
    assert qemu_objects(d) == objects


def test_an_attach_that_outlasts_the_timeout_is_detached(
        libvirtd: Libvirtd, domains: Any) -> None:  # noqa: F811
    d = domains(DomainSpec("pv-slow"))
    objects, devices = qemu_objects(d), memory_devices(d)
    with stopped_qemu(libvirtd, d) as resume:
        # (Without --qemu-monitor: it reads QEMU's state first, which the stopped QEMU
        # would not answer; the test looks into QEMU itself afterwards.)
        cmd, _ = add_with_qemu_stopped(libvirtd, d, "--id", "slow", "--timeout", "3",
                                       "--json")
        try:
            cmd.wait_until(lambda: cmd.said("did not return within 3 s: waiting up to"),
                           "the progress line")
            resume()
            code, out, err = cmd.finish()
        finally:
            cmd.end()
    assert code == 3, err
    doc = json.loads(out)
    o = doc["outcome"]
    assert (o["ok"], o["failed_step"], o["done"]) == (False, "attach-device", []), o
    print(f"\nundone in {o['seconds']:.1f} s")
    assert o["rolled_back"] == ["detach-device"] and o["orphans"] == [], o
    assert "did not return within 3 s" in o["error"], o
    assert "undone: detach-device ua-slow; nothing of it is left" in o["error"], o
    assert live_dimms(d) == [] and memory_devices(d) == devices
    assert qemu_objects(d) == objects


def test_an_attach_still_running_after_the_grace_is_reported_as_such(
        libvirtd: Libvirtd, domains: Any) -> None:  # noqa: F811
    """QEMU stays stopped past the grace: pyvhost cannot know whether the DIMM will be
    attached and says so (exit 3, the DIMM named as possibly left); the remove it
    names cleans up once libvirt's attach has finished."""
    d = domains(DomainSpec("pv-stuck"))
    devices = memory_devices(d)
    with stopped_qemu(libvirtd, d):
        cmd, _ = add_with_qemu_stopped(libvirtd, d, "--id", "stuck", "--timeout", "2",
                                       "--json")
        try:
            code, out, err = cmd.finish(timeout=2 + GRACE + 120)
        finally:
            cmd.end()
    assert code == 3, err
    o = json.loads(out)["outcome"]
    assert o["orphans"] == ["ua-stuck"] and o["rolled_back"] == [], o
    assert "still running: ua-stuck may yet be attached" in o["error"], o
    assert "pyvhost mem remove --libvirt pv-stuck ua-stuck" in o["error"], o
    # QEMU runs again: libvirt finishes the attach; the advice given removes it.
    deadline = time.monotonic() + 120
    while "ua-stuck" not in memory_devices(d):
        assert time.monotonic() < deadline, "libvirt never finished the attach"
        time.sleep(0.25)
    code, doc = lv_json(libvirtd, "remove", "--libvirt", "pv-stuck", "ua-stuck",
                        "--timeout", "120")
    assert code == 0, doc
    assert live_dimms(d) == [] and memory_devices(d) == devices


def test_ctrl_c_during_a_remove_says_what_is_left(
        libvirtd: Libvirtd, domains: Any) -> None:  # noqa: F811
    """A detach cannot be taken back: Ctrl-C while libvirt's detach waits on QEMU says
    the DIMM is still in the domain and how to finish; the remove it names does."""
    d = domains(DomainSpec("pv-rm"))
    code, doc = lv_json(libvirtd, "add", "--libvirt", "pv-rm", "--size", "128M", "--id", "rm")
    assert code == 0, doc
    devices = memory_devices(d)
    with stopped_qemu(libvirtd, d) as resume:
        pid = libvirtd.qemu_pid("pv-rm")
        assert pid is not None
        before = monitor_backlog(pid)
        cmd = Command("mem", "remove", "--libvirt", "pv-rm", "--connect", libvirtd.uri,
                      "ua-rm", "--timeout", "120")
        try:
            cmd.wait_until(lambda: monitor_backlog(pid) > before,
                           "the detach in QEMU's monitor socket")
            cmd.proc.send_signal(signal.SIGINT)
            code, _, err = cmd.finish()
        finally:
            cmd.end()
            resume()
    assert code == 130, err
    line = one_error_line(err)
    if libvirt_version(libvirtd) >= (11, 0, 0):
        # libvirt 11.3 (9.0 answers at once): the live XML waits for the detach's job,
        # which waits for QEMU; after 30 s libvirt gives up. Still one line, with what to do.
        assert ("interrupted during the removal of ua-rm; could not look at what is left: "
                "Timed out during operation: cannot acquire state change lock") in line
    else:
        assert ("interrupted while ua-rm was being detached: it is still in the live XML"
                in line)
    assert "run pyvhost mem remove --libvirt pv-rm ua-rm again to finish" in line
    # The device_del libvirt had sent goes on once QEMU runs; where the guest ignored it,
    # the remove the message names finishes the job.
    deadline = time.monotonic() + 30
    while "ua-rm" in live_dimms(d) and time.monotonic() < deadline:
        time.sleep(0.25)
    if "ua-rm" in live_dimms(d):
        code, doc = lv_json(libvirtd, "remove", "--libvirt", "pv-rm", "ua-rm", "--timeout",
                            "120")
        assert code == 0, doc
    assert live_dimms(d) == [] and "ua-rm" not in memory_devices(d)
    assert len(memory_devices(d)) == len(devices) - 1
