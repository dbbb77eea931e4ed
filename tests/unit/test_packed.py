"""PackedVirtqueue driven directly over memfd-backed GuestMemory, the test acting as a
packed-ring driver (unit_support.PackedRing, plain struct)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from unit_support import (
    EVENT_DESC,
    EVENT_DISABLE,
    EVENT_ENABLE,
    F_INDIRECT,
    F_NEXT,
    F_WRITE,
    NOT_THE_ID,
    PF_AVAIL,
    PF_USED,
    Call,
    GuestRam,
    PackedRing,
    Recorder,
    Ring,
    UsedDesc,
    eventfd_count,
    packed_avail_flags,
    packed_used_flags,
)

from vhostd.engine.dirtylog import DirtyLog
from vhostd.engine.dirtytrack import WriteTracker
from vhostd.engine.packed import PackedVirtqueue, set_layout
from vhostd.engine.seals import sealed_memfd
from vhostd.engine.virtqueue import PENDING, SplitVirtqueue
from vhostd_proto.vhost_user import VHOST_VRING_F_LOG

QS = 8
RING0 = (0x0000, 0x0200, 0x0400)  # descriptor ring, driver area, device area
TABLE = 0x2000
TABLE2 = 0x2100
BUF = 0x4000
END_OF_RAM = 0x20000
PAGE = 4096
LOG = 1 << VHOST_VRING_F_LOG
USED_BOTH = PF_AVAIL | PF_USED


@pytest.fixture
def ring(ram: GuestRam) -> PackedRing:
    return PackedRing(ram, QS, *RING0)


@pytest.fixture
def fds(eventfd: Callable[[], int]) -> tuple[int, int]:
    """(call fd, err fd)"""
    return eventfd(), eventfd()


def one(ring: PackedRing, buf_id: int, n: int = 1) -> None:
    """A chain of ``n`` one-byte writable descriptors (slot-count tests)."""
    ring.add(buf_id, [(BUF + 0x10 * k, 1, F_WRITE) for k in range(n)])


# ---- completing chains ----------------------------------------------------------------


def test_single_descriptor_chain(ring: PackedRing, fds: tuple[int, int]) -> None:
    call, err = fds
    rec = Recorder(result=7, fill=b"ok")
    q = ring.queue(rec, call_fd=call, err_fd=err)
    ring.add(3, [(BUF, 16, F_WRITE)])
    q.process()
    assert rec.calls == [Call(3, [], [16])]
    assert ring.take_used() == [UsedDesc(0, 3, 7, USED_BOTH)]  # AVAIL=USED=wrap 1
    assert ring.ram.read(BUF, 2) == b"ok"
    assert (q.last_avail_idx, q.used_idx, q.avail_wrap, q.used_wrap) == (1, 1, 1, 1)
    assert eventfd_count(call) == 1 and eventfd_count(err) == 0
    # A kick with nothing new: no handler call, nothing written, no signal.
    q.process()
    assert len(rec.calls) == 1 and eventfd_count(call) == 0
    assert ring.read_desc(1) == (0, 0, 0, 0)


def test_multi_descriptor_chains_use_the_last_id_and_advance_by_their_length(
        ring: PackedRing, fds: tuple[int, int]) -> None:
    call, _ = fds
    ram = ring.ram
    ram.write(BUF, b"H" * 16)
    ram.write(BUF + 0x200, b"abcd")
    rec = Recorder(result=lambda buf_id: buf_id + 100)
    q = ring.queue(rec, call_fd=call)
    ring.add(5, [(BUF, 16, 0), (BUF + 0x200, 4, 0), (BUF + 0x300, 1, F_WRITE)])
    ring.add(2, [(BUF + 0x400, 2, F_WRITE), (BUF + 0x500, 3, F_WRITE)])
    q.process()
    assert rec.calls == [Call(5, [b"H" * 16, b"abcd"], [1]), Call(2, [], [2, 3])]
    # One used descriptor per chain, at the slot after the previous chain's slots.
    assert ring.take_used() == [UsedDesc(0, 5, 105, USED_BOTH), UsedDesc(3, 2, 102, USED_BOTH)]
    # The chains' other slots are left as the driver wrote them.
    assert ring.read_desc(1) == (BUF + 0x200, 4, NOT_THE_ID, F_NEXT | packed_avail_flags(1))
    assert ring.read_desc(4)[2:] == (2, F_WRITE | packed_avail_flags(1))
    assert (q.last_avail_idx, q.used_idx) == (5, 5)
    assert eventfd_count(call) == 1  # one signal per batch


def test_chain_using_every_slot_is_valid(ring: PackedRing) -> None:
    rec = Recorder(result=1)
    q = ring.queue(rec)
    one(ring, 9, QS)
    q.process()
    assert not q.broken and rec.heads == [9]
    assert ring.take_used() == [UsedDesc(0, 9, 1, USED_BOTH)]
    assert (q.last_avail_idx, q.avail_wrap, q.used_idx, q.used_wrap) == (0, 0, 0, 0)


def test_chain_wrapping_around_the_ring_end(ring: PackedRing) -> None:
    ram = ring.ram
    for k, text in enumerate((b"one", b"two", b"six")):
        ram.write(BUF + 0x100 * k, text)
    rec = Recorder(result=4)
    q = ring.queue(rec)
    one(ring, 0, 3)
    one(ring, 1, 3)
    q.process()
    assert ring.take_used() == [UsedDesc(0, 0, 4, USED_BOTH), UsedDesc(3, 1, 4, USED_BOTH)]
    # Slots 6, 7 (lap 1) and 0 (lap 0): the driver's flags differ within the chain.
    ring.add(4, [(BUF, 3, 0), (BUF + 0x100, 3, 0), (BUF + 0x200, 3, F_WRITE)])
    assert ring.read_desc(0)[3] == F_WRITE | packed_avail_flags(0)
    q.process()
    assert rec.calls[-1] == Call(4, [b"one", b"two"], [3])
    assert ring.take_used() == [UsedDesc(6, 4, 4, USED_BOTH)]  # written in lap 1
    assert (q.last_avail_idx, q.avail_wrap, q.used_idx, q.used_wrap) == (1, 0, 1, 0)
    # The next chain starts at slot 1 of lap 0; its used descriptor has both flags 0.
    one(ring, 6, 2)
    q.process()
    assert rec.heads[-1] == 6
    assert ring.take_used() == [UsedDesc(1, 6, 4, 0)]
    assert (q.last_avail_idx, q.used_idx, q.used_wrap) == (3, 3, 0)


@pytest.mark.parametrize("batch", [1, 2, 3], ids=lambda b: f"batch{b}")
def test_wrap_counters_over_many_laps(ring: PackedRing, batch: int) -> None:
    """50 requests of 1-3 slots on a queue of 8: both wrap counters flip every lap."""
    rec = Recorder(result=lambda buf_id: buf_id)
    q = ring.queue(rec)
    done: list[UsedDesc] = []
    laps = 0
    for req in range(0, 50, batch):
        ids = range(req, min(req + batch, 50))
        for i in ids:
            wrap_before = ring.avail_wrap
            one(ring, i, 1 + i % 3)
            laps += ring.avail_wrap != wrap_before
        q.process()
        got = ring.take_used()
        assert [u.id for u in got] == list(ids)
        done += got
        assert (q.last_avail_idx, q.avail_wrap) == (ring.next_avail, ring.avail_wrap)
        assert (q.used_idx, q.used_wrap) == (ring.next_used, ring.used_wrap)
    assert not q.broken and rec.heads == list(range(50))
    assert laps == sum(1 + i % 3 for i in range(50)) // QS >= 12
    assert all(u.len == u.id for u in done)
    # A used descriptor carries the wrap counter of the lap it was written in.
    slot, wrap = 0, 1
    for u in done:
        assert (u.slot, u.flags) == (slot, packed_used_flags(wrap))
        slot += 1 + u.id % 3
        if slot >= QS:
            slot -= QS
            wrap ^= 1


def test_descriptor_from_the_previous_lap_is_not_available(ring: PackedRing) -> None:
    rec = Recorder(result=1)
    q = ring.queue(rec)
    one(ring, 0, QS)
    q.process()  # now at slot 0, lap 0; slot 0 holds a used descriptor of lap 1
    assert (q.last_avail_idx, q.avail_wrap) == (0, 0)
    q.process()
    # A descriptor marked available for lap 1 is stale in lap 0.
    ring.write_desc(0, BUF, 1, 4, F_WRITE | packed_avail_flags(1))
    q.process()
    assert rec.heads == [0] and not q.broken
    ring.write_desc(0, BUF, 1, 4, F_WRITE | packed_avail_flags(0))
    q.process()
    assert rec.heads == [0, 4]


def test_indirect_descriptor_counts_as_one_slot(ring: PackedRing) -> None:
    ram = ring.ram
    ram.write(BUF, b"header")
    ram.write(BUF + 0x100, b"data")
    rec = Recorder(result=lambda buf_id: 10 * buf_id)
    q = ring.queue(rec)
    ring.add_indirect(4, TABLE, [(BUF, 6, 0), (BUF + 0x100, 4, 0), (BUF + 0x200, 1, F_WRITE)])
    one(ring, 5)
    q.process()
    assert rec.calls == [Call(4, [b"header", b"data"], [1]), Call(5, [], [1])]
    assert ring.take_used() == [UsedDesc(0, 4, 40, USED_BOTH), UsedDesc(1, 5, 50, USED_BOTH)]
    assert (q.last_avail_idx, q.used_idx) == (2, 2)


def test_indirect_descriptors_over_several_laps(ring: PackedRing) -> None:
    rec = Recorder(result=2)
    q = ring.queue(rec)
    for i in range(3 * QS + 3):
        ring.add_indirect(i, TABLE + 0x40 * (i % 4), [(BUF, 2, 0), (BUF + 0x10, 2, F_WRITE)])
        q.process()
        assert ring.take_used() == [UsedDesc(i % QS, i, 2, packed_used_flags(1 - i // QS % 2))]
    assert (q.last_avail_idx, q.avail_wrap, q.used_wrap) == (3, 0, 0)


def test_indirect_table_ignores_next_flags(ring: PackedRing) -> None:
    # Packed indirect tables are sequential; NEXT inside them means nothing.
    rec = Recorder(result=0)
    q = ring.queue(rec)
    ring.add_indirect(1, TABLE, [(BUF, 1, F_NEXT), (BUF + 0x10, 1, F_WRITE)])
    q.process()
    assert not q.broken and rec.calls == [Call(1, [bytes(1)], [1])]


def test_completions_publish_in_take_order_by_their_own_chain_length(
        ring: PackedRing, fds: tuple[int, int]) -> None:
    call, _ = fds
    rec = Recorder(result=lambda buf_id: PENDING if buf_id == 1 else 9)
    q = ring.queue(rec, call_fd=call)
    one(ring, 1, 3)  # slots 0-2, completes later
    one(ring, 2, 1)  # slot 3, completes inline
    q.process()
    # Chain 2 is done but waits for the older chain 1: nothing is published yet.
    assert ring.take_used() == [] and q.used_idx == 0 and eventfd_count(call) == 0
    assert q.outstanding == 1
    q.complete(1, 33)
    # Both, in take order, each advancing by its own chain's slots.
    assert ring.take_used() == [UsedDesc(0, 1, 33, USED_BOTH), UsedDesc(3, 2, 9, USED_BOTH)]
    assert q.used_idx == 4 == q.last_avail_idx and q.outstanding == 0
    assert eventfd_count(call) == 1


def test_out_of_order_completions_wait_for_the_oldest(ring: PackedRing,
                                                      fds: tuple[int, int]) -> None:
    call, _ = fds
    q = ring.queue(Recorder(result=PENDING), call_fd=call)
    for buf_id in (1, 2, 3):
        one(ring, buf_id)
    q.process()
    q.complete(3, 30)
    q.complete(2, 20)
    assert ring.take_used() == [] and eventfd_count(call) == 0
    q.complete(1, 10)
    assert [(u.id, u.len) for u in ring.take_used()] == [(1, 10), (2, 20), (3, 30)]
    assert eventfd_count(call) == 1


def test_a_buffer_id_made_available_twice_while_in_flight_stops_the_ring(
        ring: PackedRing, fds: tuple[int, int]) -> None:
    _, err = fds
    rec = Recorder(result=PENDING)
    q = ring.queue(rec, err_fd=err)
    one(ring, 7)
    one(ring, 7)
    q.process()
    assert q.broken and eventfd_count(err) == 1
    # The device never saw the second one, so the count of outstanding requests is
    # right and a stop finishes once the first completes.
    assert rec.heads == [7] and q.outstanding == 1
    idle: list[bool] = []
    q.quiesce(lambda: idle.append(True))
    assert not idle
    q.complete(7, 1)
    assert idle and q.outstanding == 0


# ---- event suppression ----------------------------------------------------------------


@pytest.mark.parametrize("event_idx", [False, True], ids=["no-event-idx", "event-idx"])
def test_driver_event_enable_signals_every_batch(ring: PackedRing, fds: tuple[int, int],
                                                 event_idx: bool) -> None:
    call, _ = fds
    q = ring.queue(Recorder(result=1), call_fd=call, event_idx=event_idx)
    ring.set_driver_event(EVENT_ENABLE, off=QS - 1, wrap=0)  # the offset means nothing here
    for i in range(2 * QS + 1):
        one(ring, i)
        q.process()
        assert eventfd_count(call) == 1


@pytest.mark.parametrize("event_idx", [False, True], ids=["no-event-idx", "event-idx"])
def test_driver_event_disable_never_signals(ring: PackedRing, fds: tuple[int, int],
                                            event_idx: bool) -> None:
    call, _ = fds
    q = ring.queue(Recorder(result=1), call_fd=call, event_idx=event_idx)
    ring.set_driver_event(EVENT_DISABLE, off=1, wrap=1)
    for i in range(2 * QS + 1):  # first batch after start and wrapping batches included
        one(ring, i, 1 + i % 2)
        q.process()
        assert [u.id for u in ring.take_used()] == [i]
        assert eventfd_count(call) == 0
    ring.set_driver_event(EVENT_ENABLE)
    one(ring, 99)
    q.process()
    assert eventfd_count(call) == 1


def test_driver_event_desc_without_event_idx_signals(ring: PackedRing,
                                                     fds: tuple[int, int]) -> None:
    call, _ = fds
    q = ring.queue(Recorder(result=1), call_fd=call, event_idx=False)
    ring.set_driver_event(EVENT_DESC, off=6, wrap=1)
    for i in range(3):
        one(ring, i)
        q.process()
        assert eventfd_count(call) == 1


def test_driver_event_desc_signals_when_its_offset_is_passed(ring: PackedRing,
                                                             fds: tuple[int, int]) -> None:
    call, _ = fds
    q = ring.queue(Recorder(result=1), call_fd=call, event_idx=True)
    ring.set_driver_event(EVENT_DESC, off=5, wrap=1)
    one(ring, 0)
    q.process()  # the first batch after start is always signalled (no last signal known)
    assert eventfd_count(call) == 1

    def serve(*chains: int) -> int:
        for n in chains:
            one(ring, 50 + ring.next_avail, n)
        q.process()
        ring.take_used()
        return eventfd_count(call)

    ring.set_driver_event(EVENT_DESC, off=4, wrap=1)  # "when the descriptor at 4 is used"
    assert serve(1) == 0  # used position 1 -> 2
    assert serve(2) == 0  # 2 -> 4: slot 4 not used yet
    assert serve(1) == 1  # 4 -> 5: passed
    assert serve(1) == 0  # 5 -> 6: already signalled
    # An event at the same offset of the next lap is not reached in this one.
    ring.set_driver_event(EVENT_DESC, off=6, wrap=0)
    assert serve(1) == 0  # 6 -> 7 in lap 1
    assert (q.used_idx, q.used_wrap) == (7, 1)
    # A chain of 3 slots passes the end of the ring and the event: 7 -> 2 (lap 0).
    ring.set_driver_event(EVENT_DESC, off=0, wrap=0)
    assert serve(3) == 1
    assert (q.used_idx, q.used_wrap) == (2, 0)
    # In lap 0 the same rules hold.
    ring.set_driver_event(EVENT_DESC, off=3, wrap=0)
    assert serve(1) == 0  # 2 -> 3
    assert serve(1) == 1  # 3 -> 4
    ring.set_driver_event(EVENT_DESC, off=3, wrap=1)  # the next lap's slot 3
    assert serve(1, 1) == 0  # 4 -> 6
    ring.set_driver_event(EVENT_DESC, off=7, wrap=0)
    # A batch of several chains that wraps past the event: 6 -> 7 -> 1 (lap 1).
    assert serve(1, 2) == 1
    assert (q.used_idx, q.used_wrap) == (1, 1)


@pytest.mark.parametrize(("off", "wrap"), [(7, 1), (0, 0), (1, 0), (4, 0)],
                         ids=["old-lap", "new-lap-0", "new-lap-1", "not-reached"])
def test_driver_event_desc_signals_after_a_wrapping_batch(
        ring: PackedRing, fds: tuple[int, int], off: int, wrap: int) -> None:
    call, _ = fds
    q = ring.queue(Recorder(result=1), call_fd=call, event_idx=True, base=6 | 1 << 15)
    ring.set_position(6, 1)
    ring.set_driver_event(EVENT_DESC, off=0, wrap=0)
    one(ring, 0)
    q.process()  # the first batch after start: signalled
    ring.take_used()
    assert eventfd_count(call) == 1
    ring.set_driver_event(EVENT_DESC, off=off, wrap=wrap)
    # One batch at slots 7 (lap 1), 0 and 1 (lap 0). The first three events lie in it;
    # (4, 0) does not, but the engine signals every batch that wrapped (over-signalling
    # is safe), which this test pins as designed.
    for buf_id in (1, 2, 3):
        one(ring, buf_id)
    q.process()
    assert ring.take_used() == [UsedDesc(7, 1, 1, USED_BOTH), UsedDesc(0, 2, 1, 0),
                                UsedDesc(1, 3, 1, 0)]
    assert (q.used_idx, q.used_wrap) == (2, 0)
    assert eventfd_count(call) == 1


def test_device_event_flags_are_enable_after_start(ring: PackedRing) -> None:
    ring.ram.write(ring.device_gpa, bytes.fromhex("0500") + bytes.fromhex("0100"))  # DISABLE
    q = ring.queue(Recorder())
    assert ring.device_event[1] == EVENT_ENABLE
    q.stop()
    ring.ram.write(ring.device_gpa + 2, bytes.fromhex("0200"))  # DESC
    q.start(ring.ram.memory)
    assert ring.device_event[1] == EVENT_ENABLE


# ---- SET/GET_VRING_BASE -----------------------------------------------------------------


@pytest.mark.parametrize(("num", "idx", "wrap"), [
    (0, 0, 0),
    (3 | 1 << 15, 3, 1),
    (7, 7, 0),
    (5 | 1 << 15 | 0xABCD << 16, 5, 1),  # the high half (a used position) is ignored
    (2 | 0x0000 << 16, 2, 0),  # QEMU 7.2's meaningless 0 after a stop
])
def test_set_base_and_base_encoding(ring: PackedRing, num: int, idx: int, wrap: int) -> None:
    q = ring.queue(Recorder(), start=False)
    q.set_base(num)
    assert (q.last_avail_idx, q.avail_wrap, q.used_idx, q.used_wrap) == (idx, wrap, idx, wrap)
    half = idx | wrap << 15
    assert q.base() == half | half << 16


def test_processing_resumes_at_the_base_position(ring: PackedRing) -> None:
    rec = Recorder(result=1)
    q = ring.queue(rec, base=5)  # slot 5, wrap counter 0
    ring.set_position(5, 0)
    one(ring, 1, 2)
    one(ring, 2, 2)
    q.process()
    assert rec.heads == [1, 2]
    assert ring.take_used() == [UsedDesc(5, 1, 1, 0), UsedDesc(7, 2, 1, 0)]
    assert q.base() == (1 | 1 << 15) * 0x10001


def test_stop_returns_base_and_publishes(ring: PackedRing, fds: tuple[int, int]) -> None:
    call, _ = fds
    rec = Recorder(result=PENDING)
    q = ring.queue(rec, call_fd=call, base=3 | 1 << 15)
    ring.set_position(3, 1)
    one(ring, 1, 3)  # slots 3-5
    one(ring, 2, 4)  # slots 6, 7, 0, 1: the next position is slot 2 of lap 0
    q.process()
    assert eventfd_count(call) == 0
    q.complete(1, 5, publish=False)  # completed, not published yet
    q.complete(2, 6, publish=False)
    assert eventfd_count(call) == 0
    assert q.stop() == q.base() == 0x0002_0002
    assert eventfd_count(call) == 1
    assert ring.take_used() == [UsedDesc(3, 1, 5, USED_BOTH), UsedDesc(6, 2, 6, USED_BOTH)]
    assert not q.ready
    one(ring, 3)
    q.process()
    assert rec.heads == [1, 2]


def test_suspend_stops_processing_until_resumed(ring: PackedRing,
                                                fds: tuple[int, int]) -> None:
    call, _ = fds
    rec = Recorder(result=1)
    q = ring.queue(rec, call_fd=call)
    one(ring, 1)
    q.process()
    assert eventfd_count(call) == 1
    q.suspend()
    one(ring, 2)
    q.process()
    assert rec.heads == [1] and ring.take_used() == [UsedDesc(0, 1, 1, USED_BOTH)]
    assert eventfd_count(call) == 0
    q.suspended = False  # the owner resumes the member
    q.process()
    assert rec.heads == [1, 2] and ring.take_used() == [UsedDesc(1, 2, 1, USED_BOTH)]
    assert eventfd_count(call) == 1


def test_suspend_publishes_completed_work(ring: PackedRing, fds: tuple[int, int]) -> None:
    call, _ = fds
    q = ring.queue(Recorder(result=PENDING), call_fd=call)
    one(ring, 1)
    q.process()
    q.complete(1, 1, publish=False)
    q.suspend()
    assert eventfd_count(call) == 1


def test_set_layout_back_and_forth_keeps_fds_and_config(ram: GuestRam,
                                                        eventfd: Callable[[], int]) -> None:
    split = Ring(ram, QS, 0x1000, 0x1200, 0x1400)
    kick, call, err = eventfd(), eventfd(), eventfd()
    rec = Recorder(result=1)
    q = split.queue(rec, event_idx=True, indirect=True, start=False)
    q.kick_fd, q.call_fd, q.err_fd = kick, call, err

    def config(q: SplitVirtqueue) -> tuple[object, ...]:
        return (q.size, q.desc_addr, q.avail_addr, q.used_addr, q._qva, q.addr_flags,
                q.kick_fd, q.call_fd, q.err_fd, q.event_idx, q.indirect, q.enabled, q.index)

    before = config(q)
    set_layout(q, packed=True)
    assert type(q) is PackedVirtqueue and config(q) == before
    assert (q.avail_wrap, q.used_wrap) == (1, 1)
    q.set_base(3)
    set_layout(q, packed=True)  # already packed: nothing changes
    assert (q.last_avail_idx, q.avail_wrap) == (3, 0)
    set_layout(q, packed=False)
    assert type(q) is SplitVirtqueue and config(q) == before
    q.last_avail_idx = q.used_idx = 0
    # Back to split, it serves a split ring.
    q.start(ram.memory)
    split.desc(0, BUF, 1, F_WRITE)
    split.publish(0)
    q.process()
    assert rec.heads == [0] and split.used_elems() == [(0, 1)]
    assert eventfd_count(call) == 1 and eventfd_count(err) == 0


def test_unconfigure_resets_the_wrap_counters(ring: PackedRing) -> None:
    q = ring.queue(Recorder(), base=3, start=False)
    q.unconfigure()
    assert (q.last_avail_idx, q.avail_wrap, q.used_idx, q.used_wrap) == (0, 1, 0, 1)
    assert q.base() == 0x80008000


# ---- hostile rings ----------------------------------------------------------------------


def indirect_with_next(ring: PackedRing) -> None:
    ring.ram.write(TABLE, bytes(16))
    ring.add(1, [(TABLE, 16, F_INDIRECT), (BUF, 1, F_WRITE)])


def indirect_after_direct(ring: PackedRing) -> None:
    ring.add(1, [(BUF, 1, 0), (TABLE, 16, F_INDIRECT)])


def indirect_in_indirect(ring: PackedRing) -> None:
    ring.add_indirect(1, TABLE, [(BUF, 1, 0), (TABLE2, 16, F_INDIRECT)])


def indirect_table_outside_memory(ring: PackedRing) -> None:
    ring.write_desc(1, END_OF_RAM - 16, 32, 1, F_INDIRECT | packed_avail_flags(1))


def indirect_table_bad_length(ring: PackedRing) -> None:
    ring.write_desc(1, TABLE, 20, 1, F_INDIRECT | packed_avail_flags(1))


def indirect_table_empty(ring: PackedRing) -> None:
    ring.write_desc(1, TABLE, 0, 1, F_INDIRECT | packed_avail_flags(1))


def indirect_buffer_outside_memory(ring: PackedRing) -> None:
    ring.add_indirect(1, TABLE, [(BUF, 1, 0), (END_OF_RAM, 1, F_WRITE)])


def address_outside_memory(ring: PackedRing) -> None:
    ring.add(1, [(BUF, 1, 0), (END_OF_RAM - 8, 16, F_WRITE)])


def readable_after_writable(ring: PackedRing) -> None:
    ring.add(1, [(BUF, 1, F_WRITE), (BUF + 0x10, 1, 0)])


def readable_after_writable_indirect(ring: PackedRing) -> None:
    ring.add_indirect(1, TABLE, [(BUF, 1, F_WRITE), (BUF + 0x10, 1, 0)])


HOSTILE = [indirect_with_next, indirect_after_direct, indirect_in_indirect,
           indirect_table_outside_memory, indirect_table_bad_length, indirect_table_empty,
           indirect_buffer_outside_memory, address_outside_memory, readable_after_writable,
           readable_after_writable_indirect]


@pytest.mark.parametrize("build", HOSTILE, ids=[f.__name__ for f in HOSTILE])
def test_hostile_chain_breaks_the_queue(ring: PackedRing, fds: tuple[int, int],
                                        build: Callable[[PackedRing], None]) -> None:
    call, err = fds
    rec = Recorder(result=1)
    q = ring.queue(rec, call_fd=call, err_fd=err)
    one(ring, 0)  # a good chain first, in the same kick
    build(ring)
    q.process()
    assert rec.heads == [0]  # never the bad chain
    assert q.broken and eventfd_count(err) == 1
    # What completed before it is published.
    assert ring.take_used() == [UsedDesc(0, 0, 1, USED_BOTH)]
    assert eventfd_count(call) == 1
    q.process()
    assert rec.heads == [0] and eventfd_count(err) == 0


class Hang(BaseException):
    """Raised by a timer; a BaseException, so the engine's error handling cannot eat it."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_chain_longer_than_the_ring_breaks_the_queue(ring: PackedRing,
                                                     fds: tuple[int, int]) -> None:
    call, err = fds
    rec = Recorder(result=1)
    q = ring.queue(rec, call_fd=call, err_fd=err)
    one(ring, 0)
    q.process()
    ring.take_used()
    eventfd_count(call)
    # Slots 1-7 (lap 1) and 0 (lap 0) all say NEXT: the chain would come back to slot 1.
    for slot in range(QS):
        ring.write_desc(slot, BUF, 1, 1, F_NEXT | packed_avail_flags(1 if slot else 0))
    with deadline(5):
        q.process()
    assert rec.heads == [0] and q.broken and eventfd_count(err) == 1
    assert eventfd_count(call) == 0 and ring.take_used() == []


