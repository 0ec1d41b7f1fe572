"""``pyvhost net --client``: pyvhost connects to front-ends that listen, and reconnects.

Against the real peer: two DPDK testpmd virtio_user front-ends in server mode
(``server=1``: testpmd listens and waits in EAL init until a back-end connects) run
``macswap`` through the switch, like :mod:`test_dpdk_switch`. pyvhost is then killed
(SIGKILL, and in another test stopped cleanly with SIGINT) and started again: it must
reconnect, DPDK must re-negotiate on the new connection (it does so without SET_OWNER, and
with SET_VRING_BASE 0 while its rings carry on), and frames must flow again. One
front-end is also restarted under a running pyvhost: the old connection's memory must be
unmapped and its fds closed. pyvhost may start before the front-ends exist.

In-process tests (a listening socket in the test, the server's loop driven by hand or
in a thread) check the retry schedule, the hang-up path and the clean-up.

Never ask a DPDK server-mode socket whether it accepts connections: testpmd takes the
first connection as its back-end. Tests wait for the socket file to appear instead.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from backend.conftest import socket_dir  # noqa: F401 - fixture
from backend.rawclient import TIMEOUT, RawClient, fd_count, maps_count
from pyvhost.backend import Server
from pyvhost.backend.control import fetch_status
from pyvhost.backend.server import ClientState
from pyvhost.devices.reflect import ReflectNet
from pyvhost.errors import LocalError
from pyvhost.protocol import messages as m
from pyvhost.protocol.constants import Request
from pyvhost.tools.procfs import count_fds, mappings
from support.memfd import MemfdRegion
from support.procs import Procs, Started, need, wait_for_socket
from support.testpmd import accumulated_stats

MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
#: Generous: two cores shared with other busy-polling testpmds and TCG guests.
SLOW = 120.0


# ---------------------------------------------------------------------------------------
# Helpers for the real peers
# ---------------------------------------------------------------------------------------

def _wait(predicate: Callable[[], bool], what: str, timeout: float = SLOW,
          dump: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{dump()}")
        time.sleep(0.2)


def _wait_socket_file(path: Path, p: Started) -> None:
    """The file appears when testpmd listens; connecting to test it would be taken as
    testpmd's back-end."""
    def there() -> bool:
        assert p.proc.poll() is None, p.output()[-3000:]
        try:
            return stat.S_ISSOCK(os.lstat(path).st_mode)
        except FileNotFoundError:
            return False

    _wait(there, f"{path} to be created", dump=lambda: p.output()[-3000:])


def _testpmd(procs: Procs, path: Path, mac: str, name: str, *extra: str,
             eal_args: tuple[str, ...] = ()) -> Started:
    """An interactive macswap testpmd whose virtio_user port listens on ``path``."""
    return procs.testpmd(f"net_virtio_user0,path={path},queues=1,server=1,mac={mac}",
                         "-i", "--forward-mode=macswap", *extra, name=name,
                         eal_args=eal_args)


def _pyvhost(procs: Procs, name: str, ctl: Path, *paths: Path) -> Started:
    args = ["-v", "net", "--client", "--reconnect", "0.5", "--control", str(ctl)]
    for path in paths:
        args += ["--socket", str(path)]
    sw = procs.pyvhost(*args, name=name)
    wait_for_socket(ctl, sw.proc)
    return sw


def _state(ctl: Path) -> dict[str, Any]:
    return fetch_status(str(ctl))


def _clients(ctl: Path) -> dict[str, dict[str, Any]]:
    return {Path(c["path"]).name: c for c in _state(ctl)["clients"]}


def _ports(ctl: Path) -> dict[str, dict[str, Any]]:
    """The switch's live ports by socket name (``a.sock#3`` -> ``a.sock``)."""
    return {str(p["name"]).split("#")[0]: p for p in _state(ctl)["switch"]["ports"]}


