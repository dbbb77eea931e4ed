"""The vhost-user dirty log (reference 5.1): DirtyLog's bitmap, and what a SplitVirtqueue
marks in it while QEMU migrates. The log is a memfd the test reads with pread, the way
QEMU reads its own mapping, so the bitmap layout is checked from outside DirtyLog."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

import pytest
from unit_support import F_INDIRECT, F_NEXT, F_WRITE, GuestRam, Recorder, Ring

from vhostd.engine.dirtylog import DirtyLog, set_bit_run
from vhostd.engine.inflight import InflightRegion
from vhostd.engine.seals import sealed_memfd
from vhostd.engine.virtqueue import PENDING, SplitVirtqueue
from vhostd_proto.inflight import inflight_queue_stride
from vhostd_proto.vhost_user import VHOST_VRING_F_LOG

PAGE = 4096
LOG = 1 << VHOST_VRING_F_LOG  # SET_VRING_ADDR flags bit
QS = 8
RING0 = (0x0000, 0x0200, 0x0400)  # desc, avail, used: all in page 0
USED_RING_PAGE = 0
# log_guest_addr of the used ring: outside guest RAM (0x0-0x20000), as the reference allows,
# 0x40 bytes before a page boundary, so the used ring (70 bytes at QS 8) covers pages 48
# and 49 and its avail_event (offset 68) lies in page 49 alone.
LOG_ADDR = 0x30FC0
LOG_PAGE, LOG_PAGE2 = 48, 49
LOG_BYTES = 16  # 128 pages: all of guest RAM and LOG_ADDR


def pages_in(fd: int, size: int, offset: int = 0) -> set[int]:
    """The pages whose bits are set, read from the log's fd as QEMU would see them."""
    raw = os.pread(fd, size, offset)
    return {8 * i + b for i, byte in enumerate(raw) for b in range(8) if byte >> b & 1}


class Log:
    """A memfd dirty log as QEMU creates it, plus a DirtyLog on it."""

    def __init__(self, size: int = LOG_BYTES, offset: int = 0, file_size: int = 0) -> None:
        self.size, self.offset = size, offset
        self.file_size = max(file_size, offset + size)
        self.fd = sealed_memfd("vhostd-test-log", self.file_size)
        self.log = DirtyLog(self.fd, size, offset)

    @property
    def pages(self) -> set[int]:
        return pages_in(self.fd, self.size, self.offset)

    def raw(self) -> bytes:
        return os.pread(self.fd, self.file_size, 0)

    def harvest(self) -> set[int]:
        """QEMU's sync: take the set bits and clear them."""
        got = self.pages
        os.pwrite(self.fd, bytes(self.size), self.offset)
        return got

    def close(self) -> None:
        self.log.close()
        os.close(self.fd)


@pytest.fixture
def make_log() -> Iterator[Callable[..., Log]]:
    logs: list[Log] = []

    def make(size: int = LOG_BYTES, offset: int = 0, file_size: int = 0) -> Log:
        lg = Log(size, offset, file_size)
        logs.append(lg)
        return lg

    yield make
    for lg in logs:
        lg.close()


@pytest.fixture
def dlog(make_log: Callable[..., Log]) -> Log:
    return make_log()


# ---- DirtyLog --------------------------------------------------------------------------


@pytest.mark.parametrize(("gpa", "length", "expect"), [
    (0, 1, {0}),
    (4095, 1, {0}),
    (4096, 1, {1}),
    (0, 4096, {0}),
    (4095, 2, {0, 1}),  # straddles pages 0 and 1
    (0x1FFF, 0x2001, {1, 2, 3}),
    (0x1FFF, 0x2002, {1, 2, 3, 4}),
    (7 * PAGE, 2 * PAGE, {7, 8}),  # crosses a byte of the bitmap
    (0x5000, 100 * PAGE, set(range(5, 105))),  # many pages, many bytes
    (0x5800, 100 * PAGE, set(range(5, 106))),  # unaligned: one more page
    (127 * PAGE + 4095, 1, {127}),  # last page of the log
], ids=["gpa0", "gpa4095", "gpa4096", "page0", "straddle", "three", "four", "byte-edge", "large",
        "large-unaligned", "last"])
def test_marked_pages(dlog: Log, gpa: int, length: int, expect: set[int]) -> None:
    dlog.log.mark(gpa, length)
    assert dlog.pages == expect


