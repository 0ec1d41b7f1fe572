"""Hostile cases on the back-end's state: memory tables (overlap, overflow, zero size, too
many regions, unknown removals, out-of-order requests, a new file behind the same
addresses) and vring set-up (sizes, indexes, addresses, kick fds).

Each case quotes the sentence of QEMU's docs/interop/vhost-user.rst (or of the virtio 1.2
specification, where vhost-user defers to it) that it relies on.
"""

from __future__ import annotations

import os

from pyvhost.protocol.constants import ProtocolFeature, Request
from pyvhost.units import MiB

from ..memory import GuestRam
from .attacker import Attacker, Response, memfd, message, region, single, state, table
from .attacker import vring_addr as addr
from .case import Case, Context, NotApplicable
from .wire import rejected_files_kept

R = Request
TOP = 1 << 64


def _boot_desc(a: Attacker) -> bytes:
    boot = a.memory.regions[0]
    return region(boot.guest_phys_addr, boot.memory_size, boot.userspace_addr)


def _update(a: Attacker, ctx: Context, extra: bytes, ram: GuestRam) -> Response:
    """Tell the back-end about one more region, the way the connection negotiated: one
    ADD_MEM_REG, or SET_MEM_TABLE with boot RAM and it. A refusal must drop its fd."""
    if a.mem_slots:
        response = a.ask(message(R.ADD_MEM_REG, single(extra)), [ram.fd])
    else:
        boot = a.memory.regions[0]
        response = a.ask(message(R.SET_MEM_TABLE, table(_boot_desc(a), extra)),
                         [boot.fd, ram.fd])
    rejected_files_kept(a, ctx, response, [ram.name])
    return response


def overlap_gpa(a: Attacker, ctx: Context) -> Response:
    a.start()
    ram = a.ram(2 * MiB)
    return _update(a, ctx, region(1 * MiB, ram.memory_size, ram.userspace_addr), ram)


def overlap_user(a: Attacker, ctx: Context) -> Response:
    a.start()
    ram = a.ram(2 * MiB)
    boot = a.memory.regions[0]
    return _update(a, ctx, region(1 << 32, ram.memory_size, boot.userspace_addr), ram)


def gpa_overflow(a: Attacker, ctx: Context) -> Response:
    a.start()
    ram = a.ram(2 * MiB)
    return _update(a, ctx, region(TOP - 1 * MiB, ram.memory_size, ram.userspace_addr), ram)


def user_overflow(a: Attacker, ctx: Context) -> Response:
    a.start()
    ram = a.ram(2 * MiB)
    return _update(a, ctx, region(1 << 32, ram.memory_size, TOP - 1 * MiB), ram)


def zero_size(a: Attacker, ctx: Context) -> Response:
    a.start()
    ram = a.ram(2 * MiB)
    return _update(a, ctx, region(1 << 32, 0, ram.userspace_addr), ram)


def beyond_file(a: Attacker, ctx: Context) -> Response:
    a.start()
    ram = a.ram(2 * MiB)
    return _update(a, ctx, region(1 << 32, 64 * MiB, ram.userspace_addr), ram)


def offset_beyond_file(a: Attacker, ctx: Context) -> Response:
    a.start()
    ram = a.ram(2 * MiB)
    return _update(a, ctx, region(1 << 32, ram.memory_size, ram.userspace_addr, 1 << 40),
                   ram)


def too_many_regions(a: Attacker, ctx: Context) -> Response:
    a.start()
    if a.mem_slots:
        limit = a.fe.max_mem_slots or 0
        if not 0 < limit <= 512:
            raise NotApplicable(f"GET_MAX_MEM_SLOTS answered {limit}")
        last = Response("nack")
        for i in range(limit):  # boot RAM holds one slot: the last ADD is one too many
            ram = a.ram(2 * MiB, gpa=(1 << 32) + i * 4 * MiB)
            last = a.ask(message(R.ADD_MEM_REG, single(region(
                ram.guest_phys_addr, ram.memory_size, ram.userspace_addr))), [ram.fd])
            if last.kind != "ack":
                break
        return last
    boot = a.memory.regions[0]
    rams = [a.ram(2 * MiB, gpa=(1 << 32) + i * 4 * MiB) for i in range(8)]
    descs = [region(r.guest_phys_addr, r.memory_size, r.userspace_addr) for r in rams]
    response = a.ask(message(R.SET_MEM_TABLE, table(_boot_desc(a), *descs)),
                     [boot.fd] + [r.fd for r in rams])
    rejected_files_kept(a, ctx, response, [r.name for r in rams])
    return response


