"""virtio 1.4 admin virtqueue wire formats: commands, results, device parts.

Pure construct definitions and constants, no I/O. Names follow the virtio
specification; vhostd's own extensions carry a ``VHOSTD_`` prefix and are described
in docs/admin-over-vhost-user.md.
"""

from __future__ import annotations

import enum

from construct import (
    Bytes,
    GreedyBytes,
    GreedyRange,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64ul,
    Padding,
    Struct,
    this,
)


class AdminCmd(enum.IntEnum):
    VIRTIO_ADMIN_CMD_LIST_QUERY = 0x0
    VIRTIO_ADMIN_CMD_LIST_USE = 0x1
    VIRTIO_ADMIN_CMD_CAP_ID_LIST_QUERY = 0x7
    VIRTIO_ADMIN_CMD_DEVICE_CAP_GET = 0x8
    VIRTIO_ADMIN_CMD_DRIVER_CAP_SET = 0x9
    VIRTIO_ADMIN_CMD_RESOURCE_OBJ_CREATE = 0xA
    # The spec's opcode table says 0xb = QUERY, 0xc = MODIFY while the command text
    # says the reverse; vhostd follows the table (docs/admin-over-vhost-user.md).
    VIRTIO_ADMIN_CMD_RESOURCE_OBJ_QUERY = 0xB
    VIRTIO_ADMIN_CMD_RESOURCE_OBJ_MODIFY = 0xC
    VIRTIO_ADMIN_CMD_RESOURCE_OBJ_DESTROY = 0xD
    VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_GET = 0xE
    VIRTIO_ADMIN_CMD_DEV_PARTS_GET = 0xF
    VIRTIO_ADMIN_CMD_DEV_PARTS_SET = 0x10
    VIRTIO_ADMIN_CMD_DEV_MODE_SET = 0x11


class VhostdAdminCmd(enum.IntEnum):
    """vhostd vendor commands (device-side dirty page tracking), SR-IOV group."""

    VHOSTD_ADMIN_CMD_DIRTY_TRACK_START = 0x30
    VHOSTD_ADMIN_CMD_DIRTY_TRACK_REPORT = 0x31
    VHOSTD_ADMIN_CMD_DIRTY_TRACK_STOP = 0x32


class AdminStatus(enum.IntEnum):
    VIRTIO_ADMIN_STATUS_OK = 0
    VIRTIO_ADMIN_STATUS_ENXIO = 6
    VIRTIO_ADMIN_STATUS_EAGAIN = 11
    VIRTIO_ADMIN_STATUS_ENOMEM = 12
    VIRTIO_ADMIN_STATUS_EBUSY = 16
    # Used by the resource-object text but missing from the status table; the
    # value is the Linux errno, like every other status.
    VIRTIO_ADMIN_STATUS_EEXIST = 17
    VIRTIO_ADMIN_STATUS_EINVAL = 22
    VIRTIO_ADMIN_STATUS_ENOSPC = 28


class AdminQualifier(enum.IntEnum):
    VIRTIO_ADMIN_STATUS_Q_OK = 0x0
    VIRTIO_ADMIN_STATUS_Q_INVALID_COMMAND = 0x1
    VIRTIO_ADMIN_STATUS_Q_INVALID_OPCODE = 0x2
    VIRTIO_ADMIN_STATUS_Q_INVALID_FIELD = 0x3
    VIRTIO_ADMIN_STATUS_Q_INVALID_GROUP = 0x4
    VIRTIO_ADMIN_STATUS_Q_INVALID_MEMBER = 0x5
    VIRTIO_ADMIN_STATUS_Q_NORESOURCE = 0x6
    VIRTIO_ADMIN_STATUS_Q_TRYAGAIN = 0x7


class GroupType(enum.IntEnum):
    VIRTIO_ADMIN_GROUP_TYPE_SELF = 0x0
    VIRTIO_ADMIN_GROUP_TYPE_SRIOV = 0x1


