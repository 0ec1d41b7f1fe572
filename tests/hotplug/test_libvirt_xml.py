"""The libvirt domain XML reader, the DIMM XML and URI checks, without libvirt (the live
XML below is what libvirt 9.0 wrote for the test domains, trimmed)."""

from __future__ import annotations

import pytest

from pyvhost.hotplug.host import HostFacts, HugepagePool
from pyvhost.hotplug.libvirt import dimm_alias, libvirt_unsupported, plan_libvirt_add
from pyvhost.hotplug.libvirt_xml import (
    LibvirtXmlError,
    device_element,
    dimm_xml,
    flat_view,
    format_nodeset,
    migrating_memory,
    parse_nodeset,
    parse_uri,
    read_domain,
)
from pyvhost.hotplug.plan import AddRequest, Code
from pyvhost.hotplug.state import vhost_regions

MiB = 1 << 20
GiB = 1 << 30

LIVE = """<domain type='qemu' id='3'>
  <name>pv-add</name>
  <maxMemory slots='8' unit='KiB'>4194304</maxMemory>
  <memory unit='KiB'>393216</memory>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader type='rom'>/usr/share/qemu/qboot.rom</loader></os>
  <cpu><numa><cell id='0' cpus='0' memory='262144' unit='KiB'/></numa></cpu>
  <devices>
    <interface type='vhostuser'>
      <source type='unix' path='/run/vh.sock' mode='client'/>
      <model type='virtio'/><alias name='ua-net0'/>
    </interface>
    <memory model='dimm' access='shared'>
      <target><size unit='KiB'>131072</size><node>0</node></target>
      <alias name='ua-pyvhost-dimm0'/>
      <address type='dimm' slot='0' base='0x100000000'/>
    </memory>
  </devices>
</domain>"""


def host() -> HostFacts:
    return HostFacts(4096, 2 * MiB, (0,), (HugepagePool(2 * MiB, None, 0, 0),))


def test_live_xml_becomes_the_planner_state() -> None:
    d = read_domain(LIVE, status="running", qemu_version=(7, 2, 22), default_hugepage=2 * MiB)
    s = d.state
    assert (s.slots, s.maxmem, s.boot_memory, s.plugged_memory, s.numa_nodes) == (
        8, 4 * GiB, 256 * MiB, 128 * MiB, 1)
    assert [(b.id, b.qom_type, b.share) for b in s.backends] == [
        ("ram-node0", "memory-backend-memfd", True),
        ("memua-pyvhost-dimm0", "memory-backend-memfd", True)]
    (dimm,) = s.memory_devices
    assert (dimm.id, dimm.memdev, dimm.addr, dimm.slot, dimm.node) == (
        "ua-pyvhost-dimm0", "memua-pyvhost-dimm0", 4 * GiB, 0, 0)
    (net,) = s.vhost_user
    assert (net.id, net.socket, net.configure_mem_slots) == ("ua-net0", "/run/vh.sock", None)
    # Running: low RAM is one piece (as QEMU showed it for this domain), plus the DIMM.
    assert [(r.guest_phys_addr, r.memory_size) for r in vhost_regions(s, d.page_sizes)] == [
        (0, 256 * MiB), (4 * GiB, 128 * MiB)]
    assert "ua-pyvhost-dimm0" in s.device_ids and "ua-net0" in s.device_ids


def test_before_boot_the_rom_holes_split_low_ram() -> None:
    """Paused at creation, QEMU 7.2 showed ram-node0 at 0-0xbffff, 0xe0000-0xeffff and
    from 0x100000 (qboot; the option ROM and the BIOS between)."""
    d = read_domain(LIVE, status="paused", qemu_version=(7, 2, 22), default_hugepage=None)
    low = [(r.start, r.size) for r in d.state.flat_view if r.name == "ram-node0"]
    assert low == [(0, 0xC0000), (0xE0000, 0x10000), (0x100000, 256 * MiB - 0x100000)]
    assert len(vhost_regions(d.state, d.page_sizes)) == 4