def test_indirect_without_the_feature_breaks_the_queue(ring: PackedRing,
                                                       fds: tuple[int, int]) -> None:
    call, err = fds
    rec = Recorder(result=1)
    q = ring.queue(rec, call_fd=call, err_fd=err, indirect=False)
    one(ring, 0)
    ring.add_indirect(1, TABLE, [(BUF, 1, F_WRITE)])
    q.process()
    assert rec.heads == [0] and q.broken and eventfd_count(err) == 1


@pytest.mark.parametrize("num", [QS, QS | 1 << 15, 0x7FFF, QS + 3 | 1 << 15 | 1 << 16])
def test_position_past_the_ring_from_set_base_breaks_the_queue(
        ring: PackedRing, fds: tuple[int, int], num: int) -> None:
    call, err = fds
    rec = Recorder(result=1)
    for slot in range(QS):
        ring.write_desc(slot, BUF, 1, slot, F_WRITE | packed_avail_flags(1))
    q = ring.queue(rec, call_fd=call, err_fd=err, base=num)
    assert q.broken and eventfd_count(err) == 1
    q.process()
    assert rec.calls == [] and eventfd_count(call) == 0


# ---- dirty log and the owner's write tracker --------------------------------------------

# The descriptor ring straddles pages 1 and 2: slots 0-3 in page 1, 4-7 in page 2.
LOGGED_RING = (0x1FC0, 0x0200, 0x0400)
LOG_ADDR = 0x30000  # log_guest_addr (page 48): a split-ring notion, unused by packed rings
LOG_BYTES = 16  # 128 pages
LOG_TABLE = 0x9000  # indirect table, page 9: read only


