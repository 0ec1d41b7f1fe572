"""What ``execute_libvirt_add`` says and does when libvirt's attach does not return within
the timeout, with a fake domain (an extra unit test: tests/hotplug/test_libvirt_interrupt.py
holds the real attach in a real libvirtd). The fake answers as libvirt 9.0 does: the live
XML lists the DIMM from the moment the attach starts, and drops it when the attach fails
or a detach finishes; a guest that ignores the first eject keeps it until asked again."""

from __future__ import annotations

import threading
import time
from typing import Any

import libvirt
import pytest

from pyvhost.hotplug import libvirt as lvmod
from pyvhost.hotplug.host import HostFacts, HugepagePool
from pyvhost.hotplug.libvirt import Connection, execute_libvirt_add, plan_libvirt_add
from pyvhost.hotplug.libvirt_xml import parse_uri, read_domain
from pyvhost.hotplug.plan import AddRequest

MiB = 1 << 20
DOMAIN = """<domain type='qemu'><name>fake</name>
  <maxMemory slots='8' unit='KiB'>4194304</maxMemory><memory unit='KiB'>262144</memory>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>
  <cpu><numa><cell id='0' cpus='0' memory='262144' unit='KiB'/></numa></cpu>
  <devices>{dimms}</devices></domain>"""


class FakeDom:
    def __init__(self, attach_after: float, attach_error: str | None = None,
                 ignored_ejects: int = 0) -> None:
        self.attach_after = attach_after
        self.attach_error = attach_error
        self.ignored_ejects = ignored_ejects
        self.dimms: list[str] = []
        self.detaches = 0
        self.release = threading.Event()

    def name(self) -> str:
        return "fake"

    def state(self) -> list[int]:
        return [1, 1]

    def isPersistent(self) -> int:  # noqa: N802 (libvirt's name)
        return 0

    def XMLDesc(self, flags: int) -> str:  # noqa: N802
        return DOMAIN.format(dimms="".join(self.dimms))

    def attachDeviceFlags(self, xml: str, flags: int) -> None:  # noqa: N802
        self.dimms.append(xml)  # listed before QEMU has it, as libvirt 9.0 does
        self.release.wait(self.attach_after)
        if self.attach_error is not None:
            self.dimms.remove(xml)
            raise libvirt.libvirtError(self.attach_error)

    def detachDeviceFlags(self, xml: str, flags: int) -> None:  # noqa: N802
        self.detaches += 1
        if self.detaches > self.ignored_ejects:
            self.dimms.clear()


def run(dom: FakeDom, timeout: float, grace: float) -> tuple[Any, list[str]]:
    host = HostFacts(4096, 2 * MiB, (0,), (HugepagePool(2 * MiB, None, 0, 0),))
    domain = read_domain(DOMAIN.format(dimms=""), status="running", qemu_version=None,
                         default_hugepage=None)
    plan = plan_libvirt_add(AddRequest(128 * MiB, id="x"), domain, host, persistent=False)
    c = Connection(parse_uri(None), conn=None, dom=dom, timeout=timeout)
    said: list[str] = []
    return execute_libvirt_add(c, plan, grace=grace, progress=said.append), said


def test_a_late_attach_is_detached() -> None:
    out, said = run(FakeDom(attach_after=0.5), timeout=0.1, grace=30)
    assert not out.ok and out.failed_step == "attach-device" and out.done == []
    assert out.rolled_back == ["detach-device"] and out.orphans == []
    assert out.error.startswith("attach-device did not return within 0.1 s; libvirt's")
    assert "with ua-x attached; undone: detach-device ua-x; nothing of it is left" in out.error
    assert said[0].startswith("attach-device did not return within 0.1 s: waiting up to 30 s")


def test_a_late_attach_that_fails_leaves_nothing() -> None:
    out, _ = run(FakeDom(attach_after=0.5, attach_error="device_add failed"), timeout=0.1,
                 grace=30)
    assert out.rolled_back == [] and out.orphans == []
    assert "failed (device_add failed); nothing of it is left in the live XML" in out.error


def test_an_attach_still_running_after_the_grace_is_named() -> None:
    dom = FakeDom(attach_after=60)
    try:
        out, _ = run(dom, timeout=0.1, grace=0.2)
    finally:
        dom.release.set()
    assert out.orphans == ["ua-x"] and out.rolled_back == [] and dom.detaches == 0
    assert "still running: ua-x may yet be attached" in out.error
    assert "pyvhost mem remove --libvirt fake ua-x" in out.error


def test_an_ignored_eject_is_asked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lvmod, "REDETACH", 0.3)
    monkeypatch.setattr(lvmod, "UNDO_WAIT", 5.0)
    dom = FakeDom(attach_after=0.3, ignored_ejects=1)
    start = time.monotonic()
    out, said = run(dom, timeout=0.1, grace=30)
    assert out.rolled_back == ["detach-device"] and out.orphans == [], out
    assert dom.detaches == 2 and time.monotonic() - start < 5
    assert "ua-x is still in the domain: asking libvirt to detach it again" in said


class SlowXmlAfterAttach(FakeDom):
    """Attaches at once, then the first read of the live XML takes ``slow`` seconds."""

    def __init__(self, slow: float) -> None:
        super().__init__(attach_after=0)
        self.slow = slow

    def XMLDesc(self, flags: int) -> str:  # noqa: N802
        if self.dimms and self.slow:
            slow, self.slow = self.slow, 0.0
            time.sleep(slow)
        return super().XMLDesc(flags)


def test_an_attach_whose_check_is_not_answered_is_detached() -> None:
    # The verification's read of the live XML outlasts the timeout: not verified, so
    # detached again, and the outcome says so (before: the error escaped, DIMM attached).
    dom = SlowXmlAfterAttach(slow=1.0)
    out, _ = run(dom, timeout=0.3, grace=30)
    assert not out.ok and out.failed_step == "verify", out
    assert out.error.startswith("could not read the live XML to check ua-x: domain XML: "
                                "no answer within 0.3 s"), out
    assert out.rolled_back == ["detach-device"] and out.orphans == [] and dom.dimms == []
