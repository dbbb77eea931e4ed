"""Golden byte vectors for every construct definition in proto/virtio_admin.py.

Each vector is written by hand from the layouts in the reference
(virtio-admin-migration.md sections 1.3, 1.7, 2.2-2.9 and 2.11) and, for the two vhostd
vendor parts, from their field lists, never produced by ``build``: parse(golden) must
give the fields, build(fields) must give the golden bytes, and static sizes must match.
Field values are chosen so that every byte of a multi-byte field differs, so a wrong
width, order or endianness cannot pass.
"""

from __future__ import annotations

import struct
from typing import Any

import construct
import pytest
from construct import Construct
from unit_support import plain

from vhostd_proto import virtio_admin as va
from vhostd_proto.device_parts import Part, decode_parts, encode_parts, vq_selector


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# A VQ_CFG part header for queue 3, 32 bytes of value.
VQ_CFG_HDR = {"part_type": 0x104, "flags": 0, "reserved": 0,
              "selector": h("0300000000000000"), "length": 32}
VQ_CFG_HDR_HEX = "0401 00 00 0300000000000000 20000000"
# DEV_FEATURES (optional flag) with one feature word.
DEV_FEATURES_HDR = {"part_type": 0x100, "flags": 1, "reserved": 0,
                    "selector": bytes(8), "length": 8}
DEV_FEATURES_HDR_HEX = "0001 01 00 0000000000000000 08000000"
# PCI_COMMON_CFG for num_queues (offset 18), a le16 value.
NUMQ_HDR = {"part_type": 0x102, "flags": 0, "reserved": 0,
            "selector": h("1200000000000000"), "length": 2}
NUMQ_HDR_HEX = "0201 00 00 1200000000000000 02000000"
# DEVICE_STATUS, one byte.
STATUS_HDR = {"part_type": 0x103, "flags": 0, "reserved": 0, "selector": bytes(8), "length": 1}
STATUS_HDR_HEX = "0301 00 00 0000000000000000 01000000"
# vhostd's WCE part (0x5f1), one byte.
WCE_HDR = {"part_type": 0x5F1, "flags": 0, "reserved": 0, "selector": bytes(8), "length": 1}
WCE_HDR_HEX = "f105 00 00 0000000000000000 01000000"

VQ_CFG_VALUE = {"queue_size": 0x0080, "vector": 0x0102, "enabled": 1, "reserved": 0,
                "queue_desc": 0x0000_0001_2345_6000, "queue_driver": 0x0000_0001_2345_7000,
                "queue_device": 0x1122_3344_5566_7788}
VQ_CFG_VALUE_HEX = ("8000 0201 0100 0000"
                    " 0060452301000000 0070452301000000 8877665544332211")

OBJ_HDR = {"type": 0, "reserved": bytes(2), "id": 0x04030201}
OBJ_HDR_HEX = "0000 0000 01020304"

