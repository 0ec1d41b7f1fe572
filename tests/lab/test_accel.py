"""KVM only where a guest really boots with it (pyvhost.lab.accel).

The decision logic is checked with a stand-in trial (extra unit tests); the trial itself
runs for real: a guest under ``-accel kvm`` on this host's QEMU 7.2, with whatever
``/dev/kvm`` is here. On a nested "PVM" KVM layer (as on the project's test machines) it
does not boot, and the lab must fall back to TCG and remember that; where KVM works it
must boot and be used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import pytest

from pyvhost.lab import accel
from pyvhost.lab.accel import cached_verdict, choose_accel, kvm_usable, record_verdict
from pyvhost.lab.image import GuestImage
from pyvhost.lab.qemu import Qemu, guest_config
from support.procs import need


class Trial:
    def __init__(self, boots: bool) -> None:
        self.boots = boots
        self.calls = 0

    def __call__(self, image: GuestImage) -> bool:
        self.calls += 1
        return self.boots


#: The stand-in trial never looks at the image.
IMAGE = cast(GuestImage, object())


@pytest.fixture
def kvm_device(tmp_path: Path) -> Path:
    dev = tmp_path / "kvm"
    dev.touch()
    return dev


def test_explicit_requests_are_taken_as_asked(tmp_path: Path) -> None:
    trial = Trial(True)
    for request in ("tcg", "kvm"):
        choice = choose_accel(request, IMAGE, verdict_path=tmp_path / "v.json", trial=trial)
        assert choice.accel == request
    assert trial.calls == 0 and not (tmp_path / "v.json").exists()


def test_no_kvm_device_means_tcg_without_a_trial(tmp_path: Path) -> None:
    trial = Trial(True)
    choice = choose_accel("auto", IMAGE, verdict_path=tmp_path / "v.json",
                          kvm_device=tmp_path / "missing", trial=trial)
    assert choice.accel == "tcg" and "missing" in choice.reason
    assert trial.calls == 0


@pytest.mark.parametrize("boots", [True, False])
def test_one_trial_then_the_cached_verdict(tmp_path: Path, kvm_device: Path,
                                          boots: bool) -> None:
    verdict = tmp_path / "v.json"
    trial = Trial(boots)
    first = choose_accel("auto", IMAGE, verdict_path=verdict, kvm_device=kvm_device,
                         trial=trial)
    again = choose_accel("auto", IMAGE, verdict_path=verdict, kvm_device=kvm_device,
                         trial=trial)
    want = "kvm" if boots else "tcg"
    assert (first.accel, again.accel) == (want, want)
    assert trial.calls == 1
    assert first.trial_seconds is not None and again.trial_seconds is None
    assert "cached" in again.reason
    assert cached_verdict(verdict) is boots


def test_a_verdict_for_another_host_kernel_or_a_broken_file_is_ignored(
        tmp_path: Path, kvm_device: Path) -> None:
    verdict = tmp_path / "v.json"
    verdict.write_text('{"host": "Linux 0.0.1 x86_64", "kvm_boots": true}')
    assert cached_verdict(verdict) is None
    verdict.write_text("{not json")
    assert cached_verdict(verdict) is None
    trial = Trial(False)
    assert choose_accel("auto", IMAGE, verdict_path=verdict, kvm_device=kvm_device,
                        trial=trial).accel == "tcg"
    assert trial.calls == 1
    record_verdict(True, verdict)
    assert cached_verdict(verdict) is True


def _our_qemu_children() -> list[int]:
    """QEMU processes whose parent is this test process."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == os.getpid() and name.startswith("qemu"):
            found.append(int(entry))
    return found


@pytest.mark.qemu
def test_auto_on_this_host_uses_kvm_only_if_a_guest_boots_with_it(
        guest_image: GuestImage, tmp_path: Path) -> None:
    need("qemu-system-x86_64", "qemu-system-x86")
    verdict = tmp_path / "accel.json"
    choice = choose_accel("auto", guest_image, verdict_path=verdict)
    assert not _our_qemu_children(), "the trial guest's QEMU was left running"
    if not kvm_usable():
        assert choice.accel == "tcg" and not verdict.exists()
        return
    # A trial ran and its outcome is what was chosen, and remembered.
    assert choice.trial_seconds is not None
    assert cached_verdict(verdict) is (choice.accel == "kvm")
    if choice.accel == "kvm":
        # Where KVM boots, the lab's guests really run under it.
        with Qemu(guest_config(guest_image, channel="virtio", slots=0, accel="kvm")) as q:
            q.boot(accel.KVM_TRIAL_TIMEOUT * 3)
            assert q.control.cmd("query-kvm") == {"enabled": True, "present": True}
    else:
        assert "did not boot" in choice.reason