def test_page_p_is_bit_p_mod_8_of_byte_p_div_8(dlog: Log) -> None:
    for page in (0, 9, 15, 63, 100):
        dlog.log.mark(page * PAGE + 17, 1)
    expect = bytearray(LOG_BYTES)
    expect[0] = 0x01  # page 0
    expect[1] = 0x02 | 0x80  # pages 9 and 15
    expect[7] = 0x80  # page 63
    expect[12] = 0x10  # page 100
    assert dlog.raw() == bytes(expect)


def test_marks_accumulate(dlog: Log) -> None:
    dlog.log.mark(0, 1)
    dlog.log.mark(PAGE, 1)
    dlog.log.mark(0, 1)  # again: still set, nothing cleared
    assert dlog.pages == {0, 1}


def test_zero_length_write_marks_nothing(dlog: Log) -> None:
    dlog.log.mark(0x5000, 0)
    dlog.log.mark(0, 0)
    assert dlog.raw() == bytes(LOG_BYTES)


def test_write_beyond_the_log_is_clipped_and_warned_once(
        make_log: Callable[..., Log], caplog: pytest.LogCaptureFixture) -> None:
    # 8 bytes = pages 0-63 inside a 4 KiB memfd: the rest of the file must stay zero.
    lg = make_log(size=8, file_size=PAGE)
    with caplog.at_level(logging.WARNING, logger="vhostd.engine.dirtylog"):
        lg.log.mark(63 * PAGE, 3 * PAGE)  # pages 63-65: 63 is in, the rest is not
        lg.log.mark(100 * PAGE, 1)  # wholly beyond
        lg.log.mark(64 * PAGE, 1)  # first page beyond
        lg.log.mark(1 << 40, PAGE)  # far beyond
    raw = lg.raw()
    assert raw[:8] == bytes(7) + b"\x80"
    assert raw[8:] == bytes(PAGE - 8)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    lg.log.mark(PAGE, 1)  # the log still works
    assert lg.pages == {1, 63}


def test_mmap_offset(make_log: Callable[..., Log]) -> None:
    lg = make_log(size=16, offset=1000, file_size=2 * PAGE)
    lg.log.mark(0, 1)
    lg.log.mark(127 * PAGE, 1)
    lg.log.mark(128 * PAGE, 1)  # beyond the 128 pages: nothing
    raw = lg.raw()
    assert raw[1000] == 0x01 and raw[1015] == 0x80
    assert raw[:1000] == bytes(1000)
    assert raw[1001:1015] == bytes(14)
    assert raw[1016:] == bytes(2 * PAGE - 1016)


def test_zero_sized_log_is_refused() -> None:
    fd = sealed_memfd("vhostd-test-log", PAGE)
    try:
        with pytest.raises(ValueError):
            DirtyLog(fd, 0, 0)
    finally:
        os.close(fd)


# ---- SplitVirtqueue --------------------------------------------------------------------


@pytest.fixture
def ring(ram: GuestRam) -> Ring:
    return Ring(ram, QS, *RING0)


def logged_queue(ring: Ring, handler: Callable[[int, list[memoryview], list[memoryview]], int],
                 log: Log | None, flags: int = 0, log_addr: int = LOG_ADDR,
                 **kw: object) -> SplitVirtqueue:
    """A started queue whose SET_VRING_ADDR carried ``flags``/``log_addr``; ``log`` is
    attached as the backend does while LOG_ALL is negotiated."""
    ram = ring.ram
    q = ring.queue(handler, start=False, **kw)  # type: ignore[arg-type]
    q.set_addr(flags, ram.qva(ring.desc_gpa), ram.qva(ring.used_gpa), ram.qva(ring.avail_gpa),
               log_addr)
    q.start(ram.memory)
    q.dirty_log = log.log if log is not None else None
    return q


def direct_chain(ring: Ring) -> set[int]:
    # header (read), data (write, pages 5-6), status (write, page 8)
    ring.chain(0, [(0x3000, 16, 0), (0x5000, 0x1800, F_WRITE), (0x8FFF, 1, F_WRITE)])
    return {5, 6, 8}


def indirect_chain(ring: Ring) -> set[int]:
    table = 0x2000  # page 2: read by the device, never written
    ring.desc(0, table, 3 * 16, F_INDIRECT)
    ring.desc(0, 0x3000, 16, F_NEXT, 1, table=table)
    ring.desc(1, 0xA000, 0x200, F_WRITE | F_NEXT, 2, table=table)
    ring.desc(2, 0xBFFF, 2, F_WRITE, table=table)  # straddles pages 11 and 12
    return {10, 11, 12}


