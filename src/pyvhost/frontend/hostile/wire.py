"""Hostile cases on the wire: framing (header, size, flags, pace, unread replies) and fds
(too many, too few, where none belong, fds that are not shareable memory).

Each case quotes the sentence of QEMU's docs/interop/vhost-user.rst it relies on.
"""

from __future__ import annotations

import os
import time

from pyvhost.protocol.constants import (
    FLAG_REPLY,
    VHOST_USER_VERSION,
    ProtocolFeature,
    Request,
)
from pyvhost.units import MiB

from .attacker import Attacker, Response, header, memfd, message, region, table
from .case import Case, Context, NotApplicable

R = Request
V = VHOST_USER_VERSION


def _need_reply_ack(a: Attacker) -> None:
    if not a.fe.protocol_features & ProtocolFeature.REPLY_ACK:
        raise NotApplicable("REPLY_ACK not negotiated")


def rejected_files_kept(a: Attacker, ctx: Context, response: Response,
                        names: list[str]) -> None:
    """After a refused memory message, the back-end must hold none of its files."""
    if response.kind != "nack":
        return
    ctx.settle()
    kept = [n for n in names if ctx.holds(n)]
    if kept:
        ctx.leaked.append(f"kept {len(kept)} file(s) of the refused message: {', '.join(kept)}")


# -- framing ----------------------------------------------------------------------------------

def truncated_header(a: Attacker, ctx: Context) -> Response:
    a.negotiate()
    a.send(header(R.GET_FEATURES, 0)[:6])
    return a.response(timeout=0.5)


def truncated_payload_with_fd(a: Attacker, ctx: Context) -> Response:
    a.start()
    ram = a.ram(2 * MiB, gpa=1 << 32)
    body = table(region(0, a.memory.regions[0].memory_size, a.memory.regions[0].userspace_addr),
                 region(ram.guest_phys_addr, ram.memory_size, ram.userspace_addr))
    whole = header(R.SET_MEM_TABLE, len(body)) + body
    boot = a.memory.regions[0]
    a.send(whole[:len(whole) - 20], [boot.fd, ram.fd])
    return a.response(timeout=0.5)


def size_huge(a: Attacker, ctx: Context) -> Response:
    a.negotiate()
    a.send(header(R.GET_FEATURES, 0xFFFFFFF0, V) + b"\0" * 64)
    return a.response(timeout=1.0)


def size_too_small(a: Attacker, ctx: Context) -> Response:
    a.negotiate()
    _need_reply_ack(a)
    return a.ask(message(R.SET_FEATURES, b"\1\0\0\0"))


def payload_on_get(a: Attacker, ctx: Context) -> Response:
    a.negotiate()
    return a.ask(message(R.GET_FEATURES, b"\0" * 8, need_reply=False))


def bad_version(a: Attacker, ctx: Context) -> Response:
    a.negotiate()
    return a.ask(header(R.GET_FEATURES, 0, 0x2))


def reserved_flags(a: Attacker, ctx: Context) -> Response:
    a.negotiate()
    return a.ask(header(R.GET_FEATURES, 0, V | 0x20 | 0x8000))


def reply_flag_on_request(a: Attacker, ctx: Context) -> Response:
    a.negotiate()
    return a.ask(header(R.GET_FEATURES, 0, V | FLAG_REPLY))


def unknown_request(a: Attacker, ctx: Context) -> Response:
    a.negotiate()
    _need_reply_ack(a)
    return a.ask(message(200, b"\0" * 8))


def slow_sender(a: Attacker, ctx: Context) -> Response:
    a.negotiate()
    data = header(R.GET_FEATURES, 0, V)
    for i, byte in enumerate(data):
        a.send(bytes([byte]))
        harm = ctx.witness() if i == len(data) // 2 else ""
        if harm:
            ctx.harmed.append(f"while this connection sent a message one byte at a time: "
                              f"{harm}")
        time.sleep(0.1)
    return a.response()


