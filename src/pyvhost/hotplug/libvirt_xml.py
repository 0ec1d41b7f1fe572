"""A libvirt domain's memory state, read from its live XML into the same frozen dataclasses
the planner uses (:class:`~.state.VmState`); the ``<memory model='dimm'>`` XML pyvhost
attaches; libvirt URIs. Pure: strings in, dataclasses out (:mod:`.libvirt` does the I/O).

The XML is hostile until checked: sizes must be non-negative integers with a known unit,
ids are kept as text and never interpreted, anything unparsable is a
:class:`LibvirtXmlError` naming the element.

What libvirt 9.0 (libvirt's qemuBuildMemoryBackendProps) makes of the XML, measured:

- boot RAM is one backend per guest NUMA cell, ``ram-nodeN``; without ``<numa>`` it is
  ``pc.ram``. A DIMM with alias A is device A on backend ``memA``.
- the backend type: ``memory-backend-memfd`` for ``<source type='memfd'/>`` (with
  hugepages: ``hugetlb=on``); ``memory-backend-file`` for hugepages, ``<source
  type='file'/>`` or any explicit access mode; else ``memory-backend-ram`` (no fd).
- ``share``: the DIMM's ``access``, else its cell's ``memAccess``, else
  ``<memoryBacking><access mode>``; ``private`` or nothing is share=off.
- host NUMA placement: ``host-nodes`` is the DIMM's ``<source><nodemask>``, else the
  ``nodeset`` of ``<numatune><memnode cellid=N>`` for its guest node N, else of
  ``<numatune><memory>``; ``policy`` is that memnode's (else ``<memory>``'s) ``mode``,
  strict by default (QEMU's ``bind``). A DIMM has no policy of its own. (Measured with
  ``<memory>`` and with a nodemask; the memnode case as libvirt documents it.)
- ``prealloc``: on for a DIMM on hugepages (``<source><pagesize>`` or the domain's
  ``<hugepages>``), and for every DIMM when ``<memoryBacking><allocation
  mode='immediate'>`` (with its ``threads`` as ``prealloc-threads``). A DIMM has no
  preallocation switch of its own.

libvirt does not show QEMU's flat memory view. It is modelled here (:func:`flat_view`):
boot RAM from guest address 0 in cell order, split below/above 4 GiB the way q35 and pc
split it, each DIMM at its ``<address base>``. Low RAM is one piece once the firmware has
mapped RAM over the 0xc0000-0xfffff shadow (PAM, seen on a running guest); before that
(a domain created paused) QEMU shows the option ROM and BIOS holes, 2 or 3 pieces. So the
count is exact for running guests on the layouts modelled here and an upper bound before
boot; ``--qemu-monitor`` reads QEMU's own view instead (and taints the domain).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from .flatview import FlatRange
from .qemu_rules import Version
from .state import MemoryBackend, MemoryDevice, VhostUserDevice, VmState

KiB = 1024
GiB = 1 << 30
_UNITS = {"b": 1, "bytes": 1, "k": KiB, "kib": KiB, "kb": 1000, "m": KiB**2, "mib": KiB**2,
          "mb": 1000**2, "g": KiB**3, "gib": KiB**3, "gb": 1000**3, "t": KiB**4,
          "tib": KiB**4, "tb": 1000**4}
#: libvirt's prefix for user aliases: an alias it keeps as given (the QEMU device id).
USER_ALIAS = "ua-"
_ALIAS_OK = re.compile(r"^ua-[A-Za-z0-9_-]{1,60}$")
_QEMU_SCHEMES = ("qemu", "qemu+ssh", "qemu+libssh", "qemu+libssh2", "qemu+tcp", "qemu+tls",
                 "qemu+unix", "qemu+ext")
BASE_PAGE = 4096


class LibvirtXmlError(ValueError):
    """The domain XML is not what libvirt writes (or not a domain at all)."""


# -- URIs --------------------------------------------------------------------------------
@dataclass(frozen=True)
class LibvirtUri:
    """What pyvhost needs to know about a libvirt URI."""

    uri: str | None  # None: libvirt's default (LIBVIRT_DEFAULT_URI, or qemu:///system)
    transport: str | None  # "ssh", "tcp", ... or None for local
    host: str | None
    path: str

    @property
    def remote(self) -> bool:
        """Whether the domain runs on another machine: this host's sysfs says nothing
        about its hugepages, and libvirt is asked instead."""
        return bool(self.host) and self.host not in ("localhost", "127.0.0.1", "::1")


def parse_uri(uri: str | None) -> LibvirtUri:
    """Check a ``--connect`` URI: the QEMU driver, any transport (``qemu+ssh://host/system``
    drives a fleet through the tools that already manage it)."""
    if uri is None:
        return LibvirtUri(None, None, None, "/system")
    if any(c.isspace() for c in uri) or not uri:
        raise ValueError(f"{uri!r} is not a libvirt URI")
    parts = urlsplit(uri)
    if parts.scheme not in _QEMU_SCHEMES:
        raise ValueError(f"{uri!r}: pyvhost mem drives QEMU domains; use a qemu URI "
                         f"(qemu:///system, qemu+ssh://HOST/system, ...)")
    if parts.path not in ("/system", "/session", "/embed"):
        raise ValueError(f"{uri!r}: the QEMU driver's path is /system or /session")
    transport = parts.scheme.partition("+")[2] or None
    query = parse_qs(parts.query)
    if transport in (None, "unix") and parts.hostname is None and "socket" in query:
        transport = None
    return LibvirtUri(uri, transport, parts.hostname, parts.path)


# -- sizes and elements ------------------------------------------------------------------
def size_of(el: ET.Element | None, default_unit: str = "KiB") -> int:
    """A libvirt size element (``<size unit='MiB'>128</size>``) in bytes."""
    if el is None or el.text is None:
        raise LibvirtXmlError("a size element is missing")
    unit = (el.get("unit") or default_unit).lower()
    if unit not in _UNITS or not el.text.strip().isdigit():
        raise LibvirtXmlError(f"<{el.tag}> {el.text!r} {unit!r} is not a libvirt size")
    return int(el.text.strip()) * _UNITS[unit]


def _int(text: str | None, what: str) -> int:
    try:
        value = int(text or "", 0)
    except ValueError:
        raise LibvirtXmlError(f"{what} {text!r} is not a number") from None
    if value < 0:
        raise LibvirtXmlError(f"{what} {text!r} is negative")
    return value


@dataclass(frozen=True)
class Backing:
    """``<memoryBacking>``: where libvirt takes guest memory from."""

    source: str  # "anonymous", "memfd", "file"
    access: str | None  # "shared", "private" or None
    hugepages: bool
    hugepage_size: int | None  # bytes; None: the host's default
    allocation: str | None = None  # <allocation mode>: "immediate", "ondemand" or None
    allocation_threads: int | None = None  # <allocation threads>


def _backing(root: ET.Element) -> Backing:
    mb = root.find("memoryBacking")
    if mb is None:
        return Backing("anonymous", None, False, None)
    source = mb.find("source")
    access = mb.find("access")
    huge = mb.find("hugepages")
    page = huge.find("page") if huge is not None else None
    alloc = mb.find("allocation")
    threads = alloc.get("threads") if alloc is not None else None
    return Backing(source.get("type", "anonymous") if source is not None else "anonymous",
                   access.get("mode") if access is not None else None, huge is not None,
                   _page_attr(page) if page is not None else None,
                   alloc.get("mode") if alloc is not None else None,
                   _int(threads, "<allocation threads>") if threads is not None else None)


#: libvirt's ``<numatune>`` modes and the QEMU memory policy each becomes (strict and
#: preferred measured with libvirt 9.0; "restrictive" leaves placement to cgroups and
#: gives QEMU no policy, as libvirt's documentation says, not measured here).
NUMATUNE_POLICY = {"strict": "bind", "preferred": "preferred", "interleave": "interleave",
                   "restrictive": "default"}


@dataclass(frozen=True)
class Placement:
    """``<numatune>``'s word for one guest NUMA node: its mode and host nodeset."""

    mode: str  # strict, preferred, interleave, restrictive
    nodeset: tuple[int, ...]  # empty: none given
    source: str  # where it came from, for messages: "<numatune><memnode cellid='0'>", ...

    @property
    def policy(self) -> str:
        """The QEMU policy of a backend with host nodes under this placement."""
        return NUMATUNE_POLICY.get(self.mode, "bind")