def _both_forwarding(ctl: Path, minimum: int = 1000) -> Callable[[], bool]:
    """True once each port's frames in and out of the switch have both grown by more than
    ``minimum`` since this was called."""
    before = {name: (p["rx_frames"], p["tx_frames"]) for name, p in _ports(ctl).items()}

    def check() -> bool:
        ports = _ports(ctl)
        return len(ports) == 2 and all(
            p["rx_frames"] - before.get(name, (0, 0))[0] > minimum
            and p["tx_frames"] - before.get(name, (0, 0))[1] > minimum
            for name, p in ports.items())
    return check


def _queues_ready(ctl: Path) -> bool:
    """Both connections have all their queues started and enabled, none broken."""
    conns = _state(ctl)["connections"]
    return len(conns) == 2 and all(
        q["started"] and q["enabled"] and q["broken"] is None
        for c in conns for q in c["queues"])


def _start_pair(procs: Procs, d: Path) -> tuple[Started, Started, Path, Path]:
    sock_a, sock_b = d / "a.sock", d / "b.sock"
    # B forwards on core 0 and A on core 1, as in test_dpdk_switch.
    b = _testpmd(procs, sock_b, MAC_B, "testpmd-b", eal_args=("--main-lcore", "1"))
    a = _testpmd(procs, sock_a, MAC_A, "testpmd-a", f"--eth-peer=0,{MAC_B}")
    return a, b, sock_a, sock_b


def _forwarding_pair(procs: Procs, d: Path, name: str) -> tuple[Started, Started, Started]:
    """testpmds A and B listening on ``d``/a.sock and b.sock, pyvhost ``name`` connected to
    both (control socket ``d``/ctl.sock), and frames going round through it."""
    a, b, sock_a, sock_b = _start_pair(procs, d)
    for p, path in ((a, sock_a), (b, sock_b)):
        _wait_socket_file(path, p)
    sw = _pyvhost(procs, name, d / "ctl.sock", sock_a, sock_b)
    _start_traffic(a, b)
    _wait(_both_forwarding(d / "ctl.sock"), "frames through both ports", dump=sw.output)
    return a, b, sw


def _start_traffic(a: Started, b: Started) -> None:
    for p in (a, b):
        p.wait_output("testpmd> ", timeout=SLOW)
    b.send("start")
    # 4 bursts of 32 frames go round: pyvhost holds at most one batch of 64 at a time, so
    # frames are still in the rings whenever it is killed.
    a.send("start tx_first 4")


def _stop_traffic(a: Started, b: Started) -> None:
    for p in (a, b):
        count = p.output().count("Accumulated forward statistics")
        p.send("stop")
        p.wait_output("Accumulated forward statistics", count + 1, timeout=SLOW)
    stats = accumulated_stats(a.output())
    # The switch counters (the callers wait for them) are the measure; here only that
    # testpmd saw frames too.
    assert stats.rx_packets > 0 and stats.tx_packets > 0, a.output()[-3000:]


def _quit(*ps: Started) -> None:
    for p in ps:
        p.send("quit")
    for p in ps:
        assert p.proc.wait(60) == 0, p.output()[-3000:]


def _memfd_inodes(pid: int) -> set[int]:
    """The files behind pyvhost's mappings of front-end memory (DPDK's memfds)."""
    return {mp.inode for mp in mappings(pid) if mp.path.startswith("/memfd:")}


# ---------------------------------------------------------------------------------------
# Real peers: DPDK testpmd in server mode
# ---------------------------------------------------------------------------------------

