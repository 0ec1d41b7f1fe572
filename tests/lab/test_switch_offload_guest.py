"""A Linux guest (QEMU 7.2, TCG) on a ``pyvhost net`` switch port exchanges TCP data with
a network namespace behind a tap port of the same switch, with every offload on.

QEMU's virtio-net offers what the switch does (CSUM, GUEST_CSUM, HOST/GUEST_TSO4/6,
MRG_RXBUF), so the guest's driver sends TCP as GSO frames with NEEDS_CSUM and takes them;
the tap has TUN_F_CSUM|TSO4|TSO6. Frames larger than the MTU must cross the switch both
ways with their virtio-net header, and every byte must arrive (hashed at both ends).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from backend.rawclient import wait_until
from pyvhost.backend.control import fetch_status
from support.procs import Procs, wait_for_socket

from .conftest import BootGuest
from .memfds import NetNs

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

SIZE = 2 << 20
GUEST_IP, NS_IP = "10.198.0.1", "10.198.0.2"

_SERVER = """
import hashlib, socket, sys
size = int(sys.argv[1])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[2], 5001))
s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
h, n = hashlib.sha256(), 0
while n < size:
    b = c.recv(1 << 20)
    if not b:
        break
    h.update(b)
    n += len(b)
c.close()
print("got", n, h.hexdigest(), flush=True)
"""

_CLIENT = """
import random, socket, sys, time
data = random.Random(3).randbytes(int(sys.argv[1]))
for _ in range(600):
    try:
        c = socket.create_connection((sys.argv[2], 5002), timeout=5)
        break
    except OSError:
        time.sleep(0.2)
c.settimeout(300)
c.sendall(data)
c.close()
print("sent", flush=True)
"""



def test_guest_tcp_with_offloads_through_the_switch(boot_guest: BootGuest, procs: Procs,
                                                    netns: NetNs) -> None:
    import hashlib
    import random

    sockets = Path(tempfile.mkdtemp(prefix="pvoff-"))  # short: a socket path <= 107 bytes
    try:
        sock, ctl = sockets / "net.sock", sockets / "ctl.sock"
        sw = procs.pyvhost("net", "--socket", str(sock), "--tap", netns.tap,
                           "--control", str(ctl))
        wait_for_socket(ctl, sw.proc)
        netns.move_tap(f"{NS_IP}/24")

        vm = boot_guest(ip=f"{GUEST_IP}/24", mac="52:54:00:00:98:01", net_socket=sock)
        c = vm.console
        code, out = c.ping(NS_IP, count=2)
        assert code == 0, out + sw.output()

        # Guest -> namespace: the guest's TSO frames go out of the tap whole.
        server = procs.start(["ip", "netns", "exec", netns.name, sys.executable, "-c", _SERVER,
                              str(SIZE), NS_IP], "tcp-server")
        wait_until(lambda: "listening" in server.output(), "server listening", timeout=60)
        code, out = c.run(f"dd if=/dev/urandom of=/tmp/out bs=65536 count={SIZE >> 16} "
                          "2>/dev/null && sha256sum /tmp/out", timeout=120)
        assert code == 0, out
        sent_hash = out.split()[0]
        code, out = c.run(f"nc {NS_IP} 5001 < /tmp/out", timeout=300)
        wait_until(lambda: "got" in server.output(), "server done", timeout=120)
        assert server.output().split()[-2:] == [str(SIZE), sent_hash], server.output()

        # Namespace -> guest: the kernel's GSO frames from the tap reach the guest whole.
        client = procs.start(["ip", "netns", "exec", netns.name, sys.executable, "-c", _CLIENT,
                              str(SIZE), GUEST_IP], "tcp-client")
        code, out = c.run("nc -l -p 5002 > /tmp/in; wc -c < /tmp/in; sha256sum /tmp/in",
                          timeout=300)
        assert code == 0, out + client.output()
        expected = hashlib.sha256(random.Random(3).randbytes(SIZE)).hexdigest()
        assert out.split()[:2] == [str(SIZE), expected], out

        switch = fetch_status(str(ctl))["switch"]
        assert isinstance(switch, dict)
        ports = {p["kind"]: p for p in switch["ports"]}
        guest, host = ports["vhost-user"], ports["tap"]
        for p in (guest, host):
            assert p["rx_drops"] == {}, p
        # GSO frames both ways: on average far larger than an MTU-sized frame.
        assert guest["rx_bytes"] / guest["rx_frames"] > 1514, guest
        assert host["rx_bytes"] / host["rx_frames"] > 1514, host
        print(f"guest -> switch: {guest['rx_frames']} frames, "
              f"{guest['rx_bytes'] / guest['rx_frames']:.0f} bytes on average; tap -> switch: "
              f"{host['rx_frames']} frames, {host['rx_bytes'] / host['rx_frames']:.0f}")
        state = fetch_status(str(ctl))
        conns = state["connections"]
        assert isinstance(conns, list)
        devices = [conn["device"] for conn in conns]
        assert devices[0]["offloads"] == {"tx": "CSUM|TSO4|TSO6", "rx": "CSUM|TSO4|TSO6"}
        assert procs.stop(sw) == 0, sw.output()
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
