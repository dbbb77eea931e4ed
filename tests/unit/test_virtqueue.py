"""SplitVirtqueue driven directly over memfd-backed GuestMemory, the test acting as driver."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from unit_support import (
    F_INDIRECT,
    F_NEXT,
    F_WRITE,
    Call,
    FakeDevice,
    FakeLoop,
    GuestRam,
    Recorder,
    Ring,
    eventfd_count,
    frame,
    inflight_payload,
    mem_table,
    state,
    u64,
    vring_addr,
    vring_fd,
)

from vhostd.engine import virtqueue as virtqueue_mod
from vhostd.engine.inflight import (
    CHECK_ENV,
    CheckedInflightQueue,
    InflightQueue,
    InflightRegion,
)
from vhostd.engine.virtqueue import KICK_AHEAD_MAX, PENDING, SplitVirtqueue
from vhostd.vhost_user.handler import VhostUserHandler
from vhostd_proto.inflight import InflightSplitRegion, inflight_queue_stride
from vhostd_proto.vhost_user import Request as R

QS = 8
# Region A holds both rings and the indirect tables; data buffers are in A and B.
RING0 = (0x0000, 0x0200, 0x0400)  # desc, avail, used
RING1 = (0x1000, 0x1200, 0x1400)
TABLE = 0x2000
TABLE2 = 0x2100
BUF = 0x4000
END_OF_RAM = 0x20000


@pytest.fixture
def ring(ram: GuestRam) -> Ring:
    return Ring(ram, QS, *RING0)


@pytest.fixture
def ring1(ram: GuestRam) -> Ring:
    return Ring(ram, QS, *RING1)


@pytest.fixture
def fds(eventfd: Callable[[], int]) -> tuple[int, int]:
    """(call fd, err fd)"""
    return eventfd(), eventfd()


def test_chains_complete_in_order_and_signal_once(ring: Ring, ram: GuestRam,
                                                  fds: tuple[int, int]) -> None:
    call, err = fds
    ram.write(BUF, b"H" * 16)
    ram.write(BUF + 0x200, b"abcd")
    ram.write(BUF + 0x300, b"efghijkl")
    ring.chain(0, [(BUF, 16, 0), (BUF + 0x100, 100, F_WRITE)])
    ring.chain(2, [(BUF + 0x200, 4, 0), (BUF + 0x300, 8, 0), (BUF + 0x400, 1, F_WRITE)])
    rec = Recorder(result=lambda head: head + 10)
    q = ring.queue(rec, call_fd=call, err_fd=err)
    ring.publish(0, 2)
    q.process()
    assert rec.calls == [Call(0, [b"H" * 16], [100]), Call(2, [b"abcd", b"efghijkl"], [1])]
    assert ring.used_idx == 2
    assert ring.used_elems() == [(0, 10), (2, 12)]
    assert eventfd_count(call) == 1
    assert eventfd_count(err) == 0
    assert q.last_avail_idx == 2 and not q.broken
    # A kick with nothing new: no handler call, no used entry, no signal.
    q.process()
    assert len(rec.calls) == 2 and ring.used_idx == 2 and eventfd_count(call) == 0
    # The next batch is published and signalled again.
    ring.publish(0)
    q.process()
    assert rec.heads == [0, 2, 0]
    assert ring.used_elems(2) == [(0, 10)]
    assert eventfd_count(call) == 1


def test_handler_writes_reach_guest_memory(ring: Ring, ram: GuestRam) -> None:
    ring.chain(0, [(BUF, 16, 0), (BUF + 0x100, 4, F_WRITE), (BUF + 0x200, 4, F_WRITE)])
    q = ring.queue(Recorder(result=4, fill=b"DATA"))
    ring.publish(0)
    q.process()
    assert ram.read(BUF + 0x100, 4) == b"DATA"
    assert ring.used_elems() == [(0, 4)]


def test_used_ring_wraps(ring: Ring) -> None:
    ring.chain(0, [(BUF, 1, F_WRITE)])
    q = ring.queue(Recorder(result=1))
    for _ in range(3 * QS + 1):
        ring.publish(0)
        q.process()
    assert ring.used_idx == 3 * QS + 1 == q.last_avail_idx


def test_avail_index_wraps_at_16_bits(ring: Ring) -> None:
    ring.chain(0, [(BUF, 1, F_WRITE)])
    ring.avail_idx = 0xFFFE
    ring.set_used_idx(0xFFFE)
    rec = Recorder(result=1)
    q = ring.queue(rec, base=0xFFFE)
    ring.publish(0, 0, 0)
    q.process()
    assert rec.heads == [0, 0, 0]
    assert ring.used_idx == 1 and q.last_avail_idx == 1


def test_chain_using_every_descriptor_is_valid(ring: Ring) -> None:
    ring.chain(0, [(BUF + 0x10 * i, 0x10, 0) for i in range(QS - 1)] + [(BUF + 0x100, 1, F_WRITE)])
    rec = Recorder(result=1)
    q = ring.queue(rec)
    ring.publish(0)
    q.process()
    assert not q.broken
    assert len(rec.calls[0].readable) == QS - 1


# ---- notifications ------------------------------------------------------------------


def test_event_idx_writes_avail_event(ring: Ring, fds: tuple[int, int]) -> None:
    ring.chain(0, [(BUF, 1, F_WRITE)])
    q = ring.queue(Recorder(result=1), event_idx=True, call_fd=fds[0])
    ring.publish(0, 0, 0)
    q.process()
    assert ring.avail_event == 3
    ring.publish(0)
    q.process()
    assert ring.avail_event == 4


def test_kick_batching_sets_avail_event_ahead_and_arms_the_fallback(
        ring: Ring, fds: tuple[int, int]) -> None:
    ring.chain(0, [(BUF, 1, F_WRITE)])
    q = ring.queue(Recorder(result=1), event_idx=True, call_fd=fds[0])
    armed: list[int] = []
    q.defer = lambda: armed.append(q.last_avail_idx)
    ring.publish(*[0] * 6)
    q.process()
    # 6 served: the driver may add 3 more before its next kick is due.
    assert ring.avail_event == 6 + 3 and armed == [6]
    ring.publish(0)
    q.process()  # the fallback (or a kick) finds one more; 1 served: no batching
    assert ring.avail_event == 7 and armed == [6]
    ring.publish(*[0] * (QS - 1))
    q.process()
    assert ring.avail_event == 14 + min((QS - 1) // 2, KICK_AHEAD_MAX) and armed == [6, 14]
    # Without a fallback timer the device asks for the very next kick.
    q.defer = None
    ring.publish(0, 0, 0, 0)
    q.process()
    assert ring.avail_event == 18 and armed == [6, 14]


def test_kick_batching_looks_again_when_the_driver_raced(ring: Ring,
                                                         fds: tuple[int, int]) -> None:
    """An entry added between the drain and the new avail_event is served at once,
    not left to the fallback."""
    ring.chain(0, [(BUF, 1, F_WRITE)])
    rec = Recorder(result=1)
    q = ring.queue(rec, event_idx=True, call_fd=fds[0])
    armed: list[int] = []
    q.defer = lambda: armed.append(q.last_avail_idx)
    ring.publish(0, 0, 0, 0)
    real_barrier = virtqueue_mod.full_barrier
    raced = []

    def barrier() -> None:
        if not raced:
            raced.append(True)
            ring.publish(0)  # the driver, just before avail_event became visible
        real_barrier()

    virtqueue_mod.full_barrier = barrier
    try:
        q.process()
    finally:
        virtqueue_mod.full_barrier = real_barrier
    assert len(rec.calls) == 5 and ring.used_idx == 5
    assert ring.avail_event == 5 + 2 and armed == [5]


def test_no_avail_event_without_event_idx(ring: Ring) -> None:
    ring.chain(0, [(BUF, 1, F_WRITE)])
    q = ring.queue(Recorder(result=1))
    ring.publish(0, 0)
    q.process()
    assert ring.avail_event == 0


def test_event_idx_honours_used_event(ring: Ring, fds: tuple[int, int]) -> None:
    call = fds[0]
    ring.chain(0, [(BUF, 1, F_WRITE)])
    q = ring.queue(Recorder(result=1), event_idx=True, call_fd=call)
    ring.publish(0)
    q.process()  # first batch after start: always signalled
    assert eventfd_count(call) == 1
    ring.set_used_event(5)  # driver: "interrupt me once used idx passes 5"
    ring.publish(0)
    q.process()  # used 1 -> 2
    assert ring.used_idx == 2 and eventfd_count(call) == 0
    ring.publish(0, 0)
    q.process()  # used 2 -> 4: still not past 5
    assert ring.used_idx == 4 and eventfd_count(call) == 0
    ring.publish(0, 0)
    q.process()  # used 4 -> 6 crosses 5
    assert eventfd_count(call) == 1
    ring.set_used_event(6)
    ring.publish(0)
    q.process()  # used 6 -> 7 crosses 6
    assert eventfd_count(call) == 1


def test_event_idx_ignores_no_interrupt_flag(ring: Ring, fds: tuple[int, int]) -> None:
    call = fds[0]
    ring.chain(0, [(BUF, 1, F_WRITE)])
    q = ring.queue(Recorder(result=1), event_idx=True, call_fd=call)
    ring.set_avail_flags(1)  # VIRTQ_AVAIL_F_NO_INTERRUPT: meaningless with EVENT_IDX
    ring.publish(0)
    q.process()
    assert eventfd_count(call) == 1
    ring.set_used_event(1)
    ring.publish(0)
    q.process()  # used 1 -> 2 crosses used_event 1
    assert eventfd_count(call) == 1


def test_no_interrupt_flag_without_event_idx(ring: Ring, fds: tuple[int, int]) -> None:
    call = fds[0]
    ring.chain(0, [(BUF, 1, F_WRITE)])
    q = ring.queue(Recorder(result=1), call_fd=call)
    ring.set_avail_flags(1)  # VIRTQ_AVAIL_F_NO_INTERRUPT
    ring.set_used_event(0)  # ignored without EVENT_IDX
    ring.publish(0, 0)
    q.process()
    assert ring.used_idx == 2 and eventfd_count(call) == 0
    ring.set_avail_flags(0)
    ring.publish(0)
    q.process()
    assert ring.used_idx == 3 and eventfd_count(call) == 1


def test_pending_completion_publishes_and_signals(ring: Ring, fds: tuple[int, int]) -> None:
    call = fds[0]
    ring.chain(0, [(BUF, 1, F_WRITE)])
    ring.chain(1, [(BUF + 0x10, 1, F_WRITE)])
    q = ring.queue(Recorder(result=lambda h: PENDING if h == 1 else 1), call_fd=call)
    ring.publish(1, 0)
    q.process()
    assert ring.used_elems() == [(0, 1)] and eventfd_count(call) == 1
    q.complete(1, 7)
    assert ring.used_elems() == [(0, 1), (1, 7)] and eventfd_count(call) == 1


def test_first_batch_after_restart_is_signalled(ring: Ring, fds: tuple[int, int]) -> None:
    call = fds[0]
    ring.chain(0, [(BUF, 1, F_WRITE)])
    q = ring.queue(Recorder(result=1), event_idx=True, call_fd=call)
    ring.publish(0)
    q.process()
    assert eventfd_count(call) == 1
    ring.set_used_event(100)  # not yet
    ring.publish(0)
    q.process()
    assert eventfd_count(call) == 0
    base = q.stop()
    q.last_avail_idx = base
    q.start(ring.ram.memory)
    ring.publish(0)
    q.process()  # no "last signal" is known after a restart: signal to be safe
    assert eventfd_count(call) == 1


def test_late_completion_on_a_broken_queue_is_dropped(ring: Ring,
                                                      fds: tuple[int, int]) -> None:
    call, err = fds
    ring.chain(0, [(BUF, 1, F_WRITE)])
    ring.desc(2, BUF, 16, F_NEXT, 2)  # a loop
    q = ring.queue(Recorder(result=lambda h: PENDING), call_fd=call, err_fd=err)
    ring.publish(0, 2)
    q.process()
    assert q.broken and eventfd_count(err) == 1
    assert eventfd_count(call) == 0
    q.complete(0, 1)
    assert ring.used_idx == 0 and ring.used_elems(0, 1) == [(0, 0)]
    assert eventfd_count(call) == 0


# ---- buffer shapes -------------------------------------------------------------------


def test_indirect_table(ring: Ring, ram: GuestRam) -> None:
    ram.write(BUF, b"0123456789abcdef")
    ram.write(BUF + 0x100, b"x" * 32)
    ring.desc(0, TABLE, 48, F_INDIRECT)
    ring.desc(0, BUF, 16, F_NEXT, 1, table=TABLE)
    ring.desc(1, BUF + 0x100, 32, F_NEXT, 2, table=TABLE)
    ring.desc(2, BUF + 0x200, 1, F_WRITE, table=TABLE)
    rec = Recorder(result=1)
    q = ring.queue(rec, indirect=True)
    ring.publish(0)
    q.process()
    assert rec.calls == [Call(0, [b"0123456789abcdef", b"x" * 32], [1])]
    assert ring.used_elems() == [(0, 1)] and not q.broken


def test_indirect_table_after_direct_descriptor(ring: Ring, ram: GuestRam) -> None:
    ram.write(BUF, b"h" * 16)
    ring.desc(0, BUF, 16, F_NEXT, 1)
    ring.desc(1, TABLE, 16, F_INDIRECT)
    ring.desc(0, BUF + 0x200, 2, F_WRITE, table=TABLE)
    rec = Recorder(result=2)
    q = ring.queue(rec)
    ring.publish(0)
    q.process()
    assert rec.calls == [Call(0, [b"h" * 16], [2])]


def test_buffer_straddling_two_regions(ring: Ring, ram: GuestRam) -> None:
    # GPA 0xff00..0x10100 covers the end of region A and the start of region B, whose
    # front-end addresses are far apart and whose fd offset is 0x1000.
    ram.write(0xFF00, b"A" * 0x100)
    ram.write(0x10000, b"B" * 0x100)
    ring.desc(0, 0xFF00, 0x200, F_NEXT, 1)
    ring.desc(1, 0xFF80, 0x100, F_WRITE)
    got: list[tuple[list[bytes], list[int]]] = []

    def handler(head: int, readable: list[memoryview], writable: list[memoryview]) -> int:
        got.append(([bytes(b) for b in readable], [len(b) for b in writable]))
        writable[0][:] = b"w" * len(writable[0])
        writable[1][:] = b"v" * len(writable[1])
        return 0x100

    q = ring.queue(handler)
    ring.publish(0)
    q.process()
    assert got == [([b"A" * 0x100, b"B" * 0x100], [0x80, 0x80])]
    assert ram.read(0xFF80, 0x80) == b"w" * 0x80
    assert ram.read(0x10000, 0x80) == b"v" * 0x80
    assert ram.read(0x10080, 0x80) == b"B" * 0x80


def test_zero_length_descriptor_gives_no_buffer(ring: Ring) -> None:
    ring.chain(0, [(BUF, 0, 0), (BUF + 0x10, 4, 0), (BUF + 0x20, 1, F_WRITE)])
    rec = Recorder(result=1)
    q = ring.queue(rec)
    ring.publish(0)
    q.process()
    assert [len(b) for b in rec.calls[0].readable] == [4]


# ---- hostile rings ------------------------------------------------------------------

# Each case lays out a bad chain at head 2 (after a good chain at head 0) and says
# what to publish; the queue must break before calling the handler for head 2.
Setup = Callable[[Ring], list[int]]


def _loop_self(r: Ring) -> list[int]:
    r.desc(2, BUF, 16, F_NEXT, 2)
    return [0, 2]


def _loop_two(r: Ring) -> list[int]:
    r.desc(2, BUF, 16, F_NEXT, 3)
    r.desc(3, BUF, 16, F_NEXT, 2)
    return [0, 2]


def _longer_than_queue(r: Ring) -> list[int]:
    for i in range(2, QS):
        r.desc(i, BUF, 16, F_NEXT, i + 1 if i + 1 < QS else 2)
    return [0, 2]


def _indirect_loop(r: Ring) -> list[int]:
    r.desc(2, TABLE, 64, F_INDIRECT)
    for i in range(4):
        r.desc(i, BUF, 16, F_NEXT, (i + 1) % 4, table=TABLE)
    return [0, 2]


def _outside_memory(r: Ring) -> list[int]:
    r.desc(2, 0x90_0000, 16, F_NEXT, 3)
    r.desc(3, BUF, 1, F_WRITE)
    return [0, 2]


def _past_end_of_memory(r: Ring) -> list[int]:
    r.desc(2, END_OF_RAM - 0x10, 0x20, F_NEXT, 3)
    r.desc(3, BUF, 1, F_WRITE)
    return [0, 2]


def _writable_outside_memory(r: Ring) -> list[int]:
    r.desc(2, BUF, 16, F_NEXT, 3)
    r.desc(3, 0x1_0000_0000, 1, F_WRITE)
    return [0, 2]


def _overflow(r: Ring) -> list[int]:
    r.desc(2, (1 << 64) - 0x10, 0x100, F_NEXT, 3)
    r.desc(3, BUF, 1, F_WRITE)
    return [0, 2]


def _overflow_from_inside(r: Ring) -> list[int]:
    r.desc(2, BUF, 0xFFFF_FFFF, F_WRITE)
    return [0, 2]


def _indirect_in_indirect(r: Ring) -> list[int]:
    r.desc(2, TABLE, 32, F_INDIRECT)
    r.desc(0, TABLE2, 16, F_INDIRECT, table=TABLE)
    r.desc(0, BUF, 1, F_WRITE, table=TABLE2)
    return [0, 2]


def _indirect_with_next(r: Ring) -> list[int]:
    r.desc(2, TABLE, 16, F_INDIRECT | F_NEXT, 3)
    r.desc(0, BUF, 1, F_WRITE, table=TABLE)
    r.desc(3, BUF, 1, F_WRITE)
    return [0, 2]


def _indirect_len(n: int) -> Setup:
    def setup(r: Ring) -> list[int]:
        r.desc(2, TABLE, n, F_INDIRECT)
        r.desc(0, BUF, 1, F_WRITE, table=TABLE)
        r.desc(1, BUF, 1, F_WRITE, table=TABLE)
        return [0, 2]
    return setup


def _indirect_outside_memory(r: Ring) -> list[int]:
    r.desc(2, END_OF_RAM - 0x10, 32, F_INDIRECT)
    return [0, 2]


def _indirect_next_out_of_range(r: Ring) -> list[int]:
    r.desc(2, TABLE, 32, F_INDIRECT)
    r.desc(0, BUF, 16, F_NEXT, 2, table=TABLE)
    r.desc(1, BUF, 1, F_WRITE, table=TABLE)
    return [0, 2]


def _head_out_of_range(r: Ring) -> list[int]:
    return [0, QS]


def _next_out_of_range(r: Ring) -> list[int]:
    r.desc(2, BUF, 16, F_NEXT, QS)
    return [0, 2]


def _readable_after_writable(r: Ring) -> list[int]:
    r.desc(2, BUF, 1, F_WRITE | F_NEXT, 3)
    r.desc(3, BUF, 16, 0)
    return [0, 2]


HOSTILE: dict[str, Setup] = {
    "descriptor-loop": _loop_self,
    "two-descriptor-loop": _loop_two,
    "chain-longer-than-queue": _longer_than_queue,
    "indirect-loop": _indirect_loop,
    "addr-outside-every-region": _outside_memory,
    "addr-len-past-end-of-ram": _past_end_of_memory,
    "writable-outside-every-region": _writable_outside_memory,
    "addr-len-overflows-2**64": _overflow,
    "len-4GiB-from-inside": _overflow_from_inside,
    "indirect-inside-indirect": _indirect_in_indirect,
    "indirect-with-next": _indirect_with_next,
    "indirect-len-24": _indirect_len(24),
    "indirect-len-8": _indirect_len(8),
    "indirect-len-0": _indirect_len(0),
    "indirect-table-outside-ram": _indirect_outside_memory,
    "indirect-next-out-of-range": _indirect_next_out_of_range,
    "head-not-below-queue-size": _head_out_of_range,
    "next-index-out-of-range": _next_out_of_range,
    "readable-after-writable": _readable_after_writable,
}


def _check_broken(q: SplitVirtqueue, rec: Recorder, ring: Ring, err: int,
                  handled: list[int]) -> None:
    assert q.broken
    assert eventfd_count(err) == 1
    assert rec.heads == handled
    assert ring.used_elems() == [(h, 1) for h in handled]
    # Broken stays broken: more work is not looked at.
    ring.publish(0)
    q.process()
    assert rec.heads == handled
    assert not q.ready


def _check_other_queue_works(ring1: Ring) -> None:
    other = Recorder(result=1)
    ring1.chain(0, [(BUF + 0x800, 16, 0), (BUF + 0x900, 1, F_WRITE)])
    q1 = ring1.queue(other, index=1)
    ring1.publish(0)
    q1.process()
    assert other.heads == [0] and ring1.used_elems() == [(0, 1)] and not q1.broken


@pytest.mark.parametrize("setup", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_ring(ring: Ring, ring1: Ring, fds: tuple[int, int], setup: Setup) -> None:
    call, err = fds
    ring.chain(0, [(BUF, 16, 0), (BUF + 0x100, 1, F_WRITE)])
    heads = setup(ring)
    rec = Recorder(result=1)
    q = ring.queue(rec, call_fd=call, err_fd=err)
    ring.publish(*heads)
    q.process()
    # The good chain before the bad one was completed and published.
    _check_broken(q, rec, ring, err, [0])
    assert eventfd_count(call) == 1
    _check_other_queue_works(ring1)


def test_indirect_without_the_feature(ring: Ring, ring1: Ring, fds: tuple[int, int]) -> None:
    call, err = fds
    ring.chain(0, [(BUF, 16, 0), (BUF + 0x100, 1, F_WRITE)])
    ring.desc(2, TABLE, 16, F_INDIRECT)
    ring.desc(0, BUF, 1, F_WRITE, table=TABLE)
    rec = Recorder(result=1)
    q = ring.queue(rec, indirect=False, call_fd=call, err_fd=err)
    ring.publish(0, 2)
    q.process()
    _check_broken(q, rec, ring, err, [0])
    _check_other_queue_works(ring1)


def test_avail_index_jump(ring: Ring, ring1: Ring, fds: tuple[int, int]) -> None:
    call, err = fds
    ring.chain(0, [(BUF, 16, 0), (BUF + 0x100, 1, F_WRITE)])
    rec = Recorder(result=1)
    q = ring.queue(rec, call_fd=call, err_fd=err)
    ring.publish(0)
    ring.set_avail_idx(QS + 1)  # 9 new entries on a queue of 8
    q.process()
    _check_broken(q, rec, ring, err, [])
    assert eventfd_count(call) == 0
    _check_other_queue_works(ring1)


def test_avail_index_jump_of_exactly_the_queue_size_is_legal(ring: Ring) -> None:
    ring.chain(0, [(BUF, 1, F_WRITE)])
    rec = Recorder(result=1)
    q = ring.queue(rec)
    ring.publish(*[0] * QS)
    q.process()
    assert not q.broken and rec.heads == [0] * QS


def test_ring_outside_memory_breaks_at_start(ram: GuestRam, fds: tuple[int, int]) -> None:
    rec = Recorder()
    q = SplitVirtqueue(0, rec)
    q.set_num(QS)
    q.set_addr(0, 0x1234_0000, 0x1234_1000, 0x1234_2000, 0)  # no such QVA
    q.err_fd = fds[1]
    q.enabled = True
    q.start(ram.memory)
    assert q.broken and not q.ready
    assert eventfd_count(fds[1]) == 1


@pytest.mark.parametrize("num", [0, 3, 6, 1 << 16])
def test_set_num_rejects_bad_sizes(num: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        SplitVirtqueue(0, Recorder()).set_num(num)


def test_stop_returns_next_avail_index(ring: Ring) -> None:
    ring.chain(0, [(BUF, 1, F_WRITE)])
    q = ring.queue(Recorder(result=1), base=0)
    ring.publish(0, 0, 0)
    q.process()
    assert q.stop() == 3
    assert not q.ready


# ---- inflight tracking ---------------------------------------------------------------


@pytest.fixture
def inflight_fd() -> Iterator[int]:
    fd, size = InflightRegion.create(1, QS)
    assert size == inflight_queue_stride(QS)
    yield fd
    os.close(fd)


def region_state(fd: int) -> Any:
    """The queue's inflight region as the front end would see it (read with pread)."""
    raw = os.pread(fd, 16 + 16 * QS, 0)
    return InflightSplitRegion(QS).parse(raw)


