"""The processes a lab run starts, and their ends: one ``pyvhost net`` (a learning switch
with one vhost-user socket per VM and a control socket) and the QEMU guests, in a private
run directory.

``pyvhost net`` is started first and must listen before any QEMU starts (QEMU connects as
a client and gives up if nothing listens). The guests boot side by side, one thread each.
Everything is ended by pid, and the run directory removed, by :meth:`Machines.close`:
after a failure and after Ctrl-C too. It measures nothing (:mod:`.measure`) and runs no
hot-plug (:mod:`.scenario`).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from pyvhost.backend.control import fetch_status
from pyvhost.tools.process import end_process, pyvhost_argv

from .config import LabConfig, LabError
from .guest import GuestConsole
from .image import GuestImage
from .qemu import QBOOT, Accel, Qemu, VhostUserNet, guest_config

Say = Callable[[str], None]


@dataclass
class Vm:
    index: int  # from 0; VM 1 for people
    qemu: Qemu
    console: GuestConsole | None = None


class Machines:
    """The run directory, ``pyvhost net`` and the QEMU guests of one run."""

    def __init__(self, config: LabConfig, say: Say) -> None:
        self.config = config
        self.say = say
        self.rundir = Path(tempfile.mkdtemp(prefix="pyvhost-lab-"))
        self.control = str(self.rundir / "net.ctl")
        self.net: subprocess.Popen[bytes] | None = None
        self.vms: list[Vm] = []
        #: QEMUs no longer in ``vms``: a migration's source once its destination took
        #: over, a destination that was never used. Stopped by :meth:`close` too.
        self.retired: list[Qemu] = []
        self._threads: list[threading.Thread] = []

    def socket(self, vm: int) -> str:
        return str(self.rundir / f"vm{vm + 1}.sock")

    @property
    def destination_socket(self) -> str:
        """The socket VM 1's migration destination connects to (``--migrate``)."""
        return str(self.rundir / "vm1-dest.sock")

    @property
    def net_pid(self) -> int:
        if self.net is None:
            raise LabError("pyvhost net is not started")
        return self.net.pid

    def net_log(self) -> str:
        """The end of ``pyvhost net``'s output (quoted in errors)."""
        try:
            return (self.rundir / "net.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def start_net(self) -> None:
        """``pyvhost net``, listening on every VM's socket and the control socket."""
        c = self.config
        argv = pyvhost_argv("net", "--control", self.control, "--no-stats",
                            "--mem-slots" if c.mem_slots else "--no-mem-slots")
        for i in range(c.vms):
            argv += ["--socket", self.socket(i)]
        if c.migrate:
            argv += ["--socket", self.destination_socket]
        with open(self.rundir / "net.log", "wb") as log:
            self.net = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            if self.net.poll() is not None:
                raise LabError(f"pyvhost net exited with {self.net.returncode}:\n"
                               + self.net_log())
            with contextlib.suppress(OSError, ValueError):
                listening = fetch_status(self.control, timeout=2).get("listening")
                if isinstance(listening, list) and len(listening) == c.vms + c.migrate:
                    return
            if time.monotonic() > deadline:
                raise LabError("pyvhost net did not listen within 30 s:\n" + self.net_log())
            time.sleep(0.05)

    def boot(self, image: GuestImage, accel: Accel) -> None:
        """Start and boot every QEMU side by side, one thread each: qemu.qmp's synchronous
        client runs an asyncio loop of the thread that made it, so each QEMU's monitor is
        made and used in its own thread (:meth:`close` waits for them)."""
        c = self.config
        if not QBOOT.is_file():
            raise LabError(f"{QBOOT} is missing (Debian package qemu-system-data)")
        for i in range(c.vms):
            # The command channel on virtio-serial, not the UART: the lab sends many
            # commands (ping counters, MemTotal) and, on a loaded host, lines sent to the
            # emulated 16550 were seen losing their first bytes.
            cfg = guest_config(image, ip=f"{c.ip(i)}/24", channel="virtio",
                               vhost_user_net=(VhostUserNet(Path(self.socket(i)),
                                                            mac=c.mac(i)),),
                               slots=c.slot_count, maxmem=c.maxmem_bytes, accel=accel)
            qemu = Qemu(cfg, log=self.rundir / f"qemu{i + 1}.log",
                        console_log=self.rundir / f"console{i + 1}.log")
            self.vms.append(Vm(i, qemu))
        errors: list[BaseException] = []

        def boot_one(vm: Vm) -> None:
            try:
                vm.qemu.start()
                vm.console = vm.qemu.boot(c.boot_timeout)
            except BaseException as e:
                errors.append(e)

        self._threads = [threading.Thread(target=boot_one, args=(vm,), daemon=True)
                         for vm in self.vms]
        for t in self._threads:
            t.start()
        for t in self._threads:
            while t.is_alive():
                t.join(0.5)
        if errors:
            raise LabError(f"a guest did not boot: {errors[0]}") from errors[0]

    @property
    def qemu_pids(self) -> tuple[int, ...]:
        return tuple(vm.qemu.pid for vm in self.vms)

    @property
    def vm_by_pid(self) -> dict[int, int]:
        """QEMU's pid -> VM index: how the back-end's connections are told apart."""
        return {vm.qemu.pid: vm.index for vm in self.vms}

    def console(self, vm: int) -> GuestConsole:
        console = self.vms[vm].console
        if console is None:
            raise LabError(f"VM {vm + 1} is not booted")
        return console

    def start_destination(self, args: tuple[str, ...]) -> Qemu:
        """VM 1's migration destination: VM 1's command line plus ``args`` (the source's
        hot-added DIMMs and ``-incoming defer``), its NIC on :attr:`destination_socket`,
        not paused (it runs the guest once the migration completes)."""
        source = self.vms[0].qemu
        net = source.config.vhost_user_net[0]
        cfg = replace(source.config,
                      vhost_user_net=(replace(net, socket=Path(self.destination_socket)),),
                      extra_args=(*source.config.extra_args, *args), paused=False)
        qemu = Qemu(cfg, log=self.rundir / "qemu1-dest.log",
                    console_log=self.rundir / "console1-dest.log")
        self.retired.append(qemu)  # stopped by close() until it is VM 1
        qemu.start()
        return qemu

    def take_over(self, qemu: Qemu, console: GuestConsole) -> Vm:
        """The migration completed: ``qemu`` (started by :meth:`start_destination`) is VM 1
        now, the source is retired (stop it with :meth:`stop_retired`)."""
        old = self.vms[0]
        self.retired.remove(qemu)
        self.retired.append(old.qemu)
        if old.console is not None:
            old.console.close()
        self.vms[0] = Vm(0, qemu, console)
        return self.vms[0]

    def stop_retired(self) -> None:
        for qemu in self.retired:
            qemu.stop()

    def stop_vms(self) -> None:
        """Stop every QEMU (``quit``, then by pid)."""
        for vm in self.vms:
            vm.qemu.stop()

    # -- the end ---------------------------------------------------------------------------
    def close(self) -> None:
        """End QEMU (by pid), then the back-end (by pid), then remove the run directory.
        A second Ctrl-C (or SIGTERM) meanwhile is ignored, so the teardown finishes."""
        with signals_ignored():
            self._close()

    def _close(self) -> None:
        # Every stage runs whatever the one before raised: a KeyboardInterrupt that hit
        # inside qemu.qmp's event loop can come out again from the next QMP call (Qemu.stop
        # sends `quit`), and must not leave a QEMU, pyvhost net or the run directory.
        try:
            for _ in range(2):
                for qemu in [*self.retired, *(vm.qemu for vm in reversed(self.vms))]:
                    with contextlib.suppress(BaseException):
                        qemu.stop()
                # A boot thread still starting its QEMU ends soon after the others are
                # gone (Ctrl-C during boot); its process is stopped on the second pass.
                for t in self._threads:
                    t.join(10)
        finally:
            try:
                proc, self.net = self.net, None
                if proc is not None:
                    end_process(proc, timeout=10)
            finally:
                shutil.rmtree(self.rundir, ignore_errors=True)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM ignored inside (main thread only: handlers live there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
