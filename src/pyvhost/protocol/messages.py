"""Typed vhost-user payloads: small frozen dataclasses that validate themselves.

Each payload knows its wire layout (``pack``/``unpack``) and nothing else: which request
carries which payload, and how many fds, is the codec's business
(:mod:`pyvhost.protocol.codec`). All integers are little-endian ("the vhost-user protocol
uses the host's byte order"; pyvhost runs on little-endian hosts only).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Protocol

from pyvhost.errors import PeerError

from .constants import (
    MAX_CONFIG_SIZE,
    VHOST_MEMORY_BASELINE_NREGIONS,
    VRING_INDEX_MASK,
    VRING_NOFD_MASK,
)

U64_MAX = (1 << 64) - 1


class PayloadError(PeerError):
    """A payload whose bytes do not fit its layout."""


class Payload(Protocol):
    """What every payload type offers."""

    def pack(self) -> bytes: ...


def _exact(data: bytes, size: int, what: str) -> None:
    if len(data) != size:
        raise PayloadError(f"{what} payload must be {size} bytes, got {len(data)}")


@dataclass(frozen=True, slots=True)
class Empty:
    """No payload (SET_OWNER, RESET_OWNER, GET_FEATURES ...)."""

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, data: bytes) -> Empty:
        _exact(data, 0, "empty")
        return cls()


@dataclass(frozen=True, slots=True)
class U64:
    """A 64-bit integer payload."""

    value: int
    _S: ClassVar[struct.Struct] = struct.Struct("<Q")

    def __post_init__(self) -> None:
        if not 0 <= self.value <= U64_MAX:
            raise ValueError(f"u64 out of range: {self.value}")

    def pack(self) -> bytes:
        return self._S.pack(self.value)

    @classmethod
    def unpack(cls, data: bytes) -> U64:
        _exact(data, 8, "u64")
        return cls(cls._S.unpack(data)[0])


@dataclass(frozen=True, slots=True)
class VringState:
    """"A vring state description": index and num (size, or base index)."""

    index: int
    num: int
    _S: ClassVar[struct.Struct] = struct.Struct("<II")

    def pack(self) -> bytes:
        return self._S.pack(self.index, self.num)

    @classmethod
    def unpack(cls, data: bytes) -> VringState:
        _exact(data, 8, "vring state")
        return cls(*cls._S.unpack(data))


@dataclass(frozen=True, slots=True)
class VringAddr:
    """"A vring address description": front-end virtual addresses of the three rings."""

    index: int
    flags: int
    descriptor: int
    used: int
    available: int
    log: int
    _S: ClassVar[struct.Struct] = struct.Struct("<IIQQQQ")

    #: "VHOST_VRING_F_LOG ... the log address field is valid"
    F_LOG: ClassVar[int] = 1

    def pack(self) -> bytes:
        return self._S.pack(self.index, self.flags, self.descriptor, self.used,
                            self.available, self.log)

    @classmethod
    def unpack(cls, data: bytes) -> VringAddr:
        _exact(data, cls._S.size, "vring address")
        return cls(*cls._S.unpack(data))


@dataclass(frozen=True, slots=True)
class VringFd:
    """The u64 of SET_VRING_KICK/CALL/ERR: a vring index, and whether no fd is attached."""

    index: int
    nofd: bool

    def pack(self) -> bytes:
        return U64(self.index | (VRING_NOFD_MASK if self.nofd else 0)).pack()

    @classmethod
    def unpack(cls, data: bytes) -> VringFd:
        value = U64.unpack(data).value
        if value & ~(VRING_INDEX_MASK | VRING_NOFD_MASK):
            raise PayloadError(f"vring fd payload has reserved bits set: {value:#x}")
        return cls(value & VRING_INDEX_MASK, bool(value & VRING_NOFD_MASK))


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """"A memory region description": where one region of guest memory lives.

    ``guest_phys_addr`` is a guest-physical address, ``userspace_addr`` a front-end virtual
    address, ``mmap_offset`` the offset of the region in the file sent with it.
    """

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    _S: ClassVar[struct.Struct] = struct.Struct("<QQQQ")

    def pack(self) -> bytes:
        return self._S.pack(self.guest_phys_addr, self.memory_size, self.userspace_addr,
                            self.mmap_offset)

    @classmethod
    def unpack_from(cls, data: bytes, offset: int = 0) -> MemoryRegion:
        return cls(*cls._S.unpack_from(data, offset))

    def check(self) -> None:
        """Refuse a region whose size is zero or whose ranges wrap past 2**64.

        Memory-safety invariant: after this, ``guest_phys_addr + memory_size``,
        ``userspace_addr + memory_size`` and ``mmap_offset + memory_size`` are all
        at most 2**64, so range arithmetic on them can not wrap.
        """
        if self.memory_size == 0:
            raise PayloadError(f"memory region at GPA {self.guest_phys_addr:#x} has size 0")
        for name, base in (("guest_phys_addr", self.guest_phys_addr),
                           ("userspace_addr", self.userspace_addr),
                           ("mmap_offset", self.mmap_offset)):
            if base + self.memory_size > 1 << 64:
                raise PayloadError(
                    f"memory region {name} {base:#x} + size {self.memory_size:#x} "
                    "overflows 64 bits")

    def describe(self) -> str:
        return (f"GPA {self.guest_phys_addr:#x}-{self.guest_phys_addr + self.memory_size:#x} "
                f"({self.memory_size >> 20} MiB) VA {self.userspace_addr:#x} "
                f"offset {self.mmap_offset:#x}")


REGION_SIZE = MemoryRegion._S.size


@dataclass(frozen=True, slots=True)
class MemoryTable:
    """"Multiple memory regions description" of SET_MEM_TABLE: num_regions, padding, regions.

    QEMU sends exactly ``8 + num_regions * 32`` bytes; DPDK and rust-vmm accept that, and so
    does pyvhost. It also accepts the full fixed-size struct (8 regions' room) that some
    front-ends send, as long as ``num_regions`` fits.
    """

    regions: tuple[MemoryRegion, ...]
    _H: ClassVar[struct.Struct] = struct.Struct("<II")

    def pack(self) -> bytes:
        return self._H.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, data: bytes) -> MemoryTable:
        if len(data) < cls._H.size:
            raise PayloadError(f"memory table payload too short: {len(data)} bytes")
        num, _padding = cls._H.unpack_from(data)
        if num > VHOST_MEMORY_BASELINE_NREGIONS:
            raise PayloadError(
                f"memory table has {num} regions; SET_MEM_TABLE carries at most "
                f"{VHOST_MEMORY_BASELINE_NREGIONS}")
        sizes = (cls._H.size + num * REGION_SIZE,
                 cls._H.size + VHOST_MEMORY_BASELINE_NREGIONS * REGION_SIZE)
        if len(data) not in sizes:
            raise PayloadError(
                f"memory table with {num} regions must be {sizes[0]} bytes, got {len(data)}")
        regions = tuple(MemoryRegion.unpack_from(data, cls._H.size + i * REGION_SIZE)
                        for i in range(num))
        return cls(regions)


@dataclass(frozen=True, slots=True)
class SingleMemoryRegion:
    """"Single memory region description" of ADD_MEM_REG / REM_MEM_REG: padding + region."""

    region: MemoryRegion

    def pack(self) -> bytes:
        return bytes(8) + self.region.pack()

    @classmethod
    def unpack(cls, data: bytes) -> SingleMemoryRegion:
        _exact(data, 8 + REGION_SIZE, "single memory region")
        return cls(MemoryRegion.unpack_from(data, 8))


@dataclass(frozen=True, slots=True)
class LogDescription:
    """"Log description" of SET_LOG_BASE (with PROTOCOL_F_LOG_SHMFD): "log size: size of
    area used for logging; log offset: offset from start of supplied file descriptor where
    logging starts (i.e. where guest address 0 would be logged)"."""

    mmap_size: int
    mmap_offset: int
    _S: ClassVar[struct.Struct] = struct.Struct("<QQ")

    def pack(self) -> bytes:
        return self._S.pack(self.mmap_size, self.mmap_offset)

    @classmethod
    def unpack(cls, data: bytes) -> LogDescription:
        _exact(data, cls._S.size, "log description")
        return cls(*cls._S.unpack(data))


@dataclass(frozen=True, slots=True)
class ConfigSpace:
    """"Virtio device config space": offset, size, flags, then ``size`` bytes."""

    offset: int
    size: int
    flags: int
    payload: bytes
    _H: ClassVar[struct.Struct] = struct.Struct("<III")

    def __post_init__(self) -> None:
        if self.size > MAX_CONFIG_SIZE:
            raise PayloadError(f"config size {self.size} exceeds {MAX_CONFIG_SIZE}")
        if len(self.payload) != self.size:
            raise PayloadError(f"config payload is {len(self.payload)} bytes, size says "
                               f"{self.size}")

    def pack(self) -> bytes:
        return self._H.pack(self.offset, self.size, self.flags) + self.payload

    @classmethod
    def unpack(cls, data: bytes) -> ConfigSpace:
        if len(data) < cls._H.size:
            raise PayloadError(f"config payload too short: {len(data)} bytes")
        offset, size, flags = cls._H.unpack_from(data)
        if len(data) != cls._H.size + size:
            raise PayloadError(f"config payload of size {size} must be {cls._H.size + size} "
                               f"bytes, got {len(data)}")
        return cls(offset, size, flags, bytes(data[cls._H.size:]))


@dataclass(frozen=True, slots=True)
class Raw:
    """The bytes of a payload pyvhost does not interpret (requests it does not support)."""

    data: bytes

    def pack(self) -> bytes:
        return self.data
