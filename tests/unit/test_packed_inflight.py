"""Inflight tracking of packed rings: the region layout, and recovery after the back end
dies at each step of serving a chain (the test is the driver, unit_support.PackedRing).

A crash is a ``Crash`` (a BaseException, which the engine's error handling does not
catch) raised right after a chosen store; the "dead" queue object is then dropped and
a new one started on the same guest RAM and region, with the stale ring base QEMU 7.2
sends after a back-end crash.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from unit_support import (
    F_NEXT,
    F_WRITE,
    PF_AVAIL,
    PF_USED,
    Call,
    FakeDevice,
    FakeLoop,
    GuestRam,
    PackedRing,
    Recorder,
    UsedDesc,
    eventfd_count,
    frame,
    inflight_payload,
    mem_table,
    packed_avail_flags,
    packed_used_flags,
    plain,
    state,
    u64,
    vring_addr,
    vring_fd,
)

from vhostd.engine import inflight as inflight_mod
from vhostd.engine import packed as packed_mod
from vhostd.engine.inflight import InflightRegion, PackedInflightQueue
from vhostd.engine.packed import PackedVirtqueue
from vhostd.vhost_user.handler import VhostUserHandler
from vhostd_proto import inflight as inf
from vhostd_proto.vhost_user import Request as R

QS = 8
RING0 = (0x0000, 0x0200, 0x0400)  # descriptor ring, driver area, device area
TABLE = 0x2000
BUF = 0x4000
USED_BOTH = PF_AVAIL | PF_USED
PACKED_FEATURE = 1 << 34


class Crash(BaseException):
    """The back end is killed here: nothing after this point runs."""


# ---- the layout -----------------------------------------------------------------------

HEADER_VALUES = {"features": 1 << 34, "version": 1, "desc_num": 8, "free_head": 0x1122,
                 "old_free_head": 0x3344, "used_idx": 5, "old_used_idx": 3,
                 "used_wrap_counter": 1, "old_used_wrap_counter": 0}
HEADER_BYTES = bytes.fromhex("0000000004000000" "0100" "0800" "2211" "4433" "0500" "0300"
                             "01" "00" + "00" * 10)
ENTRY_VALUES = {"inflight": 1, "next": 0x0102, "last": 0x0304, "num": 0x0506,
                "counter": 0x1122334455667788, "id": 0xAABB, "flags": 0x8082,
                "len": 0x11223344, "addr": 0x0102030405060708}
ENTRY_BYTES = bytes.fromhex("01" "00" "0201" "0403" "0605" "8877665544332211" "bbaa" "8280"
                            "44332211" "0807060504030201")


def test_packed_header_golden_bytes() -> None:
    assert len(HEADER_BYTES) == 32 == inf.InflightPackedHeader.sizeof()
    assert inf.InflightPackedHeader.build(HEADER_VALUES) == HEADER_BYTES
    assert plain(inf.InflightPackedHeader.parse(HEADER_BYTES)) == HEADER_VALUES
    # The engine's precompiled struct agrees with the construct definition.
    assert inflight_mod.P_HEADER.pack(*HEADER_VALUES.values()) == HEADER_BYTES


def test_packed_entry_golden_bytes() -> None:
    assert len(ENTRY_BYTES) == 32 == inf.InflightPackedDesc.sizeof()
    assert inf.InflightPackedDesc.build(ENTRY_VALUES) == ENTRY_BYTES
    assert plain(inf.InflightPackedDesc.parse(ENTRY_BYTES)) == ENTRY_VALUES
    assert inflight_mod.P_ENTRY.pack(*ENTRY_VALUES.values()) == ENTRY_BYTES


@pytest.mark.parametrize(("queue_size", "stride"), [(1, 64), (8, 320), (128, 4160),
                                                    (256, 8256), (1024, 32832)])
def test_packed_stride(queue_size: int, stride: int) -> None:
    # Header and entries, rounded up to 64 like the split layout.
    assert inf.inflight_queue_stride(queue_size, packed=True) == stride
    assert inf.InflightPackedRegion(queue_size).sizeof() == 32 + 32 * queue_size <= stride
    fd, size = InflightRegion.create(3, queue_size, packed=True)
    os.close(fd)
    assert size == 3 * stride


def test_region_queues_are_one_packed_stride_apart() -> None:
    fd, size = InflightRegion.create(2, QS, packed=True)
    region = InflightRegion(fd, size, 0, 2, QS, packed=True)
    try:
        assert all(isinstance(q, PackedInflightQueue) for q in region.queues)
        region.queues[1].init(QS, 3, 0)  # type: ignore[call-arg]
        raw = os.pread(fd, 32, inf.inflight_queue_stride(QS, packed=True))
        hdr = plain(inf.InflightPackedHeader.parse(raw))
        assert (hdr["features"], hdr["version"], hdr["desc_num"], hdr["used_idx"]) == (
            PACKED_FEATURE, 1, QS, 3)
        assert os.pread(fd, 32, 0) == bytes(32)
    finally:
        region.close()
        os.close(fd)
    with pytest.raises(ValueError, match="too small"):
        InflightRegion(os.memfd_create("x"), inf.inflight_queue_stride(QS), 0, 1, QS,
                       packed=True)


# ---- a ring with a region ---------------------------------------------------------------


@pytest.fixture
def ring(ram: GuestRam) -> PackedRing:
    return PackedRing(ram, QS, *RING0)


@pytest.fixture
def region_fd() -> Iterator[int]:
    fd, size = InflightRegion.create(1, QS, packed=True)
    assert size == inf.inflight_queue_stride(QS, packed=True)
    yield fd
    os.close(fd)


def region_state(fd: int) -> Any:
    """The queue's slice as the front end sees it (pread, parsed with construct)."""
    return plain(inf.InflightPackedRegion(QS).parse(os.pread(fd, 32 + 32 * QS, 0)))