def flagged(fd: int) -> set[int]:
    return {i for i, d in enumerate(region_state(fd)["desc"]) if d["inflight"]}


def test_fresh_region_is_initialised(ring: Ring, inflight_fd: int) -> None:
    region = InflightRegion(inflight_fd, inflight_queue_stride(QS), 0, 1, QS)
    ring.set_used_idx(5)
    q = ring.queue(Recorder(), base=5, inflight=region.queues[0])
    hdr = region_state(inflight_fd)["header"]
    assert (hdr["version"], hdr["desc_num"], hdr["used_idx"]) == (1, QS, 5)
    assert q.last_avail_idx == 5 and flagged(inflight_fd) == set()
    region.close()


def _crash_run(ring: Ring, fd: int) -> Recorder:
    """Serve heads 5, 0, 3, 1 where 5 and 3 never complete (the back end 'dies')."""
    for head in (0, 1, 3, 5):
        ring.desc(head, BUF + 0x10 * head, 1, F_WRITE)
    seen_flagged: list[bool] = []

    def result(head: int) -> int:
        seen_flagged.append(head in flagged(fd))
        return PENDING if head in (5, 3) else 1

    region = InflightRegion(fd, inflight_queue_stride(QS), 0, 1, QS)
    rec = Recorder(result=result)
    q = ring.queue(rec, inflight=region.queues[0])
    ring.publish(5, 0, 3, 1)
    q.process()
    assert seen_flagged == [True] * 4  # each head is flagged while it is served
    assert ring.used_elems() == [(0, 1), (1, 1)]
    assert flagged(fd) == {5, 3}
    st = region_state(fd)
    assert st["header"]["used_idx"] == 2
    assert st["desc"][5]["counter"] < st["desc"][3]["counter"]
    region.close()
    return rec


