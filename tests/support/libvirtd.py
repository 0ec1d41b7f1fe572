"""A private libvirtd for tests, and TCG domains that boot the project's guest image.

Which libvirt: Debian 12's libvirt 9.0 (``/usr/sbin/libvirtd``) driving Debian 12's QEMU
7.2, or, with ``$PYVHOST_LIBVIRT`` naming a prefix that .ci/libvirt11.sh unpacked,
libvirt 11.3 from bookworm-backports driving ``$PYVHOST_QEMU``'s QEMU (CI: 10.0). The
prefix's daemon gets ``LD_LIBRARY_PATH`` (its libvirt.so.0), ``LIBVIRT_DRIVER_DIR`` (its
QEMU driver module: without it libvirtd loads the system's 9.0 module) and, in its
mount namespace, PREFIX/usr/share/libvirt over /usr/share/libvirt (cpu_map and schemas:
libvirt has no variable for them). The tests' client, libvirt-python, stays linked to the
system's libvirt.so.0 (9.0): it speaks libvirt's RPC protocol to the 11.3 daemon.

libvirtd runs as root (its QEMU driver's "system" mode) in a mount namespace of its own
(``unshare -m``), where /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/log/libvirt
and /var/cache/libvirt are bind mounts of ROOT/etc/libvirt, ... under one temporary
ROOT, so nothing of the machine's own libvirt (configuration, state, sockets) is read or
written (only their empty mount points are created when missing, and removed after).
Its socket is in ROOT too; the URI is ``qemu:///system?socket=ROOT/libvirt-sock``. A
domain's monitor is at ``ROOT/var/lib/libvirt/qemu/domain-N-NAME/monitor.sock``.

qemu.conf: QEMU runs as root with no security driver, no cgroups, no private /dev, and
writes its output to a file (``stdio_handler = "file"``: no virtlogd needed). The guest's
kernel and initramfs are copied into the root (libvirt must not relabel files under
/root). Ending: every domain destroyed, libvirtd ended by its pid (SIGTERM, then SIGKILL),
the QEMU processes it left (by their pid files), the root removed.

Traps kept here (docs/libvirt.md, "Traps"): DIMM hot-plug needs ``<features><acpi/>``
(else libvirt passes -no-acpi); QEMU 7.2 + TCG + vhost-user + MSI-X crashes QEMU, and
``vectors=0`` on a libvirt-managed device needs ``<qemu:override>``; Debian's QEMU driver
wants its compile-time user ``libvirt-qemu`` to exist even when qemu.conf says root.
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
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import pytest

from pyvhost.lab.guest import GuestConsole
from pyvhost.lab.image import GuestImage
from pyvhost.lab.qemu import (
    BOOT_TIMEOUT,
    QEMU_BINARY,
    QEMU_ENV,
    firmware_dirs,
    qboot_path,
    qemu_binary,
)

#: libvirt's system directories; each is ROOT + the same path inside the namespace.
SYSTEM_DIRS = ("/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt",
               "/var/cache/libvirt")
#: libvirt's data (cpu_map, schemas): a prefix's own copy is mounted over it.
SHARE_DIR = "/usr/share/libvirt"
QEMU_USER = "libvirt-qemu"  # Debian's compile-time qemu_user
#: Names the prefix of another libvirt (.ci/libvirt11.sh's, with PREFIX/usr/sbin/libvirtd)
#: that the tests start instead of the system's, driving $PYVHOST_QEMU's QEMU.
LIBVIRT_ENV = "PYVHOST_LIBVIRT"
LIBDIR = "usr/lib/x86_64-linux-gnu"  # Debian's multiarch library directory in a prefix
#: QEMU's module directory (Debian's CONFIG_QEMU_MODDIR): a private-prefix QEMU's own is
#: mounted over it in the daemon's namespace, where every QEMU it starts runs.
QEMU_MODULE_DIR = "/usr/lib/x86_64-linux-gnu/qemu"

QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""


def libvirt_prefix() -> Path | None:
    """``$PYVHOST_LIBVIRT``'s prefix, or None for the system's libvirt."""
    value = os.environ.get(LIBVIRT_ENV)
    return Path(value).resolve() if value else None


def daemon_env(prefix: Path | None) -> dict[str, str]:
    """The environment of the daemon of ``prefix`` (module docstring)."""
    env = dict(os.environ)
    if prefix is not None:
        libdir = prefix / LIBDIR
        env["LD_LIBRARY_PATH"] = str(libdir)
        env["LIBVIRT_DRIVER_DIR"] = str(libdir / "libvirt" / "connection-driver")
    return env


def qemu_modules(binary: str) -> Path | None:
    """The module directory of a QEMU unpacked into a private prefix, None for Debian's.

    Such a QEMU still loads its modules from Debian's ``/usr/lib/x86_64-linux-gnu/qemu``
    (QEMU 7.2's), falling back there for any it does not ship even with
    ``QEMU_MODULE_DIR``; ``qom-list-types``, which libvirt's capability probe sends, loads
    them all, and QEMU 10.0 aborts ("Only modules from the same build can be loaded",
    then an assertion in module_load_dso): libvirt reports "Unable to read from monitor:
    Connection reset by peer"."""
    if not firmware_dirs(binary):
        return None
    moddir = Path(binary).parents[1] / "lib" / "x86_64-linux-gnu" / "qemu"
    return moddir if moddir.is_dir() else None


def _need_root_and_binaries(prefix: Path | None) -> str:
    if prefix is not None:
        # Asked for by name: missing is a failure, never a skip.
        daemon = prefix / "usr" / "sbin" / "libvirtd"
        if not os.access(daemon, os.X_OK):
            pytest.fail(f"${LIBVIRT_ENV}={prefix}: no {daemon} (.ci/libvirt11.sh installs it)")
        if os.geteuid() != 0:
            pytest.fail(f"${LIBVIRT_ENV} is set, but a private libvirtd needs root")
    elif os.geteuid() != 0:
        pytest.skip("a private libvirtd needs root (CI runs as root)")
    libvirtd = str(daemon) if prefix is not None else shutil.which("libvirtd")
    if libvirtd is None:
        pytest.skip("libvirtd not installed (Debian packages libvirt-daemon "
                    "libvirt-daemon-driver-qemu; ./dev setup installs them)")
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) missing")
    try:
        import libvirt  # noqa: F401
    except ImportError:
        pytest.fail("libvirt's Python binding is missing: pip install -e '.[libvirt]' "
                    "(./dev setup does)")
    if subprocess.run(["getent", "passwd", QEMU_USER], capture_output=True,
                      check=False).returncode != 0:
        # Debian's libvirt-daemon-system creates it; libvirt-daemon alone does not, and
        # the QEMU driver refuses to start without it even when qemu.conf says root.
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir",
                        "/nonexistent", "--shell", "/usr/sbin/nologin", "--user-group",
                        QEMU_USER], check=True)
    return libvirtd


