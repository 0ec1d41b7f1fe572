"""Start QEMU 7.2 for tests and labs: its command line, its process, its QMP monitors.

Owns one QEMU process (started in its own session, ended by its pid, never by name) and
the run directory holding its sockets, which it removes on :meth:`Qemu.stop`. Guest
memory is memfd or anonymous memory owned by that process, so ending the process frees
it: nothing is left behind even when a test fails half-way.

QEMU gets two QMP monitors: ``control`` for this module (start-up, ``quit``) and
``qmp_path`` for the tool under test (``pyvhost mem --qmp``), because a QMP monitor
serves one client at a time.

It must not decide hot-plug policy (:mod:`pyvhost.hotplug`) nor build guest images.
Facts it follows (TESTBED.md): TCG only; ``vectors=0`` on vhost-user devices (QEMU 7.2 +
TCG + MSI-X crashes when the guest starts the device); qboot instead of SeaBIOS when a
kernel is booted; the vhost-user back-end must listen before QEMU starts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from qemu.qmp.legacy import QEMUMonitorProtocol

from pyvhost.errors import LocalError

QEMU_BINARY = "qemu-system-x86_64"
QBOOT = Path("/usr/share/qemu/qboot.rom")
MiB = 1 << 20
GiB = 1 << 30

RamBackend = Literal["memfd", "ram", "file"]


class QemuError(LocalError):
    """QEMU could not be started, or stopped answering."""


@dataclass(frozen=True)
class VhostUserNet:
    """A virtio-net-pci device served by a vhost-user back-end listening on ``socket``."""

    socket: Path
    id: str = "net0"


@dataclass(frozen=True)
class QemuConfig:
    """What the guest looks like. Sizes in bytes.

    ``slots=0`` gives ``-m SIZE`` alone: no memory hot-plug at all. With ``numa_nodes``
    > 0 boot RAM goes to node 0 (``-numa node,memdev=``) and the other nodes have no
    boot memory. ``ram_backend="file"`` puts boot RAM in ``ram_mem_path``.
    """

    memory: int = 256 * MiB
    slots: int = 8
    maxmem: int = 4 * GiB
    ram_backend: RamBackend = "memfd"
    ram_share: bool = True
    ram_mem_path: Path | None = None
    numa_nodes: int = 0
    vhost_user_net: tuple[VhostUserNet, ...] = ()
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    serial: Path | None = None
    paused: bool = True
    extra_args: tuple[str, ...] = ()


def _mib(size: int) -> str:
    if size % MiB:
        raise ValueError(f"{size} is not a whole number of MiB")
    return f"{size // MiB}M"


def command_line(config: QemuConfig, control: Path, qmp: Path,
                 binary: str = QEMU_BINARY) -> list[str]:
    """The argv that starts ``config`` with QMP monitors on ``control`` and ``qmp``."""
    argv = [binary, "-accel", "tcg", "-nodefaults", "-nographic",
            "-qmp", f"unix:{control},server=on,wait=off",
            "-qmp", f"unix:{qmp},server=on,wait=off"]
    backend = f"memory-backend-{config.ram_backend}"
    share = "on" if config.ram_share else "off"
    ram = f"{backend},id=ram0,size={_mib(config.memory)},share={share}"
    if config.ram_backend == "file":
        if config.ram_mem_path is None:
            raise ValueError("ram_backend='file' needs ram_mem_path")
        ram += f",mem-path={config.ram_mem_path}"
    argv += ["-object", ram]
    memory = _mib(config.memory)
    if config.slots:
        memory += f",slots={config.slots},maxmem={_mib(config.maxmem)}"
    argv += ["-m", memory]
    if config.numa_nodes:
        argv += ["-machine", "q35", "-numa", "node,nodeid=0,memdev=ram0"]
        for node in range(1, config.numa_nodes):
            argv += ["-numa", f"node,nodeid={node}"]
    else:
        argv += ["-machine", "q35,memory-backend=ram0"]
    for i, net in enumerate(config.vhost_user_net):
        argv += ["-chardev", f"socket,id=vhu{i},path={net.socket}",
                 "-netdev", f"vhost-user,id=vhun{i},chardev=vhu{i}",
                 "-device", f"virtio-net-pci,netdev=vhun{i},id={net.id},vectors=0"]
    if config.kernel is not None:
        argv += ["-bios", str(QBOOT), "-kernel", str(config.kernel)]
        if config.initrd is not None:
            argv += ["-initrd", str(config.initrd)]
        if config.append is not None:
            argv += ["-append", config.append]
    if config.serial is not None:
        argv += ["-serial", f"file:{config.serial}"]
    if config.paused:
        argv.append("-S")
    argv += list(config.extra_args)
    return argv


@dataclass
class Qemu:
    """One QEMU process. Use as a context manager, or call :meth:`start` and :meth:`stop`."""

    config: QemuConfig
    log: Path | None = None
    binary: str = QEMU_BINARY
    rundir: Path = field(init=False)
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _control: QEMUMonitorProtocol | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        # Short paths: a Unix socket path has at most 107 bytes, pytest's tmp_path can be longer.
        self.rundir = Path(tempfile.mkdtemp(prefix="pyvhost-qemu-"))

    @property
    def control_path(self) -> Path:
        return self.rundir / "control.sock"

    @property
    def qmp_path(self) -> Path:
        """The QMP monitor left free for the tool under test."""
        return self.rundir / "qmp.sock"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise QemuError("QEMU is not started")
        return self.proc.pid

    @property
    def control(self) -> QEMUMonitorProtocol:
        if self._control is None:
            raise QemuError("QEMU is not started")
        return self._control

    def argv(self) -> list[str]:
        return command_line(self.config, self.control_path, self.qmp_path, self.binary)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log is not None else ""

    def start(self, timeout: float = 60) -> Qemu:
        """Start QEMU and connect the control monitor; on any failure nothing is left."""
        if shutil.which(self.binary) is None:
            raise QemuError(f"{self.binary} not found (Debian package qemu-system-x86)")
        try:
            out = open(self.log, "wb") if self.log is not None else subprocess.DEVNULL  # noqa: SIM115
            try:
                self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT, start_new_session=True)
            finally:
                if not isinstance(out, int):
                    out.close()
            self._control = self._connect(self.control_path, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _connect(self, path: Path, timeout: float) -> QEMUMonitorProtocol:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise QemuError(f"QEMU exited with {self.proc.returncode} at start:\n"
                                + self.output()[-3000:])
            if path.exists():
                qmp = QEMUMonitorProtocol(str(path))
                try:
                    qmp.connect()
                except Exception:  # qemu.qmp's ConnectError, or OSError: not yet listening
                    pass
                else:
                    qmp.settimeout(timeout)
                    return qmp
            if time.monotonic() > deadline:
                raise QemuError(f"QEMU's QMP socket did not answer within {timeout} s")
            time.sleep(0.05)

    def stop(self, timeout: float = 20) -> None:
        """``quit`` through QMP, then SIGKILL by pid if needed; remove the run directory."""
        control, self._control = self._control, None
        if control is not None:
            with contextlib.suppress(Exception):
                control.settimeout(5)
                control.cmd_raw("quit")
            with contextlib.suppress(Exception):
                control.close()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        shutil.rmtree(self.rundir, ignore_errors=True)

    def __enter__(self) -> Qemu:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

