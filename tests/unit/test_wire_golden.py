"""Golden byte vectors for every construct definition in proto/.

Each vector is written by hand from the layouts in the reference (vhost-user-qemu72.md
sections 1.1, 1.2, 5.3 and 7), never produced by ``build``: parse(golden) must give
the fields, build(fields) must give the golden bytes, and static sizes must match.
The hot-path ``struct`` formats must agree with the construct definitions too.
"""

from __future__ import annotations

from typing import Any

import pytest
from construct import Construct
from unit_support import plain

from vhostd.devices import blk as blk_dev
from vhostd.engine import inflight as inflight_eng
from vhostd.engine import virtqueue as vq_eng
from vhostd_proto import inflight as inf
from vhostd_proto import vhost_user as vu
from vhostd_proto import virtio
from vhostd_proto import virtio_blk as vblk


def h(text: str) -> bytes:
    return bytes.fromhex(text)


REGION_A = {"guest_phys_addr": 0, "memory_size": 0x8000_0000,
            "userspace_addr": 0x7F12_0000_0000, "mmap_offset": 0}
REGION_A_HEX = "0000000000000000 0000008000000000 00000000127f0000 0000000000000000"
REGION_B = {"guest_phys_addr": 0x1_0000_0000, "memory_size": 0x4000_0000,
            "userspace_addr": 0x7F12_8000_0000, "mmap_offset": 0x8000_0000}
REGION_B_HEX = "0000000001000000 0000004000000000 00000080127f0000 0000008000000000"

BLK_CONFIG = {
    "capacity": 0x0102030405060708, "size_max": 0x11121314, "seg_max": 0x21222324,
    "cylinders": 0x3132, "heads": 0x41, "sectors": 0x42, "blk_size": 0x51525354,
    "physical_block_exp": 0x61, "alignment_offset": 0x62, "min_io_size": 0x7172,
    "opt_io_size": 0x81828384, "wce": 0x01, "num_queues": 0x9192,
    "max_discard_sectors": 0xA1A2A3A4, "max_discard_seg": 0xB1B2B3B4,
    "discard_sector_alignment": 0xC1C2C3C4, "max_write_zeroes_sectors": 0xD1D2D3D4,
    "max_write_zeroes_seg": 0xE1E2E3E4, "write_zeroes_may_unmap": 0xF1,
    "unused1": b"\0\0\0",
}
BLK_CONFIG_HEX = (
    "0807060504030201"  # 0 capacity
    " 14131211"  # 8 size_max
    " 24232221"  # 12 seg_max
    " 3231 41 42"  # 16 cylinders, 18 heads, 19 sectors
    " 54535251"  # 20 blk_size
    " 61 62 7271"  # 24 physical_block_exp, 25 alignment_offset, 26 min_io_size
    " 84838281"  # 28 opt_io_size
    " 01 00 9291"  # 32 wce, 33 unused, 34 num_queues
    " a4a3a2a1"  # 36 max_discard_sectors
    " b4b3b2b1"  # 40 max_discard_seg
    " c4c3c2c1"  # 44 discard_sector_alignment
    " d4d3d2d1"  # 48 max_write_zeroes_sectors
    " e4e3e2e1"  # 52 max_write_zeroes_seg
    " f1 000000"  # 56 write_zeroes_may_unmap, 57 unused1
)