def flagged(fd: int) -> list[int]:
    return [i for i, d in enumerate(region_state(fd)["desc"]) if d["inflight"]]


class Backend:
    """One vhostd "process": a queue on the shared ring and its own region mapping."""

    def __init__(self, ring: PackedRing, fd: int, rec: Recorder, base: int,
                 call_fd: int | None = None, err_fd: int | None = None) -> None:
        self.region = InflightRegion(fd, inf.inflight_queue_stride(QS, packed=True), 0, 1,
                                     QS, packed=True)
        self.rec = rec
        self.q = ring.queue(rec, base=base, start=False, call_fd=call_fd, err_fd=err_fd)
        self.q.inflight = self.region.queues[0]  # type: ignore[assignment]
        self.q.start(ring.ram.memory)

    def die(self) -> None:
        """The process is gone: its mapping goes away, memory stays as it was."""
        self.q.detach_memory()
        self.region.close()


def serve(rec_result: int | Callable[[int], int] = 0) -> Recorder:
    return Recorder(result=rec_result)


def test_fresh_region_is_initialised_from_the_base(ring: PackedRing, region_fd: int) -> None:
    ring.set_position(5, 0)
    b = Backend(ring, region_fd, serve(), base=5)
    st = region_state(region_fd)
    assert st["header"] == {"features": PACKED_FEATURE, "version": 1, "desc_num": QS,
                            "free_head": 0, "old_free_head": 0, "used_idx": 5,
                            "old_used_idx": 5, "used_wrap_counter": 0,
                            "old_used_wrap_counter": 0}
    assert flagged(region_fd) == []
    assert (b.q.last_avail_idx, b.q.avail_wrap, b.q.used_idx, b.q.used_wrap) == (5, 0, 5, 0)
    b.die()