# (id, construct, fields, golden hex, static size or None)
CASES: list[tuple[str, Construct, dict[str, Any], str, int | None]] = [
    # 1.3: command header (24 bytes) and status (8 bytes)
    ("cmd-hdr-mode-set", va.AdminCmdHdr,
     {"opcode": 0x11, "group_type": 1, "reserved1": bytes(12),
      "group_member_id": 0x0102030405060708},
     "1100 0100 000000000000000000000000 0807060504030201", 24),
    ("cmd-hdr-reserved-kept", va.AdminCmdHdr,
     {"opcode": 0x0A0B, "group_type": 0x0C0D, "reserved1": h("a1a2a3a4a5a6a7a8a9aaabac"),
      "group_member_id": 0},
     "0b0a 0d0c a1a2a3a4a5a6a7a8a9aaabac 0000000000000000", 24),
    ("cmd-status-einval-field", va.AdminCmdStatus,
     {"status": 22, "status_qualifier": 3, "reserved2": bytes(4)},
     "1600 0300 00000000", 8),
    ("cmd-status-wide", va.AdminCmdStatus,
     {"status": 0x0111, "status_qualifier": 0x0605, "reserved2": h("01020304")},
     "1101 0506 01020304", 8),
    # 1.7: LIST_QUERY result / LIST_USE data / CAP_ID_LIST_QUERY result
    ("bitmap-dev-parts", va.CmdBitmap, {"words": [0x3E783]}, "83e7030000000000", None),
    ("bitmap-two-words", va.CmdBitmap, {"words": [0x0102030405060708, 1 << 63]},
     "0807060504030201 0000000000000080", None),
    ("bitmap-empty", va.CmdBitmap, {"words": []}, "", None),
    # 2.2: capabilities
    ("cap-get-data", va.CapGetData, {"id": 0x0201, "reserved": bytes(6)},
     "0102 000000000000", 8),
    ("cap-set-data-dev-parts", va.CapSetData,
     {"id": 0, "reserved": bytes(6), "cap_specific_data": h("2010")},
     "0000 000000000000 2010", None),
    ("dev-parts-cap", va.DevPartsCap,
     {"get_parts_resource_objects_limit": 0x20, "set_parts_resource_objects_limit": 0x1F},
     "20 1f", 2),
    # 2.3: resource objects
    ("obj-cmd-hdr", va.ResourceObjCmdHdr, OBJ_HDR, OBJ_HDR_HEX, 8),
    ("obj-cmd-hdr-type", va.ResourceObjCmdHdr,
     {"type": 0x0201, "reserved": h("aabb"), "id": 7}, "0102 aabb 07000000", 8),
    ("obj-dev-parts-set", va.ResourceObjDevParts, {"type": 1, "reserved": bytes(7)},
     "01 00000000000000", 8),
    ("obj-create-get", va.ResourceObjCreateData,
     {"hdr": OBJ_HDR, "flags": 0x1122334455667788, "resource_obj_specific_data": h("00" * 8)},
     OBJ_HDR_HEX + " 8877665544332211 0000000000000000", None),
    ("obj-create-set", va.ResourceObjCreateData,
     {"hdr": {"type": 0, "reserved": bytes(2), "id": 5}, "flags": 0,
      "resource_obj_specific_data": h("0100000000000000")},
     "0000 0000 05000000 0000000000000000 0100000000000000", None),
    ("obj-query", va.ResourceObjQueryData,
     {"hdr": OBJ_HDR, "flags": 0x0807060504030201},
     OBJ_HDR_HEX + " 0102030405060708", 16),
    # 2.5: metadata
    ("metadata-data-list", va.DevPartsMetadataData,
     {"hdr": OBJ_HDR, "type": 2, "reserved": bytes(7)},
     OBJ_HDR_HEX + " 02 00000000000000", 16),
    ("metadata-result-size", va.DevPartsMetadataResult,
     {"value": 0x01020304, "reserved": bytes(4)}, "04030201 00000000", 8),
    ("metadata-list-result", va.DevPartsMetadataListResult,
     {"count": 2, "reserved": bytes(4), "hdrs": [DEV_FEATURES_HDR, VQ_CFG_HDR]},
     "02000000 00000000 " + DEV_FEATURES_HDR_HEX + " " + VQ_CFG_HDR_HEX, None),
    ("metadata-list-result-empty", va.DevPartsMetadataListResult,
     {"count": 0, "reserved": bytes(4), "hdrs": []}, "00000000 00000000", None),
    # 2.6 / 2.7: get and set
    ("parts-get-all", va.DevPartsGetData,
     {"hdr": OBJ_HDR, "type": 1, "reserved": bytes(7), "hdr_list": []},
     OBJ_HDR_HEX + " 01 00000000000000", None),
    ("parts-get-selected", va.DevPartsGetData,
     {"hdr": OBJ_HDR, "type": 0, "reserved": bytes(7),
      "hdr_list": [NUMQ_HDR, VQ_CFG_HDR]},
     OBJ_HDR_HEX + " 00 00000000000000 " + NUMQ_HDR_HEX + " " + VQ_CFG_HDR_HEX, None),
    ("parts-set", va.DevPartsSetData,
     {"hdr": OBJ_HDR, "parts": h(STATUS_HDR_HEX.replace(" ", "") + "0f")},
     OBJ_HDR_HEX + " " + STATUS_HDR_HEX + " 0f", None),
    ("mode-set-stop", va.DevModeSetData, {"flags": 1}, "01", 1),
    ("mode-set-freeze", va.DevModeSetData, {"flags": 3}, "03", 1),
    # 2.8: part header and part
    ("part-hdr-vq-cfg", va.DevPartHdr, VQ_CFG_HDR, VQ_CFG_HDR_HEX, 16),
    ("part-hdr-wide", va.DevPartHdr,
     {"part_type": 0x0201, "flags": 0x03, "reserved": 0x04, "selector": h("0506070809101112"),
      "length": 0x16151413},
     "0102 03 04 0506070809101112 13141516", 16),
    ("part-vq-cfg", va.DevPart, {"hdr": VQ_CFG_HDR, "value": h(VQ_CFG_VALUE_HEX.replace(" ", ""))},
     VQ_CFG_HDR_HEX + " " + VQ_CFG_VALUE_HEX, None),
    ("part-status", va.DevPart, {"hdr": STATUS_HDR, "value": h("0f")},
     STATUS_HDR_HEX + " 0f", None),
    ("parts-three", va.DevParts,
     [{"hdr": DEV_FEATURES_HDR, "value": h("0000000001000070")},
      {"hdr": NUMQ_HDR, "value": h("0200")},
      {"hdr": WCE_HDR, "value": h("00")}],
     DEV_FEATURES_HDR_HEX + " 0000000001000070 " + NUMQ_HDR_HEX + " 0200 "
     + WCE_HDR_HEX + " 00", None),
    # 2.8 selector variants (padding parses away and builds as zeros)
    ("selector-pci-common-cfg", va.PciCommonCfgSelector, {"offset": 0x01020312},
     "12030201 00000000", 8),
    ("selector-vq-index", va.VqIndexSelector, {"index": 0x0102}, "0201 000000000000", 8),
    # 2.9 part values
    ("features-one-word", va.DevPartFeatures, {"feature_bits": [0x7000000100000000]},
     "0000000001000070", None),
    ("features-two-words", va.DevPartFeatures, {"feature_bits": [1, 0x0102]},
     "0100000000000000 0201000000000000", None),
    ("vq-cfg", va.DevPartVqCfg, VQ_CFG_VALUE, VQ_CFG_VALUE_HEX, 32),
    ("vq-notify", va.DevPartVqNotifyData,
     {"queue_notify_off": 0x0102, "queue_notif_config_data": 0x0304, "reserved": bytes(4)},
     "0201 0403 00000000", 8),
    # vhostd vendor parts
    ("vhostd-vq-state", va.VhostdVqState,
     {"last_avail_idx": 0x0102, "used_idx": 0xFFFE, "avail_wrap_counter": 0,
      "used_wrap_counter": 0, "reserved": bytes(2)},
     "0201 feff 00 00 0000", 8),
    ("vhostd-vq-state-counters", va.VhostdVqState,
     {"last_avail_idx": 0, "used_idx": 0, "avail_wrap_counter": 1,
      "used_wrap_counter": 0x80, "reserved": h("abcd")},
     "0000 0000 01 80 abcd", 8),
    ("vhostd-blk-wce", va.VhostdBlkWce, {"wce": 1}, "01", 1),
    # vhostd vendor dirty tracking
    ("dirty-track-range", va.DirtyTrackRange, {"gpa": 0x100000, "length": 0x2000},
     "0000100000000000 0020000000000000", 16),
    ("dirty-track-start", va.DirtyTrackStartData,
     {"page_size": 4096, "num_ranges": 2,
      "ranges": [{"gpa": 0, "length": 0xA0000}, {"gpa": 0xC0000, "length": 0x1000}]},
     "00100000 02000000 0000000000000000 00000a0000000000"
     " 00000c0000000000 0010000000000000", None),
    ("dirty-track-report", va.DirtyTrackReportData, {"flags": 1, "reserved": bytes(4)},
     "01000000 00000000", 8),
    ("dirty-track-report-hdr", va.DirtyTrackReportHdr, {"page_size": 0x200000, "num_ranges": 3},
     "00002000 03000000", 8),
    # the test vectors of docs/admin-over-vhost-user.md section 6
    ("doc-list-query-group-1", va.AdminCmdHdr,
     {"opcode": 0, "group_type": 1, "reserved1": bytes(12), "group_member_id": 0},
     "0000010000000000 0000000000000000 0000000000000000", 24),
    ("doc-create-get-data", va.ResourceObjCreateData,
     {"hdr": {"type": 0, "reserved": bytes(2), "id": 0}, "flags": 0,
      "resource_obj_specific_data": bytes(8)},
     "0000000000000000 0000000000000000 0000000000000000", None),
    ("doc-vendor-parts", va.DevParts,
     [{"hdr": {"part_type": 0x5F0, "flags": 0, "reserved": 0, "selector": bytes(8),
               "length": 8}, "value": h("3412341200000000")},
      {"hdr": WCE_HDR, "value": h("00")}],
     "f005000000000000 0000000008000000 3412341200000000"
     " f105000000000000 0000000001000000 00", None),
]

