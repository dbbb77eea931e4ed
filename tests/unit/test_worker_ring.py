"""Moving a ring between processes (engine/worker_ring.py), within one process: a queue's
state exported, sent through JSON as the worker channel carries it, imported, served
and handed back; the write tracker's bitmaps merged; a bad spec refused cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from unit_support import (
    F_WRITE,
    GuestRam,
    PackedRing,
    Recorder,
    Ring,
    UsedDesc,
    eventfd_count,
    packed_used_flags,
)

from vhostd.devices.blk import BlkDevice
from vhostd.devices.registry import device_from_spec
from vhostd.engine.dirtytrack import WriteTracker
from vhostd.engine.inflight import InflightRegion
from vhostd.engine.packed import PackedVirtqueue, set_layout
from vhostd.engine.virtqueue import PENDING, RingError, SplitVirtqueue
from vhostd.engine.worker_ring import WorkerRing, ring_spec

QS = 8
RING0 = (0x0000, 0x0200, 0x0400)
BUF = 0x4000
PAGE = 4096
T_OUT = 1


def wire(obj: Any) -> Any:
    """What crosses the worker channel: JSON."""
    return json.loads(json.dumps(obj))


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.fixture
def ring(ram: GuestRam) -> Ring:
    return Ring(ram, QS, *RING0)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A real event loop as the worker's fd watcher (never run: the tests call process)."""
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def writes(ring: Ring, heads: list[int]) -> None:
    """One-byte writable chains at ``heads`` (not published)."""
    for h in heads:
        ring.desc(h, BUF + 0x10 * h, 1, F_WRITE)


# ---- split rings ------------------------------------------------------------------------


def test_split_state_round_trip_keeps_position_and_signalled_state(
        ring: Ring, ram: GuestRam, eventfd: Callable[[], int]) -> None:
    call = eventfd()
    writes(ring, list(range(QS)))
    q = ring.queue(Recorder(result=1), event_idx=True, call_fd=call)
    ring.publish(0, 1, 2)
    q.process()
    assert eventfd_count(call) == 1 and ring.used_idx == 3
    state = wire(q.export_state())
    assert state["packed"] is False
    assert (state["last_avail_idx"], state["used_idx"]) == (3, 3)
    assert (state["_signalled_used"], state["_signalled_valid"]) == (3, True)
    assert (state["size"], state["event_idx"], state["enabled"]) == (QS, True, True)
    assert state["_resubmit"] == [] and state["broken"] is False

    rec = Recorder(result=2)
    q2 = SplitVirtqueue(0, rec)
    q2.import_state(state, ram.memory)
    q2.call_fd = call
    assert q2.ready
    assert (q2.desc_addr, q2.avail_addr, q2.used_addr) == (q.desc_addr, q.avail_addr,
                                                          q.used_addr)
    assert (q2.last_avail_idx, q2.used_idx, q2.requests) == (3, 3, 3)
    # The driver wants a signal once used passes 3: the imported ring signals for 4...
    ring.set_used_event(3)
    ring.publish(3)
    q2.process()
    assert rec.heads == [3] and eventfd_count(call) == 1
    # ...and not for 5 with used_event still 3: it knows it signalled at 4 (a ring that
    # had lost its signalled state would signal to be safe).
    ring.publish(4)
    q2.process()
    assert rec.heads == [3, 4] and eventfd_count(call) == 0
    assert ring.used_elems() == [(0, 1), (1, 1), (2, 1), (3, 2), (4, 2)]

    # Back to the first copy: import_position takes over where q2 got to.
    q.import_position(wire(q2.export_state()))
    assert (q.last_avail_idx, q.used_idx, q.requests) == (5, 5, 5)
    ring.publish(5)
    q.process()
    assert ring.used_elems(5) == [(5, 1)]


