"""What differs between the QEMU versions pyvhost knows, as data: the vhost-user region
cap, QEMU's words when a memory device is refused for want of regions, and whether a
virtio-mem device can be unplugged. Pure.

The region count itself (:mod:`.flatview`) is the same in every version tested: the
vhost-user memory listener keeps the fd-backed RAM sections of the "memory" address
space, rounded to their page size and merged (hw/virtio/vhost.c). What changed in QEMU 8.1
(David Hildenbrand's memslot series, kept in 10.0):

- ``VHOST_USER_MAX_RAM_SLOTS`` is 512 on every target; it was ``ACPI_MAX_RAM_SLOTS`` (256)
  on x86 before. A back-end with CONFIGURE_MEM_SLOTS gets min(GET_MAX_MEM_SLOTS, cap).
- ``memory_device_check_addable()`` asks for the memslots the device needs (1 for a DIMM)
  plus those reserved by devices with dynamic memslots, and says "a used vhost backend has
  not enough free memory slots left" (7.2: "has no free memory slots left").
- the free count is per vhost device, its limit less its own ``mem->nregions`` (8.1 split
  7.2's one global ``used_memslots`` into a shared and a private count, a later release
  made it per device); 7.2 compares the smallest limit with the count of the device that
  committed last. All vhost-user devices keep the same sections (the fd-backed ones), so
  for them every version refuses at the smallest limit over the devices.

Measured (tests/hotplug, paused q35, 256 MiB memfd boot RAM, DPDK 22.11): both versions
take 6 DIMMs and refuse the 7th. With two vhost-user NICs, one on a back-end with
CONFIGURE_MEM_SLOTS (509) and one without (pyvhost --no-mem-slots, or DPDK 22.11), both
versions refuse at 8 regions, the smaller limit (test_two_vhost_user_devices.py, paused
and booted). A version not listed here gets the rules of the nearest known one and a
warning note.
"""

from __future__ import annotations

from dataclasses import dataclass

Version = tuple[int, int, int]

#: Without CONFIGURE_MEM_SLOTS QEMU sends at most VHOST_MEMORY_BASELINE_NREGIONS (8).
BASELINE_REGIONS = 8


@dataclass(frozen=True)
class QemuRules:
    """How one QEMU version counts and caps vhost-user regions."""

    name: str
    max_ram_slots: int  # VHOST_USER_MAX_RAM_SLOTS (x86)
    region_refusal: str  # QEMU's error for a memory device beyond the region limit
    # device_del of a virtio-mem-pci device: 7.2 refuses it ("virtio based memory devices
    # cannot be unplugged."); 10.0 takes it once nothing is plugged or requested (size
    # and requested-size 0) and the device sits on a hot-pluggable bus. Measured on both
    # (tests/hotplug/test_virtio_mem_remove.py).
    virtio_mem_unplug: bool


QEMU_7_2 = QemuRules("7.2", 256, "a used vhost backend has no free memory slots left",
                     virtio_mem_unplug=False)
QEMU_10_0 = QemuRules("10.0", 512,
                      "a used vhost backend has not enough free memory slots left",
                      virtio_mem_unplug=True)
#: The versions tested against real QEMU (tests/hotplug with PYVHOST_QEMU).
KNOWN: dict[tuple[int, int], QemuRules] = {(7, 2): QEMU_7_2, (10, 0): QEMU_10_0}


def version_text(version: Version | None) -> str:
    return "unknown" if version is None else ".".join(map(str, version))


def rules_for(version: Version | None) -> tuple[QemuRules, str | None]:
    """The rules for ``version``, and a warning when it is not a tested one."""
    if version is not None and version[:2] in KNOWN:
        return KNOWN[version[:2]], None
    rules = QEMU_7_2 if version is not None and version[:2] < (8, 1) else QEMU_10_0
    if version is None:
        return rules, (f"QEMU's version is unknown: counting vhost-user regions with QEMU "
                       f"{rules.name}'s rules")
    return rules, (f"QEMU {version_text(version)} is not a version pyvhost was tested with "
                   f"({', '.join(r.name for r in KNOWN.values())}): counting vhost-user "
                   f"regions with QEMU {rules.name}'s rules, the nearest")