# (id, construct, fields, golden hex, static size or None)
CASES: list[tuple[str, Construct, dict[str, Any], str, int | None]] = [
    ("header-get-features-request", vu.Header,
     {"request": 1, "flags": 0x1, "size": 0}, "01000000 01000000 00000000", 12),
    ("header-get-features-reply", vu.Header,
     {"request": 1, "flags": 0x5, "size": 8}, "01000000 05000000 08000000", 12),
    ("header-set-config-need-reply", vu.Header,
     {"request": 25, "flags": 0x9, "size": 13}, "19000000 09000000 0d000000", 12),
    ("u64", vu.U64, {"u64": 0x0123456789ABCDEF}, "efcdab8967452301", 8),
    ("vring-state", vu.VringState, {"index": 1, "num": 0x100}, "01000000 00010000", 8),
    ("vring-addr", vu.VringAddr,
     {"index": 1, "flags": 1, "desc_user_addr": 0x1111222233334444,
      "used_user_addr": 0x5555666677778888, "avail_user_addr": 0x99990000AAAABBBB,
      "log_guest_addr": 0x0102030405060708},
     "01000000 01000000 4444333322221111 8888777766665555 bbbbaaaa00009999"
     " 0807060504030201", 40),
    ("memory-region", vu.MemoryRegion, REGION_B, REGION_B_HEX, 32),
    ("memory-table-2", vu.MemoryTable,
     {"nregions": 2, "regions": [REGION_A, REGION_B]},
     "02000000 00000000 " + REGION_A_HEX + " " + REGION_B_HEX, None),
    ("single-memory-region", vu.SingleMemoryRegion, {"region": REGION_B},
     "0000000000000000 " + REGION_B_HEX, 40),
    ("log-base", vu.LogBase, {"mmap_size": 0x2000, "mmap_offset": 0},
     "0020000000000000 0000000000000000", 16),
    ("config-set-wce", vu.Config, {"offset": 32, "size": 1, "flags": 0, "region": b"\x01"},
     "20000000 01000000 00000000 01", None),
    ("inflight", vu.Inflight,
     {"mmap_size": 0x1080, "mmap_offset": 0x40, "num_queues": 2, "queue_size": 128},
     "8010000000000000 4000000000000000 0200 8000 00000000", 24),
    ("iotlb", vu.IotlbMsg,
     {"iova": 0x1000, "size": 0x2000, "uaddr": 0x7F00_0000_1000, "perm": 3, "type": 2},
     "0010000000000000 0020000000000000 00100000007f0000 03 02 000000000000", 32),
    ("message-get-features-reply", vu.Message,
     {"header": {"request": 1, "flags": 0x5, "size": 8}, "payload": h("0000000100000000")},
     "01000000 05000000 08000000 0000000100000000", None),
    ("blk-outhdr", vblk.BlkOuthdr, {"type": 1, "ioprio": 2, "sector": 0x12345678},
     "01000000 02000000 7856341200000000", 16),
    ("discard-write-zeroes", vblk.DiscardWriteZeroes,
     {"sector": 0x800, "num_sectors": 0x100, "flags": 1},
     "0008000000000000 00010000 01000000", 16),
    ("blk-config", vblk.BlkConfig, BLK_CONFIG, BLK_CONFIG_HEX, 60),
    ("virtq-desc", virtio.VirtqDesc,
     {"addr": 0x1234_5678_9000, "len": 0x1000, "flags": 3, "next": 5},
     "0090785634120000 00100000 0300 0500", 16),
    ("virtq-used-elem", virtio.VirtqUsedElem, {"id": 7, "len": 0x201},
     "07000000 01020000", 8),
    ("virtq-avail-4", virtio.VirtqAvail(4),
     {"flags": 1, "idx": 0x0102, "ring": [3, 0, 2, 1], "used_event": 0xABCD},
     "0100 0201 0300 0000 0200 0100 cdab", 14),
    ("virtq-used-4", virtio.VirtqUsed(4),
     {"flags": 1, "idx": 2,
      "ring": [{"id": 3, "len": 0x11}, {"id": 0, "len": 0x22}, {"id": 0, "len": 0},
               {"id": 0, "len": 0}],
      "avail_event": 0x0009},
     "0100 0200 03000000 11000000 00000000 22000000 00000000 00000000"
     " 00000000 00000000 0900", 38),
    ("inflight-desc", inf.InflightDesc, {"inflight": 1, "next": 0x0203, "counter": 0x42},
     "01 0000000000 0302 4200000000000000", 16),
    ("inflight-split-header", inf.InflightSplitHeader,
     {"features": 0, "version": 1, "desc_num": 128, "last_batch_head": 5, "used_idx": 0x1234},
     "0000000000000000 0100 8000 0500 3412", 16),
    ("inflight-split-region-2", inf.InflightSplitRegion(2),
     {"header": {"features": 0, "version": 1, "desc_num": 2, "last_batch_head": 1,
                 "used_idx": 7},
      "desc": [{"inflight": 0, "next": 0, "counter": 0},
               {"inflight": 1, "next": 0, "counter": 9}]},
     "0000000000000000 0100 0200 0100 0700"
     " 00 0000000000 0000 0000000000000000"
     " 01 0000000000 0000 0900000000000000", 48),
]


@pytest.mark.parametrize(("con", "fields", "golden"),
                         [pytest.param(c, f, h(g), id=i) for i, c, f, g, _ in CASES])
def test_parse_golden(con: Construct, fields: dict[str, Any], golden: bytes) -> None:
    assert plain(con.parse(golden)) == fields


@pytest.mark.parametrize(("con", "fields", "golden"),
                         [pytest.param(c, f, h(g), id=i) for i, c, f, g, _ in CASES])
def test_build_golden(con: Construct, fields: dict[str, Any], golden: bytes) -> None:
    assert con.build(fields) == golden


