"""``--listen``: the probe listens and a client-mode back-end connects, as it does to QEMU's
``server=on`` chardev; with ``reconnect`` the back-end's next connection is probed too.

Against real client-mode back-ends: ``pyvhost net --client`` (both memory modes) and DPDK
22.11 testpmd's vhost PMD with ``client=1``. Both reconnect by themselves.
"""

from __future__ import annotations

import socket
import threading

import pytest

from pyvhost.frontend import FrontendConnectError, Listener, ProbeConfig, run_probe
from pyvhost.frontend.probe import ProbeReport
from support.procs import Procs


def _probe_in_thread(config: ProbeConfig) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def work() -> None:
        try:
            out.append(run_probe(config))
        except BaseException as e:  # handed to the test thread
            out.append(e)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t, out


def _report(thread: threading.Thread, out: list[object], info: str) -> ProbeReport:
    thread.join(180)
    assert not thread.is_alive(), f"the probe did not finish\n{info}"
    (result,) = out
    if isinstance(result, BaseException):
        raise AssertionError(info) from result
    assert isinstance(result, ProbeReport)
    return result


@pytest.mark.parametrize("mem_slots", [True, False], ids=["mem-slots", "set-mem-table"])
def test_listen_probes_pyvhost_net_client_and_its_reconnect(short_dir: str, procs: Procs,
                                                             mem_slots: bool) -> None:
    sock = f"{short_dir}/fe.sock"
    config = ProbeConfig(sock, cycles=5, regions=3, listen=True, reconnect=True,
                         accept_timeout=60, settle=0.1)
    thread, out = _probe_in_thread(config)
    args = ["net", "--client", "--socket", sock, "--reflect", "--reconnect", "0.2"]
    if not mem_slots:
        args.append("--no-mem-slots")
    net = procs.pyvhost(*args, name="pyvhost-net-client")
    report = _report(thread, out, net.output())
    info = f"{report.to_json()}\n{net.output()[-2000:]}"
    assert report.listen and report.pid == net.pid, info
    assert report.measured is not None and report.measured.how == "peer socket", info
    assert report.mem_slots == mem_slots, info
    assert report.peak.mappings == report.before.mappings + 3, info
    assert report.verdict == "no leak", info
    again = report.reconnect
    assert again is not None and again.pid == net.pid and not again.leak, info
    assert again.seconds < 60, info


def test_listen_probes_dpdk_client_mode(short_dir: str, procs: Procs) -> None:
    sock = f"{short_dir}/fe.sock"
    config = ProbeConfig(sock, cycles=5, regions=3, listen=True, reconnect=True,
                         accept_timeout=90)
    thread, out = _probe_in_thread(config)
    pmd = procs.testpmd(f"net_vhost0,iface={sock},client=1,queues=1", name="testpmd-client")
    report = _report(thread, out, pmd.output())
    info = f"{report.to_json()}\n{pmd.output()[-3000:]}"
    assert report.pid == pmd.pid and not report.mem_slots, info
    assert (report.before.matching_fds, report.peak.matching_fds) == (1, 4), info
    assert report.verdict == "no leak", info
    assert report.reconnect is not None and not report.reconnect.leak, info


def test_nobody_connects_is_a_connect_error(short_dir: str) -> None:
    with pytest.raises(FrontendConnectError, match="no back-end connected"):
        run_probe(ProbeConfig(f"{short_dir}/fe.sock", listen=True, accept_timeout=0.3))


def test_listener_refuses_a_live_socket_and_removes_a_stale_one(short_dir: str) -> None:
    path = f"{short_dir}/s.sock"
    with Listener(path), pytest.raises(FrontendConnectError, match="already listens"):
        Listener(path)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # a socket file nobody listens on
    with Listener(path) as again:
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        conn = again.accept(5)
        conn.close()
        client.close()
    with open(f"{short_dir}/file", "w") as f:
        f.write("x")
    with pytest.raises(FrontendConnectError, match="not a socket"):
        Listener(f"{short_dir}/file")
