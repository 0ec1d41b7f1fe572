"""Start QEMU for tests and labs: its command line, its process, its QMP monitors.

Which QEMU: Debian 12's 7.2 (``qemu-system-x86_64`` on PATH) unless ``PYVHOST_QEMU``
names another binary, such as QEMU 10.0 unpacked from bookworm-backports into a private
prefix (``PREFIX/usr/bin/qemu-system-x86_64``): its firmware then comes from
``PREFIX/usr/share/qemu`` first and Debian's SeaBIOS second (``-L``), qboot included.

Owns one QEMU process (started in its own session, ended by its pid, never by name) and
the run directory holding its sockets, which it removes on :meth:`Qemu.stop`. Guest
memory is memfd or anonymous memory owned by that process, so ending the process frees
it: nothing is left behind even when a test fails half-way.

QEMU gets two QMP monitors: ``control`` for this module (start-up, ``cont``, ``quit``)
and ``qmp_path`` for the tool under test (``pyvhost mem --qmp``), because a QMP monitor
serves one client at a time.

Booting the test guest (:func:`guest_config`, :meth:`Qemu.boot`): the image's kernel and
initramfs with qboot, the guest's command channel on a chardev Unix socket in the run
directory (``-serial chardev:`` or a virtio-serial port), started paused so the
:class:`~pyvhost.lab.guest.GuestConsole` is connected before the guest prints anything,
then ``cont`` and a wait for ``/init``'s ready marker.

It must not decide hot-plug policy (:mod:`pyvhost.hotplug`), build guest images
(:mod:`.image`) or speak the guest's command protocol (:mod:`.guest`).
Facts it follows (measured on the project's test machines): TCG unless asked for KVM
(:mod:`.accel` asks only where a guest really boots with it); ``vectors=0`` on vhost-user
devices (QEMU 7.2 + TCG + MSI-X crashes when the guest starts the device); qboot instead
of SeaBIOS when a kernel is booted; the vhost-user back-end must listen before QEMU starts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from qemu.qmp.legacy import QEMUMonitorProtocol

from pyvhost.errors import LocalError
from pyvhost.tools.process import end_process
from pyvhost.units import GiB, MiB, qemu_size

from .guest import GuestConsole, GuestError
from .image import GuestImage

QEMU_BINARY = "qemu-system-x86_64"
#: Names the QEMU binary tests and labs start instead of the one on PATH.
QEMU_ENV = "PYVHOST_QEMU"
QBOOT = Path("/usr/share/qemu/qboot.rom")
SEABIOS_DIR = Path("/usr/share/seabios")
BOOT_TIMEOUT = 300  # seconds to the ready marker: TCG on a busy 2-core machine
VIRTIO_PORT = "pyvhost.0"  # the virtio-serial port's name (pyvhost.channel=port:NAME)

RamBackend = Literal["memfd", "ram", "file"]
Channel = Literal["serial", "virtio"]
#: TCG everywhere the lab has run; KVM where a guest really boots with it (:mod:`.accel`
#: decides). Under KVM the CPU model stays QEMU's default: ``-cpu host`` aborted QEMU
#: on a nested KVM layer (MSR 0x10a, on the project's test machines).
Accel = Literal["tcg", "kvm"]


class QemuError(LocalError):
    """QEMU could not be started, or stopped answering."""


@dataclass(frozen=True)
class VhostUserNet:
    """A virtio-net-pci device served by a vhost-user back-end listening on ``socket``."""

    socket: Path
    id: str = "net0"
    mac: str | None = None
    #: Queue pairs (``-netdev vhost-user,queues=N`` and ``mq=on``); the back-end must
    #: offer the MQ protocol feature and answer GET_QUEUE_NUM >= N.
    queues: int = 1


@dataclass(frozen=True)
class VirtioMem:
    """A virtio-mem-pci device, cold-plugged, on a memfd backend ``ID-mem`` of ``max_size``.

    ``requested_size`` is what the guest is asked to plug at start (resized later with
    ``qom-set requested-size``). The backend is shared (``share=on``) unless ``share`` is
    False, so that vhost-user back-ends can map it.
    """

    id: str = "vmem0"
    max_size: int = 1 * GiB
    requested_size: int = 0
    share: bool = True


@dataclass(frozen=True)
class QemuConfig:
    """What the guest looks like. Sizes in bytes.

    ``slots=0`` gives ``-m SIZE`` alone: no memory hot-plug at all. With ``numa_nodes``
    > 0 boot RAM goes to node 0 (``-numa node,memdev=``) and the other nodes have no
    boot memory. ``ram_backend="file"`` puts boot RAM in ``ram_mem_path``.

    ``console`` puts the guest's command channel on a chardev socket in the run directory
    (:attr:`Qemu.console_path`): ``"serial"`` on the first UART (ttyS0), ``"virtio"`` on a
    virtio-serial port named :data:`VIRTIO_PORT`. ``serial`` (a file) is for a guest
    whose serial output is only kept, not talked to.
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
    console: Channel | None = None
    virtio_mem: tuple[VirtioMem, ...] = ()
    paused: bool = True
    accel: Accel = "tcg"
    smp: int = 1
    extra_args: tuple[str, ...] = ()


