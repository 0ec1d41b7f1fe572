"""Host facts the planner needs, read from sysfs and /proc into frozen dataclasses.

Owns reading: hugepage pools (``/sys/kernel/mm/hugepages`` and, per NUMA node,
``/sys/devices/system/node/nodeN/hugepages``), the host's NUMA nodes, hugetlbfs mounts
(``/proc/mounts``) and what a ``mem-path`` is. It must not decide anything: the planner
(:mod:`.plan`) gets these facts as data and stays pure. The QMP socket is local, so the
host read here is the host QEMU runs on.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .state import VmState, page_size

BASE_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_POOL_DIR = re.compile(r"^hugepages-(\d+)kB$")
_NODE_DIR = re.compile(r"^node(\d+)$")
_SIZE = re.compile(r"^(\d+)([kKmMgG]?)$")


@dataclass(frozen=True)
class HugepagePool:
    """Hugepages of one size, on one host NUMA node (``node=None``: the whole host)."""

    page_size: int
    node: int | None
    total: int
    free: int
    reserved: int = 0  # only known for the whole host (resv_hugepages)

    @property
    def available(self) -> int:
        """Pages a new mapping can still get: free ones not promised to a mapping already."""
        return max(0, self.free - self.reserved)


@dataclass(frozen=True)
class PathFacts:
    """What a ``mem-path`` is on the host."""

    path: str
    exists: bool
    fstype: str | None  # of the mount holding it (or holding its parent if it is missing)
    hugetlb_page_size: int | None  # the page size when fstype is hugetlbfs


@dataclass(frozen=True)
class HostFacts:
    base_page_size: int
    default_hugepage_size: int | None
    host_nodes: tuple[int, ...]
    pools: tuple[HugepagePool, ...]
    mem_path: PathFacts | None = None

    def pool(self, page_size: int, node: int | None = None) -> HugepagePool | None:
        for p in self.pools:
            if p.page_size == page_size and p.node == node:
                return p
        return None


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def _pools(directory: Path, node: int | None) -> list[HugepagePool]:
    pools = []
    try:
        entries = sorted(directory.iterdir())
    except OSError:
        return []
    for entry in entries:
        m = _POOL_DIR.match(entry.name)
        if m is None:
            continue
        pools.append(HugepagePool(
            page_size=int(m.group(1)) * 1024, node=node,
            total=_read_int(entry / "nr_hugepages"), free=_read_int(entry / "free_hugepages"),
            reserved=_read_int(entry / "resv_hugepages") if node is None else 0))
    return pools


def _size(text: str) -> int | None:
    m = _SIZE.match(text.strip())
    if m is None:
        return None
    unit = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    return int(m.group(1)) * unit


def default_hugepage_size(meminfo: str) -> int | None:
    for line in meminfo.splitlines():
        if line.startswith("Hugepagesize:"):
            return int(line.split()[1]) * 1024
    return None


def mount_of(path: str, mounts: str) -> tuple[str, str, str] | None:
    """(mountpoint, fstype, options) of the mount holding ``path`` (the longest match)."""
    best: tuple[str, str, str] | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point = fields[1].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fields[2], fields[3])
    return best


def path_facts(path: str, mounts: str, default_hugepage: int | None) -> PathFacts:
    real = os.path.realpath(path)
    exists = os.path.exists(real)
    probe = real if exists else os.path.dirname(real)
    mount = mount_of(probe, mounts)
    fstype = mount[1] if mount else None
    page: int | None = None
    if fstype == "hugetlbfs" and mount is not None:
        page = default_hugepage
        for opt in mount[2].split(","):
            if opt.startswith("pagesize="):
                page = _size(opt.removeprefix("pagesize=")) or page
    return PathFacts(path, exists, fstype, page)


def read_host(mem_path: str | None = None, sys_root: Path = Path("/sys"),
              proc_root: Path = Path("/proc")) -> HostFacts:
    """Read the host's hugepage pools, NUMA nodes and (if given) what ``mem_path`` is."""
    meminfo = ""
    with contextlib.suppress(OSError):
        meminfo = (proc_root / "meminfo").read_text()
    default = default_hugepage_size(meminfo)
    pools = _pools(sys_root / "kernel/mm/hugepages", None)
    nodes: list[int] = []
    node_root = sys_root / "devices/system/node"
    try:
        node_dirs = sorted(node_root.iterdir())
    except OSError:
        node_dirs = []
    for entry in node_dirs:
        m = _NODE_DIR.match(entry.name)
        if m is None:
            continue
        nodes.append(int(m.group(1)))
        pools += _pools(entry / "hugepages", int(m.group(1)))
    facts = None
    if mem_path is not None:
        try:
            mounts = (proc_root / "mounts").read_text()
        except OSError:
            mounts = ""
        facts = path_facts(mem_path, mounts, default)
    return HostFacts(BASE_PAGE_SIZE, default, tuple(sorted(nodes)), tuple(pools), facts)


def page_sizes(state: VmState, host: HostFacts) -> dict[str, int]:
    """Each backend's page size (file backends: from the mount of their mem-path)."""
    mounts = ""
    try:
        with open("/proc/mounts") as f:
            mounts = f.read()
    except OSError:
        pass
    out = {}
    for b in state.backends:
        mp = (path_facts(b.mem_path, mounts, host.default_hugepage_size).hugetlb_page_size
              if b.mem_path else None)
        out[b.id] = page_size(b, host.base_page_size, host.default_hugepage_size, mp)
    return out