def test_take_copies_the_chain_and_completion_clears_it(ring: PackedRing,
                                                       region_fd: int) -> None:
    ring.set_position(6, 1)
    seen: list[Any] = []

    def result(buf_id: int) -> int:
        seen.append(region_state(region_fd))
        return 3

    b = Backend(ring, region_fd, Recorder(result=result), base=6 | 1 << 15)
    # Slots 6, 7 (lap 1) and 0 (lap 0).
    ring.add(9, [(BUF, 4, 0), (BUF + 0x10, 2, 0), (BUF + 0x20, 1, F_WRITE)])
    b.q.process()
    st = seen[0]
    head = st["desc"][6]
    assert (head["inflight"], head["num"], head["last"], head["next"]) == (1, 3, 0, 0)
    assert head["counter"] == 1
    # Each slot's entry holds a copy of the descriptor the driver wrote there.
    copies = [(st["desc"][s]["addr"], st["desc"][s]["len"], st["desc"][s]["id"],
               st["desc"][s]["flags"]) for s in (6, 7, 0)]
    assert copies == [(BUF, 4, 0xBEEF, F_NEXT | packed_avail_flags(1)),
                      (BUF + 0x10, 2, 0xBEEF, F_NEXT | packed_avail_flags(1)),
                      (BUF + 0x20, 1, 9, F_WRITE | packed_avail_flags(0))]
    assert [st["desc"][s]["inflight"] for s in (7, 0)] == [0, 0]
    assert ring.take_used() == [UsedDesc(6, 9, 3, USED_BOTH)]
    after = region_state(region_fd)
    assert flagged(region_fd) == []
    assert (after["header"]["used_idx"], after["header"]["used_wrap_counter"]) == (1, 0)
    assert (after["header"]["old_used_idx"], after["header"]["old_used_wrap_counter"]) == (6, 1)
    b.die()


# ---- crashes at each step ----------------------------------------------------------------

# Chains of the crash scenario, from slot 5 of lap 1 on a ring of 8: A at 5-6, B at 7 and
# 0 (across the lap boundary), C at 1 (indirect). The driver's next position is 2, lap 0.
A, B, C = 10, 11, 12
HEAD_SLOT = {A: 5, B: 7, C: 1}
START = (5, 1)
STALE_BASE = 5 | 1 << 15  # what QEMU 7.2 sends again after the crash


def add_chains(ring: PackedRing) -> None:
    ring.ram.write(BUF, b"AAAA")
    ring.ram.write(BUF + 0x100, b"B-header-16bytes")
    ring.ram.write(BUF + 0x200, b"CC")
    ring.add(A, [(BUF, 4, 0), (BUF + 0x10, 2, F_WRITE)])
    ring.add(B, [(BUF + 0x100, 16, 0), (BUF + 0x110, 1, F_WRITE)])
    ring.add_indirect(C, TABLE, [(BUF + 0x200, 2, 0), (BUF + 0x210, 3, F_WRITE)])


EXPECTED_CALLS = {A: Call(A, [b"AAAA"], [2]), B: Call(B, [b"B-header-16bytes"], [1]),
                  C: Call(C, [b"CC"], [3])}
EXPECTED_USED = [UsedDesc(5, A, 100 + A, USED_BOTH), UsedDesc(7, B, 100 + B, USED_BOTH),
                 UsedDesc(1, C, 100 + C, 0)]


class StoreCrash:
    """Wraps a precompiled struct: crash right after ``pack_into`` when ``when`` says so."""

    def __init__(self, real: struct.Struct, when: Callable[..., bool]) -> None:
        self.real = real
        self.when = when

    def pack_into(self, buf: Any, offset: int, *values: int) -> None:
        self.real.pack_into(buf, offset, *values)
        if self.when(offset, *values):
            raise Crash(f"after a store at {offset}")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


# Where the back end dies while serving chain ``target``:
#  taken        its take is recorded, the device is working on it
#  used-id-len  its used descriptor's id and length are written, not its flags
#  used-flags   the flags are written: the driver may see the used descriptor
#  position     the region has the new used position, the chain is still flagged
#  flag-cleared the region is fully updated (the next chain not yet taken)
POINTS = ["taken", "used-id-len", "used-flags", "position", "flag-cleared"]
PUBLISHED_AT = {"taken": False, "used-id-len": False, "used-flags": True, "position": True,
                "flag-cleared": True}


