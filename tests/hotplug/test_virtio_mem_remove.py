"""``pyvhost mem remove`` of a virtio-mem device on a booted guest, on the QEMU under test:
QEMU 7.2 refuses device_del of any virtio-mem device, QEMU 10.0 takes it once the device
has nothing plugged or requested and sits on a hot-pluggable bus. The planner refuses what
that version refuses, in its words, and QEMU (asked directly, past the planner) agrees.

The guest has a cold-plugged device on q35's root bus (``vmem0``: no hot-unplug there in
either version) and two hot-plugged on pcie-root-ports: ``vm1`` never plugged, ``vm2``
with 128 MiB plugged. On 10.0 ``pyvhost mem remove vm1`` takes it away: device_del, the
guest's eject, object-del of its memdev. (QEMU 10.0.2 then sends DEVICE_DELETED for the
device's virtio-backend child only, never for the device, once HMP ``info mtree -f`` ran:
:mod:`pyvhost.hotplug.execute` waits for either.)
"""

from __future__ import annotations

import time
from typing import Any, cast

import pytest

from pyvhost.hotplug.qemu_rules import rules_for
from pyvhost.lab.qemu import Qemu, VirtioMem
from pyvhost.units import GiB, MiB
from support.guestmem import wait_memtotal

from .conftest import BootVm, objects, run_json

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

KB = 1024  # /proc/meminfo counts kB
ROOT_PORTS = ("-device", "pcie-root-port,id=rp1,chassis=1,bus=pcie.0",
              "-device", "pcie-root-port,id=rp2,chassis=2,bus=pcie.0")


def _qemu_error(q: Qemu, device: str) -> str:
    """device_del sent straight to QEMU, past the planner: QEMU's own error."""
    reply = q.control.cmd_raw("device_del", {"id": device})
    assert "error" in reply, reply
    return str(reply["error"]["desc"])


def _refusal(q: Qemu, device: str) -> tuple[str, str]:
    code, doc = run_json("remove", "--qmp", str(q.qmp_path), device)
    assert code == 1 and doc["outcome"] is None, doc
    (refusal,) = doc["refusals"]
    return refusal["code"], refusal["message"]


def _hotplug(q: Qemu, device: str) -> None:
    q.control.cmd("object-add", **{"qom-type": "memory-backend-memfd", "id": f"{device}-mem",
                                   "size": GiB, "share": True})
    q.control.cmd("device_add", driver="virtio-mem-pci", id=device, memdev=f"{device}-mem",
                  bus=device.replace("vm", "rp"))


def _memory_devices(q: Qemu) -> list[str]:
    devices = cast(list[dict[str, Any]], q.control.cmd("query-memory-devices"))
    return sorted(d["data"]["id"] for d in devices)


def _wait_bound(q: Qemu, n: int) -> None:
    """Until the guest's virtio_mem driver has ``n`` devices (at most 240 looks)."""
    bound = "ls /sys/bus/virtio/drivers/virtio_mem | grep -c '^virtio'"
    for _ in range(240):
        if q.console.run(bound)[1].strip() == str(n):
            return
        time.sleep(0.5)
    raise AssertionError(f"the guest's virtio_mem driver never had {n} devices")


def test_virtio_mem_remove_follows_the_version(boot_vm: BootVm,
                                               qemu_under_test: tuple[int, int, int]) -> None:
    rules, _ = rules_for(qemu_under_test)
    q = boot_vm(virtio_mem=(VirtioMem("vmem0"),), extra_args=ROOT_PORTS)
    c = q.console
    qmp = str(q.qmp_path)
    _hotplug(q, "vm1")
    _wait_bound(q, 2)
    before = c.meminfo()["MemTotal"]

    # On a root port, nothing plugged or requested: 10.0 takes it away, 7.2 cannot.
    if not rules.virtio_mem_unplug:
        refused, message = _refusal(q, "vm1")
        assert refused == "BAD_REQUEST" and f"QEMU {rules.name} cannot unplug" in message
        assert "virtio based memory devices cannot be unplugged" in _qemu_error(q, "vm1")
    else:
        code, doc = run_json("remove", "--qmp", qmp, "vm1", "--timeout", "120")
        assert code == 0, doc
        out = doc["outcome"]
        assert out["ok"] and out["done"] == ["device_del", "object-del"], doc
        print(f"\nvirtio-mem remove on QEMU {rules.name}: {out['seconds']:.2f} s")
        assert _memory_devices(q) == ["vmem0"]
        assert "vm1-mem" not in objects(q)

    _hotplug(q, "vm2")
    _wait_bound(q, 2 if rules.virtio_mem_unplug else 3)

    # On the root bus: refused everywhere, by the planner and by QEMU.
    refused, message = _refusal(q, "vmem0")
    assert refused == "BAD_REQUEST" and f"QEMU {rules.name}" in message, message
    assert "does not support hotplugging" in _qemu_error(q, "vmem0")

    # On a root port, with 128 MiB plugged by the guest: refused by both versions.
    code, doc = run_json("resize", "--qmp", qmp, "vm2", "--size", "128M", "--timeout", "120")
    assert code == 0, doc
    assert wait_memtotal(c, before + 128 * MiB // KB) == before + 128 * MiB // KB
    refused, message = _refusal(q, "vm2")
    if rules.virtio_mem_unplug:
        assert refused == "VIRTIO_MEM_PLUGGED" and f"QEMU {rules.name} unplugs" in message
        assert "cannot get unplugged while" in _qemu_error(q, "vm2")
    else:
        assert refused == "BAD_REQUEST" and f"QEMU {rules.name} cannot unplug" in message
        assert "virtio based memory devices cannot be unplugged" in _qemu_error(q, "vm2")

    # Shrunk back to 0: 10.0 takes it away too, 7.2 still cannot.
    code, doc = run_json("resize", "--qmp", qmp, "vm2", "--size", "0", "--timeout", "120")
    assert code == 0, doc
    assert wait_memtotal(c, before) == before
    if not rules.virtio_mem_unplug:
        refused, message = _refusal(q, "vm2")
        assert refused == "BAD_REQUEST" and f"QEMU {rules.name} cannot unplug" in message
        return
    code, doc = run_json("remove", "--qmp", qmp, "vm2", "--timeout", "120")
    assert code == 0, doc
    assert doc["outcome"]["done"] == ["device_del", "object-del"], doc
    assert _memory_devices(q) == ["vmem0"]
    assert "vm2-mem" not in objects(q)
    assert c.meminfo()["MemTotal"] == before