@pytest.mark.parametrize(("con", "golden", "size"),
                         [pytest.param(c, h(g), s, id=i) for i, c, _, g, s in CASES
                          if s is not None])
def test_static_size(con: Construct, golden: bytes, size: int) -> None:
    assert con.sizeof() == size == len(golden)


def test_set_mem_table_message_with_two_regions() -> None:
    payload = h("02000000 00000000 " + REGION_A_HEX + " " + REGION_B_HEX)
    assert len(payload) == 8 + 2 * 32
    message = h("05000000 09000000 48000000") + payload
    parsed = vu.Message.parse(message)
    assert plain(parsed.header) == {"request": vu.Request.SET_MEM_TABLE, "flags": 0x9,
                                    "size": 72}
    assert plain(vu.MemoryTable.parse(parsed.payload))["regions"] == [REGION_A, REGION_B]


def test_single_region_padding_comes_first() -> None:
    golden = h("0000000000000000 " + REGION_B_HEX)
    assert golden[:8] == bytes(8)
    assert vu.SingleMemoryRegion.build({"region": REGION_B})[8:16] == h("0000000001000000")


def test_vring_addr_order_is_desc_used_avail_log() -> None:
    built = vu.VringAddr.build({"index": 0, "flags": 0, "desc_user_addr": 1,
                                "used_user_addr": 2, "avail_user_addr": 3,
                                "log_guest_addr": 4})
    assert [int.from_bytes(built[o:o + 8], "little") for o in (8, 16, 24, 32)] == [1, 2, 3, 4]


def test_set_config_wce_message() -> None:
    # SET_CONFIG(offset 32, size 1, flags 0), the guest turning on its write cache.
    message = h("19000000 09000000 0d000000 20000000 01000000 00000000 01")
    parsed = vu.Message.parse(message)
    assert parsed.header.size == len(parsed.payload) == 13
    assert plain(vu.Config.parse(parsed.payload)) == {"offset": 32, "size": 1, "flags": 0,
                                                      "region": b"\x01"}


def test_blk_config_field_offsets() -> None:
    golden = h(BLK_CONFIG_HEX)
    assert len(golden) == vblk.BLK_CONFIG_SIZE == 60
    assert golden[vblk.BLK_CONFIG_WCE_OFFSET] == 0x01
    assert vblk.BLK_CONFIG_WCE_OFFSET == 32
    assert golden[34:36] == h("9291")  # num_queues
    assert golden[36:40] == h("a4a3a2a1")  # max_discard_sectors
    assert golden[48:52] == h("d4d3d2d1")  # max_write_zeroes_sectors
    assert golden[56] == 0xF1  # write_zeroes_may_unmap
    # QEMU 7.2 asks for 57 bytes with default properties: up to write_zeroes_may_unmap.
    built = vblk.BlkConfig.build(BLK_CONFIG)
    assert built[:57] == golden[:57]


def test_avail_and_used_event_positions() -> None:
    avail = virtio.VirtqAvail(4).build({"flags": 0, "idx": 0, "ring": [0] * 4,
                                        "used_event": 0xBEEF})
    used = virtio.VirtqUsed(4).build({"flags": 0, "idx": 0,
                                      "ring": [{"id": 0, "len": 0}] * 4,
                                      "avail_event": 0xBEEF})
    assert avail[4 + 2 * 4:] == h("efbe")
    assert used[4 + 8 * 4:] == h("efbe")


@pytest.mark.parametrize("n", [1, 4, 128, 256, 1024])
def test_ring_size_helpers(n: int) -> None:
    assert virtio.desc_table_size(n) == 16 * n
    assert virtio.avail_ring_size(n) == 6 + 2 * n == virtio.VirtqAvail(n).sizeof()
    assert virtio.used_ring_size(n) == 6 + 8 * n == virtio.VirtqUsed(n).sizeof()


@pytest.mark.parametrize(("queue_size", "stride"),
                         [(4, 128), (8, 192), (128, 2112), (256, 4160), (1024, 16448)])
def test_inflight_queue_stride(queue_size: int, stride: int) -> None:
    # round_up(16 * queue_size + 16, 64) (reference 5.3)
    assert inf.inflight_queue_stride(queue_size) == stride
    assert inf.InflightSplitRegion(queue_size).sizeof() == 16 + 16 * queue_size <= stride


# ---- hot-path struct formats agree with the construct definitions -------------


