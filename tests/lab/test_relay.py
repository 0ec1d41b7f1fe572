"""The timestamping relay (pyvhost.tools.relay) between pyvhost's own front-end and a real
``pyvhost net --reflect`` process: it forwards messages and fds unchanged, pairs each
memory-table request with the back-end's ack, can hide CONFIGURE_MEM_SLOTS, keeps no fd,
and ends a connection pair on a message it can not frame without harming the back-end."""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

import pytest

from pyvhost.frontend import Frontend, FrontendMemory
from pyvhost.frontend.memory import MiB
from pyvhost.protocol.constants import ProtocolFeature, Request
from pyvhost.tools.relay import Relay
from support.procs import Procs, Started, wait_for_socket

PF = ProtocolFeature



def _backend(procs: Procs, sock: Path) -> Started:
    p = procs.pyvhost("net", "--socket", str(sock), "--reflect", "--no-stats")
    wait_for_socket(sock, p.proc, timeout=60)
    return p


def _own_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("hide", [False, True], ids=["mem-slots", "hidden-mem-slots"])
def test_relay_times_memory_updates_and_keeps_no_fd(procs: Procs, short_dir: Path,
                                                    hide: bool) -> None:
    be_sock, relay_sock = short_dir / "be.sock", short_dir / "relay.sock"
    backend = _backend(procs, be_sock)
    relay = Relay(relay_sock, be_sock,
                  hide_protocol_features=int(PF.CONFIGURE_MEM_SLOTS) if hide else 0).start()
    try:
        with FrontendMemory() as mem, Frontend() as fe:
            fe.connect(relay_sock, timeout=10)
            fe.negotiate()
            assert fe.peer_pid is not None and fe.peer_pid == os.getpid()  # the relay
            assert fe.uses_mem_slots is (not hide)
            boot = mem.add_boot_ram(64 * MiB)
            dimm = mem.add_dimm(32 * MiB)
            fds_before = _own_fds()
            sent = fe.update_memory([boot])
            sent += fe.update_memory([boot, dimm])
            sent += fe.update_memory([boot])
            # The relay closed its copy of every fd it passed on.
            assert _own_fds() == fds_before
            updates = relay.wait_updates(len(sent), timeout=30)
            assert [u.name for u in updates] == sent
            if hide:
                assert sent == ["SET_MEM_TABLE"] * 3
            else:
                assert sent == ["ADD_MEM_REG", "ADD_MEM_REG", "REM_MEM_REG"]
            for u in updates:
                assert u.need_reply and u.ok, u
                assert u.backend_seconds is not None and u.backend_seconds >= 0
            # The regions and the files their fds referred to (REM_MEM_REG carries no fd).
            files = {r.guest_phys_addr: (os.fstat(r.fd).st_dev, os.fstat(r.fd).st_ino)
                     for r in (boot, dimm)}
            for u in updates:
                for region in u.regions:
                    want = None if u.request == Request.REM_MEM_REG else files[
                        region.guest_phys_addr]
                    assert region.file == want
            assert {r.guest_phys_addr for r in updates[1].regions} == (
                {dimm.guest_phys_addr} if not hide else {boot.guest_phys_addr,
                                                         dimm.guest_phys_addr})
            names = [e.name for e in relay.events()]
            assert names[:2] == ["GET_FEATURES", "GET_FEATURES"]  # request, then its reply
    finally:
        relay.stop()
    assert not relay_sock.exists()
    assert relay.errors() == []
    assert backend.proc.poll() is None


def test_relay_drops_a_connection_it_cannot_frame(procs: Procs, short_dir: Path) -> None:
    be_sock, relay_sock = short_dir / "be.sock", short_dir / "relay.sock"
    backend = _backend(procs, be_sock)
    with Relay(relay_sock, be_sock) as relay:
        fds_before = _own_fds()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(relay_sock))
            # GET_FEATURES with a 1 MiB payload size: more than any message may carry.
            s.sendall(struct.pack("<III", int(Request.GET_FEATURES), 1, 1 << 20))
            assert s.recv(16) == b""  # the relay closed the pair
        deadline = time.monotonic() + 30
        while not relay.errors() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any("payload size 1048576" in e for e in relay.errors()), relay.errors()
        # A well-behaved front-end still gets through, to the same back-end process.
        with Frontend() as fe:
            fe.connect(relay_sock, timeout=10)
            fe.negotiate()
    assert _own_fds() <= fds_before
    assert backend.proc.poll() is None
