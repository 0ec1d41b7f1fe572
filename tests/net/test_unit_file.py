"""The systemd unit in docs/net-daemon.md: systemd accepts it, and its command line, run
the way the unit runs it (group kvm, umask 0007, NOTIFY_SOCKET), reaches READY=1 with
sockets QEMU's user can connect to."""

from __future__ import annotations

import grp
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import uuid
from pathlib import Path

import pytest

from pyvhost.tools.process import pyvhost_argv
from pyvhost.tools.procfs import unix_listening
from support.procs import Procs, need

from .conftest import TIMEOUT

DOC = Path(__file__).resolve().parents[2] / "docs" / "net-daemon.md"
UNIT_MARK = "# /etc/systemd/system/pyvhost-net.service"


def _unit() -> str:
    text = DOC.read_text()
    start = text.index(UNIT_MARK)
    return text[start:text.index("```", start)]


def _settings(unit: str) -> dict[str, str]:
    """Key=value of the unit, continuation lines joined (the last of a repeated key)."""
    joined = unit.replace("\\\n", " ")
    out = {}
    for line in joined.splitlines():
        key, sep, val = line.partition("=")
        if sep and not line.startswith(("#", "[")):
            out[key.strip()] = val.strip()
    return out


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    need("systemd-analyze", "systemd")
    executable = shutil.which("pyvhost") or shutil.which("python3")
    assert executable is not None
    unit = tmp_path / "pyvhost-net.service"
    unit.write_text(_unit().replace("/usr/local/bin/pyvhost", executable))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)
    # systemd-analyze exits 0 on settings it ignores; it names them on stderr.
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    settings = _settings(_unit())
    assert settings["Type"] == "notify" and settings["KillSignal"] == "SIGTERM"
    assert settings["RuntimeDirectory"] == "pyvhost"


def test_the_units_command_line_reaches_ready(procs: Procs, short_dir: Path) -> None:
    need("ip", "iproute2")
    need("setpriv", "util-linux")
    if os.geteuid() != 0:
        pytest.skip("the unit runs as root (taps), with Group=kvm")
    settings = _settings(_unit())
    group = settings["Group"]
    gid = grp.getgrnam(group).gr_gid
    umask = settings["UMask"]
    args = shlex.split(settings["ExecStart"])
    assert args[:2] == ["/usr/local/bin/pyvhost", "net"], args
    tap = f"pvu{uuid.uuid4().hex[:6]}"
    args = [a.replace("/run/pyvhost", str(short_dir)).replace("pv0", tap)
            .replace("127.0.0.1:9478", "127.0.0.1:0") for a in args[1:]]
    sockets = [Path(a) for a in args if a.startswith(str(short_dir))]
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    notify.bind(str(short_dir / "notify"))
    notify.settimeout(TIMEOUT)
    ns = f"pyvhost-unit-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=TIMEOUT)
    try:
        # The tap lives in a namespace of the test's own; every step execs the next, so
        # the pid is pyvhost's.
        argv = ["ip", "netns", "exec", ns, "setpriv", f"--regid={gid}", "--clear-groups",
                "sh", "-c", f'umask {umask} && exec "$@"', "sh", *pyvhost_argv(*args)]
        net = procs.start(argv, "net-unit", stop_signal=signal.SIGTERM,
                          env=dict(os.environ, NOTIFY_SOCKET=str(short_dir / "notify")))
        got = dict(line.split("=", 1) for line in notify.recv(4096).decode().splitlines())
        assert got["READY"] == "1" and got["MAINPID"] == str(net.pid), got
        table = f"/proc/{net.pid}/net/unix"  # the sockets of pyvhost's namespace
        for path in sockets:
            assert unix_listening(path, table=table), (path, net.output())
            st = path.stat()
            # QEMU's user (group kvm) may connect: a connect needs write permission.
            assert st.st_gid == gid and stat.S_IMODE(st.st_mode) == 0o770, (path, st)
        links = subprocess.run(["ip", "-n", ns, "-br", "link", "show", tap],
                               capture_output=True, text=True, timeout=TIMEOUT, check=False)
        assert links.returncode == 0 and "UP" in links.stdout, links
        assert procs.stop(net) == 0, net.output()
    finally:
        notify.close()
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=TIMEOUT)