def straddling_chain(ring: Ring) -> set[int]:
    # Region A ends at 0x10000 and region B (another memfd, offset 0x1000) starts there.
    ring.chain(0, [(0x3000, 16, 0), (0xFF80, 0x100, F_WRITE)])
    return {15, 16}


def mixed_chain(ring: Ring) -> set[int]:
    # A direct descriptor, then an indirect table; zero-length writable buffer in between.
    table = 0x2000
    ring.desc(0, 0x3000, 16, F_NEXT, 1)
    ring.desc(1, table, 2 * 16, F_INDIRECT)
    ring.desc(0, 0xD000, 0, F_WRITE | F_NEXT, 1, table=table)
    ring.desc(1, 0xE010, 4, F_WRITE, table=table)
    return {14}


@pytest.mark.parametrize("build", [direct_chain, indirect_chain, straddling_chain, mixed_chain],
                         ids=["direct", "indirect", "straddling", "direct-then-indirect"])
def test_completed_request_marks_exactly_its_writable_pages(
        ring: Ring, dlog: Log, build: Callable[[Ring], set[int]]) -> None:
    expect = build(ring)
    # A used length past the writable bytes: the device wrote all of them.
    rec = Recorder(result=1 << 20, fill=b"\x01")
    q = logged_queue(ring, rec, dlog)
    ring.publish(0)
    q.process()
    assert ring.used_elems() == [(0, 1 << 20)]
    # Readable buffers (page 3), the ring (page 0) and indirect tables (page 2) were only
    # read; without VHOST_VRING_F_LOG the used ring is not logged either.
    assert dlog.pages == expect


def test_request_with_only_readable_buffers_marks_nothing(ring: Ring, dlog: Log) -> None:
    ring.chain(0, [(0x3000, 16, 0), (0x4000, 0x1000, 0)])
    q = logged_queue(ring, Recorder(result=0), dlog)
    ring.publish(0)
    q.process()
    assert ring.used_idx == 1
    assert dlog.pages == set()


def test_used_ring_is_logged_at_log_addr_with_the_log_flag(ring: Ring, dlog: Log) -> None:
    ring.chain(0, [(0x3000, 16, 0), (0x5000, 1, F_WRITE)])
    q = logged_queue(ring, Recorder(result=1), dlog, flags=LOG)
    ring.publish(0)
    q.process()
    assert ring.used_idx == 1  # the ring itself is written at its own address ...
    got = dlog.pages
    assert 5 in got
    assert LOG_PAGE in got  # ... and logged at log_guest_addr (used.idx, entry 0)
    assert USED_RING_PAGE not in got
    assert got <= {5, LOG_PAGE, LOG_PAGE2}


def test_used_ring_covers_entries_past_a_page_boundary(ring: Ring, dlog: Log) -> None:
    # Entry slot 7 (offset 60-67) crosses 0x31000 at LOG_ADDR: both pages must be marked.
    for head in range(QS):
        ring.desc(head, 0x5000 + 0x10 * head, 1, F_WRITE)
    q = logged_queue(ring, Recorder(result=1), dlog, flags=LOG)
    ring.publish(*range(QS))
    q.process()
    assert ring.used_idx == QS
    assert dlog.pages == {5, LOG_PAGE, LOG_PAGE2}


def test_used_ring_is_not_logged_without_the_log_flag(ring: Ring, dlog: Log) -> None:
    ring.chain(0, [(0x3000, 16, 0), (0x5000, 1, F_WRITE)])
    q = logged_queue(ring, Recorder(result=1), dlog, flags=0)
    ring.publish(0)
    q.process()
    assert ring.used_idx == 1
    assert dlog.pages == {5}


@pytest.mark.parametrize("flags", [0, LOG], ids=["no-log-flag", "log-flag"])
def test_avail_event_write_is_logged(ring: Ring, dlog: Log, flags: int) -> None:
    q = logged_queue(ring, Recorder(result=1), dlog, flags=flags, event_idx=True, base=3)
    ring.set_avail_idx(3)
    ring.avail_idx = 3
    q.process()  # nothing available: the only write is avail_event = 3
    assert ring.avail_event == 3 and ring.used_idx == 0
    got = dlog.pages
    if flags:
        assert LOG_PAGE2 in got  # LOG_ADDR + 4 + 8 * QS = 0x31004
        assert got <= {LOG_PAGE, LOG_PAGE2}
    else:
        assert got == set()


