"""virtio-blk device on a FileStorage: the request handler, config space and resize."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from unit_support import F_WRITE, IMAGE_SIZE, GuestRam, Ring

from vhostd.devices.blk import BlkDevice, BlkOptions
from vhostd.engine.virtqueue import Handler, SplitVirtqueue
from vhostd.storage.file import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FileStorage,
    fallocate,
)

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
UNMAP = 1
SECTORS = IMAGE_SIZE // 512
POISON = 0xEE  # what writable buffers hold before the device writes them

MakeBlk = Callable[..., BlkDevice]


def hdr(rtype: int, sector: int = 0, ioprio: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, ioprio, sector)


def seg(sector: int, num: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, num, flags)


def pattern(sector: int, count: int = 1) -> bytes:
    """What the ``image`` fixture holds in those sectors."""
    return b"".join(bytes([s & 0xFF]) * 512 for s in range(sector, sector + count))


def handler_of(dev: BlkDevice) -> Handler:
    return dev.make_handler(SplitVirtqueue(0, lambda h, r, w: 0))


def run(dev: BlkDevice, readable: list[bytes], writable: list[int]) -> tuple[int, list[bytes]]:
    """Serve one request; returns the used length and the writable buffers afterwards."""
    wbufs = [bytearray([POISON]) * n for n in writable]
    n = handler_of(dev)(0, [memoryview(b) for b in readable], [memoryview(w) for w in wbufs])
    return n, [bytes(w) for w in wbufs]


def file_bytes(image: Path, offset: int, n: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(offset)
        return f.read(n)


def count_flushes(dev: BlkDevice, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = dev.storage.flush

    def flush(token: object) -> int:
        calls.append(1)
        return real(token)

    monkeypatch.setattr(dev.storage, "flush", flush)
    return calls


@pytest.fixture
def blk(make_blk: MakeBlk) -> BlkDevice:
    return make_blk()


@pytest.fixture
def holes(tmp_path: Path) -> None:
    """Skip unless the file system under tmp_path can punch holes."""
    probe = tmp_path / "probe"
    probe.write_bytes(b"x" * 8192)
    fd = os.open(probe, os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
    except OSError:
        pytest.skip("file system cannot punch holes")
    finally:
        os.close(fd)


# ---- reads and writes -------------------------------------------------------------


def test_read_header_in_its_own_descriptor(blk: BlkDevice) -> None:
    n, (data, status) = run(blk, [hdr(T_IN, 3)], [1024, 1])
    assert n == 1025
    assert data == pattern(3, 2)
    assert status == bytes([S_OK])


def test_read_data_and_status_in_one_descriptor(blk: BlkDevice) -> None:
    n, (buf,) = run(blk, [hdr(T_IN, 7)], [1025])
    assert n == 1025
    assert buf[:1024] == pattern(7, 2) and buf[1024] == S_OK


def test_read_into_several_buffers(blk: BlkDevice) -> None:
    n, bufs = run(blk, [hdr(T_IN, 1)], [512, 256, 256, 1])
    assert n == 1025
    assert b"".join(bufs[:3]) == pattern(1, 2) and bufs[3] == bytes([S_OK])


def test_barrier_flag_is_ignored(blk: BlkDevice) -> None:
    n, (data, status) = run(blk, [hdr(0x8000_0000 | T_IN, 5)], [512, 1])
    assert (n, data, status) == (513, pattern(5), bytes([S_OK]))


def test_write_header_in_its_own_descriptor(blk: BlkDevice, image: Path) -> None:
    n, (status,) = run(blk, [hdr(T_OUT, 10), b"X" * 1024], [1])
    assert (n, status) == (1, bytes([S_OK]))
    assert file_bytes(image, 10 * 512, 1024) == b"X" * 1024
    assert file_bytes(image, 9 * 512, 512) == pattern(9)
    assert file_bytes(image, 12 * 512, 512) == pattern(12)


def test_write_header_and_data_in_one_descriptor(blk: BlkDevice, image: Path) -> None:
    n, (status,) = run(blk, [hdr(T_OUT, 20) + b"Y" * 512, b"Z" * 512], [1])
    assert (n, status) == (1, bytes([S_OK]))
    assert file_bytes(image, 20 * 512, 1024) == b"Y" * 512 + b"Z" * 512
    assert file_bytes(image, 22 * 512, 512) == pattern(22)


def test_write_header_split_across_descriptors(blk: BlkDevice, image: Path) -> None:
    h = hdr(T_OUT, 30)
    n, (status,) = run(blk, [h[:8], h[8:] + b"Q" * 512], [1])
    assert (n, status) == (1, bytes([S_OK]))
    assert file_bytes(image, 30 * 512, 512) == b"Q" * 512


def test_write_then_read_back(blk: BlkDevice) -> None:
    run(blk, [hdr(T_OUT, 100), bytes(range(256)) * 4], [1])
    _, (data, _) = run(blk, [hdr(T_IN, 100)], [1024, 1])
    assert data == bytes(range(256)) * 4


@pytest.mark.parametrize(("rtype", "sector", "nbytes"), [
    (T_IN, SECTORS - 1, 1024),
    (T_IN, SECTORS, 512),
    (T_IN, 1 << 63, 512),
    (T_OUT, SECTORS - 1, 1024),
    (T_OUT, SECTORS, 512),
    (T_OUT, (1 << 64) - 1, 512),
])
def test_out_of_range_sector(blk: BlkDevice, image: Path, rtype: int, sector: int,
                             nbytes: int) -> None:
    if rtype == T_IN:
        n, (data, status) = run(blk, [hdr(rtype, sector)], [nbytes, 1])
        assert data == bytes([POISON]) * nbytes
    else:
        n, (status,) = run(blk, [hdr(rtype, sector), b"W" * nbytes], [1])
    assert (n, status) == (1, bytes([S_IOERR]))
    assert os.path.getsize(image) == IMAGE_SIZE
    assert file_bytes(image, IMAGE_SIZE - 512, 512) == pattern(SECTORS - 1)


def test_last_sector_is_in_range(blk: BlkDevice, image: Path) -> None:
    n, (data, status) = run(blk, [hdr(T_IN, SECTORS - 1)], [512, 1])
    assert (n, data, status) == (513, pattern(SECTORS - 1), bytes([S_OK]))
    n, (status,) = run(blk, [hdr(T_OUT, SECTORS - 1), b"L" * 512], [1])
    assert status == bytes([S_OK])
    assert file_bytes(image, IMAGE_SIZE - 512, 512) == b"L" * 512


def test_request_without_status_byte(blk: BlkDevice, image: Path) -> None:
    n, bufs = run(blk, [hdr(T_OUT, 0), b"N" * 512], [])
    assert (n, bufs) == (0, [])
    assert file_bytes(image, 0, 512) == pattern(0)


@pytest.mark.parametrize("readable", [[], [b"\0" * 8], [b"\0" * 8, b"\0" * 7]])
def test_header_too_short(blk: BlkDevice, readable: list[bytes]) -> None:
    n, (status,) = run(blk, readable, [1])
    assert (n, status) == (1, bytes([S_IOERR]))


@pytest.mark.parametrize("rtype", [2, 10, 14, 0x99, 0x7FFF_FFFF])
def test_unknown_type_is_unsupported(blk: BlkDevice, rtype: int) -> None:
    n, (data, status) = run(blk, [hdr(rtype)], [16, 1])
    assert (n, status) == (1, bytes([S_UNSUPP]))
    assert data == bytes([POISON]) * 16


def test_flush(blk: BlkDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    flushes = count_flushes(blk, monkeypatch)
    n, (status,) = run(blk, [hdr(T_FLUSH)], [1])
    assert (n, status, len(flushes)) == (1, bytes([S_OK]), 1)


def test_write_through_flushes_every_write(blk: BlkDevice,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    flushes = count_flushes(blk, monkeypatch)
    run(blk, [hdr(T_OUT, 0), b"a" * 512], [1])
    assert flushes == []  # write-back: no flush
    blk.set_config(32, b"\x00", 0)
    flushes.clear()
    run(blk, [hdr(T_OUT, 0), b"b" * 512], [1])
    assert len(flushes) == 1


# ---- GET_ID -----------------------------------------------------------------------


def test_get_id_default_serial_is_the_file_name(blk: BlkDevice) -> None:
    n, (data, status) = run(blk, [hdr(T_GET_ID)], [20, 1])
    assert (n, status) == (21, bytes([S_OK]))
    assert data == b"disk.img" + bytes(12)


def test_get_id_serial_truncated_to_20_bytes(make_blk: MakeBlk) -> None:
    dev = make_blk(serial="serial-0123456789-abcdef")
    n, (data, _) = run(dev, [hdr(T_GET_ID)], [20, 1])
    assert (n, data) == (21, b"serial-0123456789-ab")


def test_get_id_short_buffer_is_truncated(make_blk: MakeBlk) -> None:
    dev = make_blk(serial="ABCDEFGHIJKLMNOPQRST")
    n, (data, status) = run(dev, [hdr(T_GET_ID)], [8, 1])
    assert (n, data, status) == (9, b"ABCDEFGH", bytes([S_OK]))


def test_get_id_over_several_buffers(make_blk: MakeBlk) -> None:
    dev = make_blk(serial="ABCDEFGHIJKLMNOPQRST")
    n, (a, b, status) = run(dev, [hdr(T_GET_ID)], [5, 30, 1])
    assert n == 21
    assert a == b"ABCDE" and b == b"FGHIJKLMNOPQRST" + bytes([POISON]) * 15
    assert status == bytes([S_OK])


def test_get_id_in_status_descriptor(make_blk: MakeBlk) -> None:
    dev = make_blk(serial="ABCDEFGHIJKLMNOPQRST")
    n, (buf,) = run(dev, [hdr(T_GET_ID)], [21])
    assert (n, buf) == (21, b"ABCDEFGHIJKLMNOPQRST" + bytes([S_OK]))


# ---- DISCARD / WRITE_ZEROES ------------------------------------------------------


def test_discard_punches_a_hole(blk: BlkDevice, image: Path, holes: None) -> None:
    blocks = os.stat(image).st_blocks
    n, (status,) = run(blk, [hdr(T_DISCARD), seg(8, 8)], [1])
    assert (n, status) == (1, bytes([S_OK]))
    fd = os.open(image, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 4096
        assert os.lseek(fd, 4096, os.SEEK_DATA) == 8192
    finally:
        os.close(fd)
    assert os.stat(image).st_blocks == blocks - 8
    assert os.path.getsize(image) == IMAGE_SIZE
    assert file_bytes(image, 4096, 4096) == bytes(4096)
    assert file_bytes(image, 8192, 512) == pattern(16)


def test_discard_several_segments(blk: BlkDevice, image: Path, holes: None) -> None:
    _, (status,) = run(blk, [hdr(T_DISCARD), seg(8, 8) + seg(64, 8)], [1])
    assert status == bytes([S_OK])
    assert file_bytes(image, 64 * 512, 4096) == bytes(4096)
    assert file_bytes(image, 16 * 512, 512) == pattern(16)


@pytest.mark.parametrize(("payload", "status"), [
    (seg(8, 8, UNMAP), S_UNSUPP),  # UNMAP is for WRITE_ZEROES only
    (seg(8, 8, 2), S_UNSUPP),  # unknown flag
    (seg(SECTORS - 4, 8), S_IOERR),  # past the end
    (seg(8, (1 << 22) + 1), S_IOERR),  # more than max_discard_sectors
    (seg(0, 8) * 33, S_UNSUPP),  # more than max_discard_seg
    (seg(8, 8)[:12], S_UNSUPP),  # not a whole segment
    (b"", S_UNSUPP),  # no segment
])
def test_bad_discard(blk: BlkDevice, image: Path, payload: bytes, status: int) -> None:
    n, (st,) = run(blk, [hdr(T_DISCARD), payload] if payload else [hdr(T_DISCARD)], [1])
    assert (n, st) == (1, bytes([status]))
    assert file_bytes(image, 0, 8 * 4096) == pattern(0, 64)


@pytest.mark.parametrize("rtype", [T_DISCARD, T_WRITE_ZEROES])
def test_segment_longer_than_advertised_maximum(tmp_path: Path, rtype: int,
                                                holes: None) -> None:
    # A sparse 3 GiB image, so only the per-segment limit (1 << 22 sectors) can refuse.
    path = tmp_path / "big.img"
    with open(path, "wb") as f:
        f.truncate(3 << 30)
    backend = FileStorage(str(path))
    try:
        dev = BlkDevice("big", backend, BlkOptions())
        assert u32(dev.config(), 36 if rtype == T_DISCARD else 48) == 1 << 22
        # UNMAP for WRITE_ZEROES: punching keeps the sparse image from allocating 2 GiB.
        flags = UNMAP if rtype == T_WRITE_ZEROES else 0
        _, (status,) = run(dev, [hdr(rtype), seg(0, (1 << 22) + 1, flags)], [1])
        assert status == bytes([S_IOERR])
        _, (status,) = run(dev, [hdr(rtype), seg(0, 1 << 22, flags)], [1])
        assert status == bytes([S_OK])
    finally:
        backend.close()


def test_write_zeroes_without_unmap_keeps_blocks(blk: BlkDevice, image: Path,
                                                 holes: None) -> None:
    blocks = os.stat(image).st_blocks
    n, (status,) = run(blk, [hdr(T_WRITE_ZEROES), seg(16, 8)], [1])
    assert (n, status) == (1, bytes([S_OK]))
    assert file_bytes(image, 16 * 512, 4096) == bytes(4096)
    assert file_bytes(image, 15 * 512, 512) == pattern(15)
    assert file_bytes(image, 24 * 512, 512) == pattern(24)
    fd = os.open(image, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) == IMAGE_SIZE  # no hole anywhere
    finally:
        os.close(fd)
    assert os.stat(image).st_blocks == blocks  # nothing deallocated


def test_write_zeroes_with_unmap_punches_a_hole(blk: BlkDevice, image: Path,
                                                holes: None) -> None:
    n, (status,) = run(blk, [hdr(T_WRITE_ZEROES), seg(24, 8, UNMAP)], [1])
    assert (n, status) == (1, bytes([S_OK]))
    assert file_bytes(image, 24 * 512, 4096) == bytes(4096)
    fd = os.open(image, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 24 * 512
    finally:
        os.close(fd)
    assert os.path.getsize(image) == IMAGE_SIZE


def test_write_zeroes_unaligned_and_several_segments(blk: BlkDevice, image: Path) -> None:
    _, (status,) = run(blk, [hdr(T_WRITE_ZEROES), seg(3, 1) + seg(40, 3, UNMAP)], [1])
    assert status == bytes([S_OK])
    assert file_bytes(image, 2 * 512, 3 * 512) == pattern(2) + bytes(512) + pattern(4)
    assert file_bytes(image, 40 * 512, 3 * 512) == bytes(3 * 512)
    assert file_bytes(image, 43 * 512, 512) == pattern(43)


def test_write_zeroes_past_the_end(blk: BlkDevice, image: Path) -> None:
    _, (status,) = run(blk, [hdr(T_WRITE_ZEROES), seg(SECTORS - 1, 2)], [1])
    assert status == bytes([S_IOERR])
    assert file_bytes(image, IMAGE_SIZE - 512, 512) == pattern(SECTORS - 1)


# ---- read-only -----------------------------------------------------------------


@pytest.mark.parametrize(("rtype", "payload"), [
    (T_OUT, b"R" * 512),
    (T_DISCARD, seg(0, 8)),
    (T_WRITE_ZEROES, seg(0, 8)),
    (T_WRITE_ZEROES, seg(0, 8, UNMAP)),
])
@pytest.mark.parametrize("fd_writable", [False, True], ids=["ro-fd", "rw-fd"])
def test_read_only_refuses_changes(make_blk: MakeBlk, image: Path, rtype: int,
                                   payload: bytes, fd_writable: bool) -> None:
    if fd_writable:
        # The device must refuse by itself, not rely on the fd failing with EBADF.
        dev = make_blk()
        dev.storage.read_only = True
    else:
        dev = make_blk(read_only=True)
    n, (status,) = run(dev, [hdr(rtype, 0), payload], [1])
    assert (n, status) == (1, bytes([S_IOERR]))
    assert file_bytes(image, 0, 4096) == pattern(0, 8)


def test_read_only_still_reads_and_advertises_ro(make_blk: MakeBlk) -> None:
    dev = make_blk(read_only=True)
    n, (data, status) = run(dev, [hdr(T_IN, 2)], [512, 1])
    assert (n, data, status) == (513, pattern(2), bytes([S_OK]))
    assert dev.device_features() >> 5 & 1
    assert not make_blk().device_features() >> 5 & 1


def test_device_features(blk: BlkDevice) -> None:
    bits = {b for b in range(64) if blk.device_features() >> b & 1}
    assert bits == {1, 2, 6, 9, 10, 11, 12, 13, 14}


# ---- config space --------------------------------------------------------------


def u16(b: bytes, off: int) -> int:
    return int.from_bytes(b[off:off + 2], "little")


def u32(b: bytes, off: int) -> int:
    return int.from_bytes(b[off:off + 4], "little")


def test_config_bytes(make_blk: MakeBlk) -> None:
    dev = make_blk(num_queues=3, queue_size=256)
    cfg = dev.config()
    assert len(cfg) == 60
    assert int.from_bytes(cfg[0:8], "little") == SECTORS  # capacity from the file size
    assert u32(cfg, 8) == 1 << 20  # size_max
    assert u32(cfg, 12) == 126  # seg_max: what a 128-entry ring carries
    assert u32(cfg, 20) == 512  # blk_size
    assert cfg[24] == 3  # physical_block_exp: 4 KiB physical blocks
    assert cfg[32] == 1  # wce: write-back by default
    assert u16(cfg, 34) == 3  # num_queues
    assert u32(cfg, 36) == 1 << 22 and u32(cfg, 40) == 32  # discard
    assert u32(cfg, 44) == 8  # discard_sector_alignment: 4 KiB
    assert u32(cfg, 48) == 1 << 22 and u32(cfg, 52) == 32  # write zeroes
    assert cfg[56] == 1  # write_zeroes_may_unmap


def test_config_write_through_and_large_blocks(make_blk: MakeBlk) -> None:
    cfg = make_blk(writeback=False, logical_block_size=4096).config()
    assert cfg[32] == 0
    assert u32(cfg, 20) == 4096 and cfg[24] == 0


def test_get_config_slices_and_pads(blk: BlkDevice) -> None:
    cfg = blk.config()
    assert blk.get_config(0, 57) == cfg[:57]
    assert blk.get_config(32, 1) == b"\x01"
    assert blk.get_config(56, 8) == cfg[56:60] + bytes(4)
    assert blk.get_config(100, 4) == bytes(4)


def test_set_config_toggles_wce(blk: BlkDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    flushes = count_flushes(blk, monkeypatch)
    blk.set_config(32, b"\x00", 0)
    assert blk.wce == 0 and blk.config()[32] == 0 and blk.get_config(32, 1) == b"\x00"
    assert len(flushes) == 1  # switching to write-through flushes the cache
    blk.set_config(32, b"\x01", 0)
    assert blk.wce == 1 and blk.config()[32] == 1
    assert len(flushes) == 1
    blk.set_config(32, b"\x00", 0)
    blk.reset()
    assert blk.wce == 1


@pytest.mark.parametrize(("offset", "data"), [
    (0, b"\x00"), (31, b"\x00"), (33, b"\x00"), (34, b"\x01"), (32, b"\x00\x00"),
    (32, b""), (32, b"\x02"), (32, b"\xff"),
])
def test_set_config_rejects_everything_but_wce(blk: BlkDevice, offset: int,
                                               data: bytes) -> None:
    before = blk.config()
    with pytest.raises(ValueError):
        blk.set_config(offset, data, 0)
    assert blk.config() == before


def test_refresh_capacity_after_the_file_grows(blk: BlkDevice, image: Path) -> None:
    assert blk.refresh_capacity() is False
    os.truncate(image, 2 * IMAGE_SIZE)
    assert blk.refresh_capacity() is True
    assert blk.capacity == 2 * SECTORS
    assert int.from_bytes(blk.get_config(0, 8), "little") == 2 * SECTORS
    assert blk.refresh_capacity() is False
    # The new sectors are usable, with the handler made before the resize too.
    n, (data, status) = run(blk, [hdr(T_IN, 2 * SECTORS - 1)], [512, 1])
    assert (n, data, status) == (513, bytes(512), bytes([S_OK]))


def test_refresh_capacity_after_shrink(blk: BlkDevice, image: Path) -> None:
    os.truncate(image, IMAGE_SIZE // 2)
    assert blk.refresh_capacity() is True
    _, (status,) = run(blk, [hdr(T_OUT, SECTORS // 2), b"x" * 512], [1])
    assert status == bytes([S_IOERR])


# ---- through a real split ring ------------------------------------------------------


def test_request_through_a_split_ring(blk: BlkDevice, ram: GuestRam) -> None:
    ring = Ring(ram, 8, 0x0000, 0x0200, 0x0400)
    ram.write(0x4000, hdr(T_IN, 4))
    # Data buffer straddles the two guest RAM regions; status in its own descriptor.
    ring.chain(0, [(0x4000, 16, 0), (0xFF00, 1024, F_WRITE), (0x4100, 1, F_WRITE)])
    q = SplitVirtqueue(0, lambda h, r, w: 0)
    q.handler = blk.make_handler(q)
    q.set_num(8)
    q.set_addr(0, ram.qva(0x0000), ram.qva(0x0400), ram.qva(0x0200), 0)
    q.enabled = True
    q.start(ram.memory)
    ring.publish(0)
    q.process()
    assert ring.used_elems() == [(0, 1025)]
    assert ram.read(0xFF00, 256) + ram.read(0x10000, 768) == pattern(4, 2)
    assert ram.read(0x4100, 1) == bytes([S_OK])


# ---- requests the storage holds for long --------------------------------------------


class HeldFlushes(FileStorage):
    """A file whose flushes never come back (a disk or server that stopped answering)."""

    def flush(self, token: object) -> int:
        return 1  # PENDING, and no completion will ever be reported


def test_a_request_held_by_the_storage_is_named_once(image: Path) -> None:
    dev = BlkDevice("blk0", HeldFlushes(str(image)), BlkOptions())
    try:
        assert run(dev, [hdr(T_FLUSH)], [1])[0] < 0  # PENDING: at the storage
        assert dev.overdue(60 * 10**9) == []  # not yet long enough
        lines = dev.overdue(0)
        assert len(lines) == 2, lines
        assert "head 0: flush at sector 0 not completed by the storage" in lines[0]
        assert lines[1].startswith("storage: ") and str(image) in lines[1]
        assert dev.overdue(0) == []  # named once, not at every look
    finally:
        dev.storage.close()
