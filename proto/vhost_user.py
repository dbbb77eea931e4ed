"""vhost-user wire format: message header, request ids, payloads, feature bits.

Pure construct definitions, no I/O. Every layout is little-endian (vhost-user uses
the host byte order and vhostd supports x86-64 only, see docs/architecture.md).
"""

from __future__ import annotations

import enum

from construct import (
    Bytes,
    GreedyBytes,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64ul,
    Padding,
    Struct,
    this,
)

VHOST_USER_VERSION = 0x1
VHOST_USER_REPLY_MASK = 0x4
VHOST_USER_NEED_REPLY_MASK = 0x8
VHOST_USER_VERSION_MASK = 0x3
# QEMU accepts exactly this value in a reply's flags field.
VHOST_USER_REPLY_FLAGS = VHOST_USER_VERSION | VHOST_USER_REPLY_MASK

VHOST_USER_HDR_SIZE = 12
# QEMU never sends more than 8 fds in one message.
VHOST_USER_MAX_FDS = 8
VHOST_MEMORY_BASELINE_NREGIONS = 8
VHOST_USER_MAX_CONFIG_SIZE = 256
# Largest payload any request we understand can carry: a full config read or write
# (12 + 256) or a full SET_MEM_TABLE (8 + 32 * 8).
VHOST_USER_MAX_PAYLOAD = max(12 + VHOST_USER_MAX_CONFIG_SIZE,
                             8 + 32 * VHOST_MEMORY_BASELINE_NREGIONS)


class Request(enum.IntEnum):
    """Front-end to back-end request ids."""

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


class BackendRequest(enum.IntEnum):
    """Back-end to front-end request ids (sent on the SET_BACKEND_REQ_FD channel)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5


class ProtocolFeature(enum.IntEnum):
    """Bit numbers of GET/SET_PROTOCOL_FEATURES."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


# Feature bit the vhost-user protocol borrows from virtio's reserved range.
VHOST_USER_F_PROTOCOL_FEATURES = 30
VHOST_F_LOG_ALL = 26

# Bits of the vring-fd u64 (SET_VRING_KICK/CALL/ERR).
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 1 << 8

# SET_VRING_ADDR flags.
VHOST_VRING_F_LOG = 0

# SET_CONFIG flags.
VHOST_SET_CONFIG_TYPE_FRONTEND = 0
VHOST_SET_CONFIG_TYPE_MIGRATION = 1


Header = Struct(
    "request" / Int32ul,
    "flags" / Int32ul,
    "size" / Int32ul,
)

U64 = Struct("u64" / Int64ul)

VringState = Struct(
    "index" / Int32ul,
    "num" / Int32ul,
)

VringAddr = Struct(
    "index" / Int32ul,
    "flags" / Int32ul,
    "desc_user_addr" / Int64ul,
    "used_user_addr" / Int64ul,
    "avail_user_addr" / Int64ul,
    "log_guest_addr" / Int64ul,
)

MemoryRegion = Struct(
    "guest_phys_addr" / Int64ul,
    "memory_size" / Int64ul,
    "userspace_addr" / Int64ul,
    "mmap_offset" / Int64ul,
)

MemoryTable = Struct(
    "nregions" / Int32ul,
    Padding(4),
    "regions" / MemoryRegion[this.nregions],
)

SingleMemoryRegion = Struct(
    Padding(8),
    "region" / MemoryRegion,
)

LogBase = Struct(
    "mmap_size" / Int64ul,
    "mmap_offset" / Int64ul,
)

Config = Struct(
    "offset" / Int32ul,
    "size" / Int32ul,
    "flags" / Int32ul,
    "region" / Bytes(this.size),
)

Inflight = Struct(
    "mmap_size" / Int64ul,
    "mmap_offset" / Int64ul,
    "num_queues" / Int16ul,
    "queue_size" / Int16ul,
    Padding(4),
)

IotlbMsg = Struct(
    "iova" / Int64ul,
    "size" / Int64ul,
    "uaddr" / Int64ul,
    "perm" / Int8ul,
    "type" / Int8ul,
    Padding(6),
)

Message = Struct(
    "header" / Header,
    "payload" / GreedyBytes,
)
