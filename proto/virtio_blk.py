"""virtio-blk wire formats: request header, segments, config space (construct, no I/O)."""

from __future__ import annotations

import enum

from construct import Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Padding, Struct


class BlkFeature(enum.IntEnum):
    """virtio-blk device feature bit numbers."""

    VIRTIO_BLK_F_SIZE_MAX = 1
    VIRTIO_BLK_F_SEG_MAX = 2
    VIRTIO_BLK_F_GEOMETRY = 4
    VIRTIO_BLK_F_RO = 5
    VIRTIO_BLK_F_BLK_SIZE = 6
    VIRTIO_BLK_F_FLUSH = 9
    VIRTIO_BLK_F_TOPOLOGY = 10
    VIRTIO_BLK_F_CONFIG_WCE = 11
    VIRTIO_BLK_F_MQ = 12
    VIRTIO_BLK_F_DISCARD = 13
    VIRTIO_BLK_F_WRITE_ZEROES = 14


class BlkRequestType(enum.IntEnum):
    VIRTIO_BLK_T_IN = 0
    VIRTIO_BLK_T_OUT = 1
    VIRTIO_BLK_T_FLUSH = 4
    VIRTIO_BLK_T_GET_ID = 8
    VIRTIO_BLK_T_GET_LIFETIME = 10
    VIRTIO_BLK_T_DISCARD = 11
    VIRTIO_BLK_T_WRITE_ZEROES = 13
    VIRTIO_BLK_T_SECURE_ERASE = 14


class BlkStatus(enum.IntEnum):
    VIRTIO_BLK_S_OK = 0
    VIRTIO_BLK_S_IOERR = 1
    VIRTIO_BLK_S_UNSUPP = 2


VIRTIO_BLK_SECTOR_SIZE = 512
VIRTIO_BLK_ID_BYTES = 20
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
# Old drivers may set this on any request type; it carries no meaning for us.
VIRTIO_BLK_T_BARRIER = 0x80000000

BlkOuthdr = Struct(
    "type" / Int32ul,
    "ioprio" / Int32ul,
    "sector" / Int64ul,
)

DiscardWriteZeroes = Struct(
    "sector" / Int64ul,
    "num_sectors" / Int32ul,
    "flags" / Int32ul,
)

BlkConfig = Struct(
    "capacity" / Int64ul,
    "size_max" / Int32ul,
    "seg_max" / Int32ul,
    "cylinders" / Int16ul,
    "heads" / Int8ul,
    "sectors" / Int8ul,
    "blk_size" / Int32ul,
    "physical_block_exp" / Int8ul,
    "alignment_offset" / Int8ul,
    "min_io_size" / Int16ul,
    "opt_io_size" / Int32ul,
    "wce" / Int8ul,
    Padding(1),
    "num_queues" / Int16ul,
    "max_discard_sectors" / Int32ul,
    "max_discard_seg" / Int32ul,
    "discard_sector_alignment" / Int32ul,
    "max_write_zeroes_sectors" / Int32ul,
    "max_write_zeroes_seg" / Int32ul,
    "write_zeroes_may_unmap" / Int8ul,
    "unused1" / Bytes(3),
)

# Offset of the one field a driver may write.
BLK_CONFIG_WCE_OFFSET = 32
BLK_CONFIG_SIZE = 60