_PARAMS = [pytest.param(c, f, h(g), id=i) for i, c, f, g, _ in CASES]


@pytest.mark.parametrize(("con", "fields", "golden"), _PARAMS)
def test_parse_golden(con: Construct, fields: Any, golden: bytes) -> None:
    assert plain(con.parse(golden)) == fields


@pytest.mark.parametrize(("con", "fields", "golden"), _PARAMS)
def test_build_golden(con: Construct, fields: Any, golden: bytes) -> None:
    assert con.build(fields) == golden


@pytest.mark.parametrize(("con", "size"),
                         [pytest.param(c, s, id=i) for i, c, _, _, s in CASES if s is not None])
def test_static_size(con: Construct, size: int) -> None:
    assert con.sizeof() == size


def test_every_construct_has_a_vector() -> None:
    covered = {id(c) for _, c, _, _, _ in CASES}
    defined = {name for name, obj in vars(va).items()
               if isinstance(obj, Construct) and not hasattr(construct, name)}
    missing = {name for name in defined if id(getattr(va, name)) not in covered}
    assert not missing, f"no golden vector for {sorted(missing)}"


def test_struct_sizes_of_reference_2_11() -> None:
    """The reference's struct-module formats agree with the constructs (2.11)."""
    pairs = [("<HH12sQ", va.AdminCmdHdr), ("<HH4s", va.AdminCmdStatus),
             ("<H2sI", va.ResourceObjCmdHdr), ("<H2sIB7s", va.DevPartsMetadataData),
             ("<II", va.DevPartsMetadataResult), ("<HBB8sI", va.DevPartHdr),
             ("<HHHHQQQ", va.DevPartVqCfg), ("<HH4s", va.DevPartVqNotifyData),
             ("<B", va.DevModeSetData), ("<H6s", va.CapGetData), ("<BB", va.DevPartsCap)]
    for fmt, con in pairs:
        assert struct.calcsize(fmt) == con.sizeof(), con
    assert va.ADMIN_CMD_HDR_SIZE == 24
    assert va.ADMIN_STATUS_SIZE == 8
    assert va.PART_HDR_SIZE == 16


