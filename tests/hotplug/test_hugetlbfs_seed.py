"""The seed's scenario, as operators run it: a booted guest whose boot RAM and DIMMs are
``memory-backend-file`` on hugetlbfs with ``share=on``, its NIC served once by ``pyvhost
net`` and once by DPDK testpmd running on hugepages itself. DIMMs come through ``pyvhost
mem add --backend file --mem-path <hugetlbfs> --hugepages`` and through the seed's own
two HMP commands (``object_add memory-backend-file,...,share=on`` + ``device_add
pc-dimm``). After each, the back-end holds exactly one fd and one mapping per region (of
QEMU's files on that hugetlbfs), and the guest's MemTotal grew. ``mem status`` shows the
host's hugepages free and reserved.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from pyvhost.cli.mem import _print_status
from pyvhost.lab.qemu import VhostUserNet
from pyvhost.tools.procfs import measure
from pyvhost.units import MiB
from support.guestmem import wait_memtotal
from support.hugepages import PAGE, hugetlbfs
from support.procs import Procs, wait_for_socket

from .conftest import BootVm, run_json

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
KB = 1024
DIMM = 128 * MiB
BOOT = 256 * MiB


def _held(pid: int, needle: str, want: int, timeout: float = 60) -> tuple[int, int]:
    """The back-end's fds and mappings of QEMU's hugetlbfs files, once they are ``want``
    (or at the deadline: the assertion shows what it held)."""
    deadline = time.monotonic() + timeout
    while True:
        u = measure(pid, needle)
        if (u.matching_fds, u.mappings) == (want, want) or time.monotonic() > deadline:
            return u.matching_fds, u.mappings
        time.sleep(0.2)


def _pool(doc: dict[str, Any]) -> dict[str, Any]:
    pools: list[dict[str, Any]] = [p for p in doc["host"]["hugepages"]
                                   if p["node"] is None and p["page_size"] == PAGE]
    (pool,) = pools
    return pool


@pytest.fixture
def huge_mount() -> Iterator[Path]:
    """Requested first, so it is set up before and torn down after QEMU and the back-end
    (a hugetlbfs with files in use cannot be unmounted)."""
    # Boot RAM, two DIMMs, testpmd's -m 256, and slack (other processes take pages too).
    with hugetlbfs((BOOT + 2 * DIMM + 256 * MiB) // PAGE + 64) as mount:
        yield mount


@pytest.mark.parametrize("backend", ["pyvhost", pytest.param("dpdk", marks=pytest.mark.dpdk)])
def test_seed_scenario_on_hugetlbfs(huge_mount: Path, backend: str, boot_vm: BootVm,
                                    procs: Procs, short_dir: Path) -> None:
    mount = huge_mount
    qdir = mount / "qemu"
    qdir.mkdir()
    sock = short_dir / "vh.sock"
    if backend == "pyvhost":
        peer = procs.pyvhost("net", "--socket", str(sock), "--reflect", "--no-stats")
    else:
        peer = procs.testpmd(f"net_vhost0,iface={sock},queues=1", huge_dir=mount)
    wait_for_socket(sock, peer.proc, timeout=120)
    q = boot_vm(vhost_user_net=(VhostUserNet(sock),), ram_backend="file",
                ram_mem_path=qdir)
    c = q.console
    qmp = str(q.qmp_path)
    needle = f"{qdir}/"
    # Boot RAM on 2 MiB pages is one region (both q35 pieces round to the same pages,
    # pyvhost.hotplug.flatview): one fd, one mapping.
    assert _held(peer.pid, needle, 1) == (1, 1)

    code, status = run_json("status", "--qmp", qmp)
    assert code == 0 and status["problems"] == []
    (boot,) = status["backends"]
    assert (boot["type"], boot["share"], boot["page_size"]) == (
        "memory-backend-file", True, PAGE)
    assert status["vhost_user"]["regions_used"] == 1
    pool = _pool(status)
    assert pool["available"] == max(0, pool["free"] - pool["reserved"])
    out = io.StringIO()
    _print_status(status, Console(file=out, width=1000))
    assert (f"{pool['available']} available ({pool['free']} free, "
            f"{pool['reserved']} reserved)") in out.getvalue()

    mem_total = c.meminfo()["MemTotal"]
    # 1. pyvhost mem add on the same hugetlbfs.
    code, doc = run_json("add", "--qmp", qmp, "--size", "128M", "--backend", "file",
                         "--mem-path", str(qdir), "--hugepages", "--id", "d1")
    assert code == 0 and doc["outcome"]["ok"], doc
    assert doc["prediction"]["vhost_user_regions"] == 2
    print(f"\n{backend}: pyvhost mem add (hugetlbfs) {doc['outcome']['seconds']:.2f} s")
    mem_total += DIMM // KB
    assert wait_memtotal(c, mem_total) == mem_total
    assert _held(peer.pid, needle, 2) == (2, 2)

    # 2. The seed's own two HMP commands.
    for line in (f"object_add memory-backend-file,id=mem1,size=128M,mem-path={qdir},"
                 f"share=on", "device_add pc-dimm,id=dimm1,memdev=mem1"):
        said = q.control.cmd("human-monitor-command", **{"command-line": line})
        assert said == "", f"{line}: {said}"
    mem_total += DIMM // KB
    assert wait_memtotal(c, mem_total) == mem_total
    assert _held(peer.pid, needle, 3) == (3, 3)

    code, status = run_json("status", "--qmp", qmp)
    assert code == 0 and status["problems"] == []
    assert status["vhost_user"]["regions_used"] == 3
    assert {b["id"]: b["page_size"] for b in status["backends"]} == {
        "ram0": PAGE, "d1-mem": PAGE, "mem1": PAGE}