def test_event_idx_batch_logs_data_and_used_ring(ring: Ring, dlog: Log) -> None:
    ring.chain(0, [(0x3000, 16, 0), (0x6000, 8, F_WRITE)])
    q = logged_queue(ring, Recorder(result=8), dlog, flags=LOG, event_idx=True)
    ring.publish(0)
    q.process()
    assert ring.avail_event == 1
    got = dlog.pages
    assert {6, LOG_PAGE, LOG_PAGE2} <= got  # avail_event sits in page 49
    assert got <= {6, LOG_PAGE, LOG_PAGE2}


def test_nothing_is_marked_without_an_attached_log(ring: Ring, dlog: Log) -> None:
    # The log exists (as after SET_LOG_BASE) but LOG_ALL is not negotiated: the queue has
    # no dirty_log and must write none, even with the ring's log flag and EVENT_IDX.
    direct_chain(ring)
    q = logged_queue(ring, Recorder(result=1, fill=b"x"), None, flags=LOG, event_idx=True)
    assert q.dirty_log is None
    ring.publish(0)
    q.process()
    assert ring.used_idx == 1 and ring.avail_event == 1
    assert dlog.raw() == bytes(LOG_BYTES)
    assert dlog.log.marked == 0


def test_detaching_the_log_stops_marking(ring: Ring, dlog: Log) -> None:
    ring.desc(0, 0x5000, 1, F_WRITE)
    ring.desc(1, 0x7000, 1, F_WRITE)
    q = logged_queue(ring, Recorder(result=1), dlog, flags=LOG)
    ring.publish(0)
    q.process()
    assert 5 in dlog.harvest()
    q.dirty_log = None  # SET_FEATURES without LOG_ALL
    ring.publish(1)
    q.process()
    assert ring.used_idx == 2
    assert dlog.pages == set()


def test_pending_completion_is_logged_when_it_completes(ring: Ring, dlog: Log) -> None:
    direct_chain(ring)
    rec = Recorder(result=PENDING)
    q = logged_queue(ring, rec, dlog, flags=LOG)
    ring.publish(0)
    q.process()
    assert rec.heads == [0] and ring.used_idx == 0
    dlog.harvest()  # QEMU syncs while the request is still in flight
    q.complete(0, 0x1801)  # the device has written data and status now
    assert ring.used_elems() == [(0, 0x1801)]
    got = dlog.pages
    assert {5, 6, 8, LOG_PAGE} <= got
    assert got <= {5, 6, 8, LOG_PAGE, LOG_PAGE2}
    # Its writes are forgotten once logged: a second sync sees nothing new.
    dlog.harvest()
    ring.publish()
    q.process()
    assert dlog.pages == set()


def test_pending_completions_in_any_order_mark_their_own_pages(ring: Ring, dlog: Log) -> None:
    for head in range(3):
        ring.desc(head, 0x5000 + PAGE * head, 1, F_WRITE)
    q = logged_queue(ring, Recorder(result=PENDING), dlog)
    ring.publish(0, 1, 2)
    q.process()
    dlog.harvest()
    q.complete(2, 1)
    assert dlog.harvest() == {7}
    q.complete(0, 1)
    assert dlog.harvest() == {5}
    q.complete(1, 1)
    assert dlog.harvest() == {6}
    assert ring.used_elems() == [(2, 1), (0, 1), (1, 1)]


def test_pending_taken_before_logging_started_is_logged(ring: Ring, dlog: Log) -> None:
    direct_chain(ring)
    q = logged_queue(ring, Recorder(result=PENDING), None)
    ring.publish(0)
    q.process()
    q.dirty_log = dlog.log  # SET_LOG_BASE + SET_FEATURES(LOG_ALL) while it is in flight
    q.complete(0, 0x1801)
    assert ring.used_idx == 1
    assert dlog.pages == {5, 6, 8}


@pytest.fixture
def inflight_fd() -> Iterator[int]:
    fd, _ = InflightRegion.create(1, QS)
    yield fd
    os.close(fd)


