"""Start real peers (pyvhost itself, DPDK testpmd, QEMU) for tests, and end them by pid.

Every process is started in its own session and recorded; :meth:`Procs.close` ends only
those, first with the signal that lets them clean up, then SIGKILL, and waits for them.
DPDK's runtime directory (``/var/run/dpdk/<file-prefix>``) is removed after its process.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pyvhost.tools import procfs
from pyvhost.tools.process import end_process, pyvhost_argv

DPDK_RUNTIME = Path("/var/run/dpdk")


def need(binary: str, package: str) -> str:
    """The path of ``binary``, or skip the test saying which Debian package brings it."""
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} not installed (Debian package {package}); .ci/run installs it")
    return path


def settled_fd_count(pid: int, timeout: float = 30.0) -> int:
    """``pid``'s fd count once it has stayed the same for half a second. For a baseline
    taken right after :func:`wait_for_socket`: its probe is a connection the process
    closes on a later turn of its loop, so a count taken at once may still hold it (seen
    on a loaded machine: 17 before the guests, 16 after them)."""
    deadline = time.monotonic() + timeout
    last, since = procfs.count_fds(pid), time.monotonic()
    while time.monotonic() - since < 0.5:
        assert time.monotonic() < deadline, f"process {pid}'s fd count never settled"
        time.sleep(0.05)
        now = procfs.count_fds(pid)
        if now != last:
            last, since = now, time.monotonic()
    return last


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Wait until a Unix socket at ``path`` accepts connections (or the process died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before "
                               f"listening on {path}")
        if path.exists():
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(path))
                except OSError:
                    pass
                else:
                    return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {path} after {timeout} s")


@dataclass
class Started:
    proc: subprocess.Popen[bytes]
    log: Path
    stop_signal: int = signal.SIGTERM
    dpdk_prefix: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_output(self, text: str, count: int = 1, timeout: float = 90) -> None:
        """Until ``text`` has appeared ``count`` times in the output; fails at the deadline,
        or at once if the process exits first."""
        deadline = time.monotonic() + timeout
        while self.output().count(text) < count:
            assert self.proc.poll() is None, (f"pid {self.pid} exited with "
                                              f"{self.proc.returncode}:\n{self.output()[-3000:]}")
            assert time.monotonic() < deadline, (f"no {count}x {text!r} from pid {self.pid}:"
                                                 f"\n{self.output()[-3000:]}")
            time.sleep(0.2)

    def send(self, line: str) -> None:
        """One line on the process's stdin: a testpmd command ("" is Enter)."""
        assert self.proc.stdin is not None, "started without stdin_pipe"
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()


@dataclass
class Procs:
    """The processes one test started."""

    workdir: Path
    started: list[Started] = field(default_factory=list)

    def start(self, argv: Sequence[str], name: str, *, stdin_pipe: bool = False,
              stop_signal: int = signal.SIGTERM, dpdk_prefix: str | None = None,
              env: dict[str, str] | None = None) -> Started:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                                    start_new_session=True, env=env)
        s = Started(proc, log, stop_signal, dpdk_prefix)
        self.started.append(s)
        return s

    def pyvhost(self, *args: str, name: str = "pyvhost",
                env: dict[str, str] | None = None) -> Started:
        """``pyvhost ARGS`` with this interpreter (no reliance on PATH). ``pyvhost net``
        is stopped as a service is, with SIGTERM (exit 0); the other commands with
        SIGINT, as by Ctrl-C."""
        argv = pyvhost_argv(*args)
        command = next((a for a in args if not a.startswith("-")), None)
        stop = signal.SIGTERM if command == "net" else signal.SIGINT
        return self.start(argv, name, stop_signal=stop, env=env)

    def pyvhost_net(self, sock: Path, control: Path, *args: str) -> Started:
        """``pyvhost net --socket SOCK --control CONTROL ARGS``, once both sockets listen."""
        net = self.pyvhost("net", "--socket", str(sock), "--control", str(control), *args)
        wait_for_socket(sock, net.proc)
        wait_for_socket(control, net.proc)
        return net

    def testpmd(self, vdev: str, *app_args: str, name: str = "testpmd",
                stdin_pipe: bool = True, eal_args: Sequence[str] = (),
                huge_dir: Path | None = None) -> Started:
        """DPDK testpmd with no hugepages and no PCI (``--no-huge -m 512 --no-pci``: DPDK
        then backs its memory with a memfd), one forwarding core.
        ``eal_args`` go before ``--vdev`` (e.g. ``--main-lcore 1`` to forward on core 0).
        With ``huge_dir`` (a hugetlbfs mount) it runs on hugepages, with ``-m 256`` so it
        leaves pages for the VM (without ``-m`` it took 300+ 2 MiB pages)."""
        binary = need("dpdk-testpmd", "dpdk-dev")
        prefix = f"pyvhost-{name}-{uuid.uuid4().hex[:8]}"
        memory = (["--huge-dir", str(huge_dir), "-m", "256"] if huge_dir is not None
                  else ["--no-huge", "-m", "512"])
        # stdbuf: testpmd's stdout to a file is fully buffered, and tests wait for lines.
        argv = ["stdbuf", "-oL", binary, "-l", "0-1", *memory, "--no-pci",
                "--file-prefix", prefix, *eal_args, "--vdev", vdev, "--",
                "--nb-cores=1", "--total-num-mbufs=2048", *app_args]
        return self.start(argv, name, stdin_pipe=stdin_pipe, stop_signal=signal.SIGINT,
                          dpdk_prefix=prefix)

    def stop(self, s: Started, timeout: float = 15) -> int:
        """End one process: its stop signal, then SIGKILL. Returns its exit code."""
        end_process(s.proc, s.stop_signal, timeout)
        if s.proc.stdin is not None:
            with contextlib.suppress(OSError):
                s.proc.stdin.close()
        if s.dpdk_prefix:
            shutil.rmtree(DPDK_RUNTIME / s.dpdk_prefix, ignore_errors=True)
        return s.proc.returncode

    def close(self) -> None:
        for s in reversed(self.started):
            self.stop(s)