class Log:
    """A memfd dirty log as QEMU creates it, read back with pread."""

    def __init__(self) -> None:
        self.fd = sealed_memfd("vhostd-test-log", LOG_BYTES)
        self.log = DirtyLog(self.fd, LOG_BYTES, 0)

    def harvest(self) -> set[int]:
        raw = os.pread(self.fd, LOG_BYTES, 0)
        os.pwrite(self.fd, bytes(LOG_BYTES), 0)
        return {8 * i + b for i, byte in enumerate(raw) for b in range(8) if byte >> b & 1}

    def close(self) -> None:
        self.log.close()
        os.close(self.fd)


@pytest.fixture
def dlog() -> Iterator[Log]:
    lg = Log()
    yield lg
    lg.close()


@pytest.fixture
def lring(ram: GuestRam) -> PackedRing:
    return PackedRing(ram, QS, *LOGGED_RING)


def tracked_pages(tracker: WriteTracker) -> set[int]:
    raw = tracker.report(clear=True)[8:]
    return {8 * i + b for i, byte in enumerate(raw) for b in range(8) if byte >> b & 1}


def serve_logged_requests(ring: PackedRing, q: PackedVirtqueue) -> Iterator[set[int]]:
    """Serve requests whose writes and used descriptors land on known pages; after
    each kick, yield the pages it should have marked."""
    ring.add(0, [(0x3000, 16, 0), (0x5000, 0x1001, F_WRITE), (0x7FFF, 2, F_WRITE)])
    ring.add_indirect(1, LOG_TABLE, [(0x3000, 16, 0), (0xFF80, 0x100, F_WRITE)])
    q.process()
    # Data in pages 5-8 and 15-16 (across the region boundary), used descriptors at
    # slots 0 and 3 (page 1); the indirect table and readable buffers are only read.
    yield {5, 6, 7, 8, 15, 16, 1}
    one(ring, 2, 4)  # slots 4-7, buffers in page 4
    q.process()
    yield {4, 2}  # the used descriptor at slot 4 is in page 2