class PartType(enum.IntEnum):
    VIRTIO_DEV_PART_DEV_FEATURES = 0x100
    VIRTIO_DEV_PART_DRV_FEATURES = 0x101
    VIRTIO_DEV_PART_PCI_COMMON_CFG = 0x102
    VIRTIO_DEV_PART_DEVICE_STATUS = 0x103
    VIRTIO_DEV_PART_VQ_CFG = 0x104
    VIRTIO_DEV_PART_VQ_NOTIFY_CFG = 0x105
    # vhostd vendor parts for virtio-blk, at the top of the device-type range so
    # they stay clear of numbers a future spec may give blk parts.
    VHOSTD_DEV_PART_VQ_STATE = 0x5F0
    VHOSTD_BLK_PART_WCE = 0x5F1


VIRTIO_DEV_PARTS_CAP = 0x0000
VIRTIO_RESOURCE_OBJ_DEV_PARTS = 0x000
VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_GET = 0
VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_SET = 1
VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_SIZE = 0
VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_COUNT = 1
VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_LIST = 2
VIRTIO_ADMIN_CMD_DEV_PARTS_GET_TYPE_SELECTED = 0
VIRTIO_ADMIN_CMD_DEV_PARTS_GET_TYPE_ALL = 1
VIRTIO_ADMIN_CMD_DEV_MODE_F_STOPPED = 0  # bit number
# vhostd extension: with STOPPED, make the parts final even against the driver.
VHOSTD_ADMIN_CMD_DEV_MODE_F_FROZEN = 1  # bit number
VIRTIO_DEV_PART_F_OPTIONAL = 0  # bit number

# Offsets in struct virtio_pci_common_cfg used as PCI_COMMON_CFG selectors.
VIRTIO_PCI_COMMON_NUMQ = 18

# The nine device-parts opcodes Linux requires (VIRTIO_DEV_PARTS_ADMIN_CMD_BITMAP).
VIRTIO_DEV_PARTS_ADMIN_CMD_BITMAP = sum(1 << op for op in (
    AdminCmd.VIRTIO_ADMIN_CMD_CAP_ID_LIST_QUERY,
    AdminCmd.VIRTIO_ADMIN_CMD_DEVICE_CAP_GET,
    AdminCmd.VIRTIO_ADMIN_CMD_DRIVER_CAP_SET,
    AdminCmd.VIRTIO_ADMIN_CMD_RESOURCE_OBJ_CREATE,
    AdminCmd.VIRTIO_ADMIN_CMD_RESOURCE_OBJ_DESTROY,
    AdminCmd.VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_GET,
    AdminCmd.VIRTIO_ADMIN_CMD_DEV_PARTS_GET,
    AdminCmd.VIRTIO_ADMIN_CMD_DEV_PARTS_SET,
    AdminCmd.VIRTIO_ADMIN_CMD_DEV_MODE_SET,
))

ADMIN_CMD_HDR_SIZE = 24
ADMIN_STATUS_SIZE = 8
PART_HDR_SIZE = 16

AdminCmdHdr = Struct(
    "opcode" / Int16ul,
    "group_type" / Int16ul,
    "reserved1" / Bytes(12),
    "group_member_id" / Int64ul,
)

AdminCmdStatus = Struct(
    "status" / Int16ul,
    "status_qualifier" / Int16ul,
    "reserved2" / Bytes(4),
)

# LIST_QUERY result, LIST_USE data, CAP_ID_LIST_QUERY result: le64 words.
CmdBitmap = Struct("words" / GreedyRange(Int64ul))

CapGetData = Struct(
    "id" / Int16ul,
    "reserved" / Bytes(6),
)

CapSetData = Struct(
    "id" / Int16ul,
    "reserved" / Bytes(6),
    "cap_specific_data" / GreedyBytes,
)

DevPartsCap = Struct(
    "get_parts_resource_objects_limit" / Int8ul,
    "set_parts_resource_objects_limit" / Int8ul,
)