def guest_config(image: GuestImage, *, ip: str | None = None, channel: Channel = "serial",
                 cmdline_extra: tuple[str, ...] = (), **config: Any) -> QemuConfig:
    """A :class:`QemuConfig` that boots ``image`` with its command channel on ``channel``.

    ``"serial"`` (the default) also carries the kernel's and /init's boot messages, which
    tests read; under heavy load, command lines sent over the emulated UART were seen
    arriving with their first bytes missing, so ``pyvhost lab`` uses ``"virtio"``.

    ``ip`` is eth0's address (``10.99.0.1/24``); eth0's MAC is the first vhost-user NIC's
    ``mac``, if set. Other keyword arguments are :class:`QemuConfig` fields.
    """
    nets: tuple[VhostUserNet, ...] = config.get("vhost_user_net", ())
    mac = nets[0].mac if nets else None
    append = image.cmdline(ip=ip, mac=mac,
                           channel=f"port:{VIRTIO_PORT}" if channel == "virtio" else None,
                           extra=cmdline_extra)
    return QemuConfig(kernel=image.kernel, initrd=image.initrd, append=append,
                      console=channel, paused=True, **config)


def qemu_binary() -> str:
    """The QEMU binary to start: ``$PYVHOST_QEMU``, else ``qemu-system-x86_64``."""
    return os.environ.get(QEMU_ENV) or QEMU_BINARY


def firmware_dirs(binary: str) -> tuple[Path, ...]:
    """``-L`` directories for a QEMU unpacked into a private prefix (``PREFIX/usr/bin/
    qemu-system-x86_64``): its own data directory, then Debian's SeaBIOS. None for a QEMU
    installed in ``/usr``, which finds its firmware itself."""
    exe = Path(binary)
    if not exe.is_absolute() or exe.parent != exe.parents[1] / "bin":
        return ()
    prefix = exe.parents[1]  # PREFIX/usr
    data = prefix / "share" / "qemu"
    if prefix == Path("/usr") or not data.is_dir():
        return ()
    return (data, SEABIOS_DIR)


def qboot_path(binary: str) -> Path:
    """qboot of that QEMU: its prefix's copy when it has one, else Debian's."""
    for d in firmware_dirs(binary):
        if (d / "qboot.rom").is_file():
            return d / "qboot.rom"
    return QBOOT


