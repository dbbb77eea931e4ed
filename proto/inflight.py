"""Inflight I/O tracking region, split- and packed-queue layouts (construct, no I/O).

The back end owns this layout; QEMU only keeps the memory and hands it back after a
reconnect. It matches the layout other back ends use so a region stays meaningful
to them. Which fields vhostd fills, and how, is described in
vhostd/engine/inflight.py and docs/architecture.md.
"""

from __future__ import annotations

from construct import Array, Int8ul, Int16ul, Int32ul, Int64ul, Padding, Struct

INFLIGHT_VERSION = 1

InflightDesc = Struct(
    "inflight" / Int8ul,
    Padding(5),
    "next" / Int16ul,
    "counter" / Int64ul,
)

InflightSplitHeader = Struct(
    "features" / Int64ul,
    "version" / Int16ul,
    "desc_num" / Int16ul,
    "last_batch_head" / Int16ul,
    "used_idx" / Int16ul,
)


def InflightSplitRegion(queue_size: int) -> Struct:
    return Struct(
        "header" / InflightSplitHeader,
        "desc" / Array(queue_size, InflightDesc),
    )


def inflight_queue_stride(queue_size: int, packed: bool = False) -> int:
    """Bytes per queue: header and descriptors, rounded up to 64."""
    if packed:
        return (32 * queue_size + 32 + 63) & ~63
    return (16 * queue_size + 16 + 63) & ~63


# ---- packed queues ------------------------------------------------------------

# The packed header marks its layout in ``features`` with this bit (VIRTIO_F_RING_PACKED),
# so a region initialised for split rings is never read as a packed one.
INFLIGHT_PACKED_FEATURES = 1 << 34

InflightPackedDesc = Struct(
    "inflight" / Int8ul,
    Padding(1),
    "next" / Int16ul,
    "last" / Int16ul,
    "num" / Int16ul,
    "counter" / Int64ul,
    # A copy of the ring descriptor at this entry's slot (its fields in this order).
    "id" / Int16ul,
    "flags" / Int16ul,
    "len" / Int32ul,
    "addr" / Int64ul,
)

InflightPackedHeader = Struct(
    "features" / Int64ul,
    "version" / Int16ul,
    "desc_num" / Int16ul,
    "free_head" / Int16ul,
    "old_free_head" / Int16ul,
    "used_idx" / Int16ul,
    "old_used_idx" / Int16ul,
    "used_wrap_counter" / Int8ul,
    "old_used_wrap_counter" / Int8ul,
    Padding(7),
    Padding(3),  # the C struct's entries are 8-byte aligned: they start at 32
)


def InflightPackedRegion(queue_size: int) -> Struct:
    return Struct(
        "header" / InflightPackedHeader,
        "desc" / Array(queue_size, InflightPackedDesc),
    )