def replies_never_read(a: Attacker, ctx: Context) -> Response:
    a.negotiate()
    sock = a.sock
    sock.setblocking(False)
    one = header(R.GET_FEATURES, 0, V)
    sent = 0
    deadline = time.monotonic() + 5
    try:
        while sent < 100_000 and time.monotonic() < deadline:
            try:
                sock.send(one)
            except BlockingIOError:
                time.sleep(0.05)
                try:
                    sock.send(one)
                except BlockingIOError:
                    break  # both directions are full: the back-end stopped reading
            sent += 1
    except OSError:
        return Response("closed", detail=f"after {sent} requests")
    finally:
        sock.setblocking(True)
        sock.settimeout(a.timeout)
    harm = ctx.witness()
    if harm:
        ctx.harmed.append(f"while this connection left {sent} replies unread: {harm}")
    return Response("silent", detail=f"{sent} requests sent, no reply read")


# -- fds --------------------------------------------------------------------------------------

def _table_with(a: Attacker, nregions: int, nfds: int) -> tuple[bytes, list[int], list[str]]:
    boot = a.memory.regions[0]
    rams = [a.ram(2 * MiB, gpa=(1 << 32) + i * 4 * MiB) for i in range(max(nregions, nfds))]
    regions = [region(boot.guest_phys_addr, boot.memory_size, boot.userspace_addr)]
    regions += [region(r.guest_phys_addr, r.memory_size, r.userspace_addr)
                for r in rams[:nregions - 1]]
    fds = [boot.fd] + [r.fd for r in rams[:nfds - 1]]
    return message(R.SET_MEM_TABLE, table(*regions)), fds, [r.name for r in rams]


def fds_too_many(a: Attacker, ctx: Context) -> Response:
    a.start()
    data, fds, names = _table_with(a, 2, 4)
    response = a.ask(data, fds)
    rejected_files_kept(a, ctx, response, names[1:])
    return response


def fds_too_few(a: Attacker, ctx: Context) -> Response:
    a.start()
    data, fds, names = _table_with(a, 3, 2)
    response = a.ask(data, fds)
    rejected_files_kept(a, ctx, response, names)
    return response


def fds_where_none_belong(a: Attacker, ctx: Context) -> Response:
    a.negotiate()
    fds = [a.fd(os.eventfd(0, os.EFD_CLOEXEC)) for _ in range(2)]
    return a.ask(message(R.GET_FEATURES, need_reply=False), fds)


def fds_twenty(a: Attacker, ctx: Context) -> Response:
    a.negotiate()
    fds = [a.fd(memfd(4096, f"pyvhost-hostile-{i}")) for i in range(20)]
    return a.ask(message(R.GET_FEATURES, need_reply=False), fds)


def fd_not_memory(a: Attacker, ctx: Context) -> Response:
    a.start()
    boot = a.memory.regions[0]
    event = a.fd(os.eventfd(0, os.EFD_CLOEXEC))
    data = message(R.SET_MEM_TABLE, table(
        region(boot.guest_phys_addr, boot.memory_size, boot.userspace_addr),
        region(1 << 32, 2 * MiB, boot.userspace_addr + boot.memory_size + (64 << 20))))
    if a.mem_slots:
        body = b"\0" * 8 + region(1 << 32, 2 * MiB, 0x7F00_0000_0000)
        return a.ask(message(R.ADD_MEM_REG, body), [event])
    return a.ask(data, [boot.fd, event])


def fd_on_rem_mem_reg(a: Attacker, ctx: Context) -> Response:
    a.start()
    if not a.mem_slots:
        raise NotApplicable("CONFIGURE_MEM_SLOTS not negotiated")
    ram = a.ram(2 * MiB, gpa=1 << 32)
    add = message(R.ADD_MEM_REG, b"\0" * 8 + region(ram.guest_phys_addr, ram.memory_size,
                                                     ram.userspace_addr))
    if a.ask(add, [ram.fd]).kind != "ack":
        return Response("nack", detail="ADD_MEM_REG refused")
    extra = a.ram(2 * MiB)
    response = a.ask(message(R.REM_MEM_REG, b"\0" * 8 + region(
        ram.guest_phys_addr, ram.memory_size, ram.userspace_addr)), [extra.fd])
    ctx.settle()
    if ctx.holds(extra.name):
        ctx.leaked.append("kept the fd that came with REM_MEM_REG")
    return response