@pytest.mark.dpdk
@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
@pytest.mark.usefixtures("net_workers")
def test_pyvhost_restart_under_running_testpmds(procs: Procs, tmp_path: Path,
                                                kill: signal.Signals) -> None:
    a, b, sw = _forwarding_pair(procs, tmp_path, "pyvhost-1")
    sock_a, sock_b, ctl = tmp_path / "a.sock", tmp_path / "b.sock", tmp_path / "ctl.sock"
    clients = _clients(ctl)
    assert {c["state"] for c in clients.values()} == {"connected"}, clients
    assert all(c["connects"] == 1 for c in clients.values()), clients

    # Kill (or stop) pyvhost while the frames go round.
    os.kill(sw.pid, kill)
    code = sw.proc.wait(60)
    if kill == signal.SIGTERM:
        assert code == 0, sw.output()  # a service's normal stop
        assert "Traceback" not in sw.output(), sw.output()
        assert os.path.exists(sock_a) and os.path.exists(sock_b), \
            "a client must never unlink the front-end's socket"
    else:
        assert code == -signal.SIGKILL
    for p in (a, b):
        p.wait_output("virtio-user port 0 is down", timeout=SLOW)
        assert p.proc.poll() is None, p.output()[-3000:]

    sw2 = _pyvhost(procs, "pyvhost-2", ctl, sock_a, sock_b)
    for p in (a, b):
        p.wait_output("server mode virtio-user reconnection succeeds", timeout=SLOW)
    _wait(lambda: _queues_ready(ctl), "both ports' queues running again", dump=sw2.output)
    # DPDK carries on with its rings (SET_VRING_BASE 0 notwithstanding); pyvhost resumes
    # from their used rings.
    assert re.search(r"SET_VRING_BASE 0, but the used ring is at \d+: resuming there",
                     sw2.output()), sw2.output()
    # The frames that went round may be gone: while one port renegotiated, the other's
    # frames to it were dropped (port_down), as on a link that is down. So the loop is
    # started again, on the same rings, and must run as before.
    _stop_traffic(a, b)
    flowing = _both_forwarding(ctl)
    _start_traffic(a, b)
    _wait(flowing, "frames through both ports after the restart", dump=sw2.output)
    for port in _ports(ctl).values():
        # Nothing malformed or out of the rings on the way in: the rings are intact.
        assert port["rx_drops"] == {}, port
        assert set(port["tx_drops"]) <= {"port_down"}, port
    clients = _clients(ctl)
    assert {c["state"] for c in clients.values()} == {"connected"}, clients
    assert all(c["connects"] == 1 for c in clients.values()), clients
    _stop_traffic(a, b)
    _quit(a, b)
    # Both front-ends gone (testpmd removes its socket file at exit): pyvhost goes back
    # to waiting, one log line per port for the hang-up and one for the wait, however
    # many retries follow.
    _wait(lambda: {c["state"] for c in _clients(ctl).values()} == {"waiting"},
          "both ports waiting again", dump=sw2.output)
    _wait(lambda: all(c["failed_attempts"] >= 3 for c in _clients(ctl).values()),
          "several retries", dump=sw2.output)
    out = sw2.output()
    for path in (sock_a, sock_b):
        assert out.count(f"{path}: waiting for the front-end (socket does not exist") == 1
        assert len(re.findall(rf"{re.escape(str(path))}: \S+ lost: ", out)) == 1, out
    assert procs.stop(sw2) == 0, sw2.output()


@pytest.mark.dpdk
def test_pyvhost_before_the_front_ends(procs: Procs, tmp_path: Path) -> None:
    sock_a, sock_b, ctl = tmp_path / "a.sock", tmp_path / "b.sock", tmp_path / "ctl.sock"
    sw = _pyvhost(procs, "pyvhost", ctl, sock_a, sock_b)
    _wait(lambda: all(c["failed_attempts"] >= 3 for c in _clients(ctl).values()),
          "several connect attempts", dump=sw.output)
    clients = _clients(ctl)
    assert [c["state"] for c in clients.values()] == ["waiting", "waiting"], clients
    assert {c["reason"] for c in clients.values()} == {"socket does not exist yet"}
    assert all(c["connects"] == 0 and c["connection"] is None for c in clients.values())
    assert _state(ctl)["connections"] == []

    a, b, _, _ = _start_pair(procs, tmp_path)
    _start_traffic(a, b)
    _wait(_both_forwarding(ctl), "frames through both ports", dump=sw.output)
    clients = _clients(ctl)
    assert [c["state"] for c in clients.values()] == ["connected", "connected"], clients
    out = sw.output()
    for path in (sock_a, sock_b):
        # One line for the wait, however many attempts failed.
        assert out.count(f"{path}: waiting for the front-end (socket does not exist") == 1
        assert out.count(f"{path}: connected as ") == 1, out
    _stop_traffic(a, b)
    _quit(a, b)
    assert procs.stop(sw) == 0, sw.output()