class FlagsCrash:
    """The ring's 16-bit view, crashing right after the flags store of ``slot``."""

    def __init__(self, view: Any, slot: int, why: str) -> None:
        self.view, self.index, self.why = view, (16 * slot + 14) // 2, why

    def __setitem__(self, index: int, value: int) -> None:
        self.view[index] = value
        if index == self.index:
            raise Crash(self.why)

    def __getitem__(self, index: int) -> int:
        return int(self.view[index])


def arm(monkeypatch: pytest.MonkeyPatch, b: Backend, point: str, target: int) -> None:
    slot = HEAD_SLOT[target]
    q = b.q
    if point == "taken":
        def result(buf_id: int) -> int:
            if buf_id == target:
                raise Crash("in the handler")
            return 100 + buf_id
        b.rec.result = result
    elif point == "used-id-len":
        monkeypatch.setattr(packed_mod, "_ID_LEN", StoreCrash(
            packed_mod._ID_LEN, lambda off, length, buf_id: buf_id == target))
    elif point == "used-flags":
        monkeypatch.setattr(q, "_desc16", FlagsCrash(q._desc16, slot, "after the used flags"))
    elif point == "position":
        monkeypatch.setattr(inflight_mod, "_P_POSITION", StoreCrash(
            inflight_mod._P_POSITION, lambda off, new, old, *_: old == slot))
    else:
        inflight = q.inflight
        assert inflight is not None
        done = inflight.completed

        def completed(s: int, *args: int) -> None:
            done(s, *args)
            if s == slot:
                raise Crash("after the region update")
        monkeypatch.setattr(inflight, "completed", completed)


def crash_serving(ring: PackedRing, fd: int, monkeypatch: pytest.MonkeyPatch, point: str,
                  target: int) -> Backend:
    ring.set_position(*START)
    b = Backend(ring, fd, serve(lambda buf_id: 100 + buf_id), base=STALE_BASE)
    add_chains(ring)
    with monkeypatch.context() as m:
        arm(m, b, point, target)
        with pytest.raises(Crash):
            b.q.process()
    b.die()
    return b


def keep_in_step(ring: PackedRing, q: PackedVirtqueue, first_id: int = 20) -> None:
    """Requests of 1-3 slots over two laps: each used exactly where the driver expects."""
    for k in range(2 * QS):
        buf_id = first_id + k
        ring.add(buf_id, [(BUF + 0x400, 1, F_WRITE)] * (1 + k % 3))
        slot, wrap = ring.next_used, ring.used_wrap
        q.process()
        assert ring.take_used() == [UsedDesc(slot, buf_id, 100 + buf_id,
                                             packed_used_flags(wrap))]
    assert not q.broken
    assert (q.used_idx, q.used_wrap) == (ring.next_used, ring.used_wrap)
    assert (q.last_avail_idx, q.avail_wrap) == (ring.next_avail, ring.avail_wrap)


def check_after_restart(ring: PackedRing, fd: int, first: Backend, second: Backend,
                        target: int, published: bool) -> None:
    ids = [A, B, C]
    done_before = ids[:ids.index(target) + (1 if published else 0)]
    # The new back end ran exactly what was not published, oldest first, with the
    # buffers the driver gave (not what a used descriptor left in a head slot).
    assert second.rec.calls == [EXPECTED_CALLS[i] for i in ids if i not in done_before]
    assert first.rec.heads == ids[:ids.index(target) + 1]
    # The driver sees each chain used exactly once, in order, where it belongs.
    assert ring.take_used() == EXPECTED_USED
    assert flagged(fd) == []
    q = second.q
    assert (q.last_avail_idx, q.avail_wrap, q.used_idx, q.used_wrap) == (2, 0, 2, 0)
    keep_in_step(ring, q)
    hdr = region_state(fd)["header"]
    assert (hdr["used_idx"], hdr["used_wrap_counter"]) == (ring.next_used, ring.used_wrap)