def test_virtqueue_desc_struct() -> None:
    values = {"addr": 0x1234_5678_9000, "len": 0x1000, "flags": 3, "next": 5}
    golden = h("0090785634120000 00100000 0300 0500")
    assert vq_eng.DESC.pack(*values.values()) == virtio.VirtqDesc.build(values) == golden
    assert vq_eng.DESC.unpack(golden) == tuple(values.values())
    assert vq_eng.DESC.size == virtio.VirtqDesc.sizeof()


def test_virtqueue_used_elem_struct() -> None:
    values = {"id": 7, "len": 0x201}
    assert (vq_eng.USED_ELEM.pack(7, 0x201) == virtio.VirtqUsedElem.build(values)
            == h("07000000 01020000"))
    assert vq_eng.USED_ELEM.size == virtio.VirtqUsedElem.sizeof()


def test_blk_outhdr_struct() -> None:
    values = {"type": 1, "ioprio": 2, "sector": 0x12345678}
    assert blk_dev.OUTHDR.pack(1, 2, 0x12345678) == vblk.BlkOuthdr.build(values)
    assert blk_dev.OUTHDR.size == vblk.BlkOuthdr.sizeof()


def test_blk_segment_struct() -> None:
    values = {"sector": 0x800, "num_sectors": 0x100, "flags": 1}
    assert blk_dev.SEGMENT.pack(0x800, 0x100, 1) == vblk.DiscardWriteZeroes.build(values)
    assert blk_dev.SEGMENT.size == vblk.DiscardWriteZeroes.sizeof()


def test_inflight_header_struct() -> None:
    values = {"features": 0, "version": 1, "desc_num": 128, "last_batch_head": 5,
              "used_idx": 0x1234}
    assert (inflight_eng.HEADER.pack(*values.values()) == inf.InflightSplitHeader.build(values)
            == h("0000000000000000 0100 8000 0500 3412"))
    assert inflight_eng.HEADER.size == inf.InflightSplitHeader.sizeof()


def test_inflight_entry_struct() -> None:
    values = {"inflight": 1, "next": 0x0203, "counter": 0x42}
    assert (inflight_eng.ENTRY.pack(1, 0x0203, 0x42) == inf.InflightDesc.build(values)
            == h("01 0000000000 0302 4200000000000000"))
    assert inflight_eng.ENTRY.size == inf.InflightDesc.sizeof()


def test_inflight_engine_offsets_match_header() -> None:
    hdr = h("0000000000000000 0100 8000 0500 3412")
    assert int.from_bytes(hdr[inflight_eng._VERSION_OFF:][:2], "little") == 1
    assert int.from_bytes(hdr[inflight_eng._USED_IDX_OFF:][:2], "little") == 0x1234


# ---- ids and bit numbers (reference 1.3, 1.4, 2.2, 7) --------------------------

REQUEST_IDS = {
    "GET_FEATURES": 1, "SET_FEATURES": 2, "SET_OWNER": 3, "RESET_OWNER": 4,
    "SET_MEM_TABLE": 5, "SET_LOG_BASE": 6, "SET_LOG_FD": 7, "SET_VRING_NUM": 8,
    "SET_VRING_ADDR": 9, "SET_VRING_BASE": 10, "GET_VRING_BASE": 11, "SET_VRING_KICK": 12,
    "SET_VRING_CALL": 13, "SET_VRING_ERR": 14, "GET_PROTOCOL_FEATURES": 15,
    "SET_PROTOCOL_FEATURES": 16, "GET_QUEUE_NUM": 17, "SET_VRING_ENABLE": 18,
    "SEND_RARP": 19, "NET_SET_MTU": 20, "SET_BACKEND_REQ_FD": 21, "IOTLB_MSG": 22,
    "SET_VRING_ENDIAN": 23, "GET_CONFIG": 24, "SET_CONFIG": 25,
    "CREATE_CRYPTO_SESSION": 26, "CLOSE_CRYPTO_SESSION": 27, "POSTCOPY_ADVISE": 28,
    "POSTCOPY_LISTEN": 29, "POSTCOPY_END": 30, "GET_INFLIGHT_FD": 31, "SET_INFLIGHT_FD": 32,
    "GPU_SET_SOCKET": 33, "RESET_DEVICE": 34, "VRING_KICK": 35, "GET_MAX_MEM_SLOTS": 36,
    "ADD_MEM_REG": 37, "REM_MEM_REG": 38, "SET_STATUS": 39, "GET_STATUS": 40,
}
PROTOCOL_BITS = {
    "MQ": 0, "LOG_SHMFD": 1, "RARP": 2, "REPLY_ACK": 3, "NET_MTU": 4, "BACKEND_REQ": 5,
    "CROSS_ENDIAN": 6, "CRYPTO_SESSION": 7, "PAGEFAULT": 8, "CONFIG": 9,
    "BACKEND_SEND_FD": 10, "HOST_NOTIFIER": 11, "INFLIGHT_SHMFD": 12, "RESET_DEVICE": 13,
    "INBAND_NOTIFICATIONS": 14, "CONFIGURE_MEM_SLOTS": 15, "STATUS": 16,
}


