"""The test guest booted under real QEMU 7.2 (TCG): ready marker, commands, hot-add, hog, eth0.

Timeouts are generous and no test asserts a duration: other engineers run QEMU and DPDK on the
same two cores.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from pyvhost.lab.guest import GuestTimeoutError
from support.procs import Procs, wait_for_socket

from .conftest import BootGuest

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

MIB_KB = 1024  # /proc/meminfo counts kB



def test_guest_boots_and_answers_commands(boot_guest: BootGuest) -> None:
    vm = boot_guest()
    c = vm.console
    assert "PYVHOST-MODULES" in c.transcript()
    assert "failed: none" in c.transcript(), c.transcript()
    assert "PYVHOST-NET none" in c.transcript()  # no NIC on this guest

    code, out = c.run("cat /proc/meminfo")
    assert code == 0
    assert out.startswith("MemTotal:")
    assert c.meminfo()["MemTotal"] > 100 * MIB_KB

    assert c.run("echo -n no-newline") == (0, "no-newline")
    assert c.run("printf 'a\\nb\\n'") == (0, "a\nb\n")
    assert c.run("echo oops >&2; exit 3") == (3, "oops\n")
    assert c.run("echo \"$((6 * 7))\" '|&;<>' \\$HOME") == (0, "42 |&;<> $HOME\n")

    size, blocks = c.memory_blocks()
    assert size == 128 << 20  # Linux x86-64 onlines memory in 128 MiB blocks
    assert blocks and all(b.online for b in blocks)


def test_a_command_that_hangs_times_out_and_the_channel_recovers(
        boot_guest: BootGuest) -> None:
    c = boot_guest().console
    with pytest.raises(GuestTimeoutError, match="sleep 600") as info:
        c.run("sleep 600", timeout=2)
    assert "last console lines" in str(info.value)
    # The guest kills the command a few seconds later; the next one is answered, and the
    # late END of the killed one is not taken for it.
    assert c.run("echo after", timeout=120) == (0, "after\n")


def test_a_burst_of_commands_over_the_uart_gets_every_answer_once(
        boot_guest: BootGuest) -> None:
    """Commands back to back on the emulated UART (the serial channel): there, lines sent
    to the guest were seen losing their first bytes (once every 30 to 150 commands on a
    busy host; the guest then answered under a garbled id and the console, before it
    resent, waited until the command's timeout). Every command must be answered, with its
    own answer, and run once: each one appends to a file and returns its line count."""
    c = boot_guest().console  # channel="serial"
    for i in range(1, 201):
        assert c.run("echo x >>/tmp/burst; wc -l </tmp/burst", timeout=60) == (0, f"{i}\n")
    # Resends, if any, are in c.resends and in this test's warnings (conftest.py).


def test_dimm_hot_add_grows_memtotal_and_the_memory_is_usable(
        boot_guest: BootGuest) -> None:
    vm = boot_guest()
    c = vm.console
    before = c.meminfo()
    _, blocks_before = c.memory_blocks()

    vm.qmp.cmd("object-add", **{"qom-type": "memory-backend-memfd", "id": "mem1",
                                "size": 128 << 20, "share": True})
    vm.qmp.cmd("device_add", driver="pc-dimm", id="dimm1", memdev="mem1")

    total, _ = c.wait_mem_total(lambda kb: kb > before["MemTotal"] + 120 * MIB_KB)
    assert total >= before["MemTotal"] + 128 * MIB_KB, c.transcript()
    _, blocks_after = c.memory_blocks()
    new = [b for b in blocks_after if b.index not in {o.index for o in blocks_before}]
    assert len(new) == 1 and new[0].online, blocks_after
    assert new[0].zones == ("Movable",)  # memhp_default_state=online_movable

    # The block can be taken offline and brought back in the kernel's own zone (where
    # unmovable allocations such as socket buffers may go).
    c.offline_block(new[0].index)
    _, blocks = c.memory_blocks()
    offline = next(b for b in blocks if b.index == new[0].index)
    assert not offline.online and offline.state == "offline"
    assert c.meminfo()["MemTotal"] < total
    c.online_block(new[0].index, "online_kernel")
    _, blocks = c.memory_blocks()
    assert next(b for b in blocks if b.index == new[0].index).zones == ("Normal",)
    assert c.meminfo()["MemTotal"] == total

    # More than the boot RAM ever had free fits now: the hot-added memory is really used.
    want_mib = before["MemFree"] // MIB_KB + 32
    c.hog(want_mib)
    after = c.meminfo()
    assert after["Shmem"] >= want_mib * MIB_KB
    assert after["MemFree"] < total - want_mib * MIB_KB
    c.unhog()


def test_memory_hog_takes_and_gives_back_memory(boot_guest: BootGuest) -> None:
    c = boot_guest().console
    free0 = c.meminfo()["MemFree"]
    c.hog(32)
    c.hog(32)
    hogged = c.meminfo()
    free1 = hogged["MemFree"]
    assert free1 < free0 - 60 * MIB_KB
    assert hogged["Shmem"] >= 64 * MIB_KB
    c.unhog()
    free2 = c.meminfo()["MemFree"]
    assert free2 > free1 + 60 * MIB_KB


def test_virtio_serial_channel(boot_guest: BootGuest) -> None:
    vm = boot_guest(channel="virtio")
    c = vm.console
    assert "channel=/dev/vport" in c.transcript()
    code, out = c.run("cat /sys/class/virtio-ports/*/name")
    assert (code, out) == (0, "pyvhost.0\n")
    assert c.meminfo()["MemTotal"] > 100 * MIB_KB


def test_eth0_comes_up_through_pyvhost_net(boot_guest: BootGuest, procs: Procs) -> None:
    sockets = Path(tempfile.mkdtemp(prefix="pvnet-"))  # short: a socket path has <= 107 bytes
    try:
        net_socket = sockets / "net.sock"
        reflector = procs.pyvhost("net", "--socket", str(net_socket), "--reflect")
        wait_for_socket(net_socket, reflector.proc)

        vm = boot_guest(ip="10.99.0.1/24", mac="52:54:00:00:99:01", net_socket=net_socket)
        c = vm.console
        assert "PYVHOST-NET eth0 52:54:00:00:99:01 10.99.0.1/24" in c.transcript()
        addr = c.ip_addr("eth0")
        assert "inet 10.99.0.1/24" in addr
        assert ",UP" in addr, addr
        # The reflector swaps MACs, so the guest's ARP requests come back to itself: no
        # answer, but frames go through pyvhost both ways.
        code, _ = c.ping("10.99.0.2", count=3)
        assert code != 0

        assert procs.stop(reflector) == 0, reflector.output()
        stats = json.loads(reflector.output().strip().splitlines()[-1])
        assert stats["connections"] >= 1
        assert stats["stats"]["tx_frames"] > 0 and stats["stats"]["rx_frames"] > 0, stats
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