@dataclass(frozen=True)
class Numatune:
    """``<numatune>``: ``<memory>`` and the per-cell ``<memnode>`` elements."""

    memory: Placement | None = None
    memnodes: tuple[tuple[int, Placement], ...] = ()

    def placement(self, node: int | None) -> Placement:
        """What libvirt applies to memory on guest node ``node``: its memnode, else
        ``<memory>``, else strict with no nodeset (libvirt's default mode)."""
        for cell, p in self.memnodes:
            if cell == (node or 0):
                return p
        return self.memory or Placement("strict", (), "libvirt's default (no <numatune>)")


def parse_nodeset(text: str | None, what: str = "nodeset") -> tuple[int, ...]:
    """A libvirt node set (``0``, ``0-3``, ``1-4,^3``) as sorted node numbers."""
    if not text:
        return ()
    keep: set[int] = set()
    drop: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        into = drop if part.startswith("^") else keep
        lo, _, hi = part.lstrip("^").partition("-")
        first, last = _int(lo, what), _int(hi or lo, what)
        if last < first or last > 4095:
            raise LibvirtXmlError(f"{what} {text!r} is not a node set")
        into.update(range(first, last + 1))
    return tuple(sorted(keep - drop))


def format_nodeset(nodes: tuple[int, ...]) -> str:
    """Node numbers as a libvirt node set: ``0-2,5``."""
    out: list[str] = []
    for n in sorted(set(nodes)):
        if out and out[-1].split("-")[-1] == str(n - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{n}"
        else:
            out.append(str(n))
    return ",".join(out)


def _numatune(root: ET.Element) -> Numatune:
    nt = root.find("numatune")
    if nt is None:
        return Numatune()
    memory = nt.find("memory")
    mem = None
    if memory is not None:
        mem = Placement(memory.get("mode", "strict"),
                        parse_nodeset(memory.get("nodeset"), "<numatune><memory nodeset>"),
                        f"<numatune><memory mode='{memory.get('mode', 'strict')}'>")
    cells: list[tuple[int, Placement]] = []
    for mn in nt.iterfind("memnode"):
        cell = _int(mn.get("cellid"), "<memnode cellid>")
        mode = mn.get("mode", "strict")
        cells.append((cell, Placement(mode, parse_nodeset(mn.get("nodeset"),
                                                          "<memnode nodeset>"),
                                      f"<numatune><memnode cellid='{cell}' mode='{mode}'>")))
    return Numatune(mem, tuple(cells))


def _page_attr(page: ET.Element) -> int:
    size = _int(page.get("size"), "<hugepages><page size>")
    unit = (page.get("unit") or "KiB").lower()
    if unit not in _UNITS:
        raise LibvirtXmlError(f"<page unit={unit!r}> is not a libvirt unit")
    return size * _UNITS[unit]


def backend_for(backing: Backing, access: str | None, bid: str, size: int,
                hugepage_size: int | None, placement: Placement | None = None,
                nodemask: tuple[int, ...] = ()) -> MemoryBackend:
    """The QEMU backend libvirt creates for memory with this access, guest node placement
    and ``<source><nodemask>`` (libvirt 9.0's rules, module docstring)."""
    huge = hugepage_size is not None
    nodes = nodemask or (placement.nodeset if placement is not None else ())
    policy = placement.policy if placement is not None and nodes else "default"
    if policy == "default":
        nodes = ()
    if backing.source == "memfd":
        qom = "memory-backend-memfd"
    elif huge or backing.source == "file" or access is not None:
        qom = "memory-backend-file"
    else:
        qom = "memory-backend-ram"
    return MemoryBackend(id=bid, qom_type=qom, size=size, share=access == "shared",
                         mem_path=None, hugetlb=huge and qom == "memory-backend-memfd",
                         hugetlbsize=hugepage_size or 0, host_nodes=nodes, policy=policy,
                         prealloc=huge or backing.allocation == "immediate")


@dataclass(frozen=True)
class LibvirtDomain:
    """What the live XML says, beyond the :class:`VmState` built from it."""

    state: VmState
    page_sizes: dict[str, int]  # backend id -> page size (for region counting)
    backing: Backing
    machine: str
    estimated: bool  # the flat view is modelled, not read from QEMU
    dimm_aliases: tuple[str, ...]
    numatune: Numatune = Numatune()


_VHOST_USER_DRIVERS = {"interface": "virtio-net-pci", "disk": "vhost-user-blk-pci",
                       "filesystem": "vhost-user-fs-pci", "video": "vhost-user-gpu-pci"}


def _vhost_user(devices: list[ET.Element]) -> list[VhostUserDevice]:
    found: list[VhostUserDevice] = []
    for el in devices:
        kind = None
        path = None
        if el.tag == "interface" and el.get("type") == "vhostuser":
            kind = "interface"
        elif el.tag == "disk" and el.get("type") == "vhostuser":
            kind = "disk"
        elif el.tag == "filesystem" and el.findtext("driver[@type='virtiofs']") is not None:
            kind = "filesystem"
        elif el.tag == "video" and el.findtext("driver[@name='vhostuser']") is not None:
            kind = "video"
        if kind is None:
            continue
        src = el.find("source")
        if src is not None:
            path = src.get("path") or src.get("socket")
        alias = el.find("alias")
        name = alias.get("name") if alias is not None else None
        dev_id = name or f"{kind}{len(found)}"
        found.append(VhostUserDevice(id=dev_id, qom_path=f"/machine/peripheral/{dev_id}",
                                     driver=_VHOST_USER_DRIVERS[kind],
                                     chardev=f"char{dev_id}" if name else None, socket=path,
                                     started=False, configure_mem_slots=None,
                                     qemu_region_count=None))
    return found


def _low_split(machine: str, ram: int) -> int:
    """How much boot RAM QEMU maps below 4 GiB (hw/i386/pc_q35.c, pc_piix.c)."""
    if "q35" in machine:
        lowmem = 0x80000000 if ram >= 0xB0000000 else 0xB0000000
    else:
        lowmem = 0xC0000000 if ram >= 0xE0000000 else 0xE0000000
    return min(ram, lowmem)


def flat_view(nodes: list[tuple[str, int]], machine: str, booted: bool, qboot: bool,
              dimms: list[tuple[str, int, int]]) -> tuple[FlatRange, ...]:
    """The RAM ranges of QEMU's flat view for boot RAM ``nodes`` ([(backend, size)] in
    cell order) and ``dimms`` ([(backend, base, size)]). Before the firmware has run,
    the option ROM (0xc0000-0xdffff) and BIOS (qboot 0xf0000-, SeaBIOS 0xe0000-) hide
    RAM below 1 MiB."""
    total = sum(size for _, size in nodes)
    below = _low_split(machine, total)
    holes: list[tuple[int, int]] = []
    if not booted:
        holes = [(0xC0000, 0xE0000), (0xF0000, 0x100000)] if qboot else [(0xC0000, 0x100000)]
    out: list[FlatRange] = []

    def add(gpa: int, size: int, name: str, offset: int) -> None:
        pieces = [(gpa, gpa + size)]
        for lo, hi in holes:
            cut = []
            for a, b in pieces:
                if b <= lo or a >= hi:
                    cut.append((a, b))
                    continue
                if a < lo:
                    cut.append((a, lo))
                if b > hi:
                    cut.append((hi, b))
            pieces = cut
        for a, b in pieces:
            out.append(FlatRange(a, b - a, "ram", name, offset + a - gpa))

    ram_addr = 0  # offset in the machine's RAM (nodes back to back)
    for name, size in nodes:
        lo_part = max(0, min(ram_addr + size, below) - ram_addr)
        if lo_part:
            add(ram_addr, lo_part, name, 0)
        if size > lo_part:
            start = max(ram_addr, below)
            add(4 * GiB + start - below, ram_addr + size - start, name, start - ram_addr)
        ram_addr += size
    for name, base, size in dimms:
        out.append(FlatRange(base, size, "ram", name, 0))
    return tuple(out)


def read_domain(xml: str, *, status: str, qemu_version: Version | None,
                default_hugepage: int | None) -> LibvirtDomain:
    """The :class:`VmState` of a domain from its live XML (``virDomainGetXMLDesc``)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise LibvirtXmlError(f"the domain XML does not parse: {e}") from e
    if root.tag != "domain":
        raise LibvirtXmlError(f"<{root.tag}> is not a libvirt domain")
    backing = _backing(root)
    numatune = _numatune(root)
    huge = (backing.hugepage_size or default_hugepage) if backing.hugepages else None
    os_type = root.find("os/type")
    machine = os_type.get("machine", "pc") if os_type is not None else "pc"
    loader = root.findtext("os/loader") or ""
    maxmem_el = root.find("maxMemory")
    slots = _int(maxmem_el.get("slots"), "<maxMemory slots>") if maxmem_el is not None else 0
    maxmem = size_of(maxmem_el) if maxmem_el is not None else 0

    backends: list[MemoryBackend] = []
    page_sizes: dict[str, int] = {}
    cells = root.findall("cpu/numa/cell")
    nodes: list[tuple[str, int]] = []
    cell_access: dict[int, str | None] = {}
    if cells:
        for cell in cells:
            cid = _int(cell.get("id"), "<cell id>")
            size = _cell_size(cell)
            access = cell.get("memAccess") or backing.access
            cell_access[cid] = access
            nodes.append((f"ram-node{cid}", size))
    else:
        total = size_of(root.find("memory"))
        nodes.append(("pc.ram", total))  # DIMMs are subtracted below
    devices_el = root.find("devices")
    devices = list(devices_el) if devices_el is not None else []
    dimms: list[MemoryDevice] = []
    dimm_ranges: list[tuple[str, int, int]] = []
    next_base = 4 * GiB
    for el in devices:
        if el.tag != "memory" or el.get("model") not in ("dimm", "virtio-mem"):
            continue
        alias_el = el.find("alias")
        alias = alias_el.get("name") if alias_el is not None else None
        size = size_of(el.find("target/size"))
        node_text = el.findtext("target/node")
        node = _int(node_text, "<target><node>") if node_text is not None else None
        addr = el.find("address")
        base = _int(addr.get("base"), "<address base>") if addr is not None and addr.get(
            "base") else None
        slot = _int(addr.get("slot"), "<address slot>") if addr is not None and addr.get(
            "slot") else None
        access = el.get("access") or cell_access.get(node or 0) or backing.access
        page_el = el.find("source/pagesize")
        dimm_huge = size_of(page_el) if page_el is not None else huge
        memdev = f"mem{alias}" if alias else None
        if memdev is not None:
            mask = parse_nodeset(el.findtext("source/nodemask"), "<source><nodemask>")
            b = backend_for(backing, access, memdev, size, dimm_huge,
                            numatune.placement(node), mask)
            backends.append(b)
            page_sizes[memdev] = dimm_huge or BASE_PAGE
        kind = "dimm" if el.get("model") == "dimm" else "virtio-mem"
        dimms.append(MemoryDevice(alias, kind, memdev, base, size,
                                  slot if kind == "dimm" else None, node, True, True))
        if memdev is not None:
            where = base if base is not None else next_base
            dimm_ranges.append((memdev, where, size))
            next_base = max(next_base, where + size)
    if not cells:
        plugged = sum(d.size for d in dimms)
        nodes = [("pc.ram", nodes[0][1] - plugged)]
        cell_access[0] = backing.access
    for i, (name, size) in enumerate(nodes):
        access = cell_access.get(i) if cells else backing.access
        backends.insert(i, backend_for(backing, access, name, size, huge,
                                       numatune.placement(i)))
        page_sizes[name] = huge or BASE_PAGE
    vhost = _vhost_user(devices)
    booted = status == "running"
    view = flat_view(nodes, machine, booted, "qboot" in loader, dimm_ranges)
    device_ids = [a.get("name", "") for a in root.iter("alias") if a.get("name")]
    state = VmState(
        status=status, boot_memory=sum(size for _, size in nodes), slots=slots,
        maxmem=maxmem or sum(size for _, size in nodes),
        plugged_memory=sum(d.size for d in dimms), numa_nodes=len(cells),
        backends=tuple(backends), memory_devices=tuple(dimms), vhost_user=tuple(vhost),
        flat_view=view, object_ids=tuple(b.id for b in backends),
        device_ids=tuple(device_ids), qemu_version=qemu_version)
    return LibvirtDomain(state, page_sizes, backing, machine, True,
                         tuple(d.id for d in dimms if d.id), numatune)


def _cell_size(cell: ET.Element) -> int:
    mem = ET.Element("memory", {"unit": cell.get("unit", "KiB")})
    mem.text = cell.get("memory")
    return size_of(mem)


def dimm_xml(alias: str, size: int, node: int | None, share: bool,
             hugepage_size: int | None = None, nodemask: tuple[int, ...] = ()) -> str:
    """The ``<memory model='dimm'>`` element pyvhost attaches (and detaches): with
    ``<source><pagesize>`` for hugepages and ``<source><nodemask>`` for host nodes (what
    libvirt makes QEMU's ``hugetlbsize`` and ``host-nodes``, measured with 9.0)."""
    if not _ALIAS_OK.match(alias):
        raise ValueError(f"{alias!r}: a libvirt user alias is ua- and 1-60 of [A-Za-z0-9_-]")
    if size <= 0 or size % KiB:
        raise ValueError(f"{size}: a DIMM size is a positive number of KiB")
    if any(n < 0 for n in nodemask):
        raise ValueError(f"{list(nodemask)}: host NUMA nodes are not negative")
    mem = ET.Element("memory", {"model": "dimm", "access": "shared" if share else "private"})
    if hugepage_size or nodemask:
        src = ET.SubElement(mem, "source")
        if hugepage_size:
            ET.SubElement(src, "pagesize", {"unit": "KiB"}).text = str(hugepage_size // KiB)
        if nodemask:
            ET.SubElement(src, "nodemask").text = format_nodeset(nodemask)
    target = ET.SubElement(mem, "target")
    ET.SubElement(target, "size", {"unit": "KiB"}).text = str(size // KiB)
    if node is not None:
        ET.SubElement(target, "node").text = str(node)
    ET.SubElement(mem, "alias", {"name": alias})
    return ET.tostring(mem, encoding="unicode")


def device_element(xml: str, alias: str) -> str | None:
    """Memory device ``alias`` of the live XML as ``detach-device`` wants it, or None.

    Its ``<address>`` is left out: libvirt matches the persistent config's copy of the
    device too (``--persistent``), which has a slot but no base ("matching memory device
    was not found" otherwise, measured with libvirt 9.0)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise LibvirtXmlError(f"the domain XML does not parse: {e}") from e
    for el in root.iterfind("devices/memory"):
        a = el.find("alias")
        if a is not None and a.get("name") == alias:
            for address in el.findall("address"):
                el.remove(address)
            return ET.tostring(el, encoding="unicode")
    return None


@dataclass(frozen=True)
class MigratingMemory:
    """A ``<memory>`` device of a domain's live XML as a migration carries it: its alias,
    layout (bytes, guest-physical ``base``), the element itself, and whether the
    persistent config has it too (None: a transient domain has no persistent config)."""

    alias: str | None
    model: str
    size: int
    node: int | None
    slot: int | None
    base: int | None
    xml: str
    persistent: bool | None


def _element_text(el: ET.Element) -> str:
    """``el`` as XML text indented on its own (the live XML indents it for its depth)."""
    el.tail = None
    ET.indent(el, "  ")
    return ET.tostring(el, encoding="unicode")


def migrating_memory(live: str, inactive: str | None) -> list[MigratingMemory]:
    """The ``<memory>`` devices of the live XML ``live`` (every one: libvirt sends the
    live XML to a migration's destination, which starts QEMU from it); each marked by
    whether ``inactive``, the persistent config, has a device with its alias."""
    try:
        root = ET.fromstring(live)
        config = ET.fromstring(inactive) if inactive is not None else None
    except ET.ParseError as e:
        raise LibvirtXmlError(f"the domain XML does not parse: {e}") from e
    kept = None if config is None else {
        a.get("name") for a in config.iterfind("devices/memory/alias")}
    out: list[MigratingMemory] = []
    for el in root.iterfind("devices/memory"):
        a = el.find("alias")
        alias = a.get("name") if a is not None else None
        node_text = el.findtext("target/node")
        addr = el.find("address")

        def attr(name: str, addr: ET.Element | None = addr) -> int | None:
            text = addr.get(name) if addr is not None else None
            return _int(text, f"<address {name}>") if text else None

        out.append(MigratingMemory(
            alias, el.get("model", ""), size_of(el.find("target/size")),
            _int(node_text, "<target><node>") if node_text is not None else None,
            attr("slot"), attr("base"), _element_text(el),
            None if kept is None else alias in kept))
    return out