ResourceObjCmdHdr = Struct(
    "type" / Int16ul,
    "reserved" / Bytes(2),
    "id" / Int32ul,
)

ResourceObjDevParts = Struct(
    "type" / Int8ul,
    "reserved" / Bytes(7),
)

ResourceObjCreateData = Struct(
    "hdr" / ResourceObjCmdHdr,
    "flags" / Int64ul,
    "resource_obj_specific_data" / GreedyBytes,
)

ResourceObjQueryData = Struct(
    "hdr" / ResourceObjCmdHdr,
    "flags" / Int64ul,
)

DevPartsMetadataData = Struct(
    "hdr" / ResourceObjCmdHdr,
    "type" / Int8ul,
    "reserved" / Bytes(7),
)

DevPartsMetadataResult = Struct(
    "value" / Int32ul,  # parts_size.size or hdr_list_count.count
    "reserved" / Bytes(4),
)

DevPartHdr = Struct(
    "part_type" / Int16ul,
    "flags" / Int8ul,
    "reserved" / Int8ul,
    "selector" / Bytes(8),
    "length" / Int32ul,
)

DevPartsMetadataListResult = Struct(
    "count" / Int32ul,
    "reserved" / Bytes(4),
    "hdrs" / DevPartHdr[this.count],
)

DevPartsGetData = Struct(
    "hdr" / ResourceObjCmdHdr,
    "type" / Int8ul,
    "reserved" / Bytes(7),
    "hdr_list" / GreedyRange(DevPartHdr),
)

DevPart = Struct(
    "hdr" / DevPartHdr,
    "value" / Bytes(this.hdr.length),
)

DevParts = GreedyRange(DevPart)

DevPartsSetData = Struct(
    "hdr" / ResourceObjCmdHdr,
    "parts" / GreedyBytes,
)

DevModeSetData = Struct("flags" / Int8ul)

# Selector variants (8 bytes at offset 4 of the part header).
PciCommonCfgSelector = Struct("offset" / Int32ul, Padding(4))
VqIndexSelector = Struct("index" / Int16ul, Padding(6))

DevPartFeatures = Struct("feature_bits" / GreedyRange(Int64ul))

DevPartVqCfg = Struct(
    "queue_size" / Int16ul,
    "vector" / Int16ul,
    "enabled" / Int16ul,
    "reserved" / Int16ul,
    "queue_desc" / Int64ul,
    "queue_driver" / Int64ul,
    "queue_device" / Int64ul,
)

DevPartVqNotifyData = Struct(
    "queue_notify_off" / Int16ul,
    "queue_notif_config_data" / Int16ul,
    "reserved" / Bytes(4),
)

# vhostd vendor part VHOSTD_DEV_PART_VQ_STATE (selector: vq_index).
VhostdVqState = Struct(
    "last_avail_idx" / Int16ul,
    "used_idx" / Int16ul,
    "avail_wrap_counter" / Int8ul,
    "used_wrap_counter" / Int8ul,
    "reserved" / Bytes(2),
)

# vhostd vendor part VHOSTD_BLK_PART_WCE (no selector): the virtio-blk config byte.
VhostdBlkWce = Struct("wce" / Int8ul)


# vhostd vendor dirty tracking (docs/admin-over-vhost-user.md).
VHOSTD_DIRTY_TRACK_REPORT_F_CLEAR = 0  # bit number

DirtyTrackRange = Struct(
    "gpa" / Int64ul,
    "length" / Int64ul,
)

DirtyTrackStartData = Struct(
    "page_size" / Int32ul,
    "num_ranges" / Int32ul,
    "ranges" / DirtyTrackRange[this.num_ranges],
)

DirtyTrackReportData = Struct(
    "flags" / Int32ul,
    "reserved" / Bytes(4),
)

DirtyTrackReportHdr = Struct(
    "page_size" / Int32ul,
    "num_ranges" / Int32ul,
)