def qemu_version(binary: str) -> tuple[int, int, int]:
    """``binary --version`` as (major, minor, micro)."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise QemuError(f"{binary} --version failed: {e}") from e
    words = out.split()
    try:
        major, minor, micro = (int(x) for x in words[words.index("version") + 1]
                               .split("(")[0].split(".")[:3])
    except (ValueError, IndexError) as e:
        raise QemuError(f"{binary} --version said {out[:200]!r}") from e
    return (major, minor, micro)


def command_line(config: QemuConfig, control: Path, qmp: Path,
                 binary: str | None = None, console: Path | None = None) -> list[str]:
    """The argv that starts ``config`` with QMP monitors on ``control`` and ``qmp``, and
    the guest's command channel (``config.console``) listening on ``console``.
    ``binary`` defaults to :func:`qemu_binary`."""
    binary = binary or qemu_binary()
    argv = [binary]
    for d in firmware_dirs(binary):
        argv += ["-L", str(d)]
    argv += ["-accel", config.accel, "-nodefaults", "-nographic",
            "-qmp", f"unix:{control},server=on,wait=off",
            "-qmp", f"unix:{qmp},server=on,wait=off"]
    backend = f"memory-backend-{config.ram_backend}"
    share = "on" if config.ram_share else "off"
    ram = f"{backend},id=ram0,size={qemu_size(config.memory)},share={share}"
    if config.ram_backend == "file":
        if config.ram_mem_path is None:
            raise ValueError("ram_backend='file' needs ram_mem_path")
        ram += f",mem-path={config.ram_mem_path}"
    argv += ["-object", ram]
    memory = qemu_size(config.memory)
    if config.slots:
        memory += f",slots={config.slots},maxmem={qemu_size(config.maxmem)}"
    argv += ["-m", memory]
    if config.smp > 1:
        argv += ["-smp", str(config.smp)]
    if config.numa_nodes:
        argv += ["-machine", "q35", "-numa", "node,nodeid=0,memdev=ram0"]
        for node in range(1, config.numa_nodes):
            argv += ["-numa", f"node,nodeid={node}"]
    else:
        argv += ["-machine", "q35,memory-backend=ram0"]
    for i, net in enumerate(config.vhost_user_net):
        mq = f",queues={net.queues}" if net.queues > 1 else ""
        argv += ["-chardev", f"socket,id=vhu{i},path={net.socket}",
                 "-netdev", f"vhost-user,id=vhun{i},chardev=vhu{i}{mq}",
                 "-device", f"virtio-net-pci,netdev=vhun{i},id={net.id},vectors=0"
                 + (",mq=on" if mq else "") + (f",mac={net.mac}" if net.mac else "")]
    for vmem in config.virtio_mem:
        share = "on" if vmem.share else "off"
        argv += ["-object", f"memory-backend-memfd,id={vmem.id}-mem,"
                            f"size={qemu_size(vmem.max_size)},share={share}",
                 "-device", f"virtio-mem-pci,id={vmem.id},memdev={vmem.id}-mem,"
                            f"requested-size={qemu_size(vmem.requested_size)}"]
    if config.kernel is not None:
        # -no-reboot: with the guest's panic=-1 a dead guest ends QEMU instead of looping.
        argv += ["-bios", str(qboot_path(binary)), "-no-reboot", "-kernel",
                 str(config.kernel)]
        if config.initrd is not None:
            argv += ["-initrd", str(config.initrd)]
        if config.append is not None:
            argv += ["-append", config.append]
    if config.console is not None:
        if console is None:
            raise ValueError("config.console needs a console socket path")
        chardev = f"socket,id=console0,path={console},server=on,wait=off"
        if config.console == "serial":
            argv += ["-chardev", chardev, "-serial", "chardev:console0"]
        else:
            argv += ["-device", "virtio-serial-pci", "-chardev", chardev,
                     "-device", f"virtserialport,chardev=console0,name={VIRTIO_PORT}"]
    if config.serial is not None and config.console != "serial":
        argv += ["-serial", f"file:{config.serial}"]
    elif config.console == "virtio":
        argv += ["-serial", "null"]  # the guest's console=ttyS0 still has its UART
    if config.paused:
        argv.append("-S")
    argv += list(config.extra_args)
    return argv


@dataclass
class Qemu:
    """One QEMU process. Use as a context manager, or call :meth:`start` and :meth:`stop`."""

    config: QemuConfig
    log: Path | None = None
    console_log: Path | None = None  # everything the guest printed on its channel
    binary: str = field(default_factory=qemu_binary)
    rundir: Path = field(init=False)
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _control: QEMUMonitorProtocol | None = field(default=None, init=False)
    _console: GuestConsole | None = field(default=None, init=False)

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
    def console_path(self) -> Path:
        """The guest's command channel (``config.console``): a chardev socket."""
        return self.rundir / "console.sock"

    @property
    def console(self) -> GuestConsole:
        """The guest's command channel, once :meth:`boot` connected it."""
        if self._console is None:
            raise QemuError("the guest console is not connected: call boot()")
        return self._console

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
        return command_line(self.config, self.control_path, self.qmp_path, self.binary,
                            self.console_path)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log is not None else ""

    def start(self, timeout: float = 60) -> Qemu:
        """Start QEMU and connect the control monitor; on any failure nothing is left."""
        if shutil.which(self.binary) is None:
            raise QemuError(f"{self.binary} not found (Debian package qemu-system-x86; "
                            f"${QEMU_ENV} names another QEMU)")
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

    def boot(self, timeout: float = BOOT_TIMEOUT) -> GuestConsole:
        """Start QEMU paused (unless started), connect the console, ``cont``, wait for the
        guest's ready marker. Returns the console (also :attr:`console`)."""
        if self.config.console is None or self.config.kernel is None:
            raise QemuError("boot() needs a kernel and a console (see guest_config())")
        if not self.config.paused:
            raise QemuError("boot() needs paused=True: the console must be connected "
                            "before the guest prints its first line")
        if self.proc is None:
            self.start()
        self._console = GuestConsole.connect(self.console_path, timeout=60,
                                             name=f"guest-{self.pid}", log=self.console_log)
        self.control.cmd("cont")
        self.wait_ready(timeout)
        return self._console

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> str:
        """Wait for ``/init``'s ready marker; a QEMU that exited is reported with its output."""
        try:
            return self.console.wait_ready(timeout)
        except GuestError as e:
            if self.proc is not None and self.proc.poll() is not None:
                raise QemuError(f"QEMU exited with {self.proc.returncode} while booting: "
                                f"{e}\nQEMU said:\n{self.output()[-3000:]}") from e
            raise

    def stop(self, timeout: float = 20) -> None:
        """``quit`` through QMP, then SIGKILL by pid if needed; remove the run directory."""
        control, self._control = self._control, None
        if control is not None:
            with contextlib.suppress(Exception):
                control.settimeout(5)
                control.cmd_raw("quit")
            with contextlib.suppress(Exception):
                control.close()
        if self.proc is not None:
            end_process(self.proc, None, timeout)  # asked to quit over QMP above
        console, self._console = self._console, None
        if console is not None:
            console.close()
        shutil.rmtree(self.rundir, ignore_errors=True)

    def __enter__(self) -> Qemu:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

