"""A socket another back-end serves is left alone, and it is told without connecting:
a probing connect looks like a front-end to DPDK (it logs a new connection and sets up a
device for it). ``Server.listen`` reads /proc/net/unix instead."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from pyvhost.tools.procfs import unix_listening
from support.procs import Procs

from .conftest import TIMEOUT, start_net

NEW_CONNECTION = "new vhost user connection"


@pytest.mark.dpdk
def test_a_socket_dpdk_serves_is_refused_without_connecting_to_it(
        procs: Procs, short_dir: Path) -> None:
    path = short_dir / "vh.sock"
    pmd = procs.testpmd(f"net_vhost0,iface={path},queues=1", name="vhost")
    pmd.wait_output("Press enter to exit")
    deadline = time.monotonic() + TIMEOUT
    while not unix_listening(path):
        assert time.monotonic() < deadline, pmd.output()[-3000:]
        time.sleep(0.05)

    net = start_net(procs, "--socket", str(path), "--reflect")
    assert net.proc.wait(TIMEOUT) == 2, net.output()
    assert f"{path} is in use: another process listens on it" in net.output(), net.output()
    assert path.is_socket()
    assert NEW_CONNECTION not in pmd.output(), pmd.output()[-3000:]

    # The log would have shown a probe: a connect now appears in it (and testpmd still
    # serves its socket).
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        pmd.wait_output(NEW_CONNECTION)


def _table(tmp_path: Path, *rows: tuple[int, str]) -> str:
    """A /proc/net/unix in the kernel's format: (flags, path) rows."""
    lines = ["Num       RefCount Protocol Flags    Type St Inode Path"]
    for i, (flags, path) in enumerate(rows):
        lines.append(f"0000000000000000: 00000002 00000000 {flags:08X} 0001 01 {1000 + i} "
                     f"{path}")
    table = tmp_path / "unix"
    table.write_text("\n".join(lines) + "\n")
    return str(table)


def test_unix_listening_reads_the_kernel_table(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    listening, bound_only = 0x10000, 0
    table = _table(tmp_path, (listening, "/run/a.sock"), (bound_only, "/run/b.sock"),
                   (listening, "@abstract"), (listening, "rel/c.sock"),
                   (listening, "/run/with space.sock"))
    assert unix_listening("/run/a.sock", table=table)
    assert unix_listening("/run/../run/a.sock", table=table)
    assert not unix_listening("/run/b.sock", table=table)  # bound, not listening: stale
    assert not unix_listening("/run/abstract", table=table)
    # A relative path bound elsewhere can not be resolved: it counts where it could be.
    assert unix_listening("/srv/rel/c.sock", table=table)
    assert not unix_listening("/srv/c.sock", table=table)
    assert unix_listening("/run/with space.sock", table=table)
    monkeypatch.chdir("/run")
    assert unix_listening("a.sock", table=table)


def test_unix_listening_sees_a_real_listener(short_dir: Path) -> None:
    path = short_dir / "real.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
        assert not unix_listening(path)
        s.listen(1)
        assert unix_listening(path)
        assert unix_listening(os.path.relpath(path))
    assert not unix_listening(path)