CASES = [
    Case("framing-truncated-header", "framing",
         "A vhost-user message consists of 3 header fields and a payload.",
         "6 of the 12 header bytes, then hang up", truncated_header,
         reply_due=False, desync=True),
    Case("framing-truncated-payload-with-fds", "framing",
         "In the ancillary data there is an array of file descriptors for each memory "
         "mapped region.",
         "SET_MEM_TABLE with 2 fds whose payload stops 20 bytes short, then hang up",
         truncated_payload_with_fd, reply_due=False, desync=True),
    Case("framing-size-huge", "framing", ":size: 32-bit size of the payload",
         "GET_FEATURES announcing a 4 GiB payload", size_huge, reply_due=False,
         desync=True),
    Case("framing-size-too-small", "framing",
         "Depending on the request type, **payload** can be: A single 64-bit integer",
         "SET_FEATURES with a 4-byte payload, need_reply", size_too_small),
    Case("framing-payload-on-get", "framing",
         "VHOST_USER_GET_FEATURES ... :request payload: N/A",
         "GET_FEATURES carrying 8 bytes of payload", payload_on_get),
    Case("framing-bad-version", "framing",
         "Lower 2 bits are the version (currently 0x01)",
         "GET_FEATURES with version 2", bad_version, reply_due=False),
    Case("framing-reserved-flags", "framing",
         "Bit 2 is the reply flag ... Bit 3 is the need_reply flag",
         "GET_FEATURES with undefined flag bits 5 and 15 set", reserved_flags,
         reply_due=False),
    Case("framing-reply-flag-on-request", "framing",
         "Bit 2 is the reply flag - needs to be sent on each reply from the back-end",
         "a request with the reply flag set", reply_flag_on_request, reply_due=False),
    Case("framing-unknown-request", "framing",
         "With this protocol extension negotiated, the sender (QEMU) can set the "
         "need_reply [Bit 3] flag to any command. This indicates that the back-end MUST "
         "respond with a Payload VhostUserMsg indicating success or failure.",
         "request 200 with need_reply", unknown_request),
    Case("framing-slow-sender", "framing",
         "The communication consists of the *front-end* sending message requests and the "
         "*back-end* sending message replies.",
         "GET_FEATURES one byte every 0.1 s; the witness must be answered meanwhile",
         slow_sender),
    Case("framing-replies-never-read", "framing",
         "Most of the requests don't require replies. Here is a list of the ones that do: "
         "VHOST_USER_GET_FEATURES ...",
         "GET_FEATURES until the socket is full, never reading a reply; the witness must "
         "be answered meanwhile", replies_never_read, reply_due=False, desync=True),
    Case("fds-too-many", "fds",
         "The size and ordering of the fds matches the number and ordering of memory "
         "regions.", "SET_MEM_TABLE of 2 regions with 4 fds", fds_too_many),
    Case("fds-too-few", "fds",
         "The size and ordering of the fds matches the number and ordering of memory "
         "regions.", "SET_MEM_TABLE of 3 regions with 2 fds", fds_too_few),
    Case("fds-where-none-belong", "fds",
         "There are several messages that the front-end sends with file descriptors "
         "passed in the ancillary data: ...", "GET_FEATURES with 2 eventfds",
         fds_where_none_belong),
    Case("fds-twenty-on-one-message", "fds",
         "There are several messages that the front-end sends with file descriptors "
         "passed in the ancillary data: ...", "GET_FEATURES with 20 memfds",
         fds_twenty),
    Case("fds-not-shareable-memory", "fds",
         "A way for requesting shared memory represented by a file descriptor so it can be "
         "passed over a UNIX domain socket and then mapped by the other process.",
         "a memory region whose fd is an eventfd", fd_not_memory),
    Case("fds-on-rem-mem-reg", "fds",
         "If a file descriptor is passed, the back-end MUST close it without using it "
         "otherwise.", "REM_MEM_REG with an fd (CONFIGURE_MEM_SLOTS)", fd_on_rem_mem_reg),
]

__all__ = ["CASES", "rejected_files_kept"]

