"""Fuzz target: split and packed ring walks (SplitVirtqueue / PackedVirtqueue.process)
over hostile descriptor tables, with dirty logging and write tracking on.

The driver's side of a ring is random: descriptors (addresses in and out of guest
memory, any flags, loops, indirect tables of any length), avail/driver-area indexes
and heads. The handler fills every writable buffer and returns any used length, or
completes later. Properties: ``process`` never raises (a bad ring stops, marked
broken); used entries only for chains taken; the dirty log marks nothing outside
guest memory and the log area, and a run of bits equals the page-by-page reference.
"""

from __future__ import annotations

import os
import struct

from fuzz_support import CATCHER, QVA_BASE, RAM_SIZE, Ram, count
from hypothesis import given
from hypothesis import strategies as st

from vhostd.engine.dirtylog import DirtyLog, set_bit_run
from vhostd.engine.dirtytrack import WriteTracker
from vhostd.engine.packed import PackedVirtqueue, set_layout
from vhostd.engine.seals import sealed_memfd
from vhostd.engine.virtqueue import PENDING, SplitVirtqueue

DESC, AVAIL, USED, TABLES = 0x0000, 0x4000, 0x8000, 0xC000
LOG_PAGES = (RAM_SIZE >> 12) + 64

addr_in = st.integers(0, RAM_SIZE - 1)
addr_any = addr_in | st.integers(0, (1 << 64) - 1) | st.sampled_from(
    [RAM_SIZE - 1, RAM_SIZE, RAM_SIZE - 16, (1 << 64) - 1])
length = st.integers(0, 4096) | st.sampled_from([0, 1, 16, 0xFFFFFFFF, 1 << 31, RAM_SIZE])
flags = st.integers(0, 7) | st.integers(0, 0xFFFF)
desc = st.tuples(addr_any, length, flags, st.integers(0, 0xFFFF) | st.integers(0, 8))


def pack_descs(descs: list[tuple[int, int, int, int]]) -> bytes:
    return b"".join(struct.pack("<QIHH", a & (1 << 64) - 1, n & 0xFFFFFFFF, f & 0xFFFF,
                                x & 0xFFFF) for a, n, f, x in descs)


class Handler:
    def __init__(self, used: list[int], pending: bool) -> None:
        self.used = used
        self.pending = pending
        self.later: list[int] = []

    def __call__(self, head: int, readable: list[memoryview], writable: list[memoryview]) -> int:
        for w in writable:
            w[:] = b"\xa5" * len(w) if len(w) <= 1 << 16 else w[:]
        n = self.used.pop() if self.used else 1
        if self.pending and n % 5 == 0:
            self.later.append(head)
            return PENDING
        return n


def logged_pages(log: DirtyLog) -> set[int]:
    return {8 * i + b for i, byte in enumerate(bytes(log.bitmap)) for b in range(8)
            if byte >> b & 1}


@given(packed=st.booleans(), size=st.sampled_from([1, 2, 4, 8, 16, 64, 256]),
       descs=st.lists(desc, max_size=64), tables=st.lists(desc, max_size=40),
       driver=st.binary(max_size=600), avail_idx=st.integers(0, 0xFFFF),
       base=st.integers(0, 0x1FFFF), event_idx=st.booleans(), indirect=st.booleans(),
       used=st.lists(st.integers(0, 1 << 20) | st.integers(0, 64), max_size=20),
       pending=st.booleans(), status_tail=st.booleans(), log_flag=st.booleans(),
       log_addr=st.integers(0, RAM_SIZE))
def test_ring_walks_survive_hostile_rings(packed: bool, size: int, descs: list, tables: list,
                                         driver: bytes, avail_idx: int, base: int,
                                         event_idx: bool, indirect: bool, used: list[int],
                                         pending: bool, status_tail: bool, log_flag: bool,
                                         log_addr: int) -> None:
    count("packed ring" if packed else "split ring")
    ram = Ram()
    log_fd = sealed_memfd("vhostd-fuzz-log", LOG_PAGES // 8)
    log = DirtyLog(log_fd, LOG_PAGES // 8, 0)
    os.close(log_fd)
    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        ram.write(DESC, pack_descs(descs))
        ram.write(TABLES, pack_descs(tables))
        ram.write(AVAIL, driver)
        if not packed:
            ram.write(AVAIL + 2, struct.pack("<H", avail_idx))
        handler = Handler(list(used), pending)
        q = SplitVirtqueue(0, handler, name="fuzz")
        if packed:
            set_layout(q, packed=True)
        q.set_num(size)
        q.set_addr(1 if log_flag else 0, QVA_BASE + DESC, QVA_BASE + USED, QVA_BASE + AVAIL,
                   log_addr)
        q.set_features(event_idx=event_idx, indirect=indirect)
        q.status_tail = status_tail
        q.call_fd = call
        if isinstance(q, PackedVirtqueue):
            q.set_base(base & 0x7FFF | (base >> 15 & 1) << 15)
        else:
            q.last_avail_idx = base & 0xFFFF
        q.enabled = True
        q.dirty_log = log
        q.tracker = WriteTracker(4096, [(0, RAM_SIZE)])
        q.start(ram.memory)
        q.process()
        for head in handler.later:
            q.complete(head, 3)
        q.process()
        q.stop()
        # Nothing is marked outside guest memory and the log area of the used ring.
        assert max(logged_pages(log), default=0) < LOG_PAGES
        CATCHER.check()
    finally:
        log.close()
        os.close(call)
        ram.close()


@given(first=st.integers(0, 1 << 16), n=st.integers(1, 1 << 12))
def test_bit_runs_equal_page_by_page(first: int, n: int) -> None:
    count("bit runs")
    last = first + n - 1
    fast = bytearray((last >> 3) + 2)
    slow = bytearray(len(fast))
    set_bit_run(fast, first, last)
    for page in range(first, last + 1):
        slow[page >> 3] |= 1 << (page & 7)
    assert fast == slow