def test_request_ids() -> None:
    assert {r.name: r.value for r in vu.Request} == REQUEST_IDS


def test_backend_request_ids() -> None:
    assert {r.name: r.value for r in vu.BackendRequest} == {
        "IOTLB_MSG": 1, "CONFIG_CHANGE_MSG": 2, "VRING_HOST_NOTIFIER_MSG": 3,
        "VRING_CALL": 4, "VRING_ERR": 5,
    }


def test_protocol_feature_bits() -> None:
    assert {f.name: f.value for f in vu.ProtocolFeature} == PROTOCOL_BITS


def test_header_constants() -> None:
    assert vu.VHOST_USER_HDR_SIZE == vu.Header.sizeof() == 12
    assert vu.VHOST_USER_REPLY_FLAGS == 0x5
    assert vu.VHOST_USER_NEED_REPLY_MASK == 0x8
    assert vu.VHOST_USER_VERSION_MASK == 0x3
    assert vu.VHOST_USER_F_PROTOCOL_FEATURES == 30
    assert vu.VHOST_F_LOG_ALL == 26
    assert vu.VHOST_USER_VRING_NOFD_MASK == 0x100
    assert vu.VHOST_USER_MAX_FDS == vu.VHOST_MEMORY_BASELINE_NREGIONS == 8
    assert vu.VHOST_USER_MAX_CONFIG_SIZE == 256


def test_virtio_feature_and_flag_bits() -> None:
    f = virtio.Feature
    assert (f.VIRTIO_F_NOTIFY_ON_EMPTY, f.VIRTIO_F_ANY_LAYOUT, f.VIRTIO_RING_F_INDIRECT_DESC,
            f.VIRTIO_RING_F_EVENT_IDX, f.VIRTIO_F_VERSION_1, f.VIRTIO_F_ACCESS_PLATFORM,
            f.VIRTIO_F_RING_PACKED, f.VIRTIO_F_IN_ORDER, f.VIRTIO_F_RING_RESET) == (
        24, 27, 28, 29, 32, 33, 34, 35, 40)
    assert (virtio.VIRTQ_DESC_F_NEXT, virtio.VIRTQ_DESC_F_WRITE,
            virtio.VIRTQ_DESC_F_INDIRECT) == (1, 2, 4)
    assert virtio.VIRTQ_AVAIL_F_NO_INTERRUPT == virtio.VIRTQ_USED_F_NO_NOTIFY == 1


def test_blk_ids_and_bits() -> None:
    assert {b.name: b.value for b in vblk.BlkFeature} == {
        "VIRTIO_BLK_F_SIZE_MAX": 1, "VIRTIO_BLK_F_SEG_MAX": 2, "VIRTIO_BLK_F_GEOMETRY": 4,
        "VIRTIO_BLK_F_RO": 5, "VIRTIO_BLK_F_BLK_SIZE": 6, "VIRTIO_BLK_F_FLUSH": 9,
        "VIRTIO_BLK_F_TOPOLOGY": 10, "VIRTIO_BLK_F_CONFIG_WCE": 11, "VIRTIO_BLK_F_MQ": 12,
        "VIRTIO_BLK_F_DISCARD": 13, "VIRTIO_BLK_F_WRITE_ZEROES": 14,
    }
    t = vblk.BlkRequestType
    assert (t.VIRTIO_BLK_T_IN, t.VIRTIO_BLK_T_OUT, t.VIRTIO_BLK_T_FLUSH, t.VIRTIO_BLK_T_GET_ID,
            t.VIRTIO_BLK_T_GET_LIFETIME, t.VIRTIO_BLK_T_DISCARD, t.VIRTIO_BLK_T_WRITE_ZEROES,
            t.VIRTIO_BLK_T_SECURE_ERASE) == (0, 1, 4, 8, 10, 11, 13, 14)
    s = vblk.BlkStatus
    assert (s.VIRTIO_BLK_S_OK, s.VIRTIO_BLK_S_IOERR, s.VIRTIO_BLK_S_UNSUPP) == (0, 1, 2)
    assert vblk.VIRTIO_BLK_ID_BYTES == 20
    assert vblk.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP == 1
