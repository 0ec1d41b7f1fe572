"""``pyvhost mem --libvirt`` against a real libvirtd, started privately by
tests/support/libvirtd.py: Debian 12's libvirt 9.0 driving Debian 12's QEMU 7.2 (TCG;
libvirt 9.0 cannot drive QEMU 10.0, so ``PYVHOST_QEMU`` alone does not apply here), or,
with ``PYVHOST_LIBVIRT``, libvirt 11.3 driving ``PYVHOST_QEMU``'s QEMU (CI: 10.0). Every
libvirt refusal provoked for real and forced past the planner to see libvirt's own verdict; add
and remove with MemTotal checked in the guest; a failure that libvirt rolls back leaves
nothing in the domain XML or in QEMU; the monitor libvirt holds gives exit 2 in time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvhost.hotplug.host import read_host
from pyvhost.hotplug.qemu_rules import rules_for
from pyvhost.lab.image import GuestImage
from pyvhost.tools.process import pyvhost_argv
from support.guestmem import wait_memtotal
from support.libvirtd import Domain, DomainSpec, Libvirtd, create_domain, start_libvirtd
from support.procs import Procs, wait_for_socket
from support.schemas import validate

from .conftest import run_mem

pytestmark = [pytest.mark.qemu, pytest.mark.libvirt]
KB = 1024
DIMM = 128 << 20


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[Libvirtd]:
    lv = start_libvirtd()
    try:
        yield lv
    finally:
        lv.stop()


@pytest.fixture
def domains(libvirtd: Libvirtd, hotplug_image: GuestImage, tmp_path: Path) -> Iterator[Any]:
    """``domains(spec, boot=True)``: a transient domain, destroyed at the end."""
    made: list[Domain] = []

    def make(spec: DomainSpec, boot: bool = True, persistent: bool = False) -> Domain:
        d = create_domain(libvirtd, hotplug_image, spec, boot=boot,
                          log=tmp_path / f"{spec.name}.console.log", persistent=persistent)
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in reversed(made):
            if d.console is not None:
                d.console.close()
            for end in (d.dom.destroy, d.dom.undefine):
                try:
                    end()
                except Exception as e:  # already gone (or transient) is fine
                    print(f"{end.__name__} {d.dom.name()}: {e}")


def lv_json(lv: Libvirtd, *args: str) -> tuple[int, dict[str, Any]]:
    code, out = run_mem(*args, "--connect", lv.uri, "--json")
    doc: dict[str, Any] = json.loads(out)
    return code, doc


def codes(doc: dict[str, Any]) -> list[str]:
    return [r["code"] for r in doc["refusals"]]


def hypervisor_version(lv: Libvirtd) -> tuple[int, int, int]:
    v = int(lv.connection().getVersion())
    return (v // 1_000_000, v // 1000 % 1000, v % 1000)


def libvirt_version(lv: Libvirtd) -> tuple[int, int, int]:
    """The daemon's libvirt (getLibVersion is answered by the daemon over the socket)."""
    v = int(lv.connection().getLibVersion())
    return (v // 1_000_000, v // 1000 % 1000, v % 1000)


def live_dimms(d: Domain) -> list[str]:
    root = ET.fromstring(d.dom.XMLDesc(0))
    return [a.get("name", "") for a in root.iterfind("devices/memory/alias")]


def qemu_objects(d: Domain) -> set[str]:
    """QEMU's /objects, asked through libvirt (the test's own look; taints the domain)."""
    import libvirt_qemu

    reply = json.loads(libvirt_qemu.qemuMonitorCommand(
        d.dom, json.dumps({"execute": "qom-list", "arguments": {"path": "/objects"}}), 0))
    return {o["name"] for o in reply["return"] if o["type"].startswith("child<")}


def pyvhost_net(procs: Procs, short_dir: Path, *extra: str) -> Path:
    sock = short_dir / "vh.sock"
    p = procs.pyvhost("net", "--socket", str(sock), "--reflect", "--no-stats", *extra)
    wait_for_socket(sock, p.proc, timeout=60)
    return sock


def refused_then_forced(lv: Libvirtd, d: Domain, *args: str) -> tuple[dict[str, Any],
                                                                        dict[str, Any]]:
    """Refused (exit 1, the domain unchanged), then forced: libvirt's own verdict."""
    name = d.dom.name()
    before = live_dimms(d)
    code, doc = lv_json(lv, "add", "--libvirt", name, *args)
    assert code == 1, doc
    assert doc["outcome"] is None and live_dimms(d) == before
    _, forced = lv_json(lv, "add", "--libvirt", name, *args, "--force")
    out = forced["outcome"]
    print(f"\n{codes(doc)} forced: ok={out['ok']} {out['error']}")  # pytest -s: the table
    return doc, forced


def test_status_add_remove_follow_memtotal(libvirtd: Libvirtd, domains: Any, procs: Procs,
                                            short_dir: Path) -> None:
    sock = pyvhost_net(procs, short_dir)
    d = domains(DomainSpec("pv-add", vhost_user=(sock,)))
    assert d.console is not None
    # The <qemu:override> reached QEMU: the NIC's -device has vectors 0 (docs/libvirt.md).
    (nic,) = [a for a in libvirtd.qemu_log("pv-add").splitlines()
              if a.startswith("-device ") and "virtio-net-pci" in a and "ua-net0" in a]
    assert '"vectors":0' in nic or "vectors=0" in nic, nic
    before = d.console.meminfo()["MemTotal"]

    code, status = lv_json(libvirtd, "status", "--libvirt", "pv-add")
    assert code == 0, status
    assert status["vm"]["slots"] == 8 and status["problems"] == []
    assert [b["id"] for b in status["backends"]] == ["ram-node0"]
    assert status["backends"][0]["share"] and status["backends"][0]["fd"]
    (dev,) = status["vhost_user"]["devices"]
    assert dev["id"] == "ua-net0" and dev["socket"] == str(sock)
    # A booted guest's low RAM is one piece (the firmware shadowed PAM to RAM).
    assert status["vhost_user"]["regions_used"] == 1

    code, doc = lv_json(libvirtd, "add", "--libvirt", "pv-add", "--size", "128M")
    assert code == 0, doc
    out = doc["outcome"]
    assert out["ok"] and out["done"] == ["attach-device"], doc
    assert doc["device_id"] == "ua-pyvhost-dimm0" and out["device"]["size"] == DIMM
    assert live_dimms(d) == ["ua-pyvhost-dimm0"]
    assert wait_memtotal(d.console, before + DIMM // KB) == before + DIMM // KB
    # The libvirt view and QEMU's own (--qemu-monitor) count the same regions.
    _, est = lv_json(libvirtd, "status", "--libvirt", "pv-add")
    _, exact = lv_json(libvirtd, "status", "--libvirt", "pv-add", "--qemu-monitor")
    assert est["vhost_user"]["regions_used"] == exact["vhost_user"]["regions_used"] == 2
    assert any("taint" in n for n in exact["vhost_user"]["notes"])

    code, doc = lv_json(libvirtd, "remove", "--libvirt", "pv-add", "ua-pyvhost-dimm0",
                        "--timeout", "120")
    assert code == 0, doc
    assert doc["outcome"]["ok"] and live_dimms(d) == []
    assert wait_memtotal(d.console, before) == before
    assert "memua-pyvhost-dimm0" not in qemu_objects(d)


def test_persistent_add_and_remove_change_the_config_too(libvirtd: Libvirtd, domains: Any,
                                                         procs: Procs,
                                                         short_dir: Path) -> None:
    import libvirt

    sock = pyvhost_net(procs, short_dir)
    d = domains(DomainSpec("pv-persist", vhost_user=(sock,)), persistent=True)
    assert d.console is not None
    before = d.console.meminfo()["MemTotal"]

    def config_dimms() -> list[str]:
        root = ET.fromstring(d.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        return [a.get("name", "") for a in root.iterfind("devices/memory/alias")]

    code, doc = lv_json(libvirtd, "add", "--libvirt", "pv-persist", "--size", "128M",
                        "--id", "keep")
    assert code == 0 and live_dimms(d) == ["ua-keep"] and config_dimms() == [], doc
    code, doc = lv_json(libvirtd, "add", "--libvirt", "pv-persist", "--size", "128M",
                        "--persistent")
    assert code == 0 and doc["steps"][0]["arguments"]["config"] is True, doc
    assert live_dimms(d) == ["ua-keep", "ua-pyvhost-dimm0"]
    assert config_dimms() == ["ua-pyvhost-dimm0"]
    migrate_args_lists_the_live_memory_devices(libvirtd, d)
    assert wait_memtotal(d.console, before + 2 * DIMM // KB) == before + 2 * DIMM // KB
    code, doc = lv_json(libvirtd, "remove", "--libvirt", "pv-persist", "ua-pyvhost-dimm0",
                        "--persistent", "--timeout", "120")
    assert code == 0, doc["outcome"]
    assert live_dimms(d) == ["ua-keep"] and config_dimms() == []


def migrate_args_lists_the_live_memory_devices(lv: Libvirtd, d: Domain) -> None:
    """``mem migrate-args --libvirt``: the live XML's <memory> devices (what a libvirt
    migration carries), the one missing from the persistent config named."""
    name = d.dom.name()
    code, doc = lv_json(lv, "migrate-args", "--libvirt", name)
    assert code == 0, doc
    validate(doc, "pyvhost.mem.migrate-args/1")
    assert doc["args"] == [] and doc["libvirt"]["persistent"] is True
    devices = doc["libvirt"]["memory_devices"]
    assert [(m["alias"], m["persistent"]) for m in devices] == [
        ("ua-keep", False), ("ua-pyvhost-dimm0", True)]
    live = {a.get("name"): a for a in ET.fromstring(d.dom.XMLDesc(0)).iterfind(
        "devices/memory/alias")}
    assert set(live) == {"ua-keep", "ua-pyvhost-dimm0"}
    for m in devices:
        el = ET.fromstring(m["xml"])  # the element itself, with its address
        assert el.find("alias").get("name") == m["alias"]  # type: ignore[union-attr]
        assert m["size"] == DIMM and m["base"] is not None and m["slot"] is not None
        assert int(el.find("address").get("base"), 0) == m["base"]  # type: ignore[union-attr,arg-type]
    assert sum("ua-keep is in the live XML only" in n for n in doc["notes"]) == 1
    human = subprocess.run(pyvhost_argv("mem", "migrate-args", "--libvirt", name,
                                        "--connect", lv.uri),
                           capture_output=True, text=True, timeout=120, check=False)
    assert human.returncode == 0, human
    assert human.stdout.count("<memory model=\"dimm\"") == 2, human.stdout
    assert "ua-keep is in the live XML only" in human.stderr


def test_refusals_on_a_paused_domain(libvirtd: Libvirtd, domains: Any, procs: Procs,
                                     short_dir: Path) -> None:
    """One paused domain (slots=2, maxmem 640 MiB over 256 MiB boot, 1 NUMA cell) shows
    NOT_SHARED_WITH_VHOST_USER, NUMA_NODE_OUT_OF_RANGE, MAXMEM_EXCEEDED, ID_IN_USE,
    HUGEPAGES_SHORT, SIZE_ALIGNMENT and NO_FREE_SLOT, each refused, then forced."""
    sock = pyvhost_net(procs, short_dir)
    d = domains(DomainSpec("pv-ref", slots=2, maxmem=640, vhost_user=(sock,)), boot=False)
    lv, name = libvirtd, "pv-ref"

    # libvirt 9.0 takes private memory beside a vhost-user interface (docs/libvirt.md,
    # "Traps").
    doc, forced = refused_then_forced(lv, d, "--size", "128M", "--no-share", "--id", "priv")
    assert codes(doc) == ["NOT_SHARED_WITH_VHOST_USER"]
    assert forced["outcome"]["ok"] is True, forced
    code, status = lv_json(lv, "status", "--libvirt", name)
    assert code == 1 and [(p["code"], p["device"]) for p in status["problems"]] == [
        ("NOT_SHARED_WITH_VHOST_USER", "ua-priv")]
    assert "private copy-on-write" in status["problems"][0]["message"]

    doc, forced = refused_then_forced(lv, d, "--size", "128M", "--node", "3")
    assert codes(doc) == ["NUMA_NODE_OUT_OF_RANGE"]
    assert forced["outcome"]["failed_step"] == "attach-device"
    assert forced["outcome"]["orphans"] == []
    doc, forced = refused_then_forced(lv, d, "--size", "384M")
    assert codes(doc) == ["MAXMEM_EXCEEDED"]
    assert forced["outcome"]["ok"] is False and "maxMemory" in forced["outcome"]["error"]
    doc, forced = refused_then_forced(lv, d, "--size", "128M", "--id", "priv")
    assert codes(doc) == ["ID_IN_USE"]
    assert forced["outcome"]["ok"] is False
    # More than the host's free 2 MiB pages, whatever other tests reserved meanwhile.
    pool = read_host().pool(2 << 20)
    short = ((pool.available if pool else 0) * 2 // 128 + 1) * 128  # MiB
    doc, forced = refused_then_forced(lv, d, "--size", f"{short}M", "--hugepages")
    assert "HUGEPAGES_SHORT" in codes(doc)
    assert forced["outcome"]["ok"] is False and forced["outcome"]["orphans"] == []
    # With many free pages on the host the size also exceeds maxMemory, and libvirt
    # refuses it before QEMU sees an object-add; otherwise QEMU's object-add fails.
    hugepages_reached_qemu = "maxMemory" not in forced["outcome"]["error"]
    assert live_dimms(d) == ["ua-priv"]

    doc, forced = refused_then_forced(lv, d, "--size", "100M")
    assert codes(doc) == ["SIZE_ALIGNMENT"]
    if hypervisor_version(lv) >= (10, 0, 0) and hugepages_reached_qemu:
        # QEMU 10.0 (7.2 does not): after the failed object-add of the hugepages DIMM,
        # every later object-add under the same id (libvirt's "memua-pyvhost-dimm0", the
        # same alias pyvhost picked again) fails with that error, whatever its arguments.
        # libvirt rolls it back; a new id is taken.
        out = forced["outcome"]
        assert out["ok"] is False and out["failed_step"] == "attach-device", out
        assert "unable to map backing store for guest RAM: Cannot allocate memory" in out[
            "error"]
        assert out["orphans"] == [] and live_dimms(d) == ["ua-priv"]
        doc, forced = refused_then_forced(lv, d, "--size", "100M", "--id", "odd")
        assert codes(doc) == ["SIZE_ALIGNMENT"]
    assert forced["outcome"]["ok"] is True  # libvirt and QEMU take it; the guest wastes 100M
    doc, forced = refused_then_forced(lv, d, "--size", "128M")
    assert codes(doc) == ["NO_FREE_SLOT"]
    assert forced["outcome"]["ok"] is False and forced["outcome"]["orphans"] == []
    assert len(live_dimms(d)) == 2


def test_no_slots_and_private_boot_ram(libvirtd: Libvirtd, domains: Any, procs: Procs,
                                       short_dir: Path) -> None:
    sock = pyvhost_net(procs, short_dir)
    d = domains(DomainSpec("pv-noslots", slots=None, vhost_user=(sock,)), boot=False)
    doc, forced = refused_then_forced(libvirtd, d, "--size", "128M")
    assert codes(doc) == ["NO_SLOTS_CONFIGURED"]
    assert forced["outcome"]["ok"] is False and forced["outcome"]["orphans"] == []
    assert live_dimms(d) == []

    spec = DomainSpec("pv-private", source=None, access=None, vhost_user=(sock,))
    if libvirt_version(libvirtd) >= (11, 0, 0):
        # Private anonymous boot RAM with a vhost-user interface: libvirt 11.3 refuses to
        # start it (9.0 starts it; pyvhost's refusal of the 9.0 domain is below).
        with pytest.raises(RuntimeError,
                           match="unsupported configuration: 'interface' requires shared "
                                 "memory"):
            domains(spec, boot=False)
        assert "pv-private" not in [x.name() for x in libvirtd.connection().listAllDomains(0)]
        return
    # Private anonymous boot RAM with a vhost-user interface: libvirt 9.0 starts it.
    priv = domains(spec, boot=False)
    code, status = lv_json(libvirtd, "status", "--libvirt", "pv-private")
    assert code == 1 and [p["code"] for p in status["problems"]] == ["BOOT_RAM_NOT_SHARED"]
    assert status["backends"][0]["type"] == "memory-backend-ram"
    code, doc = lv_json(libvirtd, "add", "--libvirt", "pv-private", "--size", "128M")
    assert code == 1 and "BOOT_RAM_NOT_SHARED" in codes(doc)
    assert live_dimms(priv) == []


def test_region_limit_exact_and_rolled_back(libvirtd: Libvirtd, domains: Any, procs: Procs,
                                            short_dir: Path) -> None:
    """pyvhost net without CONFIGURE_MEM_SLOTS (8 regions), a booted guest (boot RAM 1
    region): 7 DIMMs, and the 8th refused by the planner and by QEMU through libvirt,
    which rolls its object back: nothing is left in the XML or in QEMU."""
    sock = pyvhost_net(procs, short_dir, "--no-mem-slots")
    d = domains(DomainSpec("pv-limit", slots=10, vhost_user=(sock,)))
    accepted = 0
    while True:
        code, doc = lv_json(libvirtd, "add", "--libvirt", "pv-limit", "--size", "128M")
        if code != 0:
            break
        accepted += 1
        assert accepted <= 10, "the planner never refused"
    assert code == 1 and codes(doc) == ["VHOST_USER_REGION_LIMIT"], doc
    assert accepted == 7
    before = qemu_objects(d)
    code, forced = lv_json(libvirtd, "add", "--libvirt", "pv-limit", "--size", "128M",
                           "--force", "--qemu-monitor")
    out = forced["outcome"]
    assert code == 3 and out["ok"] is False and out["failed_step"] == "attach-device"
    assert rules_for(hypervisor_version(libvirtd))[0].region_refusal in out["error"]
    assert out["orphans"] == [] and len(live_dimms(d)) == 7
    assert qemu_objects(d) == before


def test_held_monitor_is_bounded_and_names_libvirt(libvirtd: Libvirtd, domains: Any) -> None:
    d = domains(DomainSpec("pv-held"), boot=False)
    monitor = libvirtd.monitor_path(d.dom)
    assert monitor.exists()
    r = subprocess.run(pyvhost_argv("mem", "status", "--qmp", str(monitor), "--timeout", "3"),
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2, r
    assert "libvirt domain 'pv-held'" in r.stderr and "--libvirt pv-held" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1


def test_without_the_binding_it_says_how_to_install_it() -> None:
    code = ("import sys; sys.modules['libvirt'] = None; sys.modules['libvirt_qemu'] = None\n"
            "from pyvhost.cli import main\n"
            "main(['mem', 'status', '--libvirt', 'vm1'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 2, r
    assert "pip install 'pyvhost[libvirt]'" in r.stderr and "libvirt-dev" in r.stderr