def test_split_state_carries_the_resubmit_list_and_inflight_counter(
        ring: Ring, ram: GuestRam) -> None:
    fd, size = InflightRegion.create(1, QS)
    region = InflightRegion(fd, size, 0, 1, QS)
    try:
        writes(ring, [0, 1, 3, 5])
        # A back end that dies with 5 and 3 taken, not completed.
        crashed = ring.queue(Recorder(result=lambda h: PENDING if h in (5, 3) else 1),
                             inflight=region.queues[0])
        ring.publish(5, 0, 3, 1)
        crashed.process()
        assert ring.used_elems() == [(0, 1), (1, 1)]
        # The next back end recovers them at start; the ring moves before it serves.
        q = ring.queue(Recorder(), base=ring.used_idx, inflight=region.queues[0])
        assert q._resubmit == [5, 3] and q.last_avail_idx == 4
        state = wire(q.export_state())
        assert state["_resubmit"] == [5, 3]
        counter = state["inflight_counter"]
        assert counter == region.queues[0].counter > 0

        other = InflightRegion(fd, size, 0, 1, QS)  # the worker maps the region too
        rec = Recorder(result=2)
        q2 = SplitVirtqueue(0, rec)
        q2.inflight = other.queues[0]
        q2.import_state(state, ram.memory)
        assert other.queues[0].counter == counter
        q2.process()
        assert rec.heads == [5, 3]  # oldest first, once
        assert ring.used_elems(2) == [(5, 2), (3, 2)]
        ring.publish(0)
        q2.process()
        assert rec.heads == [5, 3, 0]
        assert other.queues[0].counter == counter + 1  # continues past the imported one
        other.close()
    finally:
        region.close()
        os.close(fd)


# ---- packed rings -----------------------------------------------------------------------


def test_packed_state_round_trip_keeps_wrap_counters(ram: GuestRam,
                                                     eventfd: Callable[[], int]) -> None:
    call = eventfd()
    ring = PackedRing(ram, QS, 0x0000, 0x0200, 0x0400)
    q = ring.queue(Recorder(result=1), event_idx=True, call_fd=call)
    for buf_id in range(3):  # 3 chains of 3 slots: the third wraps past the ring's end
        ring.add(buf_id, [(BUF + 0x40 * buf_id + k, 1, F_WRITE) for k in range(3)])
        q.process()
        assert len(ring.take_used()) == 1
    assert (q.last_avail_idx, q.avail_wrap, q.used_idx, q.used_wrap) == (1, 0, 1, 0)
    state = wire(q.export_state())
    assert state["packed"] is True
    assert (state["avail_wrap"], state["used_wrap"]) == (0, 0)

    rec = Recorder(result=7)
    q2 = SplitVirtqueue(0, rec)
    set_layout(q2, packed=True)
    assert isinstance(q2, PackedVirtqueue)
    q2.import_state(state, ram.memory)
    q2.call_fd = call
    assert (q2.last_avail_idx, q2.avail_wrap, q2.used_idx, q2.used_wrap) == (1, 0, 1, 0)
    eventfd_count(call)
    ring.add(9, [(BUF + 0x200, 1, F_WRITE)])
    ring.add(4, [(BUF + 0x300, 1, F_WRITE), (BUF + 0x301, 1, F_WRITE)])
    q2.process()
    # Used descriptors at slots 1 and 2, written with the second lap's flags.
    assert ring.take_used() == [UsedDesc(1, 9, 7, packed_used_flags(0)),
                                UsedDesc(2, 4, 7, packed_used_flags(0))]
    assert rec.heads == [9, 4] and eventfd_count(call) == 1
    assert (q2.last_avail_idx, q2.avail_wrap, q2.used_idx, q2.used_wrap) == (4, 0, 4, 0)


# ---- write tracker ----------------------------------------------------------------------