def test_parse_ignores_trailing_bytes_of_fixed_structs() -> None:
    # A driver may send more command data than the device expects (reference 1.3).
    assert plain(va.DevModeSetData.parse(h("01ffff"))) == {"flags": 1}
    assert plain(va.CapGetData.parse(h("0000 000000000000 99"))) == {"id": 0,
                                                                     "reserved": bytes(6)}


# ---- enums and constants against the reference tables ---------------------------


def test_opcodes_match_reference_1_6() -> None:
    C = va.AdminCmd
    assert {c.name: c.value for c in C} == {
        "VIRTIO_ADMIN_CMD_LIST_QUERY": 0x0, "VIRTIO_ADMIN_CMD_LIST_USE": 0x1,
        "VIRTIO_ADMIN_CMD_CAP_ID_LIST_QUERY": 0x7, "VIRTIO_ADMIN_CMD_DEVICE_CAP_GET": 0x8,
        "VIRTIO_ADMIN_CMD_DRIVER_CAP_SET": 0x9, "VIRTIO_ADMIN_CMD_RESOURCE_OBJ_CREATE": 0xA,
        # the opcode table's reading: 0xb = QUERY, 0xc = MODIFY
        "VIRTIO_ADMIN_CMD_RESOURCE_OBJ_QUERY": 0xB, "VIRTIO_ADMIN_CMD_RESOURCE_OBJ_MODIFY": 0xC,
        "VIRTIO_ADMIN_CMD_RESOURCE_OBJ_DESTROY": 0xD,
        "VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_GET": 0xE, "VIRTIO_ADMIN_CMD_DEV_PARTS_GET": 0xF,
        "VIRTIO_ADMIN_CMD_DEV_PARTS_SET": 0x10, "VIRTIO_ADMIN_CMD_DEV_MODE_SET": 0x11,
    }