@pytest.mark.parametrize("target", [A, B, C], ids=["A", "B-across-the-lap", "C-indirect"])
@pytest.mark.parametrize("point", POINTS)
def test_crash_while_serving_then_restart(ring: PackedRing, region_fd: int,
                                          monkeypatch: pytest.MonkeyPatch, point: str,
                                          target: int) -> None:
    first = crash_serving(ring, region_fd, monkeypatch, point, target)
    # Inline completion: only the chain being served is in flight.
    assert flagged(region_fd) == ([] if point == "flag-cleared" else [HEAD_SLOT[target]])
    hdr = region_state(region_fd)["header"]
    where = {A: (5, 1), B: (7, 1), C: (1, 0)}
    after = {A: (7, 1), B: (1, 0), C: (2, 0)}
    # The region's used position moves with its own store, after the used flags.
    expect = after[target] if point in ("position", "flag-cleared") else where[target]
    assert (hdr["used_idx"], hdr["used_wrap_counter"]) == expect
    second = Backend(ring, region_fd, serve(lambda buf_id: 100 + buf_id), base=STALE_BASE)
    assert not second.q.broken
    second.q.process()
    check_after_restart(ring, region_fd, first, second, target, PUBLISHED_AT[point])
    second.die()


def test_driver_reused_the_published_slot_before_the_restart(ring: PackedRing,
                                                            region_fd: int,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """The used descriptor of the chain at slot 0 was published and the back end died
    before the region knew; the driver took it and put a new chain (next lap) there."""
    ring.set_position(0, 1)
    first = Backend(ring, region_fd, serve(lambda buf_id: 100 + buf_id), base=1 << 15)
    ring.add(1, [(BUF, 1, 0)] * 3 + [(BUF + 0x10, 1, F_WRITE)])  # slots 0-3
    ring.add(2, [(BUF, 1, 0)] * 3 + [(BUF + 0x20, 1, F_WRITE)])  # slots 4-7
    with monkeypatch.context() as m:
        m.setattr(first.q, "_desc16",
                  FlagsCrash(first.q._desc16, 0, "after the used flags of slot 0"))
        with pytest.raises(Crash):
            first.q.process()
    first.die()
    assert flagged(region_fd) == [0]
    assert ring.take_used() == [UsedDesc(0, 1, 101, USED_BOTH)]
    ring.add(3, [(BUF + 0x30, 1, F_WRITE), (BUF + 0x40, 1, F_WRITE)])  # slots 0-1, lap 0
    assert ring.read_desc(0)[3] & (PF_AVAIL | PF_USED) == PF_USED
    second = Backend(ring, region_fd, serve(lambda buf_id: 100 + buf_id), base=1 << 15)
    second.q.process()
    assert second.rec.heads == [2, 3]
    assert ring.take_used() == [UsedDesc(4, 2, 102, USED_BOTH), UsedDesc(0, 3, 103, 0)]
    keep_in_step(ring, second.q)
    second.die()


def test_several_chains_in_flight_are_resubmitted_oldest_first(
        ring: PackedRing, region_fd: int, eventfd: Callable[[], int]) -> None:
    """A device that completes later (in order): three chains in flight at the crash,
    their head slots since overwritten by the guest; a second crash while the new back
    end serves them again; the third back end finishes."""
    from vhostd.engine.virtqueue import PENDING

    ring.set_position(6, 0)
    first = Backend(ring, region_fd, serve(lambda buf_id: 100 + buf_id if buf_id == 1
                                           else PENDING), base=6)
    ring.add(1, [(BUF + 0x40, 1, F_WRITE)])  # slot 6
    ring.add(2, [(BUF, 4, 0), (BUF + 0x50, 1, F_WRITE)])  # 7, 0 (next lap)
    ring.add(3, [(BUF + 0x10, 4, 0), (BUF + 0x60, 1, F_WRITE)])  # 1, 2
    ring.add(4, [(BUF + 0x20, 4, 0), (BUF + 0x70, 1, F_WRITE)])  # 3, 4
    for k, text in enumerate((b"two.", b"thre", b"four")):
        ring.ram.write(BUF + 0x10 * k, text)
    first.q.process()
    assert first.rec.heads == [1, 2, 3, 4]
    first.die()
    assert ring.take_used() == [UsedDesc(6, 1, 101, 0)]  # lap 0: both flags 0
    assert flagged(region_fd) == [1, 3, 7]
    # Not the driver's to change, but the copies are what counts: scribble on the slots.
    for slot in (7, 0, 1):
        ring.write_desc(slot, 0xDEAD0, 0xFFFF, 0xEE, ring.read_desc(slot)[3])

    def crash_on_3(buf_id: int) -> int:
        if buf_id == 3:
            raise Crash("while resubmitting")
        return 100 + buf_id

    second = Backend(ring, region_fd, serve(crash_on_3), base=6)
    assert (second.q.last_avail_idx, second.q.avail_wrap) == (5, 1)
    assert (second.q.used_idx, second.q.used_wrap) == (7, 0)
    with pytest.raises(Crash):
        second.q.process()
    second.die()
    assert second.rec.calls == [Call(2, [b"two."], [1]), Call(3, [b"thre"], [1])]
    assert ring.take_used() == [UsedDesc(7, 2, 102, 0)]
    third = Backend(ring, region_fd, serve(lambda buf_id: 100 + buf_id), base=6)
    third.q.process()
    assert third.rec.calls == [Call(3, [b"thre"], [1]), Call(4, [b"four"], [1])]
    assert ring.take_used() == [UsedDesc(1, 3, 103, USED_BOTH), UsedDesc(3, 4, 104, USED_BOTH)]
    assert flagged(region_fd) == []
    keep_in_step(ring, third.q)
    third.die()


# ---- regions that cannot be trusted, and positions from elsewhere ----------------------


def test_split_layout_region_is_initialised_afresh(ring: PackedRing, region_fd: int) -> None:
    # A valid split header (features 0, version 1, the same size) and a flagged entry.
    os.pwrite(region_fd, struct.pack("<QHHHH", 0, 1, QS, 0, 3) + b"\x01", 0)
    ring.set_position(2, 1)
    b = Backend(ring, region_fd, serve(1), base=2 | 1 << 15)
    hdr = region_state(region_fd)["header"]
    assert (hdr["features"], hdr["version"], hdr["used_idx"], hdr["used_wrap_counter"]) == (
        PACKED_FEATURE, 1, 2, 1)
    assert flagged(region_fd) == [] and b.q.base() == (2 | 1 << 15) * 0x10001
    b.die()


@pytest.mark.parametrize("desc_num", [QS // 2, QS * 2])
def test_region_for_another_queue_size_is_initialised_afresh(ring: PackedRing, region_fd: int,
                                                             desc_num: int) -> None:
    os.pwrite(region_fd, struct.pack("<QHH", PACKED_FEATURE, 1, desc_num), 0)
    os.pwrite(region_fd, b"\x01", 32)
    b = Backend(ring, region_fd, serve(1), base=1 << 15)
    assert region_state(region_fd)["header"]["desc_num"] == QS and flagged(region_fd) == []
    b.die()


def flag_entry(fd: int, slot: int, num: int, counter: int, lap: int) -> None:
    os.pwrite(fd, struct.pack("<BxHHHQ", 1, 0, slot, num, counter), 32 + 32 * slot)
    os.pwrite(fd, struct.pack("<HHIQ", 0, F_WRITE | packed_avail_flags(lap), 1, BUF),
              48 + 32 * slot)


@pytest.mark.parametrize("entries", [
    [(0, 1, 1, 1), (2, 1, 2, 1)],  # a gap between the two chains
    [(2, 1, 1, 1), (0, 1, 2, 1)],  # the newer chain before the older
    [(0, 3, 1, 1), (3, 1, 2, 0)],  # the right slot in the wrong lap
    [(0, 0, 1, 1)],  # no slots
    [(0, QS + 1, 1, 1)],  # more slots than the ring
    [(0, 6, 1, 1), (6, 4, 2, 1)],  # more than the ring in flight
], ids=["gap", "order", "lap", "empty", "too-long", "overfull"])
def test_inconsistent_region_stops_the_queue(ring: PackedRing, region_fd: int,
                                             eventfd: Callable[[], int],
                                             entries: list[tuple[int, int, int, int]]) -> None:
    first = Backend(ring, region_fd, serve(1), base=1 << 15)  # a valid header
    first.die()
    for slot, num, counter, lap in entries:
        flag_entry(region_fd, slot, num, counter, lap)
    err = eventfd()
    b = Backend(ring, region_fd, serve(1), base=1 << 15, err_fd=err)
    assert b.q.broken and eventfd_count(err) == 1
    one = ring.add(1, [(BUF, 1, F_WRITE)])
    assert one == 0
    b.q.process()
    assert b.rec.calls == [] and ring.take_used() == []
    b.die()


def test_region_position_outside_the_ring_stops_the_queue(ring: PackedRing, region_fd: int,
                                                          eventfd: Callable[[], int]) -> None:
    Backend(ring, region_fd, serve(1), base=1 << 15).die()
    os.pwrite(region_fd, struct.pack("<H", QS), 16)
    err = eventfd()
    b = Backend(ring, region_fd, serve(1), base=1 << 15, err_fd=err)
    assert b.q.broken and eventfd_count(err) == 1
    b.die()


def test_clean_restart_takes_the_position_from_the_region(ring: PackedRing,
                                                          region_fd: int,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    """A valid region outranks SET_VRING_BASE (stale after a crash in QEMU 7.2)."""
    caplog.set_level(logging.INFO, logger="vhostd.engine.packed")
    ring.set_position(3, 1)
    first = Backend(ring, region_fd, serve(lambda buf_id: 100 + buf_id), base=3 | 1 << 15)
    for buf_id in range(4):
        ring.add(buf_id, [(BUF, 1, F_WRITE)] * 2)  # 8 slots: a whole lap, back at 3 lap 0
    first.q.process()
    assert [u.id for u in ring.take_used()] == [0, 1, 2, 3]
    base = first.q.stop()
    assert base == 3 * 0x10001
    first.die()
    second = Backend(ring, region_fd, serve(lambda buf_id: 100 + buf_id), base=3 | 1 << 15)
    assert second.q.base() == base
    assert "ring position 0x30003 from the inflight region (the front end sent 0x80038003)" \
        in caplog.text
    keep_in_step(ring, second.q)
    second.die()


def test_position_from_device_parts_reinitialises_the_region(ring: PackedRing,
                                                             region_fd: int) -> None:
    """The owner's parts set a position on a started ring at rest: the region follows."""
    b = Backend(ring, region_fd, serve(lambda buf_id: 100 + buf_id), base=1 << 15)
    b.q.set_base(6)
    hdr = region_state(region_fd)["header"]
    assert (hdr["used_idx"], hdr["used_wrap_counter"]) == (6, 0)
    b.die()
    ring.set_position(6, 0)
    again = Backend(ring, region_fd, serve(lambda buf_id: 100 + buf_id), base=1 << 15)
    assert again.q.base() == 6 * 0x10001
    keep_in_step(ring, again.q)
    again.die()


# ---- through the vhost-user handler: QEMU 7.2's messages (reference 6.1, 6.3) -----------------


def connect(backend: VhostUserHandler, ring: PackedRing, eventfd: Callable[[], int],
            base: int, inflight_fd: int | None) -> int:
    """QEMU 7.2's start sequence for one packed queue; without ``inflight_fd`` it asks
    for a region first (GET_INFLIGHT_FD). Returns the region's fd."""
    proto = backend.connect()
    ram = ring.ram
    a, b = ram.regions

    def send(data: bytes, fds: list[int] | None = None) -> Any:
        out = None
        for msg in proto.receive(data, fds or []):
            out = backend.handle(msg)
        return out

    send(frame(R.GET_FEATURES))
    send(frame(R.GET_PROTOCOL_FEATURES))
    send(frame(R.SET_PROTOCOL_FEATURES, u64(proto.info.protocol_features)))
    send(frame(R.SET_OWNER))
    send(frame(R.SET_FEATURES, u64(proto.info.features)))  # RING_PACKED acked
    if inflight_fd is None:
        reply, fds = send(frame(R.GET_INFLIGHT_FD, inflight_payload(0, 0, 1, QS)))
        mmap_size, mmap_offset, nq, qs = struct.unpack_from("<QQHH", reply, 12)
        assert (mmap_size, mmap_offset, nq, qs) == (
            inf.inflight_queue_stride(QS, packed=True), 0, 1, QS)
        inflight_fd = fds[0]
    size = inf.inflight_queue_stride(QS, packed=True)
    send(frame(R.SET_INFLIGHT_FD, inflight_payload(size, 0, 1, QS)), [os.dup(inflight_fd)])
    send(frame(R.SET_VRING_CALL, vring_fd(0)), [os.dup(eventfd())])
    send(frame(R.SET_MEM_TABLE, mem_table((a.gpa, a.size, a.qva, a.offset),
                                          (b.gpa, b.size, b.qva, b.offset))),
         [os.dup(a.fd), os.dup(b.fd)])
    send(frame(R.SET_VRING_NUM, state(0, QS)))
    send(frame(R.SET_VRING_BASE, state(0, base)))
    send(frame(R.SET_VRING_ADDR, vring_addr(0, 0, ram.qva(ring.desc_gpa),
                                            ram.qva(ring.device_gpa),
                                            ram.qva(ring.driver_gpa))))
    send(frame(R.SET_VRING_KICK, vring_fd(0)), [os.dup(eventfd())])
    send(frame(R.SET_VRING_ENABLE, state(0, 1)))
    return inflight_fd


def test_backend_recovers_a_packed_ring_after_reconnect(ring: PackedRing,
                                                        eventfd: Callable[[], int]) -> None:
    rec = Recorder(result=lambda buf_id: 100 + buf_id)
    first = VhostUserHandler(FakeDevice(rec, 1, QS), FakeLoop())
    fd = connect(first, ring, eventfd, 1 << 15, None)
    try:
        q = first.queues[0]
        assert isinstance(q, PackedVirtqueue) and isinstance(q.inflight, PackedInflightQueue)
        for buf_id in range(3):
            ring.add(buf_id, [(BUF, 1, 0), (BUF + 0x10 * buf_id, 1, F_WRITE)])
        q.process()
        assert [u.id for u in ring.take_used()] == [0, 1, 2]

        def crash_on_4(buf_id: int) -> int:
            if buf_id == 4:
                raise Crash("in the handler")
            return 100 + buf_id

        rec.result = crash_on_4
        ring.add(3, [(BUF, 1, F_WRITE)])
        ring.add(4, [(BUF, 1, 0), (BUF + 0x80, 1, F_WRITE)])
        with pytest.raises(Crash):
            q.process()
        assert ring.take_used() == [UsedDesc(6, 3, 103, USED_BOTH)]
        assert flagged(fd) == [7]
        assert first.disconnect() is None  # the crash left nothing outstanding

        # A new back end; QEMU 7.2 sends the base of the previous start again.
        rec2 = Recorder(result=lambda buf_id: 100 + buf_id)
        second = VhostUserHandler(FakeDevice(rec2, 1, QS), FakeLoop())
        connect(second, ring, eventfd, 1 << 15, fd)
        assert rec2.heads == [4]  # resubmitted at KICK/ENABLE
        assert ring.take_used() == [UsedDesc(7, 4, 104, USED_BOTH)]
        q2 = second.queues[0]
        assert q2.base() == 1 * 0x10001  # slot 1 of lap 0 (chain 4 crossed the lap)
        keep_in_step(ring, q2)  # type: ignore[arg-type]
        assert second.disconnect() is None
    finally:
        os.close(fd)