def test_write_tracker_merge_ors_bitmaps_and_adds_marks() -> None:
    main = WriteTracker(PAGE, [(0, 16 * PAGE), (1 << 20, 16 * PAGE)])
    worker = WriteTracker(*main.params())
    assert worker.params() == (PAGE, [(0, 16 * PAGE), (1 << 20, 16 * PAGE)])
    main.mark(PAGE, 1)  # page 1
    main.mark(3 * PAGE, 1)  # page 3, marked on both sides
    worker.mark(3 * PAGE + 5, PAGE)  # pages 3 and 4
    worker.mark((1 << 20) + 15 * PAGE, 1)  # range 2, page 15
    main.merge(worker.bitmaps(), worker.marked)
    assert main.marked == 2 + 3
    # Report: le32 page size, le32 ranges, then one 64-bit-word bitmap per range.
    report = main.report(clear=False)
    assert report[:8] == struct.pack("<II", PAGE, 2)
    first, second = (int.from_bytes(report[8 + 8 * i:16 + 8 * i], "little") for i in (0, 1))
    assert first == 1 << 1 | 1 << 3 | 1 << 4
    assert second == 1 << 15
    assert worker.bitmaps() == [(1 << 3 | 1 << 4).to_bytes(8, "little"),
                                (1 << 15).to_bytes(8, "little")]  # unchanged
    with pytest.raises(ValueError):
        main.merge(worker.bitmaps()[:1], 0)  # not made from params(): refused


# ---- WorkerRing: a ring served "in a worker" --------------------------------------------


def recalled(work: WorkerRing) -> Any:
    """The state a recall hands back (the ring must have nothing outstanding)."""
    got: list[Any] = []
    work.recall(got.append)
    assert len(got) == 1, "the recall waits for requests still at the device"
    return got[0]


def _blk_ring(ring: Ring, make_blk: Callable[..., BlkDevice], eventfd: Callable[[], int]
              ) -> tuple[SplitVirtqueue, BlkDevice]:
    dev = make_blk()
    q = ring.queue(dev.make_handler(SplitVirtqueue(0, Recorder())))
    q.kick_fd, q.call_fd, q.err_fd = eventfd(), eventfd(), eventfd()
    return q, dev