def rem_unknown(a: Attacker, ctx: Context) -> Response:
    a.start()
    if not a.mem_slots:
        raise NotApplicable("CONFIGURE_MEM_SLOTS not negotiated")
    return a.ask(message(R.REM_MEM_REG, single(region(0x7000_0000_0000, 2 * MiB,
                                                      0x7F12_3456_0000))))


def table_before_owner(a: Attacker, ctx: Context) -> Response:
    a.connect()
    ram = a.ram(2 * MiB)
    response = a.ask(message(R.SET_MEM_TABLE, table(region(0, ram.memory_size,
                                                           ram.userspace_addr))),
                     [ram.fd], timeout=1.0)
    return response


def same_addresses_new_file(a: Attacker, ctx: Context) -> Response:
    boot = a.start()
    fresh = a.ram(boot.memory_size)
    if a.mem_slots:
        # A second ADD_MEM_REG for the very addresses of a region it already has.
        return a.ask(message(R.ADD_MEM_REG, single(_boot_desc(a))), [fresh.fd])
    response = a.ask(message(R.SET_MEM_TABLE, table(_boot_desc(a))), [fresh.fd])
    if response.kind == "ack":
        ctx.settle()
        if ctx.holds(boot.name) and not ctx.holds(fresh.name):
            ctx.leaked.append("acknowledged a table naming a new file at the same addresses "
                              "but kept the old file mapped (and never mapped the new one)")
        elif ctx.holds(boot.name):
            ctx.leaked.append("acknowledged a table naming a new file at the same addresses "
                              "but still holds the old file")
    return response


# -- vrings -----------------------------------------------------------------------------------

def _ask_vring(a: Attacker, request: int, payload: bytes, fds: list[int] | None = None,
               ) -> Response:
    if not a.fe.protocol_features & ProtocolFeature.REPLY_ACK:
        a.send(message(request, payload, need_reply=False), fds or [])
        return a.ping()
    return a.ask(message(request, payload), fds or [])


def vring_num_zero(a: Attacker, ctx: Context) -> Response:
    a.start()
    return _ask_vring(a, R.SET_VRING_NUM, state(0, 0))


def vring_num_odd(a: Attacker, ctx: Context) -> Response:
    a.start()
    return _ask_vring(a, R.SET_VRING_NUM, state(0, 3))


def vring_num_huge(a: Attacker, ctx: Context) -> Response:
    a.start()
    return _ask_vring(a, R.SET_VRING_NUM, state(0, 65536))


def vring_index_huge(a: Attacker, ctx: Context) -> Response:
    a.start()
    return _ask_vring(a, R.SET_VRING_NUM, state(250, 256))


def vring_index_u32(a: Attacker, ctx: Context) -> Response:
    a.start()
    return _ask_vring(a, R.SET_VRING_BASE, state(0xFFFFFFFF, 0))


def vring_base_huge(a: Attacker, ctx: Context) -> Response:
    a.start()
    return _ask_vring(a, R.SET_VRING_BASE, state(0, 0x10005))


def _kick(a: Attacker, index: int) -> None:
    vring = a.fe.vrings.get(index)
    if vring is not None:
        os.eventfd_write(vring.kick_fd, 1)


def vring_addr_unmapped(a: Attacker, ctx: Context) -> Response:
    a.start()
    response = _ask_vring(a, R.SET_VRING_ADDR, addr(0, 0x1000, 0x3000, 0x2000))
    _kick(a, 0)
    return response


def vring_addr_straddles(a: Attacker, ctx: Context) -> Response:
    boot = a.start()
    end = boot.userspace_addr + boot.memory_size
    response = _ask_vring(a, R.SET_VRING_ADDR, addr(0, end - 16, end - 8, end - 12))
    _kick(a, 0)
    return response


def vring_before_table(a: Attacker, ctx: Context) -> Response:
    a.negotiate()
    ram = a.ram(2 * MiB)
    base = ram.userspace_addr
    a.send(message(R.SET_VRING_NUM, state(0, 256), need_reply=False))
    return _ask_vring(a, R.SET_VRING_ADDR, addr(0, base, base + 8192, base + 4096))


def kick_not_eventfd(a: Attacker, ctx: Context) -> Response:
    a.start()
    fd = a.fd(memfd(4096, "pyvhost-hostile-kick"))
    response = _ask_vring(a, R.SET_VRING_KICK, (0).to_bytes(8, "little"), [fd])
    harm = ctx.witness()
    if harm:
        ctx.harmed.append(f"after a kick fd that is a memfd: {harm}")
    return response


def kick_nofd_flag_with_fd(a: Attacker, ctx: Context) -> Response:
    a.start()
    fd = a.fd(memfd(4096, "pyvhost-hostile-nofd"))
    return _ask_vring(a, R.SET_VRING_KICK, (0x100).to_bytes(8, "little"), [fd])