def test_resubmitted_inflight_requests_are_logged(ring: Ring, dlog: Log,
                                                  inflight_fd: int) -> None:
    for head in (0, 1, 3, 5):
        ring.desc(head, 0x4000 + PAGE * head, 1, F_WRITE)  # page 4 + head
    # First back end: 5 and 3 never complete (no log: no migration then).
    region = InflightRegion(inflight_fd, inflight_queue_stride(QS), 0, 1, QS)
    q = ring.queue(Recorder(result=lambda head: PENDING if head in (5, 3) else 1),
                   inflight=region.queues[0])
    ring.publish(5, 0, 3, 1)
    q.process()
    assert ring.used_elems() == [(0, 1), (1, 1)]
    region.close()

    # Restarted back end, with the dirty log already on.
    region = InflightRegion(inflight_fd, inflight_queue_stride(QS), 0, 1, QS)
    rec = Recorder(result=1)
    q = logged_queue(ring, rec, dlog, flags=LOG, base=ring.used_idx,
                     inflight=region.queues[0])
    q.process()
    assert rec.heads == [5, 3]
    assert ring.used_elems(2) == [(5, 1), (3, 1)]
    got = dlog.pages
    assert {9, 7, LOG_PAGE} <= got
    assert got <= {9, 7, LOG_PAGE, LOG_PAGE2}
    region.close()


def test_resubmitted_pending_request_is_logged_at_completion(ring: Ring, dlog: Log,
                                                             inflight_fd: int) -> None:
    ring.desc(2, 0x6000, 1, F_WRITE)
    region = InflightRegion(inflight_fd, inflight_queue_stride(QS), 0, 1, QS)
    q = ring.queue(Recorder(result=PENDING), inflight=region.queues[0])
    ring.publish(2)
    q.process()
    region.close()

    region = InflightRegion(inflight_fd, inflight_queue_stride(QS), 0, 1, QS)
    rec = Recorder(result=PENDING)
    q = logged_queue(ring, rec, dlog, base=ring.used_idx, inflight=region.queues[0])
    q.process()
    assert rec.heads == [2] and dlog.pages == set()
    q.complete(2, 1)
    assert ring.used_elems() == [(2, 1)]
    assert dlog.pages == {6}
    region.close()


# ---- only what the used length says was written, as bit runs ----------------------

def test_refused_request_marks_only_its_status_byte(ring: Ring, dlog: Log) -> None:
    """A request the device refuses before any data moves (used length 1: the status
    byte at the end of a virtio-blk request) marks the status byte's page only."""
    ring.chain(0, [(0x3000, 16, 0), (0x5000, 0x3000, F_WRITE), (0xA000, 0x1000, F_WRITE),
                   (0xC7FF, 1, F_WRITE)])
    q = logged_queue(ring, Recorder(result=1), dlog)
    q.status_tail = True
    ring.publish(0)
    q.process()
    assert dlog.pages == {0xC}


def test_short_read_marks_the_data_written_and_the_status_byte(ring: Ring, dlog: Log) -> None:
    ring.chain(0, [(0x3000, 16, 0), (0x5000, 0x3000, F_WRITE), (0xC7FF, 1, F_WRITE)])
    q = logged_queue(ring, Recorder(result=0x1001 + 1), dlog)  # 0x1001 data bytes + status
    q.status_tail = True
    ring.publish(0)
    q.process()
    assert dlog.pages == {5, 6, 0xC}


def test_used_length_marks_the_first_bytes_of_the_writable_part(ring: Ring, dlog: Log) -> None:
    """Without a status tail (the admin queue) the used length counts from the start."""
    ring.chain(0, [(0x3000, 16, 0), (0x5000, 0x10, F_WRITE), (0x8000, 0x3000, F_WRITE)])
    q = logged_queue(ring, Recorder(result=0x10 + 0x1001), dlog)
    ring.publish(0)
    q.process()
    assert dlog.pages == {5, 8, 9}


def test_a_huge_run_is_marked_whole_bytes_at_a_time() -> None:
    """A run of 2**20 pages (4 GiB) sets exactly its bits; a per-page loop would take
    seconds, slice assignment a fraction of a millisecond."""
    bitmap = bytearray(1 << 18)
    set_bit_run(bitmap, 3, (1 << 20) + 2)
    assert bitmap[0] == 0xF8 and bitmap[(1 << 17)] == 0x07
    assert bitmap[1:1 << 17] == b"\xff" * ((1 << 17) - 1)
    assert not any(bitmap[(1 << 17) + 1:])
    one = bytearray(2)
    set_bit_run(one, 9, 9)
    assert one == b"\x00\x02"