@pytest.mark.parametrize("flags", [LOG, 0], ids=["log-flag", "no-log-flag"])
def test_dirty_log_marks_data_and_used_descriptors(lring: PackedRing, dlog: Log,
                                                   flags: int) -> None:
    # A used length past the writable bytes: the device wrote all of them.
    q = lring.queue(Recorder(result=1 << 20, fill=b"x"), addr_flags=flags, log_addr=LOG_ADDR)
    q.dirty_log = dlog.log
    for expect in serve_logged_requests(lring, q):
        got = dlog.harvest()
        # Used descriptors (pages 1, 2) only for rings whose addresses ask for it.
        assert got == (expect if flags else expect - {1, 2})
    assert [u.slot for u in lring.take_used()] == [0, 3, 4]


def test_no_dirty_log_attached_marks_nothing(lring: PackedRing, dlog: Log) -> None:
    q = lring.queue(Recorder(result=1), addr_flags=LOG, log_addr=LOG_ADDR)
    serve_logged_requests(lring, q)
    assert dlog.harvest() == set()


def test_tracker_marks_data_and_used_descriptors(lring: PackedRing) -> None:
    q = lring.queue(Recorder(result=1 << 20), addr_flags=0, log_addr=LOG_ADDR)
    tracker = WriteTracker(PAGE, [(0, END_OF_RAM)])
    q.tracker = tracker
    for expect in serve_logged_requests(lring, q):
        assert tracked_pages(tracker) == expect  # at the ring's own address, no flag needed


def test_pending_completion_is_logged_when_it_completes(lring: PackedRing, dlog: Log) -> None:
    q = lring.queue(Recorder(result=PENDING), addr_flags=LOG)
    q.dirty_log = dlog.log
    lring.add(0, [(0x3000, 16, 0), (0x5000, 1, F_WRITE)])
    q.process()
    assert dlog.harvest() == set()
    q.complete(0, 1)
    assert dlog.harvest() == {5, 1}


def test_pending_taken_before_logging_started_is_logged(lring: PackedRing, dlog: Log) -> None:
    q = lring.queue(Recorder(result=PENDING), addr_flags=LOG)
    lring.add(0, [(0x3000, 16, 0), (0x5000, 1, F_WRITE)])
    q.process()
    q.dirty_log = dlog.log  # SET_LOG_BASE + LOG_ALL while the request is in flight
    q.complete(0, 1)
    assert lring.take_used() == [UsedDesc(0, 0, 1, USED_BOTH)]
    assert dlog.harvest() == {5, 1}
