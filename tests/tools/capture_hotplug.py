#!/usr/bin/env python3
"""Capture what a QEMU binary sends a vhost-user back-end across memory hot-plug.

One command per capture (as root; builds the lab's guest image on first use)::

    python tests/tools/capture_hotplug.py --backend dpdk --out qemu100_dpdk_setmemtable.jsonl \\
        --qemu PREFIX/usr/bin/qemu-system-x86_64 -L PREFIX/usr/share/qemu
    python tests/tools/capture_hotplug.py --backend qsd --out qemu100_memslots.jsonl ...
    python tests/tools/capture_hotplug.py --backend pyvhost --queue-pairs 2 --out ...
    python tests/tools/capture_hotplug.py --backend pyvhost --virtio-mem --out ...

It starts the back-end (DPDK 22.11 testpmd ``net_vhost``, qemu-storage-daemon's
vhost-user-blk export, or ``pyvhost net --mem-slots``), the recording proxy
``tests/tools/vhost_capture.py`` in front of it, and a QEMU guest (TCG, q35, 256 MiB memfd
boot RAM, the lab's kernel and busybox initramfs) whose NIC or disk goes through the
proxy. Once the guest is up: two 128 MiB memfd DIMMs hot-added two seconds apart, the
first one removed, then ``quit`` -- the QMP sequence of the captures in
tests/data/captures/README.md. With ``--virtio-mem`` a cold-plugged 1 GiB virtio-mem
device is resized to 256 MiB and back to 0 instead; ``--queue-pairs N`` gives the NIC N
queue pairs (``-smp N``, ``mq=on``). ``--qemu`` defaults to ``$PYVHOST_QEMU`` or Debian's
QEMU; a QEMU in a private prefix gets its ``-L`` directories by itself
(:func:`pyvhost.lab.qemu.firmware_dirs`). Every process is ended by pid.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from pyvhost.lab.image import DEFAULT_MODULES, build_image
from pyvhost.lab.qemu import Qemu, VirtioMem, guest_config, qemu_binary
from pyvhost.tools.process import end_process, pyvhost_argv
from pyvhost.tools.procfs import unix_listening

HERE = Path(__file__).resolve().parent


def wait_listening(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not unix_listening(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"nothing listens on {path} (pid {proc.pid} exit "
                             f"{proc.poll()})")
        time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--backend", choices=("dpdk", "qsd", "pyvhost"), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--qemu", default=qemu_binary())
    ap.add_argument("--queue-pairs", type=int, default=1)
    ap.add_argument("--virtio-mem", action="store_true")
    ap.add_argument("-L", dest="data_dirs", action="append", default=[],
                    help="QEMU data directory (repeatable), for a QEMU in a private prefix")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pvcap-"))
    procs: list[subprocess.Popen[bytes]] = []
    prefix = f"pyvhost-cap-{uuid.uuid4().hex[:6]}"
    out = Path(args.out).resolve()
    out.unlink(missing_ok=True)
    try:
        upstream, proxy = work / "be.sock", work / "proxy.sock"
        log = open(work / "backend.log", "wb")  # noqa: SIM115 - closed in finally
        qp = args.queue_pairs
        if args.backend == "dpdk":
            be = subprocess.Popen(
                ["stdbuf", "-oL", "dpdk-testpmd", "-l", "0-1", "--no-huge", "-m", "512",
                 "--no-pci", "--file-prefix", prefix, "--vdev",
                 f"net_vhost0,iface={upstream},queues={qp}", "--", "--nb-cores=1",
                 "--total-num-mbufs=2048", "--forward-mode=macswap"],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        elif args.backend == "pyvhost":
            # The reflector serves one queue pair; the switch (one port) serves more.
            mode = ["--reflect"] if qp == 1 else []
            be = subprocess.Popen(
                pyvhost_argv("net", "--socket", str(upstream), *mode, "--no-stats",
                             "--mem-slots", "--queue-pairs", str(qp)),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        else:
            be = subprocess.Popen(
                ["qemu-storage-daemon", "--blockdev",
                 "driver=null-co,node-name=n0,size=67108864", "--export",
                 f"type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,"
                 f"addr.path={upstream},writable=on"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(be)
        wait_listening(upstream, be)
        cap = subprocess.Popen([sys.executable, str(HERE / "vhost_capture.py"), "--listen",
                                str(proxy), "--upstream", str(upstream), "--out", str(out)],
                               start_new_session=True)
        procs.append(cap)
        wait_listening(proxy, cap)
        image = build_image(modules=(*DEFAULT_MODULES, "virtio_mem"))
        extra: list[str] = []
        for d in args.data_dirs:
            extra += ["-L", d]
        if args.backend in ("dpdk", "pyvhost"):
            mq = f",queues={qp}" if qp > 1 else ""
            extra += ["-chardev", f"socket,id=c0,path={proxy}",
                      "-netdev", f"vhost-user,id=n0,chardev=c0{mq}",
                      "-device", "virtio-net-pci,netdev=n0,vectors=0"
                      + (",mq=on" if mq else "")]
        else:
            extra += ["-chardev", f"socket,id=c0,path={proxy}",
                      "-device", "vhost-user-blk-pci,chardev=c0,vectors=0"]
        vmem = (VirtioMem("vmem0"),) if args.virtio_mem else ()
        config = guest_config(image, extra_args=tuple(extra), virtio_mem=vmem, smp=qp)
        with Qemu(config, binary=args.qemu) as qemu:
            qemu.boot()
            for size in (256 << 20, 0) if args.virtio_mem else ():
                qemu.control.cmd_raw("qom-set", {"path": "/machine/peripheral/vmem0",
                                                 "property": "requested-size",
                                                 "value": size})
                time.sleep(4)
            for i in (1, 2) if not args.virtio_mem else ():
                qemu.control.cmd_raw("object-add", {"qom-type": "memory-backend-memfd",
                                                "id": f"mem{i}", "size": 128 << 20,
                                                "share": True})
                qemu.control.cmd_raw("device_add", {"driver": "pc-dimm", "id": f"dimm{i}",
                                                "memdev": f"mem{i}"})
                time.sleep(2)
            if not args.virtio_mem:
                qemu.control.cmd_raw("device_del", {"id": "dimm1"})
                time.sleep(2)
        time.sleep(1)
        print(f"{sum(1 for _ in out.open())} messages in {out}", file=sys.stderr)
        return 0
    finally:
        for proc in reversed(procs):
            end_process(proc, signal.SIGINT, 10)
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        shutil.rmtree(Path("/var/run/dpdk") / prefix, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
