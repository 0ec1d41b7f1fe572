"""A 2-vCPU Linux guest with two queue pairs on a ``pyvhost net --queue-pairs 2`` port.

With vhost-user the control virtqueue is QEMU's: the guest asks for two pairs over it and
QEMU turns the second pair on in the back-end with SET_VRING_ENABLE. The guest's driver
maps each vCPU to its own transmit queue (XPS), and the switch spreads flows over the
enabled receive queues by :func:`~pyvhost.switch.flow.flow_hash`. Pings pinned to each
vCPU, to several addresses behind a tap, must use both transmit queues and arrive on both
receive queues, with no loss.

Then a DIMM is hot-added and unplugged through the hotplug library. QEMU 7.2 sends each
ADD_MEM_REG and REM_MEM_REG once per queue pair (one vhost_dev per pair on the one
socket): the repeats must be acknowledged without a second mapping, and the port must
keep its single connection, its table exact and its traffic flowing.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest

from backend.rawclient import wait_until
from pyvhost.backend.control import fetch_status
from pyvhost.hotplug.execute import execute_add, execute_remove
from pyvhost.hotplug.host import read_host
from pyvhost.hotplug.plan import AddRequest, plan_add, plan_remove
from pyvhost.hotplug.qmp import Qmp
from pyvhost.hotplug.state import read_state
from pyvhost.switch.core import NET_HDR
from pyvhost.switch.flow import flow_hash
from pyvhost.units import MiB
from support.procs import Procs, wait_for_socket

from .conftest import BootGuest
from .memfds import NetNs, ip

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

GUEST_IP = "10.197.0.1"
GUEST_MAC = "52:54:00:00:97:01"
TAP_MAC = "02:00:00:00:97:02"
PAIRS = 2


def _reply_queue(src_ip: str) -> int:
    """The receive pair the switch picks for an ICMP echo reply from ``src_ip``."""
    frame = (bytes(NET_HDR) + bytes.fromhex(GUEST_MAC.replace(":", ""))
             + bytes.fromhex(TAP_MAC.replace(":", "")) + b"\x08\x00"
             + struct.pack("!BBHHHBBH4s4s", 0x45, 0, 84, 0, 0, 64, 1, 0,
                           bytes(map(int, src_ip.split("."))),
                           bytes(map(int, GUEST_IP.split(".")))))
    return flow_hash(frame) % PAIRS


def _addresses() -> list[str]:
    """Peer addresses whose replies land on each receive pair (at least two per pair)."""
    by_queue: dict[int, list[str]] = {}
    for host in range(2, 60):
        peer = f"10.197.0.{host}"
        by_queue.setdefault(_reply_queue(peer), []).append(peer)
    assert all(len(by_queue.get(q, [])) >= 2 for q in range(PAIRS)), by_queue
    return [peer for q in range(PAIRS) for peer in by_queue[q][:2]]



def _connection(ctl: Path) -> dict[str, Any]:
    conns = fetch_status(str(ctl))["connections"]
    assert isinstance(conns, list) and len(conns) == 1, conns
    conn = conns[0]
    assert isinstance(conn, dict)
    return conn


def _queues(ctl: Path) -> list[dict[str, Any]]:
    queues = _connection(ctl)["queues"]
    assert isinstance(queues, list)
    return queues


def _table(ctl: Path) -> list[int]:
    return [r["guest_phys_addr"] for r in _connection(ctl)["memory"]]


def test_two_queue_pairs_carry_traffic_both_ways(boot_guest: BootGuest, procs: Procs,
                                                 netns: NetNs) -> None:
    sockets = Path(tempfile.mkdtemp(prefix="pvmq-"))  # short: a socket path <= 107 bytes
    try:
        sock, ctl = sockets / "net.sock", sockets / "ctl.sock"
        tap, ns = netns.tap, netns.name
        sw = procs.pyvhost("net", "--socket", str(sock), "--queue-pairs", str(PAIRS),
                           "--tap", tap, "--control", str(ctl))
        wait_for_socket(ctl, sw.proc)
        peers = _addresses()
        ip("link", "set", tap, "netns", ns)
        ip("-n", ns, "link", "set", tap, "address", TAP_MAC)
        for peer in peers:
            ip("-n", ns, "addr", "add", f"{peer}/24", "dev", tap)
        ip("-n", ns, "link", "set", tap, "up")

        vm = boot_guest(ip=f"{GUEST_IP}/24", mac=GUEST_MAC, net_socket=sock,
                        queues=PAIRS, smp=2)
        c = vm.console
        # QEMU enabled every ring of both pairs once the guest asked for two pairs.
        try:
            wait_until(lambda: all(q["started"] and q["enabled"] for q in _queues(ctl)),
                       "both queue pairs started and enabled", timeout=120)
        except AssertionError as e:
            raise AssertionError(f"{e}: {_queues(ctl)}\n{sw.output()[-3000:]}") from e
        assert len(_queues(ctl)) == 2 * PAIRS
        assert c.check("cat /sys/class/net/eth0/queues/tx-1/xps_cpus").strip() != ""

        # Each vCPU pings every peer: vCPU n transmits on queue pair n (XPS).
        cmd = " & ".join(f"busybox taskset {1 << cpu} ping -c 10 -i 0.1 -W 5 {peer} "
                         f"> /tmp/ping.{cpu}.{peer}" for cpu in range(2) for peer in peers)
        code, out = c.run(f"{cmd} & wait; cat /tmp/ping.*", timeout=180)
        assert code == 0, out
        sent = out.count(" packets transmitted")
        assert sent == 2 * len(peers), out
        assert out.count("10 packets transmitted, 10 packets received") == sent, out

        queues = _queues(ctl)
        rx_used = [queues[2 * p]["used_idx"] for p in range(PAIRS)]
        tx_taken = [queues[2 * p + 1]["last_avail_idx"] for p in range(PAIRS)]
        print(f"receive queues used {rx_used}; transmit queues taken {tx_taken}")
        assert all(n > 0 for n in rx_used), queues
        assert all(n > 0 for n in tx_taken), queues
        assert all(q["broken"] is None for q in queues), queues

        # A DIMM in and out: ADD_MEM_REG and REM_MEM_REG arrive once per queue pair.
        name = _connection(ctl)["name"]
        assert _table(ctl) == [0]
        vm.qmp.close()  # a QMP monitor serves one client: the library takes it over
        with Qmp(str(vm.qemu.qmp_path), timeout=120) as qmp:
            plan = plan_add(AddRequest(size=128 * MiB, id="mq1"), read_state(qmp),
                            read_host())
            assert not plan.refused, plan.refusals
            added = execute_add(qmp, plan, timeout=120, ost_timeout=10)
            assert added.ok and added.device is not None, added
            gpa = int(added.device["addr"])
            wait_until(lambda: _table(ctl) == [0, gpa], "the DIMM in the table", timeout=60)
            code, out = c.ping(peers[0], count=3)
            assert code == 0, out
            removed = execute_remove(qmp, plan_remove("mq1", read_state(qmp)), timeout=180)
            assert removed.ok, removed
        wait_until(lambda: _table(ctl) == [0], "the DIMM out of the table", timeout=60)
        code, out = c.ping(peers[-1], count=3)
        assert code == 0, out
        conn = _connection(ctl)
        assert conn["name"] == name, "the port's connection was dropped and renewed"
        assert conn["counters"]["nacks"] == 0, conn["counters"]
        assert all(q["broken"] is None for q in conn["queues"]), conn["queues"]
        assert procs.stop(sw) == 0, sw.output()
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
