"""The same migration on DPDK 22.11 (testpmd's net_vhost, which logs dirty pages): the C
reference beside pyvhost's own test (test_migrate_qemu). A guest with a hot-added DIMM, on
port 0 of testpmd in ``io`` mode, receives a TCP stream from a guest on port 1 during the
migration; its destination connects to the same vhost-user socket (DPDK's server takes
several front-ends on one socket and binds port 0 to the device that starts last).

It checks what ``pyvhost mem migrate`` sees of a C back-end (the preflight passes: DPDK
offers VHOST_F_LOG_ALL and PROTOCOL_F_LOG_SHMFD), that the migration completes, that the
stream arrives intact in the migrated guest, and that DPDK survives; durations printed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pyvhost.lab.guest import GuestConsole
from pyvhost.lab.qemu import Qemu, VhostUserNet
from pyvhost.lab.traffic import Stream
from support.procs import Procs, wait_for_socket

from .conftest import BootVm, run_json
from .test_migrate_qemu import (
    MAC_A,
    MAC_B,
    add_dimm_in_kernel_zone,
    destinations,  # noqa: F401 - fixture
    migrate_args,
    start_destination,
    valid,
)

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def test_migration_of_a_guest_on_dpdk(boot_vm: BootVm, procs: Procs, short_dir: Path,
                                      tmp_path: Path, destinations: list[Qemu]) -> None:  # noqa: F811
    a_sock, b_sock = short_dir / "a.sock", short_dir / "b.sock"
    pmd = procs.testpmd(f"net_vhost0,iface={a_sock},queues=1", "--forward-mode=io",
                        eal_args=("--vdev", f"net_vhost1,iface={b_sock},queues=1"))
    wait_for_socket(a_sock, pmd.proc, timeout=60)
    wait_for_socket(b_sock, pmd.proc, timeout=60)
    a = boot_vm(ip="10.92.0.1/24", channel="virtio",
                vhost_user_net=(VhostUserNet(a_sock, mac=MAC_A),))
    b = boot_vm(ip="10.92.0.2/24", channel="virtio",
                vhost_user_net=(VhostUserNet(b_sock, mac=MAC_B),))
    code, out = b.console.ping("10.92.0.1", count=3)
    assert code == 0, out + pmd.output()[-2000:]
    add_dimm_in_kernel_zone(a, "d1")
    stream = Stream(b.console, a.console, "10.92.0.1")
    stream.start()
    time.sleep(5)
    dest = start_destination(a, a_sock, MAC_A, migrate_args(a), tmp_path / "dest.log",
                             destinations)
    stream.pause_receiver()
    code, doc = run_json("migrate", "--qmp", str(a.qmp_path), "--to", str(dest.qmp_path),
                         "--uri", f"unix:{short_dir}/mig.sock", "--timeout", "300")
    assert code == 0, doc
    o = valid(doc)["outcome"]
    assert o["ok"] and o["destination_state"] == "running", doc
    print(f"\nDPDK 22.11: QEMU total {o['total_time']:.3f} s, downtime "
          f"{o['downtime'] * 1000:.0f} ms, {o['transferred'] >> 20} MiB in "
          f"{o['dirty_sync_count']} dirty syncs")
    a.stop()
    console = GuestConsole.connect(dest.console_path, name="dest", log=tmp_path / "dest.con")
    try:
        stream.resume_receiver(console)
        result = stream.finish(console)
        print(f"stream: {result.received} bytes, {'intact' if result.intact else 'CORRUPTED'}")
        assert result.intact, result
        code, out = console.ping("10.92.0.2", count=3)
        assert code == 0, out
    finally:
        console.close()
    assert pmd.proc.poll() is None, pmd.output()[-3000:]