@pytest.mark.dpdk
@pytest.mark.usefixtures("net_workers")
def test_front_end_restart_under_running_pyvhost(procs: Procs, tmp_path: Path) -> None:
    """testpmd A is restarted: pyvhost reconnects, with the old connection's memory
    unmapped and its fds closed, and B's port untouched meanwhile."""
    a, b, sw = _forwarding_pair(procs, tmp_path, "pyvhost")
    sock_a, ctl = tmp_path / "a.sock", tmp_path / "ctl.sock"
    _stop_traffic(a, b)
    # Settled (nothing moving): what pyvhost holds with both ports connected.
    fds_before = count_fds(sw.pid)
    memfds_before = _memfd_inodes(sw.pid)
    assert len(memfds_before) == 2, mappings(sw.pid)
    b_conn = _clients(ctl)["b.sock"]["connection"]

    _quit(a)
    _wait(lambda: _clients(ctl)["a.sock"]["state"] == "waiting", "a.sock waiting",
          dump=sw.output)
    # A's memory is unmapped as soon as its connection closed; B's is still there.
    memfds_between = _memfd_inodes(sw.pid)
    assert len(memfds_between) == 1 and memfds_between < memfds_before
    assert _clients(ctl)["b.sock"]["connection"] == b_conn
    # testpmd removes its socket file at exit; had it crashed, the file would stay, and a
    # new testpmd would refuse to bind it.
    assert not sock_a.exists()
    a2 = _testpmd(procs, sock_a, MAC_A, "testpmd-a2", f"--eth-peer=0,{MAC_B}")
    _wait(lambda: _clients(ctl)["a.sock"]["state"] == "connected", "a.sock reconnected",
          dump=sw.output)
    _start_traffic(a2, b)
    _wait(lambda: _ports(ctl).get("a.sock", {}).get("rx_frames", 0) > 1000,
          "frames from the new testpmd", dump=sw.output)
    _stop_traffic(a2, b)

    clients = _clients(ctl)
    assert clients["a.sock"]["connects"] == 2 and clients["b.sock"]["connects"] == 1
    assert clients["b.sock"]["connection"] == b_conn, "B's connection must not be touched"
    # The new A connection holds the same kinds of things the old one held: nothing of
    # the old one is left (its memfd mapping, its eventfds, its socket).
    memfds_after = _memfd_inodes(sw.pid)
    assert len(memfds_after) == 2
    assert memfds_before - memfds_after == memfds_before - memfds_between, \
        "the old front-end's memory is still mapped"
    assert count_fds(sw.pid) == fds_before
    # The old port left the switch; the new one joined.
    departed = [d["name"] for d in _state(ctl)["switch"]["departed"]]
    assert [n.split("#")[0] for n in departed] == ["a.sock"], departed
    _quit(a2, b)
    assert procs.stop(sw) == 0, sw.output()