def test_above_4g_split_and_nodes() -> None:
    ranges = flat_view([("ram-node0", 2 * GiB), ("ram-node1", 2 * GiB)], "pc-q35-7.2", True,
                       False, [])
    # q35 with 4 GiB: 2 GiB below 4 GiB, the rest from 4 GiB, each node its own region.
    assert [(r.name, r.start, r.size, r.offset) for r in ranges] == [
        ("ram-node0", 0, 2 * GiB, 0), ("ram-node1", 4 * GiB, 2 * GiB, 0)]
    pc = flat_view([("pc.ram", 4 * GiB)], "pc-i440fx-7.2", True, False, [])
    assert [(r.start, r.size) for r in pc] == [(0, 3 * GiB), (4 * GiB, 1 * GiB)]


@pytest.mark.parametrize(("backing", "access", "qom", "share"), [
    ("", None, "memory-backend-ram", False),  # anonymous, private: no fd at all
    ("<access mode='shared'/>", None, "memory-backend-file", True),
    ("<source type='memfd'/>", None, "memory-backend-memfd", False),
    ("<source type='memfd'/><access mode='shared'/>", "private", "memory-backend-memfd",
     False),
    ("<hugepages/><access mode='shared'/>", None, "memory-backend-file", True),
])
def test_backends_as_libvirt_makes_them(backing: str, access: str | None, qom: str,
                                         share: bool) -> None:
    dimm_access = f" access='{access}'" if access else ""
    xml = (f"<domain><memory unit='MiB'>384</memory><memoryBacking>{backing}</memoryBacking>"
           f"<maxMemory slots='2' unit='GiB'>4</maxMemory><devices>"
           f"<memory model='dimm'{dimm_access}><target><size unit='MiB'>128</size></target>"
           f"<alias name='dimm0'/></memory></devices></domain>")
    s = read_domain(xml, status="running", qemu_version=None, default_hugepage=2 * MiB).state
    boot, dimm = s.backends
    assert boot.id == "pc.ram" and boot.size == 256 * MiB  # <memory> less the DIMM
    assert (dimm.id, dimm.qom_type, dimm.share) == ("memdimm0", qom, share)


@pytest.mark.parametrize("xml", [
    "<domain><memory unit='MiB'>-1</memory></domain>",
    "<domain><memory unit='parsecs'>1</memory></domain>",
    "<domain><memory unit='KiB'>1e9</memory></domain>",
    "<network/>",
    "<domain><memory",
    "<domain><memory unit='MiB'>256</memory><maxMemory slots='x'>1</maxMemory></domain>",
])
def test_hostile_xml_is_refused_by_name(xml: str) -> None:
    with pytest.raises(LibvirtXmlError):
        read_domain(xml, status="running", qemu_version=None, default_hugepage=None)


def test_dimm_xml_and_its_live_element() -> None:
    xml = dimm_xml("ua-d1", 128 * MiB, 0, share=True)
    assert xml == ('<memory model="dimm" access="shared"><target><size unit="KiB">131072'
                   '</size><node>0</node></target><alias name="ua-d1" /></memory>')
    assert "access=\"private\"" in dimm_xml("ua-d1", 128 * MiB, None, share=False)
    assert "<pagesize unit=\"KiB\">2048</pagesize>" in dimm_xml("ua-d1", 128 * MiB, 0, True,
                                                                 2 * MiB)
    for alias in ("d1", "ua-", "ua-a b", "ua-<x>"):
        with pytest.raises(ValueError):
            dimm_xml(alias, 128 * MiB, 0, True)
    with pytest.raises(ValueError):
        dimm_xml("ua-d1", 1000, 0, True)
    element = device_element(LIVE, "ua-pyvhost-dimm0")
    assert element is not None and "ua-pyvhost-dimm0" in element and "131072" in element
    assert "<address" not in element  # the persistent config's copy has no base
    assert device_element(LIVE, "ua-none") is None


def test_migrating_memory_is_the_live_xml_marked_by_the_config() -> None:
    (dimm,) = migrating_memory(LIVE, None)  # transient: no persistent config
    assert (dimm.alias, dimm.model, dimm.size, dimm.node, dimm.slot, dimm.base) == (
        "ua-pyvhost-dimm0", "dimm", 128 * MiB, 0, 0, 4 * GiB)
    assert dimm.persistent is None
    assert dimm.xml.startswith("<memory model=\"dimm\" access=\"shared\">\n  <target>")
    assert "base=\"0x100000000\"" in dimm.xml
    config = LIVE.replace("<alias name='ua-pyvhost-dimm0'/>", "")
    assert [m.persistent for m in migrating_memory(LIVE, config)] == [False]
    assert [m.persistent for m in migrating_memory(LIVE, LIVE)] == [True]
    with pytest.raises(LibvirtXmlError, match="address base"):
        migrating_memory(LIVE.replace("base='0x100000000'", "base='-1'"), None)


