"""Inflight I/O tracking region, split-queue layout (construct, no I/O).

The back end owns this layout; QEMU only keeps the memory and hands it back after a
reconnect. It matches the layout other back ends use so a region stays meaningful
to them.
"""

from __future__ import annotations

from construct import Array, Int8ul, Int16ul, Int64ul, Padding, Struct

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


def inflight_queue_stride(queue_size: int) -> int:
    """Bytes per queue: header and descriptors, rounded up to 64."""
    return (16 * queue_size + 16 + 63) & ~63
