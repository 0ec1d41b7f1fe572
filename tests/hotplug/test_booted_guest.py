"""``pyvhost mem`` against a booted guest (real QEMU 7.2, TCG, the test image): MemTotal in
the guest follows add, remove and virtio-mem resize; the guest's refusal of an unplug is
reported; vhost-user back-ends see exactly the memory the planner says they see.

Timeouts are generous and no test asserts a duration: other engineers run QEMU and DPDK on
the same two cores. Durations are printed (``pytest -s``) for the record.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, cast

import pytest

from pyvhost.backend.control import fetch_status
from pyvhost.lab.qemu import Qemu, VhostUserNet, VirtioMem
from pyvhost.units import MiB
from support.guestmem import wait_memtotal
from support.procs import Procs, wait_for_socket

from .conftest import BootVm, objects, run_json

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

KB = 1024  # /proc/meminfo counts kB
DIMM = 128 * MiB



def memory_devices(q: Qemu) -> list[str]:
    devices = cast(list[dict[str, Any]], q.control.cmd("query-memory-devices"))
    return [d["data"]["id"] for d in devices]


def add(q: Qemu, *args: str) -> dict[str, Any]:
    code, doc = run_json("add", "--qmp", str(q.qmp_path), "--size", "128M", *args)
    assert code == 0, doc
    assert doc["outcome"]["ok"], doc
    return doc



def test_add_then_remove_follows_memtotal(boot_vm: BootVm) -> None:
    q = boot_vm()
    c = q.console
    before = c.meminfo()["MemTotal"]

    doc = add(q, "--id", "d1")
    print(f"\nadd: QMP steps and verification {doc['outcome']['seconds']:.3f} s")
    # The guest's ACPI answer to the insert, if it came within 10 s: source 1, status 0.
    ost = [(o["source"], o["status"]) for o in doc["outcome"]["acpi_ost"]]
    assert all(status == 0 for source, status in ost if source == 1), ost
    t0 = time.monotonic()
    assert wait_memtotal(c, before + DIMM // KB) == before + DIMM // KB, c.transcript()[-2000:]
    print(f"add: MemTotal grew {time.monotonic() - t0:.2f} s after pyvhost mem add returned")

    code, doc = run_json("remove", "--qmp", str(q.qmp_path), "d1", "--timeout", "120")
    assert code == 0, doc
    out = doc["outcome"]
    print(f"remove: device_del to DEVICE_DELETED and object-del {out['seconds']:.3f} s")
    assert out["ok"] and out["done"] == ["device_del", "object-del"], doc
    assert not out["timed_out"]
    assert wait_memtotal(c, before) == before
    assert "d1" not in memory_devices(q)
    assert "d1-mem" not in objects(q)  # no orphan backend
    _, status = run_json("status", "--qmp", str(q.qmp_path))
    assert [b["role"] for b in status["backends"]] == ["boot"]


def test_unplug_of_memory_onlined_in_a_kernel_zone_is_refused_by_the_guest(
        boot_vm: BootVm) -> None:
    q = boot_vm()
    c = q.console
    _, blocks_before = c.memory_blocks()
    before = c.meminfo()["MemTotal"]
    add(q, "--id", "d1")
    assert wait_memtotal(c, before + DIMM // KB) == before + DIMM // KB
    _, blocks = c.memory_blocks()
    (new,) = [b for b in blocks if b.index not in {o.index for o in blocks_before}]
    assert new.zones == ("Movable",)

    # Move the block into ZONE_NORMAL. With 256 MiB of boot RAM (all in DMA32) it is then
    # the kernel's only Normal memory: slab (dentries, inodes) lands there and pins it.
    c.offline_block(new.index)
    c.online_block(new.index, "online_kernel")
    c.check("i=0; while [ $i -lt 3000 ]; do : > /tmp/pin.$i; i=$((i + 1)); done")
    code, text = c.run(f"echo offline > /sys/devices/system/memory/memory{new.index}/state")
    assert code != 0 and "busy" in text, "the guest could still offline the block"

    code, doc = run_json("remove", "--qmp", str(q.qmp_path), "d1", "--timeout", "120")
    assert code == 4, doc
    out = doc["outcome"]
    assert out["timed_out"] and not out["ok"] and out["done"] == []
    ost = [(o["source"], o["status"]) for o in out["acpi_ost"]]
    # QEMU 7.2 + Linux 6.1: "eject in progress", then "busy" (memory not offlinable).
    assert ost[-1] == (3, 0x82), out
    assert "refused" in out["error"] and "0x82" in out["error"]
    print(f"\nrefused remove: ACPI _OST {[(s, hex(v)) for s, v in ost]} "
          f"after {out['seconds']:.2f} s")
    # Nothing was taken away: the DIMM still uses its backend.
    assert "d1" in memory_devices(q)
    assert "d1-mem" in objects(q)
    assert c.meminfo()["MemTotal"] == before + DIMM // KB


def _memfds_of(pid: int, size: int) -> list[Path]:
    """The memfds of process ``pid`` that are ``size`` bytes long."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith("/memfd:") and fd.stat().st_size == size:
                found.append(fd)
        except OSError:
            continue
    return found