def test_uris() -> None:
    assert parse_uri(None).uri is None and not parse_uri(None).remote
    local = parse_uri("qemu:///system")
    assert (local.transport, local.host, local.remote) == (None, None, False)
    private = parse_uri("qemu:///system?socket=/tmp/x/libvirt-sock")
    assert not private.remote and private.path == "/system"
    ssh = parse_uri("qemu+ssh://root@hv17.example/system?keyfile=/k")
    assert (ssh.transport, ssh.host, ssh.remote) == ("ssh", "hv17.example", True)
    assert parse_uri("qemu+tls://hv1/system").remote
    assert not parse_uri("qemu+ssh://localhost/system").remote
    assert parse_uri("qemu:///session").path == "/session"
    for bad in ("", "xen:///system", "test:///default", "qemu:///nope", "qemu:///sys tem",
                "lxc:///"):
        with pytest.raises(ValueError):
            parse_uri(bad)


def test_libvirt_plan_attaches_a_shared_dimm_with_a_user_alias() -> None:
    d = read_domain(LIVE, status="running", qemu_version=(7, 2, 22), default_hugepage=2 * MiB)
    assert dimm_alias(None, d.state) == "ua-pyvhost-dimm1"
    assert dimm_alias("d7", d.state) == "ua-d7" and dimm_alias("ua-x", d.state) == "ua-x"
    plan = plan_libvirt_add(AddRequest(128 * MiB), d, host(), persistent=True)
    assert not plan.refused and plan.device_id == "ua-pyvhost-dimm1"
    (step,) = plan.steps
    assert step.command == "attach-device" and step.arguments["config"] is True
    assert "access=\"shared\"" in step.arguments["xml"] and "<node>0</node>" in str(
        step.arguments["xml"])
    assert step.undo is not None and step.undo.command == "detach-device"
    assert any("counted from the domain XML" in n for n in plan.notes)
    private = plan_libvirt_add(AddRequest(128 * MiB, share=False), d, host(), persistent=False)
    assert [r.code for r in private.refusals] == [Code.NOT_SHARED_WITH_VHOST_USER]
    taken = plan_libvirt_add(AddRequest(128 * MiB, id="pyvhost-dimm0"), d, host(),
                             persistent=False)
    assert Code.ID_IN_USE in [r.code for r in taken.refusals]


def test_dimm_xml_host_nodes_and_pagesize_in_the_source() -> None:
    """``--host-nodes`` and ``--hugepages`` become the DIMM's ``<source>``, which libvirt
    9.0 turns into QEMU's host-nodes and hugetlbsize (tests/hotplug/test_libvirt.py
    reads them back from QEMU)."""
    xml = dimm_xml("ua-d1", 128 * MiB, 0, True, 2 * MiB, (0, 1, 2, 5))
    assert xml == ('<memory model="dimm" access="shared"><source><pagesize unit="KiB">2048'
                   '</pagesize><nodemask>0-2,5</nodemask></source><target><size unit="KiB">'
                   '131072</size><node>0</node></target><alias name="ua-d1" /></memory>')
    assert "<source><nodemask>1</nodemask></source>" in dimm_xml("ua-d1", 128 * MiB, 0, True,
                                                                nodemask=(1,))
    assert "<source>" not in dimm_xml("ua-d1", 128 * MiB, 0, True)
    with pytest.raises(ValueError):
        dimm_xml("ua-d1", 128 * MiB, 0, True, nodemask=(-1,))


def test_nodesets() -> None:
    assert parse_nodeset("0") == (0,) and parse_nodeset("1-4,^3") == (1, 2, 4)
    assert parse_nodeset(None) == () and parse_nodeset("0,0-1") == (0, 1)
    for bad in ("a", "3-1", "-1", "0-99999"):
        with pytest.raises(LibvirtXmlError):
            parse_nodeset(bad)
    assert format_nodeset((5, 0, 1, 2)) == "0-2,5" and format_nodeset(()) == ""
    assert format_nodeset((1, 3)) == "1,3"


