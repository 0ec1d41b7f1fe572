"""Guest RAM of the front-end: memfd regions, their VAs, GPA placement, clean close."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest

from pyvhost.frontend.memory import (
    HOTPLUG_BASE,
    FrontendMemory,
    GuestMemoryError,
    GuestRam,
    MiB,
    name_prefix,
)
from pyvhost.tools import procfs

PID = os.getpid()


def _rss_kib(ram: GuestRam) -> int:
    """Resident kB of the mapping of ``ram`` in this process (from /proc/self/smaps)."""
    start = f"{ram.userspace_addr:x}-"
    with open("/proc/self/smaps", encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines):
        if line.startswith(start):
            for detail in lines[i + 1:]:
                if detail.startswith("Rss:"):
                    return int(detail.split()[1])
    raise AssertionError(f"no mapping at {ram.userspace_addr:#x}")


def test_memfd_region_is_named_mapped_and_found_in_proc() -> None:
    with GuestRam(0, 2 * MiB) as ram:
        assert ram.name.startswith(name_prefix())
        assert ram.name.startswith(f"pyvhost-fe-{PID}-")
        assert os.readlink(f"/proc/self/fd/{ram.fd}") == f"/memfd:{ram.name} (deleted)"
        maps = procfs.matching_mappings(PID, ram.name)
        assert [(mp.start, mp.size) for mp in maps] == [(ram.userspace_addr, 2 * MiB)]
        desc = ram.region()
        assert (desc.guest_phys_addr, desc.memory_size, desc.userspace_addr,
                desc.mmap_offset) == (0, 2 * MiB, ram.userspace_addr, 0)


def test_userspace_addr_is_the_address_of_the_mapping() -> None:
    with GuestRam(0, mmap.PAGESIZE * 4) as ram:
        ram.write(100, b"vhost")
        assert ctypes.string_at(ram.userspace_addr + 100, 5) == b"vhost"
        ctypes.memmove(ram.userspace_addr + 200, b"user", 4)
        assert ram.read(200, 4) == b"user"
        # The fd maps the same file: a second mapping sees the bytes.
        with mmap.mmap(ram.fd, mmap.PAGESIZE, flags=mmap.MAP_SHARED) as other:
            assert other[100:105] == b"vhost"


def test_no_prefault() -> None:
    with GuestRam(0, 64 * MiB) as ram:
        assert _rss_kib(ram) == 0
        ram.write(0, b"x")
        assert 0 < _rss_kib(ram) < 64 * 1024


def test_names_are_unique() -> None:
    with GuestRam(0, 2 * MiB) as a, GuestRam(0, 2 * MiB) as b:
        assert a.name != b.name
        assert a.userspace_addr != b.userspace_addr


def test_close_releases_fd_and_mapping() -> None:
    ram = GuestRam(0, 2 * MiB)
    name = ram.name
    assert procfs.matching_fds(PID, name)
    ram.close()
    ram.close()  # idempotent
    assert ram.closed
    assert procfs.matching_fds(PID, name) == {}
    assert procfs.matching_mappings(PID, name) == []
    with pytest.raises(GuestMemoryError, match="closed"):
        _ = ram.fd


@pytest.mark.parametrize(("gpa", "size"), [(0, 0), (0, 4097), (123, 4096), (-4096, 4096),
                                           (1 << 52, 4096)])
def test_bad_geometry_is_refused(gpa: int, size: int) -> None:
    with pytest.raises(GuestMemoryError):
        GuestRam(gpa, size)


def test_out_of_range_access_is_refused() -> None:
    with GuestRam(0, mmap.PAGESIZE) as ram:
        with pytest.raises(GuestMemoryError):
            ram.write(mmap.PAGESIZE - 1, b"ab")
        with pytest.raises(GuestMemoryError):
            ram.read(-1, 1)


def test_file_backed_region_is_unlinked_after_open(tmp_path: os.PathLike[str]) -> None:
    with GuestRam(0, 2 * MiB, directory=tmp_path) as ram:
        assert os.listdir(tmp_path) == []
        target = os.readlink(f"/proc/self/fd/{ram.fd}")
        assert ram.name in target and target.endswith(" (deleted)")
        ram.write(0, b"file")
        assert ctypes.string_at(ram.userspace_addr, 4) == b"file"


def test_missing_directory_is_a_clear_error(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(GuestMemoryError, match="can not use directory"):
        GuestRam(0, 2 * MiB, directory=os.path.join(tmp_path, "nope"))


def test_boot_ram_at_zero_and_dimms_above_hotplug_base() -> None:
    with FrontendMemory() as mem:
        boot = mem.add_boot_ram(64 * MiB)
        a = mem.add_dimm(2 * MiB)
        b = mem.add_dimm(128 * MiB)
        c = mem.add_dimm(2 * MiB)
        assert boot.guest_phys_addr == 0
        assert a.guest_phys_addr == HOTPLUG_BASE
        assert b.guest_phys_addr == HOTPLUG_BASE + 2 * MiB
        assert c.guest_phys_addr == HOTPLUG_BASE + 130 * MiB
        assert mem.regions == (boot, a, b, c)
        assert mem.total_size == 196 * MiB
        # First fit: a freed hole is reused by a DIMM that fits in it.
        mem.detach(a).close()
        d = mem.add_dimm(2 * MiB)
        assert d.guest_phys_addr == HOTPLUG_BASE
        e = mem.add_dimm(4 * MiB)  # does not fit the 2 MiB hole: goes on top
        assert e.guest_phys_addr == HOTPLUG_BASE + 132 * MiB
        assert [r.guest_phys_addr for r in mem] == sorted(r.guest_phys_addr for r in mem)


def test_dimm_alignment() -> None:
    with FrontendMemory(dimm_align=128 * MiB) as mem:
        a = mem.add_dimm(2 * MiB)
        b = mem.add_dimm(2 * MiB)
        assert b.guest_phys_addr - a.guest_phys_addr == 128 * MiB
    with pytest.raises(GuestMemoryError, match="power of two"):
        FrontendMemory(dimm_align=3 * MiB)


def test_overlap_and_foreign_regions_are_refused() -> None:
    with FrontendMemory() as mem:
        mem.add_boot_ram(64 * MiB)
        with pytest.raises(GuestMemoryError, match="overlaps"):
            mem.add(32 * MiB, 64 * MiB)
        with pytest.raises(GuestMemoryError, match="overlaps"):
            mem.add_boot_ram(2 * MiB)
        with GuestRam(0, 2 * MiB) as stranger, pytest.raises(GuestMemoryError, match="not part"):
            mem.detach(stranger)
        with pytest.raises(GuestMemoryError, match="does not fit below"):
            FrontendMemory(hotplug_base=64 * MiB).add_boot_ram(128 * MiB)


def test_detach_keeps_the_region_open_and_close_releases_the_rest() -> None:
    mem = FrontendMemory()
    boot = mem.add_boot_ram(8 * MiB)
    dimm = mem.add_dimm(2 * MiB)
    before = procfs.measure(PID, mem.name_prefix)
    mem.detach(dimm)
    assert not dimm.closed and len(mem) == 1
    dimm.close()
    mem.close()
    mem.close()
    assert boot.closed
    after = procfs.measure(PID, mem.name_prefix)
    assert after.matching_fds <= before.matching_fds - 4  # 2 per region: ours + mmap's dup
    assert after.mappings == before.mappings - 2