def _restart(ring: Ring, fd: int) -> tuple[SplitVirtqueue, Recorder, InflightRegion]:
    region = InflightRegion(fd, inflight_queue_stride(QS), 0, 1, QS)
    rec = Recorder(result=lambda head: 2)
    # After a reconnect QEMU sends the used index as the ring base.
    q = ring.queue(rec, base=ring.used_idx, inflight=region.queues[0])
    return q, rec, region


def test_crash_then_resubmit_pending_heads_in_order(ring: Ring, inflight_fd: int) -> None:
    _crash_run(ring, inflight_fd)
    q, rec, region = _restart(ring, inflight_fd)
    assert q.last_avail_idx == 4  # used index + chains in flight
    assert rec.heads == []
    q.resubmit()
    assert rec.heads == [5, 3]  # by counter, not by head number
    assert ring.used_elems(2) == [(5, 2), (3, 2)]
    assert flagged(inflight_fd) == set()
    assert region_state(inflight_fd)["header"]["used_idx"] == 4
    q.resubmit()  # only once
    q.process()  # nothing new in the avail ring
    assert rec.heads == [5, 3]
    ring.publish(0)
    q.process()
    assert rec.heads == [5, 3, 0]
    region.close()


def test_published_but_not_cleared_batch_is_not_resubmitted(ring: Ring,
                                                           inflight_fd: int) -> None:
    _crash_run(ring, inflight_fd)
    # Simulate a crash after the used index of the last batch (heads 0 and 1) was
    # published but before the region was updated.
    for head in (0, 1):
        os.pwrite(inflight_fd, b"\x01", 16 + 16 * head)
    os.pwrite(inflight_fd, struct.pack("<H", 0), 14)
    assert flagged(inflight_fd) == {0, 1, 3, 5}
    q, rec, region = _restart(ring, inflight_fd)
    assert flagged(inflight_fd) == {3, 5}
    assert region_state(inflight_fd)["header"]["used_idx"] == 2
    q.resubmit()
    assert rec.heads == [5, 3]
    region.close()