def test_vhost_user_back_end_sees_only_shared_memory(boot_vm: BootVm, procs: Procs,
                                                     short_dir: Path) -> None:
    sock, ctl = short_dir / "vh.sock", short_dir / "vh.ctl"
    p = procs.pyvhost("net", "--socket", str(sock), "--reflect", "--control", str(ctl),
                      "--no-stats")
    wait_for_socket(sock, p.proc, timeout=60)
    wait_for_socket(ctl, p.proc, timeout=60)
    q = boot_vm(ip="10.99.0.1/24", vhost_user_net=(VhostUserNet(sock),))
    c = q.console
    qmp = str(q.qmp_path)

    def table() -> list[int]:
        conns = fetch_status(str(ctl))["connections"]
        assert isinstance(conns, list) and len(conns) == 1
        return [int(r["guest_phys_addr"]) for r in conns[0]["memory"]]

    # The guest's virtio-net driver started the device: QMP now tells that the back-end
    # negotiated CONFIGURE_MEM_SLOTS, not its GET_MAX_MEM_SLOTS answer: the device's limit
    # is unknown, the planner assumes --region-limit (8) and says so.
    _, status = run_json("status", "--qmp", qmp)
    vu = status["vhost_user"]
    (dev,) = vu["devices"]
    assert dev["started"] and dev["configure_mem_slots"] is True, vu
    assert dev["region_limit"] is None and vu["region_limit"] == 8
    assert vu["region_limit_assumed"] is True
    assert any("GET_MAX_MEM_SLOTS" in n for n in vu["notes"])
    _, status = run_json("status", "--qmp", qmp, "--region-limit", "509")
    cap = 256 if status["vm"]["qemu_version"].startswith("7.") else 509
    assert status["vhost_user"]["region_limit"] == cap
    assert vu["regions_used"] == dev["qemu_region_count"] == len(table())

    # share=off memfd, forced past the planner: QEMU and the guest take it; QEMU even sends
    # the back-end its fd (it has one), but maps it MAP_PRIVATE itself, so what the guest
    # writes there never reaches the file the back-end maps.
    code, refused = run_json("add", "--qmp", qmp, "--size", "128M", "--id", "priv",
                             "--no-share")
    assert code == 1 and [r["code"] for r in refused["refusals"]] == [
        "NOT_SHARED_WITH_VHOST_USER"]
    before = c.meminfo()["MemTotal"]
    priv = add(q, "--id", "priv", "--no-share", "--force")["outcome"]["device"]["addr"]
    assert wait_memtotal(c, before + DIMM // KB) == before + DIMM // KB
    assert priv in table()
    # Movable allocations (tmpfs pages) go to ZONE_MOVABLE first: the only Movable memory
    # is this DIMM. Fill half of it with a pattern and compare the two views.
    c.check("mkdir -p /pat && mount -t tmpfs -o size=96m pat /pat && "
            "yes PYVHOSTPATTERN | head -c 67108864 > /pat/x")
    qemu_view = short_dir / "qemu-view"
    q.control.cmd("pmemsave", val=priv, size=DIMM, filename=str(qemu_view))
    assert b"PYVHOSTPATTERN" in qemu_view.read_bytes()
    qemu_view.unlink()
    # The back-end's view: the one 128 MiB memfd it holds (pyvhost keeps each region's fd).
    (held,) = _memfds_of(p.pid, DIMM)
    assert b"PYVHOSTPATTERN" not in held.read_bytes()

    # memory-backend-ram has no fd: the back-end is never told about it at all.
    before = c.meminfo()["MemTotal"]
    ram = add(q, "--id", "ram", "--backend", "ram", "--force")["outcome"]["device"]["addr"]
    assert wait_memtotal(c, before + DIMM // KB) == before + DIMM // KB
    assert ram not in table()

    # A share=on DIMM, as the planner wants it: in the back-end's table.
    good = add(q, "--id", "good")["outcome"]["device"]["addr"]
    assert good in table()
    _, status = run_json("status", "--qmp", qmp)
    assert status["vhost_user"]["regions_used"] == len(table()) == 3


def test_virtio_mem_resize_beside_vhost_user(boot_vm: BootVm, procs: Procs,
                                            short_dir: Path) -> None:
    """QEMU 7.2 runs a cold-plugged virtio-mem device beside a vhost-user NIC: the back-end
    gets the device's whole region once; resizing changes what the guest has plugged."""
    sock, ctl = short_dir / "vh.sock", short_dir / "vh.ctl"
    p = procs.pyvhost("net", "--socket", str(sock), "--reflect", "--control", str(ctl),
                      "--no-stats")
    wait_for_socket(sock, p.proc, timeout=60)
    wait_for_socket(ctl, p.proc, timeout=60)
    q = boot_vm(vhost_user_net=(VhostUserNet(sock),), virtio_mem=(VirtioMem("vmem0"),))
    c = q.console
    qmp = str(q.qmp_path)
    assert "virtio_mem" in c.transcript() and "failed: none" in c.transcript()
    before = c.meminfo()["MemTotal"]

    _, status = run_json("status", "--qmp", qmp)
    (vmem,) = status["memory_devices"]
    assert (vmem["type"], vmem["size"], vmem["requested_size"], vmem["max_size"]) == (
        "virtio-mem", 0, 0, 1 << 30)
    conn = fetch_status(str(ctl))["connections"]
    assert isinstance(conn, list)
    regions = {int(r["guest_phys_addr"]): int(r["memory_size"]) for r in conn[0]["memory"]}
    assert regions.get(vmem["addr"]) == 1 << 30  # the whole device, before any plug

    code, doc = run_json("resize", "--qmp", qmp, "vmem0", "--size", "3M")
    assert code == 1 and [r["code"] for r in doc["refusals"]] == ["SIZE_ALIGNMENT"]
    code, doc = run_json("resize", "--qmp", qmp, "vmem0", "--size", "2G")
    assert code == 1 and [r["code"] for r in doc["refusals"]] == ["VIRTIO_MEM_SIZE_EXCEEDED"]
    code, doc = run_json("remove", "--qmp", qmp, "vmem0")
    assert code == 1 and [r["code"] for r in doc["refusals"]] == ["BAD_REQUEST"]

    code, doc = run_json("resize", "--qmp", qmp, "vmem0", "--size", "256M", "--timeout", "120")
    assert code == 0, doc
    assert doc["outcome"]["device"]["size"] == 256 * MiB
    print(f"\nresize to 256M: {doc['outcome']['seconds']:.2f} s")
    assert wait_memtotal(c, before + 256 * MiB // KB) == before + 256 * MiB // KB

    code, doc = run_json("resize", "--qmp", qmp, "vmem0", "--size", "0", "--timeout", "120")
    assert code == 0, doc
    assert doc["outcome"]["device"]["size"] == 0
    print(f"resize to 0: {doc['outcome']['seconds']:.2f} s")
    assert wait_memtotal(c, before) == before
    # The back-end's table did not change: one region for the device, whatever its size.
    conn = fetch_status(str(ctl))["connections"]
    assert isinstance(conn, list)
    assert {int(r["guest_phys_addr"]): int(r["memory_size"])
            for r in conn[0]["memory"]} == regions


def test_resize_of_a_paused_guest_times_out(boot_vm: BootVm) -> None:
    q = boot_vm(virtio_mem=(VirtioMem("vmem0"),))
    q.control.cmd("stop")
    code, doc = run_json("resize", "--qmp", str(q.qmp_path), "vmem0", "--size", "128M",
                         "--timeout", "3")
    assert code == 4, doc
    assert any("paused" in n for n in doc["notes"])
    out = doc["outcome"]
    assert out["timed_out"] and out["device"]["requested-size"] == 128 * MiB
    assert out["device"]["size"] == 0
