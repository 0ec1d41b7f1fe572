"""Which accelerator QEMU gets: KVM only where a guest really boots with it, else TCG.

Owns the decision and its cached verdict. ``/dev/kvm`` being there is not enough: on some
hosts it is a nested layer under which stock kernels never finish booting (measured on the
project's test machines: a "PVM" layer; ``-cpu host`` even aborts QEMU there, on MSR
0x10a). So ``auto`` boots a throwaway guest
with KVM once, with a short deadline, and remembers the outcome for this host kernel in
``$XDG_CACHE_HOME/pyvhost/accel.json``; later runs go straight to the verdict. A guest
that does not reach its ready marker under KVM within :data:`KVM_TRIAL_TIMEOUT` seconds
(a KVM boot of the test guest takes about a second where KVM works) counts as "does
not boot".

It does not start the lab's VMs (:mod:`.scenario`) or build images (:mod:`.image`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pyvhost.errors import PyvhostError

from .image import GuestImage, cache_root
from .qemu import Accel, Qemu, guest_config

AccelRequest = Literal["auto", "tcg", "kvm"]
KVM_DEVICE = Path("/dev/kvm")
KVM_TRIAL_TIMEOUT = 20.0
VERDICT_FILE = "accel.json"


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator to use, and why (for people and the lab's JSON)."""

    accel: Accel
    reason: str
    trial_seconds: float | None = None  # a KVM trial boot ran now, and took this long


def kvm_usable(device: Path = KVM_DEVICE) -> bool:
    """Whether this process could open the KVM device at all."""
    return device.exists() and os.access(device, os.R_OK | os.W_OK)


def _verdict_path() -> Path:
    return cache_root().parent / VERDICT_FILE


def _host_key() -> str:
    # The verdict belongs to the host kernel (and the layer under it): a new host kernel
    # gets a new trial.
    u = os.uname()
    return f"{u.sysname} {u.release} {u.machine}"


def cached_verdict(path: Path | None = None) -> bool | None:
    """True/False: KVM booted / did not boot here before; None: never tried (or the file
    is unreadable or for another host kernel)."""
    path = path or _verdict_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("host") != _host_key():
        return None
    boots = data.get("kvm_boots")
    return boots if isinstance(boots, bool) else None


def record_verdict(boots: bool, path: Path | None = None) -> None:
    path = path or _verdict_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"host": _host_key(), "kvm_boots": boots,
                               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    tmp.replace(path)


def trial_boot(image: GuestImage, timeout: float = KVM_TRIAL_TIMEOUT) -> bool:
    """Boot a bare guest (no NIC, no hot-plug) under KVM; True if it reached its ready
    marker within ``timeout`` seconds. The QEMU process is ended by pid either way."""
    qemu = Qemu(guest_config(image, channel="virtio", slots=0, accel="kvm"))
    try:
        qemu.boot(timeout)
    except PyvhostError:
        return False
    finally:
        qemu.stop()
    return True


def choose_accel(request: AccelRequest, image: GuestImage, *,
                 verdict_path: Path | None = None,
                 say: Callable[[str], None] = lambda _: None,
                 kvm_device: Path = KVM_DEVICE,
                 trial: Callable[[GuestImage], bool] = trial_boot) -> AccelChoice:
    """``tcg`` and ``kvm`` are taken as asked; ``auto`` is KVM where it really boots."""
    if request != "auto":
        return AccelChoice(request, "asked for")
    if not kvm_usable(kvm_device):
        return AccelChoice("tcg", f"{kvm_device} is missing or not accessible")
    known = cached_verdict(verdict_path)
    if known is not None:
        return (AccelChoice("kvm", "KVM booted the guest here before (cached)") if known
                else AccelChoice("tcg", "KVM did not boot the guest here before (cached)"))
    say(f"trying KVM: a guest must boot within {KVM_TRIAL_TIMEOUT:g} s (once per host "
        "kernel)")
    start = time.monotonic()
    boots = trial(image)
    took = time.monotonic() - start
    record_verdict(boots, verdict_path)
    if boots:
        return AccelChoice("kvm", "a trial guest booted under KVM", took)
    return AccelChoice("tcg", f"a trial guest did not boot under KVM within "
                              f"{KVM_TRIAL_TIMEOUT:g} s", took)