TUNED = LIVE.replace(
    "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>",
    "<memoryBacking><source type='memfd'/><access mode='shared'/>"
    "<allocation mode='immediate' threads='2'/></memoryBacking>"
    "<numatune><memory mode='preferred' nodeset='0'/>"
    "<memnode cellid='0' mode='interleave' nodeset='0-1'/></numatune>").replace(
    "<target><size unit='KiB'>131072</size><node>0</node></target>",
    "<source><nodemask>1</nodemask></source>"
    "<target><size unit='KiB'>131072</size><node>0</node></target>")


def test_numatune_and_allocation_reach_the_backends() -> None:
    """What libvirt 9.0 gave QEMU, measured (qom-get on the backends): a DIMM's
    nodemask, else the cell's memnode nodeset, else <numatune><memory>'s; the mode of
    the cell's memnode (else <memory>'s) as the policy; prealloc and its threads from
    <allocation mode='immediate'>, and for DIMMs on hugepages."""
    d = read_domain(TUNED, status="running", qemu_version=None, default_hugepage=None)
    ram, dimm = d.state.backends
    assert (ram.host_nodes, ram.policy, ram.prealloc) == ((0, 1), "interleave", True)
    assert (dimm.host_nodes, dimm.policy, dimm.prealloc) == ((1,), "interleave", True)
    assert d.backing.allocation == "immediate" and d.backing.allocation_threads == 2
    assert d.numatune.placement(0).mode == "interleave"
    assert d.numatune.placement(1).mode == "preferred"  # no memnode: <memory>'s
    plain = read_domain(LIVE, status="running", qemu_version=None, default_hugepage=None)
    ram, dimm = plain.state.backends
    assert (ram.host_nodes, ram.policy, ram.prealloc) == ((), "default", False)
    assert plain.numatune.placement(0).policy == "bind"  # libvirt's default, strict
    with pytest.raises(LibvirtXmlError, match="memnode"):
        read_domain(TUNED.replace("cellid='0'", "cellid='x'"), status="running",
                    qemu_version=None, default_hugepage=None)


def test_policy_and_prealloc_libvirt_cannot_apply_per_dimm() -> None:
    """A DIMM has no policy and no preallocation of its own in libvirt: asking for what
    the domain gives anyway is fine; anything else says what to set instead."""
    plain = read_domain(LIVE, status="running", qemu_version=None, default_hugepage=None)
    tuned = read_domain(TUNED, status="running", qemu_version=None, default_hugepage=None)
    ok = [AddRequest(128 * MiB), AddRequest(128 * MiB, host_nodes=(0,), policy="bind"),
          AddRequest(128 * MiB, hugepages=True, prealloc=True)]
    for req in ok:
        assert libvirt_unsupported(req, plain) is None, req
    assert libvirt_unsupported(AddRequest(128 * MiB, host_nodes=(0,), policy="interleave",
                                          prealloc=True, prealloc_threads=2), tuned) is None
    why = libvirt_unsupported(AddRequest(128 * MiB, host_nodes=(0,), policy="preferred"),
                              plain)
    assert why is not None and "no memory policy per DIMM" in why
    assert "<numatune><memnode cellid='0' mode='preferred' nodeset='0'/>" in why
    why = libvirt_unsupported(AddRequest(128 * MiB, host_nodes=(0,), policy="bind"), tuned)
    assert why is not None and "<numatune><memnode cellid='0' mode='interleave'>" in why
    why = libvirt_unsupported(AddRequest(128 * MiB, prealloc=True), plain)
    assert why is not None and "<allocation mode='immediate'/>" in why
    why = libvirt_unsupported(AddRequest(128 * MiB, prealloc=True, prealloc_threads=4), tuned)
    assert why is not None and "threads='4'" in why and "(here 2)" in why


def test_libvirt_plan_writes_host_nodes_into_the_dimm() -> None:
    d = read_domain(LIVE, status="running", qemu_version=(7, 2, 22), default_hugepage=2 * MiB)
    plan = plan_libvirt_add(AddRequest(128 * MiB, host_nodes=(0,), policy="bind"), d, host(),
                            persistent=False)
    assert not plan.refused, plan.refusals
    (step,) = plan.steps
    assert "<source><nodemask>0</nodemask></source>" in str(step.arguments["xml"])
    assert step.undo is not None and step.undo.arguments["xml"] == step.arguments["xml"]
    # A host node the host lacks is refused by the planner, as on the QMP path.
    missing = plan_libvirt_add(AddRequest(128 * MiB, host_nodes=(3,)), d, host(),
                               persistent=False)
    assert missing.refused