def test_status_and_qualifiers_match_reference_1_4() -> None:
    assert {s.name.removeprefix("VIRTIO_ADMIN_STATUS_"): s.value for s in va.AdminStatus} == {
        "OK": 0, "ENXIO": 6, "EAGAIN": 11, "ENOMEM": 12, "EBUSY": 16, "EEXIST": 17,
        "EINVAL": 22, "ENOSPC": 28}
    assert [q.value for q in va.AdminQualifier] == list(range(8))
    assert va.AdminQualifier.VIRTIO_ADMIN_STATUS_Q_INVALID_GROUP == 4
    assert va.AdminQualifier.VIRTIO_ADMIN_STATUS_Q_INVALID_MEMBER == 5


def test_groups_parts_and_flags_match_reference() -> None:
    assert va.GroupType.VIRTIO_ADMIN_GROUP_TYPE_SELF == 0
    assert va.GroupType.VIRTIO_ADMIN_GROUP_TYPE_SRIOV == 1
    P = va.PartType
    assert [P.VIRTIO_DEV_PART_DEV_FEATURES, P.VIRTIO_DEV_PART_DRV_FEATURES,
            P.VIRTIO_DEV_PART_PCI_COMMON_CFG, P.VIRTIO_DEV_PART_DEVICE_STATUS,
            P.VIRTIO_DEV_PART_VQ_CFG, P.VIRTIO_DEV_PART_VQ_NOTIFY_CFG] == list(range(0x100, 0x106))
    # vendor parts: device-type range 0x200-0x5ff, at its top
    assert P.VHOSTD_DEV_PART_VQ_STATE == 0x5F0 and P.VHOSTD_BLK_PART_WCE == 0x5F1
    assert va.VIRTIO_DEV_PARTS_CAP == 0 and va.VIRTIO_RESOURCE_OBJ_DEV_PARTS == 0
    assert (va.VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_GET, va.VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_SET
            ) == (0, 1)
    assert (va.VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_SIZE,
            va.VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_COUNT,
            va.VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_LIST) == (0, 1, 2)
    assert (va.VIRTIO_ADMIN_CMD_DEV_PARTS_GET_TYPE_SELECTED,
            va.VIRTIO_ADMIN_CMD_DEV_PARTS_GET_TYPE_ALL) == (0, 1)
    # bit numbers, not masks
    assert va.VIRTIO_ADMIN_CMD_DEV_MODE_F_STOPPED == 0
    assert va.VHOSTD_ADMIN_CMD_DEV_MODE_F_FROZEN == 1
    assert va.VIRTIO_DEV_PART_F_OPTIONAL == 0
    assert va.VIRTIO_PCI_COMMON_NUMQ == 18
    # Linux's VIRTIO_DEV_PARTS_ADMIN_CMD_BITMAP: bits 7, 8, 9, 0xa, 0xd, 0xe, 0xf, 0x10, 0x11
    assert va.VIRTIO_DEV_PARTS_ADMIN_CMD_BITMAP == 0x3E780


