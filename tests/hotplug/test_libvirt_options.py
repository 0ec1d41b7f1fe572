"""``pyvhost mem --libvirt`` options against a real libvirtd (Debian 12's libvirt 9.0
and QEMU 7.2, or libvirt 11.3 and QEMU 10.0; TCG): ``--host-nodes`` and ``--hugepages``
land in the DIMM's ``<source>`` and in QEMU's backend; ``--policy`` and ``--prealloc``,
which libvirt has no per-DIMM knob for, are refused with exit 2 and what to set instead;
BAD_REQUEST (a bad alias, a bad size) and DEVICE_NOT_FOUND are refused with exit 1.
Every refusal leaves the domain as it was.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from support.hugepages import hugetlbfs
from support.libvirtd import Domain, DomainSpec, Libvirtd

from .conftest import run_mem
from .test_libvirt import codes, domains, libvirtd, live_dimms, lv_json  # noqa: F401

pytestmark = [pytest.mark.qemu, pytest.mark.libvirt]


def backend(d: Domain, name: str) -> dict[str, Any]:
    """Properties of QEMU's backend ``name``, asked through libvirt (the test's look)."""
    import libvirt_qemu

    def get(prop: str) -> Any:
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(d.dom, json.dumps({
            "execute": "qom-get", "arguments": {"path": f"/objects/{name}",
                                                "property": prop}}), 0))
        return reply["return"]

    return {p: get(p) for p in ("host-nodes", "policy", "prealloc", "hugetlb",
                                "hugetlbsize", "share")}


def usage_error(lv: Libvirtd, *args: str) -> str:
    """``pyvhost mem ARGS --json`` that must end with exit 2: its error message."""
    code, out = run_mem(*args, "--connect", lv.uri, "--json")
    assert code == 2, out
    doc = json.loads(out)
    assert doc["schema"] == "pyvhost.error/1" and doc["error"]["kind"] == "usage", doc
    message: str = doc["error"]["message"]
    return message


def test_host_nodes_and_hugepages_land_in_the_dimm_and_in_qemu(
        libvirtd: Libvirtd, domains: Any) -> None:  # noqa: F811
    d = domains(DomainSpec("pv-opt"), boot=False)
    with hugetlbfs(64 + 8):
        try:
            code, doc = lv_json(libvirtd, "add", "--libvirt", "pv-opt", "--size", "128M",
                                "--id", "huge", "--hugepages", "--host-nodes", "0",
                                "--policy", "bind", "--prealloc")
            assert code == 0 and doc["outcome"]["ok"], doc
            (el,) = [m for m in ET.fromstring(d.dom.XMLDesc(0)).iterfind("devices/memory")
                     if m.find("alias") is not None
                     and m.find("alias").get("name") == "ua-huge"]  # type: ignore[union-attr]
            assert el.findtext("source/nodemask") == "0"
            page = el.find("source/pagesize")
            assert page is not None and (page.text, page.get("unit")) == ("2048", "KiB")
            assert backend(d, "memua-huge") == {
                "host-nodes": [0], "policy": "bind", "prealloc": True, "hugetlb": True,
                "hugetlbsize": 2 << 20, "share": True}
            code, status = lv_json(libvirtd, "status", "--libvirt", "pv-opt")
            (b,) = [b for b in status["backends"] if b["id"] == "memua-huge"]
            assert (b["host_nodes"], b["policy"], b["prealloc"]) == ([0], "bind", True), b
        finally:
            d.dom.destroy()  # gives its hugepages back before the pool shrinks


def test_what_libvirt_cannot_apply_per_dimm_is_refused(
        libvirtd: Libvirtd, domains: Any) -> None:  # noqa: F811
    d = domains(DomainSpec("pv-nokn"), boot=False)
    before = d.dom.XMLDesc(0)
    message = usage_error(libvirtd, "add", "--libvirt", "pv-nokn", "--size", "128M",
                          "--host-nodes", "0", "--policy", "preferred")
    assert "libvirt has no memory policy per DIMM" in message
    assert "<numatune><memnode cellid='0' mode='preferred' nodeset='0'/>" in message
    message = usage_error(libvirtd, "add", "--libvirt", "pv-nokn", "--size", "128M",
                          "--prealloc", "--dry-run")
    assert "<allocation mode='immediate'/>" in message and "--hugepages" in message
    message = usage_error(libvirtd, "add", "--libvirt", "pv-nokn", "--size", "128M",
                          "--hugepages", "--prealloc", "--prealloc-threads", "4")
    assert "threads='4'" in message and "(here not set)" in message
    assert d.dom.XMLDesc(0) == before


def test_bad_request_and_device_not_found(
        libvirtd: Libvirtd, domains: Any) -> None:  # noqa: F811
    d = domains(DomainSpec("pv-bad"), boot=False)
    before = d.dom.XMLDesc(0)
    code, doc = lv_json(libvirtd, "add", "--libvirt", "pv-bad", "--size", "128M", "--id",
                        "no good")
    assert code == 1 and codes(doc) == ["BAD_REQUEST"], doc
    assert "a libvirt user alias is ua- and 1-60 of [A-Za-z0-9_-]" in doc["refusals"][0][
        "message"] and doc["outcome"] is None
    code, doc = lv_json(libvirtd, "add", "--libvirt", "pv-bad", "--size", "1000")
    assert code == 1 and "BAD_REQUEST" in codes(doc), doc
    assert any("a DIMM size is a positive number of KiB" in r["message"]
               for r in doc["refusals"]), doc
    code, doc = lv_json(libvirtd, "add", "--libvirt", "pv-bad", "--size", "128M",
                        "--policy", "bind")
    assert code == 1 and codes(doc) == ["BAD_REQUEST"], doc
    assert "--policy bind needs --host-nodes" in doc["refusals"][0]["message"]
    code, doc = lv_json(libvirtd, "remove", "--libvirt", "pv-bad", "ua-none")
    assert code == 1 and codes(doc) == ["DEVICE_NOT_FOUND"], doc
    assert doc["refusals"][0]["message"] == (
        "no memory device 'ua-none' (memory devices: none)") and doc["outcome"] is None
    assert d.dom.XMLDesc(0) == before and live_dimms(d) == []
