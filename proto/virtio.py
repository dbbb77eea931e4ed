"""virtio split-ring structures and common feature bits (construct, no I/O).

These definitions document the layouts and serve the control plane and tests. The
data path reads guest memory with precompiled ``struct.Struct`` objects whose formats
are derived from the same field lists (see vhostd/engine/virtqueue.py).
"""

from __future__ import annotations

import enum

from construct import Array, Int16ul, Int32ul, Int64ul, Struct


class Feature(enum.IntEnum):
    """Device-independent virtio feature bit numbers."""

    VIRTIO_F_NOTIFY_ON_EMPTY = 24
    VIRTIO_F_ANY_LAYOUT = 27
    VIRTIO_RING_F_INDIRECT_DESC = 28
    VIRTIO_RING_F_EVENT_IDX = 29
    VIRTIO_F_VERSION_1 = 32
    VIRTIO_F_ACCESS_PLATFORM = 33
    VIRTIO_F_RING_PACKED = 34
    VIRTIO_F_IN_ORDER = 35
    VIRTIO_F_RING_RESET = 40
    VIRTIO_F_ADMIN_VQ = 41


class DeviceStatus(enum.IntFlag):
    """virtio device status bits (the byte SET_STATUS / GET_STATUS carry)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

# Largest split queue the spec allows.
VIRTQ_MAX_SIZE = 32768

VirtqDesc = Struct(
    "addr" / Int64ul,
    "len" / Int32ul,
    "flags" / Int16ul,
    "next" / Int16ul,
)

VirtqUsedElem = Struct(
    "id" / Int32ul,
    "len" / Int32ul,
)


def VirtqAvail(queue_size: int) -> Struct:
    """Available ring of a queue of ``queue_size`` entries, with used_event."""
    return Struct(
        "flags" / Int16ul,
        "idx" / Int16ul,
        "ring" / Array(queue_size, Int16ul),
        "used_event" / Int16ul,
    )


def VirtqUsed(queue_size: int) -> Struct:
    """Used ring of a queue of ``queue_size`` entries, with avail_event."""
    return Struct(
        "flags" / Int16ul,
        "idx" / Int16ul,
        "ring" / Array(queue_size, VirtqUsedElem),
        "avail_event" / Int16ul,
    )


def desc_table_size(queue_size: int) -> int:
    return 16 * queue_size


def avail_ring_size(queue_size: int) -> int:
    return 6 + 2 * queue_size


def used_ring_size(queue_size: int) -> int:
    return 6 + 8 * queue_size