def test_ring_work_serves_and_hands_back(ring: Ring, ram: GuestRam, image: Path,
                                         make_blk: Callable[..., BlkDevice],
                                         eventfd: Callable[[], int],
                                         loop: asyncio.AbstractEventLoop) -> None:
    q, dev = _blk_ring(ring, make_blk, eventfd)
    q.tracker = tracker = WriteTracker(PAGE, [(0, 0x20000)])
    baseline = open_fds()
    spec, fds = ring_spec(q, ram.memory, dev, None, tracker)
    spec = wire(spec)
    work = WorkerRing(spec, [os.dup(fd) for fd in fds], loop, device_from_spec)
    # One blk write of 512 bytes to sector 2: header, data, status.
    ram.write(BUF, struct.pack("<IIQ", T_OUT, 0, 2))
    ram.write(BUF + 0x100, b"\xab" * 512)
    ram.write(BUF + 0x400, b"\xff")
    ring.chain(0, [(BUF, 16, 0), (BUF + 0x100, 512, 0), (BUF + 0x400, 1, F_WRITE)])
    ring.publish(0)
    work.q.process()
    assert ring.used_elems() == [(0, 1)] and ram.read(BUF + 0x400, 1) == b"\0"
    assert eventfd_count(q.call_fd) == 1  # the worker signals the very same eventfd
    back = wire(recalled(work))
    assert open_fds() == baseline, "the worker's copy leaked fds"
    with open(image, "rb") as f:
        f.seek(2 * 512)
        assert f.read(512) == b"\xab" * 512
    q.import_position(back["ring"])
    assert (q.last_avail_idx, q.used_idx, q.requests) == (1, 1, 1)
    # The worker's marks come home: status byte page and used ring page.
    assert back["tracker"]["marked"] > 0
    tracker.merge([bytes.fromhex(b) for b in back["tracker"]["bitmaps"]],
                  back["tracker"]["marked"])
    bitmap = int.from_bytes(tracker.report(clear=False)[8:], "little")
    assert bitmap >> (BUF // PAGE) & 1 and bitmap >> (RING0[2] // PAGE) & 1
    # The main process continues the ring exactly there.
    ram.write(BUF + 0x600, struct.pack("<IIQ", T_OUT, 0, 3))
    ram.write(BUF + 0x700, b"\xcd" * 512)
    ring.chain(4, [(BUF + 0x600, 16, 0), (BUF + 0x700, 512, 0), (BUF + 0x400, 1, F_WRITE)])
    ring.publish(4)
    q.process()
    assert ring.used_elems() == [(0, 1), (4, 1)] and ram.read(BUF + 0x400, 1) == b"\0"
    with open(image, "rb") as f:
        f.seek(3 * 512)
        assert f.read(512) == b"\xcd" * 512


def test_ring_work_with_the_ring_outside_its_memory_fails_cleanly(
        ring: Ring, ram: GuestRam, make_blk: Callable[..., BlkDevice],
        eventfd: Callable[[], int], loop: asyncio.AbstractEventLoop) -> None:
    q, dev = _blk_ring(ring, make_blk, eventfd)
    baseline = open_fds()
    spec, fds = ring_spec(q, ram.memory, dev, None, None)
    spec = wire(spec)
    # The worker gets a memory table without the region that holds the rings (GPA 0).
    assert [m[0] for m in spec["memory"]] == [0x0, 0x10000]
    spec["memory"] = [m for m in spec["memory"] if m[0] != 0]
    sent = [os.dup(fd) for fd in fds]
    with pytest.raises(RingError, match="not in guest memory"):
        WorkerRing(spec, sent, loop, device_from_spec)
    assert open_fds() == baseline, "fds leaked by the refused ring"
    # The caller's queue and fds are untouched: it still serves.
    writes(ring, [0])
    ring.publish(0)
    q.process()
    assert ring.used_idx == 1


def test_ring_work_with_an_unknown_device_fails_cleanly(
        ring: Ring, ram: GuestRam, make_blk: Callable[..., BlkDevice],
        eventfd: Callable[[], int], loop: asyncio.AbstractEventLoop) -> None:
    q, dev = _blk_ring(ring, make_blk, eventfd)
    baseline = open_fds()
    spec, fds = ring_spec(q, ram.memory, dev, None, None)
    spec = wire(spec)
    spec["device"]["kind"] = "net"
    with pytest.raises(ValueError, match="net"):
        WorkerRing(spec, [os.dup(fd) for fd in fds], loop, device_from_spec)
    assert open_fds() == baseline, "fds leaked by the refused device"


class _SlowDevice:
    """A device whose requests complete when the test says so."""

    def __init__(self) -> None:
        self.q: SplitVirtqueue | None = None
        self.taken: list[int] = []

    def make_handler(self, q: SplitVirtqueue) -> Callable[..., int]:
        self.q = q

        def handle(head: int, readable: list[memoryview], writable: list[memoryview]) -> int:
            self.taken.append(head)
            return PENDING

        return handle

    def close(self) -> None:
        pass


def test_recall_waits_for_requests_still_at_the_device(
        ring: Ring, ram: GuestRam, make_blk: Callable[..., BlkDevice],
        eventfd: Callable[[], int], loop: asyncio.AbstractEventLoop) -> None:
    q, dev = _blk_ring(ring, make_blk, eventfd)
    spec, fds = ring_spec(q, ram.memory, dev, None, None)
    slow = _SlowDevice()
    work = WorkerRing(wire(spec), [os.dup(fd) for fd in fds], loop, lambda s, f: slow)
    writes(ring, [0, 1])
    ring.publish(0, 1)
    work.q.process()
    assert slow.taken == [0, 1] and work.q.outstanding == 2
    got: list[Any] = []
    work.recall(got.append)
    assert got == []  # two requests are still at the device
    ring.publish(2)
    assert slow.taken == [0, 1]  # a recalled ring takes nothing new
    work.q.complete(1, 1)
    assert got == [] and ring.used_elems() == [(1, 1)]  # out of order, published
    work.q.complete(0, 1)
    assert len(got) == 1
    q.import_position(wire(got[0])["ring"])
    assert (q.last_avail_idx, q.used_idx) == (2, 2)
    assert ring.used_elems() == [(1, 1), (0, 1)]