@dataclass
class Libvirtd:
    root: Path
    pid: int
    created_dirs: list[str]
    #: The QEMU its domains run: Debian's 7.2 under the system's libvirt 9.0, else
    #: $PYVHOST_QEMU's.
    qemu: str = QEMU_BINARY
    conn: Any = field(default=None, repr=False)

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.root}/libvirt-sock"

    def path(self, system_path: str) -> Path:
        """Where a path libvirtd sees (``/var/lib/libvirt/...``) is for this process."""
        if any(system_path == d or system_path.startswith(d + "/") for d in SYSTEM_DIRS):
            return self.root / system_path.lstrip("/")
        return Path(system_path)

    def monitor_path(self, dom: Any) -> Path:
        """The domain's QMP monitor socket (libvirt's own)."""
        return self.path(f"/var/lib/libvirt/qemu/domain-{dom.ID()}-{dom.name()}/monitor.sock")

    def qemu_log(self, name: str) -> str:
        log = self.path(f"/var/log/libvirt/qemu/{name}.log")
        return log.read_text(errors="replace") if log.exists() else ""

    def qemu_pid(self, name: str) -> int | None:
        try:
            return int(self.path(f"/run/libvirt/qemu/{name}.pid").read_text())
        except (OSError, ValueError):
            return None

    def connection(self) -> Any:
        if self.conn is None:
            import libvirt

            self.conn = libvirt.open(self.uri)
        return self.conn

    def stop(self) -> None:
        conn, self.conn = self.conn, None
        pids: list[int] = []
        if conn is not None or self.pid:
            with contextlib.suppress(Exception):
                import libvirt

                c = conn or libvirt.open(self.uri)
                for dom in c.listAllDomains(0):
                    pid = self.qemu_pid(dom.name())
                    if pid:
                        pids.append(pid)
                    with contextlib.suppress(Exception):
                        dom.destroy()
                    with contextlib.suppress(Exception):
                        dom.undefine()
                c.close()
        _end_pid(self.pid)
        for pidfile in self.path("/run/libvirt/qemu").glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pids.append(int(pidfile.read_text()))
        for pid in pids:
            _end_pid(pid)
        shutil.rmtree(self.root, ignore_errors=True)
        for d in reversed(self.created_dirs):
            with contextlib.suppress(OSError):
                os.rmdir(d)  # only the empty mount points this fixture created


