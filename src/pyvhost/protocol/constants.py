"""Numbers of the vhost-user specification (QEMU docs/interop/vhost-user.rst) and of virtio.

This module owns names and values only: no logic beyond small helpers to name a bit.
"""

from __future__ import annotations

import enum

#: "The header's flags: Version this is version 0x1 of the protocol" (bits 0-1).
VHOST_USER_VERSION = 0x1
VERSION_MASK = 0x3
#: "Reply: Bit 2 is set for replies"
FLAG_REPLY = 1 << 2
#: "Need_reply: Bit 3 is the need_reply flag"
FLAG_NEED_REPLY = 1 << 3
#: Every other bit of the header's flags is reserved and must be zero.
FLAGS_KNOWN = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

HEADER_SIZE = 12

#: "VHOST_MEMORY_BASELINE_NREGIONS ... 8": the most regions SET_MEM_TABLE carries.
VHOST_MEMORY_BASELINE_NREGIONS = 8
#: The slot count pyvhost answers to GET_MAX_MEM_SLOTS. QEMU's own limit (and libvhost-user's)
#: is 509: KVM's 512 memslots less a few the host keeps for itself.
VHOST_USER_MAX_MEM_SLOTS = 509

#: Linux's SCM_MAX_FD; no message of the protocol needs more than 8.
MAX_FDS_PER_MESSAGE = 8
#: The largest payload pyvhost accepts. The biggest fixed payload is SET_MEM_TABLE
#: (8 + 8 * 32 bytes); GET/SET_CONFIG carry at most 256 bytes of config space.
MAX_PAYLOAD_SIZE = 4096
#: "VHOST_USER_MAX_CONFIG_SIZE 256"
MAX_CONFIG_SIZE = 256

#: SET_VRING_KICK/CALL/ERR: "Bits (0-7) of the payload contain the vring index. Bit 8 is the
#: invalid FD flag. This flag is set when there is no file descriptor in the ancillary data."
VRING_INDEX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8


class Request(enum.IntEnum):
    """Front-end message types ("Front-end message types" in the spec)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


def request_name(code: int) -> str:
    """The spec's name of a request code, or ``UNKNOWN(n)``."""
    try:
        return Request(code).name
    except ValueError:
        return f"UNKNOWN({code})"


class ProtocolFeature(enum.IntFlag):
    """Protocol feature bits (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


#: "Dirty pages are of size VHOST_LOG_PAGE 0x1000": one bit of the dirty log each.
VHOST_LOG_PAGE = 0x1000

#: "VHOST_USER_F_PROTOCOL_FEATURES 30": a virtio-feature-space bit owned by vhost-user.
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30


class VirtioFeature(enum.IntFlag):
    """Device-independent virtio feature bits (virtio 1.2, section 6)."""

    NOTIFY_ON_EMPTY = 1 << 24
    #: "VHOST_F_LOG_ALL 26": a vhost bit in the transport range: the back-end logs its
    #: writes to guest memory in a dirty log while it is acked (live migration).
    LOG_ALL = 1 << 26
    ANY_LAYOUT = 1 << 27
    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35


class VirtioStatus(enum.IntFlag):
    """Device status field bits (virtio 1.2, 2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


def bit_names(value: int, flags: type[enum.IntFlag]) -> list[str]:
    """Names of the set bits of ``value`` known to ``flags``, then ``bitN`` for the rest."""
    names: list[str] = []
    for bit in range(64):
        mask = 1 << bit
        if value & mask:
            try:
                member = flags(mask)
                names.append(member.name or f"bit{bit}")
            except ValueError:
                names.append(f"bit{bit}")
    return names
