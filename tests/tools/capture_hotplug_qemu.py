#!/usr/bin/env python3
"""Record what a QEMU sends a vhost-user back-end across memory hot-plug (test tool).

Boots the test guest (pyvhost.lab.qemu; ``PYVHOST_QEMU`` selects the QEMU) with one
virtio-net device whose vhost-user socket is the recording proxy
``tests/tools/vhost_capture.py``, in front of a real back-end:

- ``--backend dpdk``: DPDK 22.11 testpmd net_vhost (no CONFIGURE_MEM_SLOTS);
- ``--backend pyvhost``: ``pyvhost net --mem-slots`` (CONFIGURE_MEM_SLOTS), with
  ``--queue-pairs N`` a multiqueue device (``-smp N``, ``mq=on``).

Then, 2 s apart: ``object-add`` + ``device_add`` of DIMMs d1 and d2 (128 MiB memfd,
share=on), ``device_del`` d1 (waiting for DEVICE_DELETED); with ``--virtio-mem`` a
cold-plugged 1 GiB virtio-mem device is resized to 256 MiB and back to 0 instead. QEMU
quits; the proxy's JSON lines are in ``--out``. Markers are not recorded: the README says
which message follows which step.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyvhost.lab.image import DEFAULT_MODULES, build_image
from pyvhost.lab.qemu import (
    MiB,
    Qemu,
    VhostUserNet,
    VirtioMem,
    guest_config,
    qemu_binary,
    qemu_version,
)
from pyvhost.tools.process import end_process, pyvhost_argv

HERE = Path(__file__).resolve().parent


def wait_listening(path: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    from pyvhost.tools.procfs import unix_listening

    deadline = time.monotonic() + timeout
    while not unix_listening(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{proc.args!r} did not listen on {path}")
        time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=["dpdk", "pyvhost"], required=True)
    ap.add_argument("--queue-pairs", type=int, default=1)
    ap.add_argument("--virtio-mem", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    # SIGTERM (timeout(1), CI) ends it through the finally below: nothing is left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run = Path(tempfile.mkdtemp(prefix="pvcap-"))
    upstream, proxy = run / "backend.sock", run / "proxy.sock"
    procs: list[subprocess.Popen[bytes]] = []
    q: Qemu | None = None
    try:
        if args.backend == "dpdk":
            cmd = ["stdbuf", "-oL", "dpdk-testpmd", "-l", "0-1", "--no-huge", "-m", "512",
                   "--no-pci", "--file-prefix", f"pvcap{os.getpid()}", "--vdev",
                   f"net_vhost0,iface={upstream},queues={args.queue_pairs}", "--",
                   "--nb-cores=1", "--total-num-mbufs=2048"]
        else:
            # The reflector serves one queue pair; the switch (one port) serves more.
            mode = ["--reflect"] if args.queue_pairs == 1 else []
            cmd = pyvhost_argv("net", "--socket", str(upstream), *mode, "--no-stats",
                               "--mem-slots", "--queue-pairs", str(args.queue_pairs))
        procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))
        wait_listening(upstream, procs[0])
        args.out.unlink(missing_ok=True)
        procs.append(subprocess.Popen(
            [sys.executable, str(HERE / "vhost_capture.py"), "--listen", str(proxy),
             "--upstream", str(upstream), "--out", str(args.out)], start_new_session=True))
        wait_listening(proxy, procs[1])
        image = build_image(modules=(*DEFAULT_MODULES, "virtio_mem"), update_lists=False)
        net = VhostUserNet(proxy, queues=args.queue_pairs)
        vmem = (VirtioMem("vmem0"),) if args.virtio_mem else ()
        q = Qemu(guest_config(image, vhost_user_net=(net,), virtio_mem=vmem,
                              smp=max(1, args.queue_pairs)), log=run / "qemu.log")
        q.boot()
        time.sleep(2)
        ctl = q.control
        if args.virtio_mem:
            for size in (256 * MiB, 0):
                ctl.cmd("qom-set", path="/machine/peripheral/vmem0", property="requested-size",
                        value=size)
                time.sleep(4)
        else:
            for i in (1, 2):
                ctl.cmd("object-add", **{"qom-type": "memory-backend-memfd", "id": f"mem{i}",
                                         "size": 128 * MiB, "share": True})
                ctl.cmd("device_add", driver="pc-dimm", id=f"d{i}", memdev=f"mem{i}")
                time.sleep(2)
            ctl.cmd("device_del", id="d1")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                ev = ctl.pull_event(wait=1.0)
                if ev and ev.get("event") == "DEVICE_DELETED" and \
                        ev.get("data", {}).get("device") == "d1":
                    break
            time.sleep(2)
        v = ".".join(map(str, qemu_version(qemu_binary())))
        print(f"captured QEMU {v} -> {args.backend} into {args.out}")
    finally:
        if q is not None:
            q.stop()
        for p in reversed(procs):
            end_process(p, signal.SIGINT)
        subprocess.run(["rm", "-rf", str(run), f"/var/run/dpdk/pvcap{os.getpid()}"],
                       check=False)


if __name__ == "__main__":
    main()
