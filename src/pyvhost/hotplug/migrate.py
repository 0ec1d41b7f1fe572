"""Live migration of a VM that had memory hot-added: the destination's arguments and the
preflight. Pure: QEMU's state in (:mod:`.state`, and :class:`MigrationFacts` that
:mod:`.migrate_run` reads), arguments or refusals out.

QEMU does not migrate device creation: "the destination must be started with every
hot-added DIMM on its command line, with the same id, size, backend and address". A
memory backend's RAM block is named after the backend (``/objects/ID``) and a DIMM is
matched by its device id, so both ids, the sizes, the slot and the address must match,
and the backends must map the same kind of memory (memfd or file, shared or not, the
same hugepages): QEMU checks some of this only half-way through the copy ("Length
mismatch", "Unknown ramblock"), and a destination with less RAM may come up at all.

- :func:`destination_args` turns the source's hot-added DIMMs into ``-object`` and
  ``-device`` arguments (JSON syntax, which QEMU 7.2 takes for both: no quoting of
  commas in paths), what ``pyvhost mem migrate-args`` prints.
- :func:`preflight` compares the source with the destination and says, with a stable
  :class:`Code`, what would make the migration fail or corrupt the guest: a missing or
  different DIMM, a vhost-user device not connected on the destination, a vhost-user
  back-end that can not log the pages it writes (VHOST_F_LOG_ALL, PROTOCOL_F_LOG_SHMFD:
  without them QEMU blocks the migration, and a back-end that pretended would leave
  stale pages behind), a destination not waiting for a migration.

It must not talk QMP (:mod:`.migrate_run` does) and decides no hot-plug.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pyvhost.units import mib

from .plan import Refusal
from .state import MemoryBackend, MemoryDevice, VmState

#: What QEMU 7.2's x-query-virtio-status names the two features a vhost-user back-end
#: needs for a migration (the start of each entry; a description follows the colon).
LOG_ALL = "VHOST_F_LOG_ALL"
LOG_SHMFD = "VHOST_USER_PROTOCOL_F_LOG_SHMFD"
#: Migration states in which a migration is under way (query-migrate's status).
ACTIVE = frozenset({"setup", "active", "device", "pre-switchover", "cancelling",
                    "wait-unplug", "postcopy-active", "postcopy-paused",
                    "postcopy-recover"})


class Code(StrEnum):
    DEST_NOT_INCOMING = "DEST_NOT_INCOMING"
    SOURCE_NOT_RUNNING = "SOURCE_NOT_RUNNING"
    MIGRATION_ACTIVE = "MIGRATION_ACTIVE"
    MIGRATION_BLOCKED = "MIGRATION_BLOCKED"
    BACKEND_NO_LOGGING = "BACKEND_NO_LOGGING"
    DEST_MISSING_DIMM = "DEST_MISSING_DIMM"
    DEST_EXTRA_DIMM = "DEST_EXTRA_DIMM"
    DEST_LAYOUT_DIFFERS = "DEST_LAYOUT_DIFFERS"
    VHOST_USER_DEVICE_MISSING = "VHOST_USER_DEVICE_MISSING"
    VHOST_USER_NOT_CONNECTED = "VHOST_USER_NOT_CONNECTED"


@dataclass(frozen=True)
class VhostLogging:
    """What QEMU says about one started vhost-user device's back-end (x-query-virtio-status
    ``vhost-dev``): whether it offers the two features, and whether QEMU logs now."""

    offers_log_all: bool
    offers_log_shmfd: bool
    log_enabled: bool
    log_size: int


@dataclass(frozen=True)
class MigrationFacts:
    """What a migration needs to know of one QEMU beside its memory state.

    ``migration_status``: query-migrate's status (None before any migration);
    ``blocked_reasons``: why QEMU refuses to migrate now (its migration blockers);
    ``chardev_connected``: chardev id -> whether its socket is connected (query-chardev:
    QEMU names a client socket that lost its peer ``disconnected:...``); ``logging``:
    vhost-user device id -> :class:`VhostLogging`, for the devices the guest started.
    """

    run_state: str
    migration_status: str | None = None
    blocked_reasons: tuple[str, ...] = ()
    chardev_connected: Mapping[str, bool] = field(default_factory=dict)
    logging: Mapping[str, VhostLogging] = field(default_factory=dict)


@dataclass(frozen=True)
class DimmArgs:
    """One DIMM as the destination's command line recreates it."""

    device: MemoryDevice
    backend: MemoryBackend
    object_props: Mapping[str, Any]
    device_props: Mapping[str, Any]

    @property
    def argv(self) -> tuple[str, ...]:
        return ("-object", _json(self.object_props), "-device", _json(self.device_props))


@dataclass(frozen=True)
class DestinationArgs:
    """What the destination needs beyond the source's own command line."""

    dimms: tuple[DimmArgs, ...]
    notes: tuple[str, ...] = ()

    @property
    def argv(self) -> tuple[str, ...]:
        return tuple(a for d in self.dimms for a in d.argv)