@pytest.mark.qemu
def test_qemu_server_chardev(procs: Procs, tmp_path: Path) -> None:
    """QEMU 7.2 with ``-chardev socket,server=on``: it waits at start for pyvhost, and
    initialises its vhost-user netdev again on a new connection after pyvhost was killed.
    The guest stays paused (-S): no guest is needed to see the vhost-user session."""
    qemu = need("qemu-system-x86_64", "qemu-system-x86")
    sock, ctl = tmp_path / "vh.sock", tmp_path / "ctl.sock"
    vm = procs.start([qemu, "-accel", "tcg", "-S", "-display", "none", "-nodefaults",
                      "-machine", "q35,memory-backend=ram0",
                      "-object", "memory-backend-memfd,id=ram0,size=128M,share=on",
                      "-m", "128M",
                      "-chardev", f"socket,id=c0,path={sock},server=on",
                      "-netdev", "vhost-user,id=n0,chardev=c0",
                      "-device", "virtio-net-pci,netdev=n0,vectors=0"], "qemu")
    _wait_socket_file(sock, vm)

    def session_ready() -> bool:
        conns = _state(ctl)["connections"]
        # QEMU sends SET_OWNER on every connection (DPDK does not): owned, not implied.
        return len(conns) == 1 and conns[0]["phase"] == "owned" \
            and conns[0]["peer_pid"] == vm.pid

    sw = _pyvhost(procs, "pyvhost-1", ctl, sock)
    _wait(session_ready, "QEMU's vhost-user session", dump=sw.output)
    os.kill(sw.pid, signal.SIGKILL)
    sw.proc.wait(60)
    sw2 = _pyvhost(procs, "pyvhost-2", ctl, sock)
    _wait(session_ready, "QEMU's vhost-user session again", dump=sw2.output)
    assert _clients(ctl)["vh.sock"]["state"] == "connected"
    assert vm.proc.poll() is None, vm.output()
    assert procs.stop(sw2) == 0, sw2.output()


# ---------------------------------------------------------------------------------------
# In-process: the retry schedule, hang-ups and clean-up, with a listening socket here
# ---------------------------------------------------------------------------------------