# ---- the engine's hand-rolled part codec agrees with the vectors ---------------------


def test_engine_part_codec_matches_golden() -> None:
    golden = h((DEV_FEATURES_HDR_HEX + " 0000000001000070 " + VQ_CFG_HDR_HEX + " "
                + VQ_CFG_VALUE_HEX + " " + WCE_HDR_HEX + " 00").replace(" ", ""))
    parts = [Part(0x100, 1, bytes(8), h("0000000001000070")),
             Part(0x104, 0, vq_selector(3), h(VQ_CFG_VALUE_HEX.replace(" ", ""))),
             Part(0x5F1, 0, bytes(8), h("00"))]
    assert encode_parts(parts) == golden
    assert decode_parts(golden) == parts
    assert parts[1].header() == h(VQ_CFG_HDR_HEX.replace(" ", ""))
    assert parts[1].vq_index == 3


def test_documented_parts_vector_decodes() -> None:
    """docs/admin-over-vhost-user.md section 6: GET(ALL) of a one-queue blk member after 50
    requests, decoded with the constructs field by field."""
    blob = h("00010100000000000000000008000000 467e003005000000"
             "01010000000000000000000008000000 466e003001000000"
             "02010000120000000000000002000000 0100"
             "03010000000000000000000001000000 0f"
             "04010000000000000000000020000000 8000000001000000 0000000000000000"
             " 0008000000000000 0809000000000000"
             "05010000000000000000000008000000 0000000000000000"
             "f0050000000000000000000008000000 3200320000000000"
             "f1050000000000000000000001000000 01".replace(" ", ""))
    assert len(blob) == 196
    parts = va.DevParts.parse(blob)
    assert [(p.hdr.part_type, p.hdr.flags, p.hdr.length) for p in parts] == [
        (0x100, 1, 8), (0x101, 0, 8), (0x102, 0, 2), (0x103, 0, 1), (0x104, 0, 32),
        (0x105, 0, 8), (0x5F0, 0, 8), (0x5F1, 0, 1)]
    assert va.DevPartFeatures.parse(parts[0].value).feature_bits == [0x530007E46]
    assert va.DevPartFeatures.parse(parts[1].value).feature_bits == [0x130006E46]
    assert va.PciCommonCfgSelector.parse(parts[2].hdr.selector).offset == 18
    cfg = plain(va.DevPartVqCfg.parse(parts[4].value))
    assert cfg == {"queue_size": 128, "vector": 0, "enabled": 1, "reserved": 0,
                   "queue_desc": 0, "queue_driver": 0x800, "queue_device": 0x908}
    assert plain(va.VhostdVqState.parse(parts[6].value))["last_avail_idx"] == 50
    assert va.DevParts.build(parts) == blob
    assert decode_parts(blob) == [Part(p.hdr.part_type, p.hdr.flags, p.hdr.selector, p.value)
                                  for p in parts]