def test_region_for_another_queue_size_is_reset(ring: Ring, inflight_fd: int) -> None:
    _crash_run(ring, inflight_fd)
    os.pwrite(inflight_fd, struct.pack("<H", QS * 2), 10)  # desc_num no longer matches
    q, rec, region = _restart(ring, inflight_fd)
    q.resubmit()
    assert rec.heads == [] and flagged(inflight_fd) == set()
    region.close()


def test_ring_check_reports_a_head_taken_twice_and_a_completion_not_in_flight(
        ring: Ring, inflight_fd: int, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(CHECK_ENV, "1")
    region = InflightRegion(inflight_fd, inflight_queue_stride(QS), 0, 1, QS)
    checked = region.queues[0]
    assert isinstance(checked, CheckedInflightQueue)
    for head in (0, 1):
        ring.desc(head, BUF + 0x10 * head, 1, F_WRITE)
    rec = Recorder(result=lambda head: PENDING if head == 0 else 1)
    q = ring.queue(rec, inflight=checked)
    ring.publish(0, 1)
    q.process()
    assert checked.violations == 0  # a normal run is silent
    ring.publish(0)  # the driver offers head 0 again while the device holds it
    q.process()
    assert checked.violations == 1
    assert "head 0 taken again while in flight" in caplog.text
    q.push_used(1, 1)  # a device bug: head 1 was completed already
    q._publish()
    assert checked.violations == 2
    assert "head 1 completed but not in flight" in caplog.text
    # The driver writes an avail entry after the device read it: a stale read.
    ring.desc(2, BUF + 0x20, 1, F_WRITE)
    ring.publish(2)

    def late_driver(head: int) -> int:
        ring.ram.write(ring.avail_gpa + 4 + 2 * 3, struct.pack("<H", 1))
        return 1

    rec.result = late_driver
    q.process()
    assert checked.violations == 3
    assert "avail slot 3 was read as head 2 but holds 1" in caplog.text
    # Someone else writes a used entry the device published earlier.
    ring.write_used_elem(0, 7, 7)
    rec.result = 1
    ring.publish(2)
    q.process()
    assert checked.violations == 4
    assert "used slot 0 changed behind the device: (id 1, len 1) -> (id 7, len 7)" in caplog.text
    region.close()


def test_ring_check_is_off_by_default(inflight_fd: int, monkeypatch: pytest.MonkeyPatch
                                      ) -> None:
    monkeypatch.delenv(CHECK_ENV, raising=False)
    region = InflightRegion(inflight_fd, inflight_queue_stride(QS), 0, 1, QS)
    assert type(region.queues[0]) is InflightQueue
    region.close()


# ---- resubmission after a back-end restart, through the vhost-user handler (reference 6.3) --


def _start_connection(backend: VhostUserHandler, ram: GuestRam, ring: Ring, inflight_fd: int,
                      base: int, eventfd: Callable[[], int]) -> None:
    """QEMU 7.2's start sequence for one queue (steps 1-19), bit 30 negotiated."""
    proto = backend.connect()
    a, b = ram.regions

    def send(data: bytes, fds: list[int] | None = None) -> None:
        for msg in proto.receive(data, fds or []):
            backend.handle(msg)

    send(frame(R.GET_FEATURES))
    send(frame(R.GET_PROTOCOL_FEATURES))
    send(frame(R.SET_PROTOCOL_FEATURES, u64(proto.info.protocol_features)))
    send(frame(R.SET_OWNER))
    # Split rings here: RING_PACKED (bit 34) is offered but not acked.
    send(frame(R.SET_FEATURES, u64(proto.info.features & ~(1 << 34))))
    send(frame(R.SET_INFLIGHT_FD, inflight_payload(inflight_queue_stride(QS), 0, 1, QS)),
         [os.dup(inflight_fd)])
    send(frame(R.SET_VRING_CALL, vring_fd(0)), [os.dup(eventfd())])
    send(frame(R.SET_MEM_TABLE, mem_table((a.gpa, a.size, a.qva, a.offset),
                                          (b.gpa, b.size, b.qva, b.offset))),
         [os.dup(a.fd), os.dup(b.fd)])
    send(frame(R.SET_VRING_NUM, state(0, QS)))
    send(frame(R.SET_VRING_BASE, state(0, base)))
    send(frame(R.SET_VRING_ADDR, vring_addr(0, 0, ram.qva(ring.desc_gpa),
                                            ram.qva(ring.used_gpa), ram.qva(ring.avail_gpa))))
    send(frame(R.SET_VRING_KICK, vring_fd(0)), [os.dup(eventfd())])
    send(frame(R.SET_VRING_ENABLE, state(0, 1)))


def test_backend_resubmits_after_reconnect(ring: Ring, ram: GuestRam, inflight_fd: int,
                                           eventfd: Callable[[], int]) -> None:
    for head in (0, 1, 3, 5):
        ring.desc(head, BUF + 0x10 * head, 1, F_WRITE)
    rec = Recorder(result=lambda head: PENDING if head in (5, 3) else 1)
    first = VhostUserHandler(FakeDevice(rec, 1, QS), FakeLoop())
    _start_connection(first, ram, ring, inflight_fd, 0, eventfd)
    ring.publish(5, 0, 3, 1)
    first.queues[0].process()  # the kick
    assert rec.heads == [5, 0, 3, 1] and flagged(inflight_fd) == {5, 3}
    # The back end dies (kill -9) with 5 and 3 still at its storage; a new one starts.
    rec2 = Recorder(result=1)
    second = VhostUserHandler(FakeDevice(rec2, 1, QS), FakeLoop())
    _start_connection(second, ram, ring, inflight_fd, ring.used_idx, eventfd)
    try:
        assert rec2.heads == [5, 3]
        assert ring.used_elems(2) == [(5, 1), (3, 1)]
    finally:
        assert second.disconnect() is None


# ---- robustness: faults that are not the driver's, and hostile recovery state ------


def test_handler_exception_publishes_completed_work_and_stops_the_queue(
        ring: Ring, fds: tuple[int, int]) -> None:
    call, err = fds
    for head in (0, 1, 2):
        ring.desc(head, BUF + 0x10 * head, 1, F_WRITE)

    def handler(head: int, readable: list[memoryview], writable: list[memoryview]) -> int:
        if head == 2:
            raise MemoryError("simulated")
        return 1

    q = ring.queue(handler, call_fd=call, err_fd=err)
    ring.publish(0, 1, 2)
    q.process()  # must not raise into the event loop
    assert ring.used_elems() == [(0, 1), (1, 1)]  # what completed is published
    assert q.broken and eventfd_count(err) == 1 and eventfd_count(call) == 1
    # A stopped queue reports the position it really reached, not past a lost request.
    ring.publish(0)
    q.process()
    assert ring.used_idx == 2


def test_inflight_recovery_ignores_impossible_heads_in_the_used_ring(
        ring: Ring, inflight_fd: int) -> None:
    region = InflightRegion(inflight_fd, inflight_queue_stride(QS), 0, 1, QS)
    q = ring.queue(Recorder(result=1), inflight=region.queues[0])
    q.stop()
    # The guest scribbles a huge head id into a used entry the region has not seen.
    ring.write_used_elem(0, 0xFFFFFF, 1)
    ring.set_used_idx(1)
    q.start(ring.ram.memory)  # must not raise
    assert not q.broken
    assert q.last_avail_idx == 1
    region.close()


# ---- fields the driver reads while the device runs change with one store ----------

# A driver on another CPU: spins on used.idx and avail_event through its own mapping
# of guest RAM and counts the times it reads 0 (the device never writes 0 here).
_SPINNER = """
import mmap, os, sys
fd, flag_fd, *offsets = map(int, sys.argv[1:])
words = memoryview(mmap.mmap(fd, os.fstat(fd).st_size)).cast("H")
flag = mmap.mmap(flag_fd, 16)
count = memoryview(flag)[8:16].cast("Q")
fields = [off // 2 for off in offsets]
flag[0] = 1  # running
zeros = reads = 0
while flag[0] == 1:
    for _ in range(1000):
        for f in fields:
            zeros += words[f] == 0
    reads += 1000 * len(fields)
    count[0] = reads
print(zeros, reads)
"""
MIN_READS = 100_000


def zero_reads(fd: int, offsets: list[int], work: Callable[[], None],
               repeat: bool = False) -> int:
    """Run ``work`` while a second process polls the 16-bit fields at ``offsets`` of
    ``fd`` (the other side of shared memory, on another CPU); the times it read 0.
    ``repeat``: run ``work`` again until the poller has read :data:`MIN_READS` times
    (on a loaded machine it may hardly run during one pass)."""
    import mmap
    import subprocess
    import sys
    import time

    flag_fd = os.memfd_create("spinner-flag")
    os.ftruncate(flag_fd, 16)
    flag = mmap.mmap(flag_fd, 16)
    count = memoryview(flag)[8:16].cast("Q")
    spinner = subprocess.Popen(
        [sys.executable, "-c", _SPINNER, str(fd), str(flag_fd), *map(str, offsets)],
        pass_fds=(fd, flag_fd), stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while flag[0] != 1:
            assert spinner.poll() is None and time.monotonic() < deadline, "spinner not up"
            time.sleep(0.001)
        work()
        deadline = time.monotonic() + 30
        while repeat and count[0] < MIN_READS and time.monotonic() < deadline:
            work()
    finally:
        flag[0] = 0
        out, _ = spinner.communicate(timeout=10)
        count.release()
        flag.close()
        os.close(flag_fd)
    zeros, reads = map(int, out.split())
    assert reads >= MIN_READS, "the spinner hardly ran"
    return zeros


def test_driver_never_reads_a_half_written_used_idx_or_avail_event(ram: GuestRam) -> None:
    """struct.pack_into clears a field before it writes it: a driver polling used.idx
    in between would see 0 and take stale used entries (the guest then reports
    "id N is not a head!"). The engine must store these fields in one move."""
    ring = Ring(ram, QS, 0x1000, 0x2000, 0x3000)
    ring.desc(0, BUF, 16, F_WRITE)
    ring.set_used_idx(1)
    q = ring.queue(Recorder(result=1), event_idx=True, base=1)
    ring.avail_idx = 1
    region, off = ram._locate(ring.used_gpa, 8)
    struct.pack_into("<H", region.mm, off + 4 + 8 * QS, 1)  # avail_event, before the spinner

    def serve() -> None:
        # 60000 requests: used.idx runs from 2 to 60001, avail_event likewise.
        for _ in range(60000):
            ring.publish(0)
            q.process()
        assert ring.used_idx == 60001

    assert zero_reads(region.fd, [off + 2, off + 4 + 8 * QS], serve) == 0


def test_inflight_used_idx_is_never_half_written(inflight_fd: int) -> None:
    """The region's used_idx tells a back end started after a crash where the ring
    stood; a crash between pack_into's clearing and its store would leave 0."""
    region = InflightRegion(inflight_fd, inflight_queue_stride(QS), 0, 1, QS)
    queue = region.queues[0]
    assert isinstance(queue, InflightQueue)
    queue.init(QS, 1)

    def complete() -> None:
        for used_idx in range(2, 60002):
            queue.take(0)
            queue.completed([0], used_idx)

    try:
        assert zero_reads(inflight_fd, [14], complete, repeat=True) == 0
    finally:
        region.close()


# ---- a crash after every store, with requests completing out of order ---------------


class _Crash(BaseException):
    """The back end is killed here: nothing after this point runs."""


class _Stores:
    """Counts every store the split engine makes to shared memory (used ring entries,
    used.idx, inflight entries, flags and used_idx) and crashes after the ``limit``-th."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def store(self) -> None:
        self.count += 1
        if self.count == self.limit:
            raise _Crash

    def packer(self, real: Callable[..., None]) -> Callable[..., None]:
        def pack_into(*args: Any) -> None:
            real(*args)
            self.store()
        return pack_into

    def words(self, view: memoryview) -> Any:
        stores = self

        class Words:
            def __getitem__(self, i: int) -> int:
                return view[i]  # type: ignore[no-any-return]

            def __setitem__(self, i: int, value: int) -> None:
                view[i] = value
                stores.store()

            def release(self) -> None:
                view.release()

        return Words()


class _Packers:
    def __init__(self, real: Any, stores: _Stores) -> None:
        self.pack_into = stores.packer(real.pack_into)
        self.unpack_from = real.unpack_from
        self.size = real.size


# (completions in order; None publishes what was completed without publishing)
OUT_OF_ORDER = [
    [(2, True), (0, True), (3, True), (1, True)],
    [(3, False), (0, False), None, (2, True), (1, True)],
]


@pytest.mark.parametrize("completions", OUT_OF_ORDER, ids=["one-by-one", "batched"])
def test_crash_after_every_store_with_out_of_order_completions(
        ring: Ring, inflight_fd: int, monkeypatch: pytest.MonkeyPatch,
        completions: list[tuple[int, bool] | None]) -> None:
    from vhostd.engine import inflight as inflight_mod

    heads = [0, 1, 2, 3]
    for head in heads:
        ring.desc(head, BUF + 0x10 * head, 1, F_WRITE)
    limit = 1
    while True:
        # A fresh guest ring and region for every crash point.
        ring.ram.write(ring.used_gpa, bytes(6 + 8 * QS))
        ring.ram.write(ring.avail_gpa, bytes(6 + 2 * QS))
        ring.avail_idx = 0
        os.pwrite(inflight_fd, bytes(inflight_queue_stride(QS)), 0)
        stores = _Stores(limit)
        region = InflightRegion(inflight_fd, inflight_queue_stride(QS), 0, 1, QS)
        q = ring.queue(Recorder(result=PENDING), inflight=region.queues[0])
        crashed = False
        with monkeypatch.context() as m:
            m.setattr(inflight_mod, "ENTRY", _Packers(inflight_mod.ENTRY, stores))
            m.setattr(inflight_mod, "_U8", _Packers(inflight_mod._U8, stores))
            m.setattr(virtqueue_mod, "_used_pack", stores.packer(virtqueue_mod._used_pack))
            iq = region.queues[0]
            iq._words = stores.words(iq._words)  # type: ignore[attr-defined]
            q._used16 = stores.words(q._used16)  # type: ignore[assignment]
            try:
                ring.publish(*heads)
                q.process()
                for step in completions:
                    if step is None:
                        q.publish()
                    else:
                        q.complete(step[0], 7, publish=step[1])
            except _Crash:
                crashed = True
        published = ring.used_elems()
        # A new back end after the crash: QEMU sends the used index as the base.
        region2 = InflightRegion(inflight_fd, inflight_queue_stride(QS), 0, 1, QS)
        rec2 = Recorder(result=9)
        q2 = ring.queue(rec2, base=ring.used_idx, inflight=region2.queues[0])
        q2.resubmit()
        q2.process()  # and the chains the first never took
        assert q2.last_avail_idx == 4, limit
        done = ring.used_elems()
        # Every request completed exactly once: what was published before the crash
        # is not run again, and what was not is resubmitted.
        assert sorted(h for h, _ in done) == heads, (limit, published, done)
        assert done[:len(published)] == published
        assert {h for h, n in done if n == 9} == set(rec2.heads), limit
        assert flagged(inflight_fd) == set(), limit
        region.close()
        region2.close()
        if not crashed:
            break
        limit += 1
    assert limit > 12  # every store of the scenario was a crash point once