def _json(props: Mapping[str, Any]) -> str:
    return json.dumps(dict(props), separators=(",", ":"))


def backend_props(b: MemoryBackend) -> dict[str, Any]:
    """``-object`` properties that recreate backend ``b`` (the ones ``object-add`` took)."""
    props: dict[str, Any] = {"qom-type": b.qom_type, "id": b.id, "size": b.size}
    if b.fd_backed:
        props["share"] = b.share
    if b.mem_path is not None:
        props["mem-path"] = b.mem_path
    if b.hugetlb:
        props["hugetlb"] = True
        if b.hugetlbsize:
            props["hugetlbsize"] = b.hugetlbsize
    if b.host_nodes:
        props["host-nodes"] = list(b.host_nodes)
    if b.policy not in ("default", ""):
        props["policy"] = b.policy
    if b.prealloc:
        props["prealloc"] = True
    return props


def device_props(d: MemoryDevice) -> dict[str, Any]:
    """``-device`` properties that put DIMM ``d`` where it is on the source."""
    props: dict[str, Any] = {"driver": "pc-dimm" if d.kind == "dimm" else d.kind,
                             "id": d.id, "memdev": d.memdev}
    if d.addr is not None:
        props["addr"] = d.addr
    if d.slot is not None:
        props["slot"] = d.slot
    if d.node is not None:
        props["node"] = d.node
    return props


def destination_args(state: VmState, *, every_dimm: bool = False) -> DestinationArgs:
    """The ``-object``/``-device`` pairs of the source's hot-added DIMMs (``every_dimm``:
    of every DIMM, for a destination whose command line has none)."""
    dimms: list[DimmArgs] = []
    notes: list[str] = []
    for d in state.memory_devices:
        if d.kind not in ("dimm", "nvdimm"):
            if d.hotplugged:
                notes.append(f"{d.id}: a hot-plugged {d.kind} device: not recreated here")
            continue
        if not (d.hotplugged or every_dimm):
            notes.append(f"{d.id}: on the source's own command line (not hot-added): the "
                         "destination gets it from there")
            continue
        backend = state.backend(d.memdev) if d.memdev else None
        if d.id is None or backend is None:
            notes.append(f"a {d.kind} without an id or a memory backend QMP shows "
                         f"(memdev {d.memdev!r}): it can not be recreated")
            continue
        dimms.append(DimmArgs(d, backend, backend_props(backend), device_props(d)))
    used = {d.memdev for d in state.memory_devices}
    boot = {b.id for b in state.boot_backends}
    for b in state.backends:
        if b.id not in used and b.id not in boot:
            notes.append(f"backend {b.id} is used by no device: QEMU does not migrate it, "
                         "the destination does not need it")
    return DestinationArgs(tuple(dimms), tuple(notes))


# ------------------------------------------------------------------------------------------
# The preflight
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preflight:
    refusals: tuple[Refusal[Code], ...]
    notes: tuple[str, ...] = ()

    @property
    def refused(self) -> bool:
        return bool(self.refusals)