class Listener:
    """A front-end's listening socket, made and removed by the test."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None

    def listen(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.bind(str(self.path))
        self.sock.listen(1)

    def accept(self) -> RawClient:
        assert self.sock is not None
        self.sock.settimeout(TIMEOUT)
        conn, _ = self.sock.accept()
        return RawClient(conn)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.path.unlink(missing_ok=True)


@pytest.fixture
def dialing(socket_dir: Path) -> Iterator[tuple[Server, list[ReflectNet], Listener]]:  # noqa: F811
    devices: list[ReflectNet] = []

    def factory() -> ReflectNet:
        devices.append(ReflectNet())
        return devices[-1]

    server = Server(factory)
    listener = Listener(socket_dir / "fe.sock")
    try:
        yield server, devices, listener
    finally:
        server.close()
        listener.close()


def _turn(server: Server, until: Callable[[], bool], what: str) -> None:
    """Run the loop on this thread until ``until()``."""
    deadline = time.monotonic() + TIMEOUT
    while not until():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        server.run_once(0.05)


def test_backoff_doubles_to_the_bound_and_logs_once(
        dialing: tuple[Server, list[ReflectNet], Listener],
        caplog: pytest.LogCaptureFixture) -> None:
    server, devices, listener = dialing
    caplog.set_level("DEBUG", logger="pyvhost.backend.server")
    client = server.connect(str(listener.path), first=0.01, max_interval=0.08)
    _turn(server, lambda: client.failures >= 6, "six failed attempts")
    assert client.state is ClientState.WAITING
    assert client.reason == "socket does not exist yet"
    # The schedule, not the clock: 0.01 doubling, bounded by 0.08.
    assert client.delay == 0.08
    assert client.timer is not None and not client.timer.cancelled
    waits = [r for r in caplog.records if "waiting for the front-end" in r.getMessage()]
    assert len(waits) == 1 and waits[0].levelname == "INFO"

    # A stale socket file: a different reason, logged once more.
    listener.listen()
    assert listener.sock is not None
    listener.sock.close()
    listener.sock = None
    _turn(server, lambda: client.reason == "nothing listens on the socket", "refusal")
    assert client.failures == 1  # counted afresh for the new reason
    waits = [r for r in caplog.records if "waiting for the front-end" in r.getMessage()]
    assert len(waits) == 2
    assert devices == [] and server.connections == []


def test_hang_up_gives_a_fresh_connection(
        dialing: tuple[Server, list[ReflectNet], Listener]) -> None:
    server, devices, listener = dialing
    listener.listen()
    baseline = fd_count()
    client = server.connect(str(listener.path), first=0.01, max_interval=0.05)
    _turn(server, lambda: client.state is ClientState.CONNECTED, "connected")
    fe = listener.accept()
    # DPDK's reconnect order: it stops its old device on the new socket before anything
    # else, and never sends SET_OWNER again. A client connection takes that.
    first = client.connection
    assert first is not None and len(devices) == 1
    fe.send(Request.SET_VRING_ENABLE, m.VringState(0, 0))
    fe.send(Request.GET_VRING_BASE, m.VringState(1, 0))
    _turn(server, lambda: first.counters["requests"] == 2, "two requests served")
    reply = fe.recv_reply(Request.GET_VRING_BASE, ack=False)
    assert reply.payload == m.VringState(1, 0)
    assert not first.closed
    # Guest memory for the first connection, to see it unmapped after the hang-up.
    name = f"reconnect-{uuid.uuid4().hex[:8]}"
    region = MemfdRegion(name, 1 << 20, 0)
    try:
        fe.send(Request.SET_MEM_TABLE, m.MemoryTable((region.region(),)), fds=[region.fd])
        _turn(server, lambda: first.counters["requests"] == 3, "SET_MEM_TABLE served")
        assert not first.closed, first.close_reason
        assert maps_count(name) == 2  # ours and the back-end's
    finally:
        region.close()
    assert client.describe()["state"] == "connected"

    fe.close()  # the front-end goes away
    _turn(server, lambda: client.state is ClientState.WAITING, "hang-up seen")
    assert client.reason == "hung up: front-end closed the connection"
    assert client.failures == 0 and client.connection is None
    # Nothing of the old connection is left: its mapping, its socket, its fds.
    assert first.closed and maps_count(name) == 0
    assert fd_count() == baseline
    _turn(server, lambda: client.connects == 2, "reconnected")
    second = client.connection
    assert second is not None and second is not first
    assert first.closed and first.close_reason == "front-end closed the connection"
    assert len(devices) == 2 and devices[0] is not devices[1]
    assert server.connections == [second]
    fe2 = listener.accept()
    fe2.send(Request.GET_FEATURES)
    _turn(server, lambda: second.counters["requests"] == 1, "GET_FEATURES served")
    reply = fe2.recv_reply(Request.GET_FEATURES, ack=False)
    assert reply.payload == m.U64(second.offered_features)
    fe2.close()


def test_close_cancels_retries_and_keeps_the_front_ends_socket(
        dialing: tuple[Server, list[ReflectNet], Listener]) -> None:
    server, _, listener = dialing
    listener.listen()
    client = server.connect(str(listener.path))
    _turn(server, lambda: client.state is ClientState.CONNECTED, "connected")
    fe = listener.accept()
    conn = client.connection
    assert conn is not None
    server.close()
    assert client.state is ClientState.STOPPED and conn.closed
    assert client.timer is None and server._timers == []
    assert listener.path.exists(), "the front-end's socket is not ours to remove"
    assert fe.wait_closed() == b""
    fe.close()


def test_connect_refuses_bad_paths(
        dialing: tuple[Server, list[ReflectNet], Listener]) -> None:
    server, _, listener = dialing
    with pytest.raises(LocalError, match="longer than"):
        server.connect("/" + "x" * 120)
    server.connect(str(listener.path))
    with pytest.raises(LocalError, match="given twice"):
        server.connect(str(listener.path))
    with pytest.raises(LocalError, match="client port"):
        server.listen(str(listener.path))
    with pytest.raises(LocalError, match="intervals"):
        server.connect(str(listener.path) + "2", first=2, max_interval=1)

