"""What QEMU 10.0 sends on memory hot-plug, compared with QEMU 7.2, read from the golden
captures (tests/data/captures/README.md, sections 4-6): the facts pyvhost relies on.

- Without CONFIGURE_MEM_SLOTS both re-send the whole table (SET_MEM_TABLE, a fresh fd per
  region) on every DIMM added or removed: 1, 2, 3, 2 regions.
- With it both send one ADD_MEM_REG / REM_MEM_REG per region; with two queue pairs QEMU
  7.2 sends each one twice (once per queue pair's vhost device), QEMU 10.0 once.
- QEMU 10.0 asks for a reply to SET_VRING_ENABLE (NEED_REPLY, with REPLY_ACK); 7.2 does
  not. On stop, 10.0 fetches the rings (GET_VRING_BASE) before SET_STATUS 0; 7.2 after.
- A cold-plugged virtio-mem device is one region, sent once at start (gpa 4 GiB, its whole
  size); resizing it sends nothing, in both.
"""

from __future__ import annotations

import struct

from pyvhost.protocol.constants import FLAG_NEED_REPLY, Request
from support.captures import Captured, load


def sent(name: str) -> list[Captured]:
    return [c for c in load(name) if c.to_backend]


def table_sizes(name: str) -> list[int]:
    return [struct.unpack_from("<I", c.raw, 12)[0] for c in sent(name)
            if c.request == Request.SET_MEM_TABLE]


def region_ops(name: str) -> list[tuple[str, int]]:
    """(ADD/REM, guest_phys_addr) of each ADD_MEM_REG / REM_MEM_REG, in order."""
    ops = []
    for c in sent(name):
        if c.request in (Request.ADD_MEM_REG, Request.REM_MEM_REG):
            # VhostUserMemRegMsg: u64 padding, then guest_phys_addr.
            gpa = struct.unpack_from("<Q", c.raw, 12 + 8)[0]
            ops.append(("ADD" if c.request == Request.ADD_MEM_REG else "REM", gpa))
    return ops


def test_without_mem_slots_both_resend_the_whole_table() -> None:
    for name in ("qemu72_dpdk_setmemtable.jsonl", "qemu100_dpdk_setmemtable.jsonl"):
        assert table_sizes(name) == [1, 2, 3, 2], name
        for c in sent(name):
            if c.request == Request.SET_MEM_TABLE:
                assert c.nfds == struct.unpack_from("<I", c.raw, 12)[0]


def test_mem_slots_one_message_per_region_per_queue_pair_in_72_only() -> None:
    dimm1, dimm2 = 0x100000000, 0x108000000
    one = [("ADD", 0), ("ADD", dimm1), ("ADD", dimm2), ("REM", dimm1)]
    assert region_ops("qemu100_pyvhost_memslots.jsonl") == one
    assert region_ops("qemu100_pyvhost_mq2.jsonl") == one
    assert region_ops("qemu72_pyvhost_mq2.jsonl") == [
        ("ADD", 0), ("ADD", 0), ("ADD", dimm1), ("ADD", dimm1), ("ADD", dimm2),
        ("ADD", dimm2), ("REM", dimm1), ("REM", dimm1)]


def test_set_vring_enable_needs_a_reply_from_100_on() -> None:
    def flags(name: str) -> set[bool]:
        return {bool(c.flags & FLAG_NEED_REPLY) for c in sent(name)
                if c.request == Request.SET_VRING_ENABLE}

    assert flags("qemu72_dpdk_setmemtable.jsonl") == {False}
    assert flags("qemu100_dpdk_setmemtable.jsonl") == {True}


def test_stop_order() -> None:
    def tail(name: str) -> list[int]:
        return [c.request for c in sent(name)][-3:]

    assert tail("qemu72_dpdk_setmemtable.jsonl") == [
        Request.SET_STATUS, Request.GET_VRING_BASE, Request.GET_VRING_BASE]
    assert tail("qemu100_dpdk_setmemtable.jsonl") == [
        Request.GET_VRING_BASE, Request.GET_VRING_BASE, Request.SET_STATUS]


def test_virtio_mem_is_one_region_sent_once() -> None:
    for name in ("qemu72_pyvhost_virtio_mem.jsonl", "qemu100_pyvhost_virtio_mem.jsonl"):
        adds = [c for c in sent(name) if c.request == Request.ADD_MEM_REG]
        assert region_ops(name) == [("ADD", 0), ("ADD", 0x100000000)], name
        # VhostUserMemRegMsg: padding, guest_phys_addr, memory_size, ...
        assert struct.unpack_from("<Q", adds[1].raw, 12 + 16)[0] == 1 << 30