def _differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    return [f"{k} {a.get(k)!r} on the source, {b.get(k)!r} on the destination"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _memory_refusals(src: VmState, dst: VmState) -> list[Refusal[Code]]:
    r: list[Refusal[Code]] = []
    machine = [f"{name} {a} on the source, {b} on the destination"
               for name, a, b in (("boot memory", mib(src.boot_memory), mib(dst.boot_memory)),
                                  ("slots", src.slots, dst.slots),
                                  ("maxmem", mib(src.maxmem), mib(dst.maxmem)))
               if a != b]
    if machine:
        r.append(Refusal(Code.DEST_LAYOUT_DIFFERS,
                         f"the destination's memory is not the source's: {'; '.join(machine)}: "
                         "start it with the source's -m option"))
    for b in src.boot_backends:
        boot = dst.backend(b.id)
        if boot is None:
            r.append(Refusal(Code.DEST_LAYOUT_DIFFERS,
                             f"boot RAM backend {b.id} is missing on the destination: start it "
                             "with the source's -object and -machine memory-backend="))
        elif diff := _differences(backend_props(b), backend_props(boot)):
            r.append(Refusal(Code.DEST_LAYOUT_DIFFERS,
                             f"boot RAM backend {b.id} differs: {'; '.join(diff)}"))
    src_dimms = {d.id: d for d in src.memory_devices if d.id is not None}
    dst_dimms = {d.id: d for d in dst.memory_devices if d.id is not None}
    for did, d in src_dimms.items():
        other = dst_dimms.get(did)
        if other is None:
            r.append(Refusal(Code.DEST_MISSING_DIMM,
                             f"{did} ({d.kind}, {mib(d.size)} at "
                             f"{'?' if d.addr is None else hex(d.addr)}) is missing on the "
                             "destination: start it with the arguments of pyvhost mem "
                             "migrate-args --qmp SOURCE"))
            continue
        diff = _differences(device_props(d) | {"size": d.size}, device_props(other)
                            | {"size": other.size})
        sb = src.backend(d.memdev) if d.memdev else None
        db = dst.backend(other.memdev) if other.memdev else None
        if sb is not None and db is not None:
            diff += [f"backend {x}" for x in _differences(backend_props(sb), backend_props(db))]
        elif sb is not None:
            diff.append(f"backend {sb.id} is missing on the destination")
        if diff:
            r.append(Refusal(Code.DEST_LAYOUT_DIFFERS,
                             f"{did} differs: {'; '.join(diff)}: recreate it with the "
                             "arguments of pyvhost mem migrate-args --qmp SOURCE"))
    for did, d in dst_dimms.items():
        if did not in src_dimms:
            r.append(Refusal(Code.DEST_EXTRA_DIMM,
                             f"the destination has {did} ({d.kind}, {mib(d.size)}), which "
                             "the source has not: QEMU would refuse its RAM block; start the "
                             "destination without it"))
    return r


def _vhost_refusals(src: VmState, src_facts: MigrationFacts, dst: VmState,
                    dst_facts: MigrationFacts) -> tuple[list[Refusal[Code]], list[str]]:
    r: list[Refusal[Code]] = []
    notes: list[str] = []
    dst_devices = {d.id: d for d in dst.vhost_user}
    for dev in src.vhost_user:
        facts = src_facts.logging.get(dev.id)
        if facts is not None and not (facts.offers_log_all and facts.offers_log_shmfd):
            missing = [name for name, ok in ((LOG_ALL, facts.offers_log_all),
                                             (LOG_SHMFD, facts.offers_log_shmfd)) if not ok]
            r.append(Refusal(Code.BACKEND_NO_LOGGING,
                             f"{dev.id}: the back-end at {dev.socket or dev.chardev} does not "
                             f"offer {' and '.join(missing)}: it can not tell QEMU which "
                             "guest pages it writes while the VM is copied"))
        other = dst_devices.get(dev.id)
        if other is None:
            r.append(Refusal(Code.VHOST_USER_DEVICE_MISSING,
                             f"the destination has no vhost-user device {dev.id} "
                             f"({dev.driver})"))
            continue
        connected = dst_facts.chardev_connected.get(other.chardev or "")
        if not connected:
            r.append(Refusal(Code.VHOST_USER_NOT_CONNECTED,
                             f"{dev.id} on the destination: its chardev "
                             f"{other.chardev or '(none)'} is not connected to a back-end"
                             f"{f' at {other.socket}' if other.socket else ''}: start the "
                             "back-end (it must listen before QEMU starts)"))
    told = any(x.code is Code.BACKEND_NO_LOGGING for x in r)
    for reason in src_facts.blocked_reasons:
        # QEMU 7.2 blocks a VM whose vhost-user back-end lacks either feature ("Migration
        # disabled: vhost lacks VHOST_F_LOG_ALL feature.", "... vhost-user backend lacks
        # VHOST_USER_PROTOCOL_F_LOG_SHMFD feature."), started by the guest or not.
        logging = LOG_ALL in reason or "LOG_SHMFD" in reason
        if logging and told:
            continue  # said per device above
        r.append(Refusal(Code.BACKEND_NO_LOGGING if logging else Code.MIGRATION_BLOCKED,
                         f"QEMU blocks the migration: {reason}"))
    for reason in dst_facts.blocked_reasons:
        notes.append(f"the destination could not migrate on later: {reason}")
    return r, notes


def preflight(src: VmState, src_facts: MigrationFacts, dst: VmState,
              dst_facts: MigrationFacts) -> Preflight:
    """Everything that would make migrating ``src`` to ``dst`` fail or corrupt the guest."""
    r: list[Refusal[Code]] = []
    if dst_facts.run_state != "inmigrate":
        r.append(Refusal(Code.DEST_NOT_INCOMING,
                         f"the destination QEMU is {dst_facts.run_state}, not waiting for a "
                         "migration: start it with the source's command line, the "
                         "arguments of pyvhost mem migrate-args and -incoming defer"))
    if src_facts.run_state not in ("running", "paused"):
        r.append(Refusal(Code.SOURCE_NOT_RUNNING,
                         f"the source QEMU is {src_facts.run_state}: only a running (or "
                         "paused) VM is migrated"))
    if src_facts.migration_status in ACTIVE:
        r.append(Refusal(Code.MIGRATION_ACTIVE,
                         f"a migration of the source is under way ({src_facts.migration_status})"))
    r += _memory_refusals(src, dst)
    vhost, notes = _vhost_refusals(src, src_facts, dst, dst_facts)
    r += vhost
    if not src.vhost_user:
        notes.append("the source has no vhost-user device")
    return Preflight(tuple(r), tuple(notes))
