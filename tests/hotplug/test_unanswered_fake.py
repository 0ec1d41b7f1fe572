"""The executor's handling of a command QEMU does not answer, on a scripted monitor (no
QEMU): a connection QEMU closed during device_add is reconnected to look the step up and
undo it; a monitor that times out on the look-up too raises StateUnknownError naming
what may be left. The real-QEMU tests (test_qmp_timeouts.py) hold answers back through
a proxy, which cannot close and reopen a connection."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from pyvhost.hotplug.execute import StateUnknownError, execute_add
from pyvhost.hotplug.plan import Plan, Step
from pyvhost.hotplug.qmp import QmpConnectError, QmpTimeoutError

PLAN = Plan("add", "d1", "d1-mem", (
    Step("object-add", {"qom-type": "memory-backend-memfd", "id": "d1-mem", "size": 1},
         undo=Step("object-del", {"id": "d1-mem"})),
    Step("device_add", {"driver": "pc-dimm", "id": "d1", "memdev": "d1-mem"},
         undo=Step("device_del", {"id": "d1"}, wait_deleted="d1"))))


class Scripted:
    """QEMU's memory objects and devices; ``fail`` maps a command to what happens to its
    answer: "closed" (run, then the connection drops until reconnect) or "timeout"
    (run, then nothing answers any more)."""

    def __init__(self, fail: dict[str, str]) -> None:
        self.fail, self.objects, self.devices = fail, set[str](), set[str]()
        self.closed = self.silent = False
        self.reconnects, self.limits, self.deleted = 0, list[float](), list[str]()

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        args = arguments or {}
        if self.silent:
            raise QmpTimeoutError(command, 1.0)
        if self.closed:
            e = QmpConnectError(f"{command}: QEMU closed the QMP connection")
            e.command = command
            raise e
        if command == "object-add":
            self.objects.add(args["id"])
        elif command == "object-del":
            self.objects.discard(args["id"])
        elif command == "device_add":
            self.devices.add(args["id"])
        elif command == "device_del":
            self.devices.discard(args["id"])
            self.deleted.append(args["id"])
        elif command == "qom-list":
            return [{"name": o, "type": "child<memory-backend-memfd>"} for o in self.objects]
        elif command == "query-memory-devices":
            return [{"type": "dimm", "data": {"id": d, "size": 1}} for d in self.devices]
        what = self.fail.pop(command, None)
        if what == "closed":
            self.closed = True
            return self.execute(command, arguments)
        if what == "timeout":
            self.silent = True
            raise QmpTimeoutError(command, 1.0)
        return {}

    def hmp(self, command_line: str) -> str:
        return ""

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        if self.deleted:
            return {"event": "DEVICE_DELETED", "data": {"device": self.deleted.pop()}}
        return None

    def reconnect(self, timeout: float) -> None:
        self.reconnects += 1
        self.closed = False

    @contextlib.contextmanager
    def time_limit(self, seconds: float) -> Iterator[None]:
        self.limits.append(seconds)
        yield


def test_connection_closed_during_device_add_is_reconnected_and_undone() -> None:
    m = Scripted({"device_add": "closed"})
    out = execute_add(m, PLAN, timeout=30.0)
    assert not out.ok and out.failed_step == "device_add", out
    assert out.error == ("QEMU closed the QMP connection during device_add; QEMU had run it "
                         "(d1 was in query-memory-devices afterwards)"), out
    assert out.rolled_back == ["device_del", "object-del"] and out.orphans == [], out
    assert m.reconnects == 1 and m.objects == set() and m.devices == set()
    assert m.limits and max(m.limits) <= 10.0  # the look-up's own, shorter limit


@pytest.mark.parametrize(("command", "left"), [
    ("object-add", "memory backend d1-mem (object-add was sent; whether QEMU ran it is "
                   "unknown)"),
    ("device_add", "memory backend d1-mem (object-add ran) and DIMM d1 (device_add was "
                   "sent; whether QEMU ran it is unknown)")])
def test_monitor_silent_after_a_timeout_says_what_may_be_left(command: str,
                                                              left: str) -> None:
    m = Scripted({command: "timeout"})
    with pytest.raises(StateUnknownError) as e:
        execute_add(m, PLAN, timeout=30.0)
    text = str(e.value)
    assert text.startswith(f"QEMU did not answer {command} within 1 s, and a look-up "
                           f"after it failed too"), text
    assert f"it may have {left}: check with pyvhost mem status" in text, text
    assert "pyvhost mem remove d1-mem (the backend alone, unused)" in text, text
    assert ("pyvhost mem remove d1 (the DIMM, then its backend)" in text) == (
        command == "device_add"), text