def _end_pid(pid: int, timeout: float = 20) -> None:
    """End a process this fixture started (by pid): SIGTERM, then SIGKILL."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def start_libvirtd(timeout: float = 60) -> Libvirtd:
    """Start a private libvirtd (module docstring): the system's, or $PYVHOST_LIBVIRT's;
    stopped with :meth:`Libvirtd.stop`."""
    prefix = libvirt_prefix()
    libvirtd = _need_root_and_binaries(prefix)
    qemu = QEMU_BINARY
    if prefix is not None:
        qemu = qemu_binary()
        if shutil.which(qemu) is None:
            pytest.fail(f"${QEMU_ENV}={qemu} does not exist")
    root = Path(tempfile.mkdtemp(prefix="pyvhost-lv-"))
    for d in SYSTEM_DIRS:
        (root / d.lstrip("/")).mkdir(parents=True)
    etc = root / "etc" / "libvirt"
    (etc / "qemu.conf").write_text(QEMU_CONF)
    (etc / "libvirtd.conf").write_text(
        f'unix_sock_dir = "{root}"\nunix_sock_rw_perms = "0700"\n'
        f'auth_unix_rw = "none"\nauth_unix_ro = "none"\n'
        f'log_outputs = "3:file:{root}/libvirtd.log"\n')
    mounts = {d: root / d.lstrip("/") for d in SYSTEM_DIRS}
    if prefix is not None:
        mounts[SHARE_DIR] = prefix / SHARE_DIR.lstrip("/")
        moddir = qemu_modules(qemu)
        if moddir is not None:
            mounts[QEMU_MODULE_DIR] = moddir
    created = [d for d in mounts if not os.path.isdir(d)]
    files: dict[str, Path] = {}
    system_qemu = shutil.which(QEMU_BINARY)
    if prefix is not None and system_qemu is not None and qemu_wrapper(root, qemu) != qemu:
        # libvirt probes /usr/bin/qemu-system-x86_64 for the host's x86_64 guests (without
        # them, "could not find capabilities for arch=x86_64") and for getVersion(): in
        # this namespace it is $PYVHOST_QEMU's QEMU, whose modules the one above are.
        files[system_qemu] = root / "qemu-system-x86_64"
    script = "set -e\n" + "".join(f"mkdir -p {d}\n" for d in mounts) + "".join(
        f"mount --bind {src} {d}\n" for d, src in {**mounts, **files}.items()) + (
        f"exec {libvirtd} -d -p {root}/libvirtd.pid -f {etc}/libvirtd.conf\n")
    subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                   check=True, timeout=timeout, env=daemon_env(prefix))
    deadline = time.monotonic() + timeout
    pidfile, sock = root / "libvirtd.pid", root / "libvirt-sock"
    while not (pidfile.exists() and sock.exists()):
        if time.monotonic() > deadline:
            log = (root / "libvirtd.log").read_text(errors="replace")[-3000:] if (
                root / "libvirtd.log").exists() else ""
            shutil.rmtree(root, ignore_errors=True)
            raise RuntimeError(f"libvirtd did not start within {timeout} s:\n{log}")
        time.sleep(0.1)
    return Libvirtd(root, int(pidfile.read_text()), created, qemu)


@dataclass(frozen=True)
class DomainSpec:
    """A TCG q35 domain booting the guest image. Sizes in MiB."""

    name: str
    memory: int = 256
    slots: int | None = 8  # None: no <maxMemory> (no memory hot-plug)
    maxmem: int = 4096
    numa_cells: int = 1
    source: str | None = "memfd"  # <memoryBacking><source type=...>
    access: str | None = "shared"  # <memoryBacking><access mode=...>
    hugepages: bool = False
    vhost_user: tuple[Path, ...] = ()
    cmdline_extra: tuple[str, ...] = ()


def domain_xml(spec: DomainSpec, image_dir: Path, console: Path,
               emulator: str | None = None, qemu: str | None = None) -> str:
    """The domain XML for ``spec``; ``emulator`` defaults to Debian's QEMU, ``qemu`` (the
    binary whose qboot is the loader) to ``emulator``."""
    emulator = emulator or QEMU_BINARY
    exe = shutil.which(emulator) or emulator
    cells = max(spec.numa_cells, 1)
    per_cell = spec.memory // cells
    numa = "".join(f"<cell id='{i}' cpus='{0 if i == 0 else ''}' memory='{per_cell}' "
                   f"unit='MiB'/>".replace(" cpus=''", "") for i in range(cells))
    backing = ""
    if spec.source or spec.access or spec.hugepages:
        backing = "<memoryBacking>"
        if spec.hugepages:
            backing += "<hugepages><page size='2048' unit='KiB'/></hugepages>"
        if spec.source:
            backing += f"<source type='{spec.source}'/>"
        if spec.access:
            backing += f"<access mode='{spec.access}'/>"
        backing += "</memoryBacking>"
    max_memory = (f"<maxMemory slots='{spec.slots}' unit='MiB'>{spec.maxmem}</maxMemory>"
                  if spec.slots is not None else "")
    nets = ""
    overrides = ""
    for i, sock in enumerate(spec.vhost_user):
        nets += (f"<interface type='vhostuser'><mac address='52:54:00:00:10:{i + 1:02x}'/>"
                 f"<source type='unix' path={quoteattr(str(sock))} mode='client'/>"
                 f"<model type='virtio'/><alias name='ua-net{i}'/></interface>")
        # QEMU 7.2 + TCG + vhost-user + MSI-X: vectors=0, which libvirt only passes through
        # <qemu:override> (docs/libvirt.md, "Traps").
        overrides += (f"<qemu:device alias='ua-net{i}'><qemu:frontend><qemu:property "
                      f"name='vectors' type='unsigned' value='0'/></qemu:frontend>"
                      f"</qemu:device>")
    cmdline = " ".join(("console=ttyS0", "quiet", "loglevel=1", "panic=-1",
                        "memhp_default_state=online_movable", *spec.cmdline_extra))
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{escape(spec.name)}</name>
  {max_memory}
  <memory unit='MiB'>{spec.memory}</memory>
  {backing}
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <loader type='rom'>{escape(str(qboot_path(qemu or emulator)))}</loader>
    <kernel>{escape(str(image_dir / 'vmlinuz'))}</kernel>
    <initrd>{escape(str(image_dir / 'initrd.cpio'))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu><numa>{numa}</numa></cpu>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>{escape(exe)}</emulator>
    {nets}
    <serial type='unix'><source mode='bind' path={quoteattr(str(console))}/>
      <target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
  {f'<qemu:override>{overrides}</qemu:override>' if overrides else ''}
</domain>"""