CASES = [
    Case("memory-overlap-guest-addresses", "memory",
         "Guest addresses map to the vhost memory region containing that guest address.",
         "a region whose GPA range overlaps boot RAM's", overlap_gpa),
    Case("memory-overlap-user-addresses", "memory",
         "User addresses map to the vhost memory region containing that user address.",
         "a region at boot RAM's user address", overlap_user),
    Case("memory-guest-address-overflow", "memory",
         ":guest address: a 64-bit guest address of the region / :size: a 64-bit size",
         "guest address + size wraps past 2^64", gpa_overflow),
    Case("memory-user-address-overflow", "memory",
         ":user address: a 64-bit user address",
         "user address + size wraps past 2^64", user_overflow),
    Case("memory-zero-size", "memory", ":size: a 64-bit size",
         "a region of size 0", zero_size),
    Case("memory-size-beyond-file", "memory",
         "Sets the memory map regions on the back-end so it can translate the vring "
         "addresses.", "a 64 MiB region on a 2 MiB file", beyond_file),
    Case("memory-offset-beyond-file", "memory",
         ":mmap offset: 64-bit offset where region starts in the mapped memory",
         "mmap offset 1 TiB into a 2 MiB file", offset_beyond_file),
    Case("memory-more-regions-than-offered", "memory",
         "The back-end should return the message with a u64 payload containing the "
         "maximum number of memory slots for QEMU to expose to the guest. / num regions "
         "... region0 ... region7",
         "9 regions in SET_MEM_TABLE, or one ADD_MEM_REG past GET_MAX_MEM_SLOTS",
         too_many_regions),
    Case("memory-remove-unknown-region", "memory",
         "The memory region to be removed is identified by its guest address, user "
         "address and size.", "REM_MEM_REG of a region never added", rem_unknown),
    Case("memory-table-before-set-owner", "memory",
         "Issued when a new connection is established. It marks the sender as the "
         "front-end that owns of the session.",
         "SET_MEM_TABLE as the first message of a connection", table_before_owner,
         reply_due=False),
    Case("memory-same-addresses-new-file", "memory",
         "In the ancillary data there is an array of file descriptors for each memory "
         "mapped region.",
         "the boot region again, same addresses, a different file", same_addresses_new_file),
    Case("vring-size-zero", "vring",
         "Queue Size value is always a power of 2. The maximum Queue Size value is 32768. "
         "(virtio 1.2, 2.7)", "SET_VRING_NUM 0", vring_num_zero),
    Case("vring-size-not-power-of-2", "vring",
         "Queue Size value is always a power of 2. (virtio 1.2, 2.7)",
         "SET_VRING_NUM 3", vring_num_odd),
    Case("vring-size-too-big", "vring",
         "The maximum Queue Size value is 32768. (virtio 1.2, 2.7)",
         "SET_VRING_NUM 65536", vring_num_huge),
    Case("vring-index-beyond-queues", "vring",
         "The max number of queues the back-end supports can be queried with message "
         "VHOST_USER_GET_QUEUE_NUM. Front-end should stop when the number of requested "
         "queues is bigger than that.", "SET_VRING_NUM for ring 250", vring_index_huge),
    Case("vring-index-u32", "vring", ":index: a 32-bit index",
         "SET_VRING_BASE for ring 0xffffffff", vring_index_u32),
    Case("vring-base-beyond-16-bits", "vring",
         "Sets the base offset in the available vring.",
         "SET_VRING_BASE 0x10005 (avail idx is 16 bits)", vring_base_huge),
    Case("vring-address-unmapped", "vring",
         "Note that a ring address is an IOVA if VIRTIO_F_IOMMU_PLATFORM has been "
         "negotiated. Otherwise it is a user address.",
         "SET_VRING_ADDR at user addresses no region maps, then a kick",
         vring_addr_unmapped),
    Case("vring-address-straddles-region", "vring",
         "User addresses map to the vhost memory region containing that user address.",
         "rings that start 16 bytes before the end of boot RAM, then a kick",
         vring_addr_straddles),
    Case("vring-address-before-table", "vring",
         "Sets the memory map regions on the back-end so it can translate the vring "
         "addresses.", "SET_VRING_ADDR before any memory table", vring_before_table),
    Case("vring-kick-not-an-eventfd", "vring",
         "Set the event file descriptor for adding buffers to the vring. It is passed in "
         "the ancillary data.", "SET_VRING_KICK with a memfd", kick_not_eventfd),
    Case("vring-kick-invalid-flag-with-fd", "vring",
         "Bit 8 is the invalid FD flag. This flag is set when there is no file descriptor "
         "in the ancillary data.", "SET_VRING_KICK with bit 8 set and an fd attached",
         kick_nofd_flag_with_fd),
]

__all__ = ["CASES"]
