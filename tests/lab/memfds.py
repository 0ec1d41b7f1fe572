"""What a vhost-user back-end process holds of guest memory files, by file (inode), from /proc.

QEMU names every ``memory-backend-memfd`` file the same (``memory-backend-memfd``), so
names can not tell the boot RAM from a DIMM: files are told apart by inode. The fds come
from ``/proc/PID/fd`` (``stat`` through the link gives the file's inode), the mappings
from ``/proc/PID/maps`` (its inode column), both read with :mod:`pyvhost.tools.procfs`.

:func:`holding_errors` is the assertion the lab tests make after every hot-plug step: for
each guest file, the back-end holds exactly as many fds and mappings as the memory table it
was last sent has regions on that file, and nothing of files no longer in the table.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pytest

from pyvhost.tools import procfs
from pyvhost.tools.relay import MemoryUpdate, RegionInfo
from support.procs import need


@dataclass(frozen=True)
class Holdings:
    """One look at a process: its fd count and, per memfd inode, its fds and mappings."""

    total_fds: int
    fds: Counter[int]
    maps: Counter[int]

    def of(self, inodes: Iterable[int]) -> tuple[int, int]:
        """(fds, mappings) held of the files ``inodes``."""
        wanted = set(inodes)
        return (sum(n for i, n in self.fds.items() if i in wanted),
                sum(n for i, n in self.maps.items() if i in wanted))


def memfd_inodes(pid: int) -> set[int]:
    """The inodes of the memfds process ``pid`` has open (QEMU: its memory backends)."""
    found: set[int] = set()
    for fd, target in procfs.fd_targets(pid).items():
        if target.startswith("/memfd:"):
            try:
                found.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
            except FileNotFoundError:
                continue  # closed meanwhile
    return found


def holdings(pid: int) -> Holdings:
    """The memfds ``pid`` holds open and has mapped, counted per inode."""
    fds: Counter[int] = Counter()
    targets = procfs.fd_targets(pid)
    for fd, target in targets.items():
        if target.startswith("/memfd:"):
            try:
                fds[os.stat(f"/proc/{pid}/fd/{fd}").st_ino] += 1
            except FileNotFoundError:
                continue
    maps: Counter[int] = Counter(m.inode for m in procfs.mappings(pid)
                                 if m.path.startswith("/memfd:"))
    return Holdings(len(targets), fds, maps)


def table_files(update: MemoryUpdate) -> Counter[int]:
    """Regions per file (inode) of a SET_MEM_TABLE the relay saw."""
    return Counter(r.file[1] for r in update.regions if r.file is not None)


def holding_errors(expected: Counter[int], guest_files: Iterable[int],
                   seen: Holdings) -> list[str]:
    """What is wrong with ``seen`` if the back-end should hold, of the guest's files
    ``guest_files``, exactly ``expected[inode]`` fds and mappings each (a back-end keeps one
    fd and one mapping per region, as DPDK and pyvhost do). Empty: all exact."""
    errors = []
    for inode in sorted(set(guest_files) | set(expected)):
        want = expected.get(inode, 0)
        fds, maps = seen.fds.get(inode, 0), seen.maps.get(inode, 0)
        if fds != want:
            errors.append(f"inode {inode}: {fds} fds held, {want} expected")
        if maps != want:
            errors.append(f"inode {inode}: {maps} mappings, {want} expected")
    return errors


def region_at(update: MemoryUpdate, gpa: int) -> RegionInfo:
    (region,) = [r for r in update.regions if r.guest_phys_addr == gpa]
    return region


def wait_holdings(pid: int, ok: Callable[[Holdings], bool], timeout: float = 30) -> Holdings:
    """Look at ``pid`` until ``ok(holdings)`` is true or ``timeout`` passes; the last look.
    (A back-end releases a region when its last reader lets go, not at the reply.)"""
    deadline = time.monotonic() + timeout
    while True:
        h = holdings(pid)
        if ok(h) or time.monotonic() > deadline:
            return h
        time.sleep(0.2)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``ip ARGS`` (iproute2), failing on an error unless ``check`` is False."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=60)


@dataclass(frozen=True)
class NetNs:
    name: str
    tap: str  # the tap pyvhost net creates; moved into the namespace by move_tap()

    def move_tap(self, address: str) -> None:
        ip("link", "set", self.tap, "netns", self.name)
        ip("-n", self.name, "addr", "add", address, "dev", self.tap)
        ip("-n", self.name, "link", "set", self.tap, "up")
        ip("-n", self.name, "link", "set", "lo", "up")


def make_netns() -> NetNs:
    """A fresh network namespace and a unique tap name for it; :func:`remove_netns` after."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces and taps need root")
    need("ip", "iproute2")
    tag = uuid.uuid4().hex[:6]
    ns = NetNs(f"pyvhost-lab-{tag}", f"pvl{tag}")
    ip("netns", "add", ns.name)
    return ns


def remove_netns(ns: NetNs) -> None:
    ip("netns", "del", ns.name, check=False)