def emulator_for(lv: Libvirtd, binary: str | None = None) -> str:
    """A QEMU as libvirt's ``<emulator>`` (default: ``lv.qemu``): a private-prefix QEMU
    gets a wrapper script that adds its -L directories.

    Debian 12's libvirt 9.0 drives Debian 12's QEMU 7.2, whatever ``PYVHOST_QEMU`` says:
    it cannot drive QEMU 10.0 (its capability probe of QEMU 10.0.2 fails, "Unable to read
    from monitor: Connection reset by peer"); QEMU 10.0 goes with libvirt 11.3
    (``PYVHOST_LIBVIRT``)."""
    return qemu_wrapper(lv.root, binary or lv.qemu)


def qemu_wrapper(root: Path, binary: str) -> str:
    """``binary``, or for a private-prefix QEMU ROOT/qemu-system-x86_64, a script that runs
    it with its -L directories."""
    dirs = firmware_dirs(binary)
    if not dirs:
        return binary
    wrapper = root / "qemu-system-x86_64"
    args = " ".join(f"-L {d}" for d in dirs)
    wrapper.write_text(f"#!/bin/sh\nexec {binary} {args} \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper)


@dataclass
class Domain:
    dom: Any
    console: GuestConsole | None
    console_path: Path


def create_domain(lv: Libvirtd, image: GuestImage, spec: DomainSpec, *,
                  boot: bool = True, log: Path | None = None,
                  persistent: bool = False) -> Domain:
    """Create ``spec`` (transient, or defined first with ``persistent``) paused; with
    ``boot``, connect its console, resume and wait for the guest's ready marker."""
    import libvirt

    image_dir = lv.root / "img"
    if not image_dir.exists():
        image_dir.mkdir()
        shutil.copy(image.kernel, image_dir / "vmlinuz")
        shutil.copy(image.initrd, image_dir / "initrd.cpio")
    console = lv.root / f"{spec.name}.console"
    xml = domain_xml(spec, image_dir, console, emulator_for(lv), lv.qemu)
    try:
        if persistent:
            dom = lv.connection().defineXML(xml)
            dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
        else:
            dom = lv.connection().createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
    except libvirt.libvirtError as e:
        raise RuntimeError(f"libvirt did not start {spec.name}: {e}\n"
                           f"{lv.qemu_log(spec.name)[-3000:]}") from e
    if not boot:
        return Domain(dom, None, console)
    c = GuestConsole.connect(console, timeout=60, name=spec.name, log=log)
    dom.resume()
    try:
        c.wait_ready(BOOT_TIMEOUT)
    except Exception as e:
        raise RuntimeError(f"{spec.name} did not boot: {e}\n"
                           f"{lv.qemu_log(spec.name)[-3000:]}") from e
    return Domain(dom, c, console)
