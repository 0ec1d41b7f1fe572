"""What one ``pyvhost lab`` run is asked to do (:class:`LabConfig`), the settings derived
from it (slots, maxmem, each VM's address and MAC), and the lab's one error type.

It checks its own values and starts nothing; :mod:`.scenario` runs a config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pyvhost.errors import LocalError
from pyvhost.units import GiB, MiB

from .accel import AccelRequest
from .qemu import BOOT_TIMEOUT

BOOT_MEMORY = 256 * MiB
GUEST_BLOCK = 128 * MiB  # the guest's memory block size: DIMMs are whole blocks
HOTPLUG_VM = 0  # the VM the DIMMs go into (index; VM 1 for people)


class LabError(LocalError):
    """The lab could not be set up or run (a program missing, a guest that did not boot)."""


@dataclass(frozen=True)
class LabConfig:
    """One run. ``slots`` and ``maxmem`` default to what the DIMMs (and the probe past the
    limit) need."""

    vms: int = 2
    dimms: int = 6
    dimm_size: int = 128 * MiB
    unplug: bool = False
    mem_slots: bool = False
    #: After the DIMMs: keep hot-adding until the planner refuses, then force that DIMM
    #: through to show QEMU's own refusal (and that the back-end was not touched).
    probe_limit: bool = False
    #: After the DIMMs (and before an unplug): live-migrate VM 1 to a second QEMU started
    #: with ``pyvhost mem migrate-args``' arguments, on another socket of the switch.
    migrate: bool = False
    slots: int | None = None
    maxmem: int | None = None
    subnet: str = "10.99.0"
    #: After each step, wait for this many more answered pings: traffic through the new
    #: table (and time for a late loss to show).
    pings_per_step: int = 3
    boot_timeout: float = BOOT_TIMEOUT
    step_timeout: float = 60.0
    #: ``auto``: KVM where a guest really boots with it (a trial once per host kernel,
    #: cached), else TCG (:mod:`.accel`).
    accel: AccelRequest = "auto"

    def __post_init__(self) -> None:
        if not 2 <= self.vms <= 8:
            raise ValueError("vms must be 2..8: VM 1 is hot-plugged, the others ping it")
        if self.dimms < 0 or self.dimm_size <= 0 or self.dimm_size % GUEST_BLOCK:
            raise ValueError("DIMMs must be whole multiples of 128 MiB (the guest's "
                             "memory block size)")
        if not re.fullmatch(r"\d{1,3}\.\d{1,3}\.\d{1,3}", self.subnet):
            raise ValueError(f"subnet {self.subnet!r} is not like 10.99.0")

    @property
    def slot_count(self) -> int:
        return self.slots if self.slots is not None else max(8, self.dimms + 2)

    @property
    def maxmem_bytes(self) -> int:
        if self.maxmem is not None:
            return self.maxmem
        need = BOOT_MEMORY + self.slot_count * self.dimm_size
        return -(-need // GiB) * GiB

    def ip(self, vm: int) -> str:
        return f"{self.subnet}.{vm + 1}"

    def mac(self, vm: int) -> str:
        return f"52:54:00:1a:b0:{vm + 1:02x}"
