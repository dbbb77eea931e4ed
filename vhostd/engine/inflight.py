"""Inflight I/O tracking (the split and packed layouts of vhostd_proto.inflight).

While a chain is being served its descriptor entry is flagged in a region shared
with the front end, so a back end started after a crash can resubmit exactly the
chains that were taken and not completed. Hot-path writes use precompiled structs.

Split rings (:class:`InflightQueue`): entry ``i`` is descriptor head ``i``; the used
ring in guest memory says which flagged heads a published batch completed.

Packed rings (:class:`PackedInflightQueue`) need more, because QEMU 7.2 cannot tell
a new back end where a packed ring stands (its SET_VRING_BASE after a crash repeats
the position of the previous start) and because used descriptors overwrite ring
slots. vhostd fills the packed layout like this:

* entry ``s`` belongs to ring slot ``s``. Taking a chain of ``num`` slots at slot
  ``s`` copies each of its ring descriptors into the ``id/flags/len/addr`` of the
  entries ``s .. s+num-1`` (mod the ring size), then writes the head entry's
  ``num``, ``last`` (slot of the last descriptor) and ``counter``, and only then
  sets its ``inflight`` byte: the one store that records the take. ``next`` is 0.
  The head copy's AVAIL bit is the lap (wrap counter) the chain was made available
  in. A chain's slots belong to it until its used descriptor is written, so the
  copies of chains in flight are never overwritten by another chain.
* completing the chain at slot ``s`` (chains complete in order, so its used
  descriptor goes to slot ``s``): the used descriptor (id, len, then flags: that
  store publishes it to the driver); then ``used_idx``/``used_wrap_counter`` become
  the position after the chain, ``old_used_idx``/``old_used_wrap_counter`` the
  position before it; then the head entry's ``inflight`` byte is cleared.
* the header: ``features`` = VIRTIO_F_RING_PACKED (marks the layout), ``version`` 1,
  ``desc_num`` = ring size; ``free_head``/``old_free_head`` are 0 (entries are
  indexed by slot, there is no free list). A zeroed region (version 0) is
  initialised at ring start with the position the front end sent.

Recovery (a valid region at ring start): the flagged entries, oldest counter first,
are the chains in flight; in order they cover consecutive slots. The oldest one
may have had its used descriptor published just before the crash: if its head
slot's USED bit equals the chain's lap, it is finished now (position, then flag),
and so on. The used position is then the oldest remaining chain's head (or the
header's position when none remains: the header is written before a flag is
cleared), the avail position the end of the newest chain, and the remaining chains
are served again from their copies, oldest first.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vhostd_proto.inflight import (
    INFLIGHT_PACKED_FEATURES,
    INFLIGHT_VERSION,
    inflight_queue_stride,
)

from .memory import unmap
from .seals import check_mappable, sealed_memfd

if TYPE_CHECKING:
    from .memory import MappingBudget

# Header: features u64, version u16, desc_num u16, last_batch_head u16, used_idx u16.
HEADER = struct.Struct("<QHHHH")
# Descriptor entry: inflight u8, 5 pad, next u16, counter u64.
ENTRY = struct.Struct("<B5xHQ")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_USED = struct.Struct("<II")
_COUNTER = struct.Struct("<Q")
_VERSION_OFF = 8
_USED_IDX_OFF = 14

log = logging.getLogger(__name__)

# Debugging aid (``vhostd --check-rings``; the variable reaches queue workers too):
# split rings verify each take and completion against the region's flags.
CHECK_ENV = "VHOSTD_CHECK_RINGS"
_CHECK_REPORTS = 20  # error lines per queue, then silence


class InflightQueue:
    """One queue's slice of the inflight region."""

    def __init__(self, view: memoryview, queue_size: int) -> None:
        self.view = view
        # used_idx changes with one store: pack_into clears a field before writing
        # it, and a crash in between would leave 0 for the next back end.
        self._words = view.cast("H")
        self.queue_size = queue_size
        self.counter = 0

    @property
    def valid(self) -> bool:
        version = _U16.unpack_from(self.view, _VERSION_OFF)[0]
        desc_num = _U16.unpack_from(self.view, 10)[0]
        return version == INFLIGHT_VERSION and desc_num == self.queue_size

    @property
    def used_idx(self) -> int:
        return _U16.unpack_from(self.view, _USED_IDX_OFF)[0]

    def init(self, queue_size: int, used_idx: int) -> None:
        self.view[: 16 + 16 * queue_size] = bytes(16 + 16 * queue_size)
        HEADER.pack_into(self.view, 0, 0, INFLIGHT_VERSION, queue_size, 0, used_idx)
        self.counter = 0

    def take(self, head: int) -> None:
        self.counter += 1
        ENTRY.pack_into(self.view, 16 + 16 * head, 1, 0, self.counter)

    def completed(self, heads: list[int], used_idx: int) -> None:
        """Called after the used index covering ``heads`` was published."""
        view = self.view
        for head in heads:
            _U8.pack_into(view, 16 + 16 * head, 0)
        self._words[_USED_IDX_OFF >> 1] = used_idx

    # Recovery clears what the used ring says was published, flagged or not.
    settle = completed

    def release(self) -> None:
        self._words.release()
        self.view.release()

    def pending_heads(self) -> list[int]:
        """Heads still flagged, oldest first."""
        found = []
        for head in range(self.queue_size):
            flag, _next, counter = ENTRY.unpack_from(self.view, 16 + 16 * head)
            if flag:
                found.append((counter, head))
        found.sort()
        if found:
            self.counter = found[-1][0]
        return [head for _, head in found]


class CheckedInflightQueue(InflightQueue):
    """:class:`InflightQueue` that reports impossible transitions:

    * a head made available again while the device still holds it (the driver's
      fault, or a stale read of the avail ring);
    * a head completed that was not in flight (a device bug: the driver would see a
      used id it does not own);
    * an avail ring entry that changed between the take and the completion: the
      device read it before the driver had written it;
    * used ring entries or used index changed by someone else (only the device
      writes them): compared at each completion with a copy of what it published.
    """

    def __init__(self, view: memoryview, queue_size: int, name: str) -> None:
        super().__init__(view, queue_size)
        self.name = name
        self.violations = 0
        self._ring: Callable[[], Any] = lambda: None  # the SplitVirtqueue (weakly)
        self._taken: list[tuple[int, int]] = []  # (avail slot, head) since the last publish
        self._used_copy: bytes | None = None  # the used entries as last published

    def attach(self, ring: Any) -> None:
        self._ring = weakref.ref(ring)  # no cycle: the ring holds this queue
        self.name = ring.name
        self._taken = []
        self._used_copy = None

    def _report(self, what: str, *args: object) -> None:
        self.violations += 1
        if self.violations <= _CHECK_REPORTS:
            log.error("%s: ring check: " + what, self.name, *args)

    def take(self, head: int) -> None:
        flag, _next, counter = ENTRY.unpack_from(self.view, 16 + 16 * head)
        if flag:
            self._report("head %d taken again while in flight (taken as #%d, now #%d)",
                         head, counter, self.counter + 1)
        ring = self._ring()
        if ring is not None and ring.size:
            # The ring advanced past the entry just read.
            self._taken.append(((ring.last_avail_idx - 1) % ring.size, head))
        super().take(head)

    def completed(self, heads: list[int], used_idx: int) -> None:
        seen: set[int] = set()
        for head in heads:
            if head in seen or not _U8.unpack_from(self.view, 16 + 16 * head)[0]:
                self._report("head %d completed but not in flight (batch %s, used_idx %d)",
                             head, heads, used_idx)
            seen.add(head)
        ring = self._ring()
        avail = ring.avail if ring is not None else None
        if avail is not None:
            for slot, head in self._taken:
                now = _U16.unpack_from(avail, 4 + 2 * slot)[0]
                if now != head:
                    self._report("avail slot %d was read as head %d but holds %d "
                                 "(read before the driver wrote it?)", slot, head, now)
        self._taken = []
        used = ring.used if ring is not None else None
        if used is not None and ring.size:
            self._check_used(used, ring.size, len(heads), used_idx)
        super().completed(heads, used_idx)

    def _check_used(self, used: memoryview, size: int, batch: int, used_idx: int) -> None:
        idx = _U16.unpack_from(used, 2)[0]
        if idx != used_idx:
            self._report("used index is %d in guest memory, the device published %d",
                         idx, used_idx)
        now = bytes(used[4:4 + 8 * size])
        old = self._used_copy
        self._used_copy = now
        if old is None or old == now:
            return
        fresh = {(used_idx - 1 - k) % size for k in range(min(batch, size))}
        for slot in range(size):
            a, b = old[8 * slot:8 * slot + 8], now[8 * slot:8 * slot + 8]
            if a != b and slot not in fresh:
                self._report("used slot %d changed behind the device: (id %d, len %d) -> "
                             "(id %d, len %d)", slot, *_USED.unpack(a), *_USED.unpack(b))


# Packed header (InflightPackedHeader): features u64, version u16, desc_num u16,
# free_head u16, old_free_head u16, used_idx u16, old_used_idx u16,
# used_wrap_counter u8, old_used_wrap_counter u8, 7 + 3 pad.
P_HEADER = struct.Struct("<QHHHHHHBB10x")
_P_VALID = struct.Struct("<QHH")  # features, version, desc_num
_P_POSITION = struct.Struct("<HHBB")  # used_idx, old_used_idx, and their wrap counters
_P_POSITION_OFF = 16
# Packed entry (InflightPackedDesc): inflight u8, pad, next u16, last u16, num u16,
# counter u64, then the copy of the ring descriptor: id u16, flags u16, len u32, addr u64.
P_ENTRY = struct.Struct("<BxHHHQHHIQ")
_P_CHAIN = struct.Struct("<HHHQ")  # next, last, num, counter at entry offset 2
_P_HEAD = struct.Struct("<BxHHHQ")  # inflight .. counter
_P_COPY = struct.Struct("<HHIQ")  # id, flags, len, addr at entry offset 16
_P_RING_DESC = struct.Struct("<QIHH")  # a packed ring descriptor: addr, len, id, flags
_AVAIL_BIT = 1 << 7  # VRING_PACKED_DESC_F_AVAIL


class PackedInflightQueue:
    """One packed queue's slice of the inflight region (see the module docstring)."""

    def __init__(self, view: memoryview, queue_size: int) -> None:
        self.view = view
        self.queue_size = queue_size
        self.counter = 0

    def release(self) -> None:
        self.view.release()

    @property
    def valid(self) -> bool:
        features, version, desc_num = _P_VALID.unpack_from(self.view, 0)
        return (features == INFLIGHT_PACKED_FEATURES and version == INFLIGHT_VERSION
                and desc_num == self.queue_size)

    def position(self) -> tuple[int, int]:
        """(used_idx, used_wrap_counter): the device's position after the last completion."""
        used_idx, _old, wrap, _old_wrap = _P_POSITION.unpack_from(self.view, _P_POSITION_OFF)
        return used_idx, wrap

    def init(self, queue_size: int, used_idx: int, used_wrap: int) -> None:
        """A fresh slice: nothing in flight, the ring at (used_idx, used_wrap)."""
        n = 32 + 32 * queue_size
        self.view[:n] = bytes(n)
        P_HEADER.pack_into(self.view, 0, INFLIGHT_PACKED_FEATURES, INFLIGHT_VERSION,
                           queue_size, 0, 0, used_idx, used_idx, used_wrap, used_wrap)
        self.counter = 0

    def take(self, slot: int, count: int, ring: memoryview) -> None:
        """Record the chain of ``count`` slots at ``slot`` of ``ring`` as taken."""
        view = self.view
        size = self.queue_size
        i = slot
        for _ in range(count):
            addr, length, buf_id, flags = _P_RING_DESC.unpack_from(ring, 16 * i)
            _P_COPY.pack_into(view, 48 + 32 * i, buf_id, flags, length, addr)
            last = i
            i += 1
            if i == size:
                i = 0
        self.counter += 1
        off = 32 + 32 * slot
        _P_CHAIN.pack_into(view, off + 2, 0, last, count, self.counter)
        view[off] = 1  # the take is recorded by this store alone

    def completed(self, slot: int, old_idx: int, old_wrap: int, used_idx: int,
                  used_wrap: int) -> None:
        """The chain at ``slot`` (whose used descriptor was just written at old_idx)
        is done: the position first, then its flag."""
        view = self.view
        _P_POSITION.pack_into(view, _P_POSITION_OFF, used_idx, old_idx, used_wrap, old_wrap)
        view[32 + 32 * slot] = 0

    def pending(self) -> list[tuple[int, int, int]]:
        """Chains still flagged, oldest first: (head slot, slots, lap of the head)."""
        view = self.view
        found = []
        top = 0
        for slot in range(self.queue_size):
            off = 32 + 32 * slot
            flag, _next, _last, num, counter = _P_HEAD.unpack_from(view, off)
            top = max(top, counter)
            if flag:
                flags = _P_COPY.unpack_from(view, off + 16)[1]
                found.append((counter, slot, num, 1 if flags & _AVAIL_BIT else 0))
        found.sort()
        self.counter = top
        return [(slot, num, lap) for _, slot, num, lap in found]

    def chain(self, slot: int) -> bytearray:
        """The saved descriptors of the chain taken at ``slot``, laid out as ring
        descriptors (``num`` of them, as its head entry says)."""
        view = self.view
        count = _P_HEAD.unpack_from(view, 32 + 32 * slot)[3]
        out = bytearray(16 * count)
        i = slot
        for k in range(count):
            buf_id, flags, length, addr = _P_COPY.unpack_from(view, 48 + 32 * i)
            _P_RING_DESC.pack_into(out, 16 * k, addr, length, buf_id, flags)
            i += 1
            if i == self.queue_size:
                i = 0
        return out


class InflightRegion:
    """The whole shared region: one stride per queue, back to back, in the split or
    the packed layout (which the front end's acked features chose)."""

    def __init__(self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int,
                 queue_size: int, packed: bool = False,
                 budget: MappingBudget | None = None) -> None:
        stride = inflight_queue_stride(queue_size, packed)
        if mmap_size < stride * num_queues:
            raise ValueError(f"inflight region of {mmap_size} bytes is too small for "
                             f"{num_queues} queues of {queue_size}")
        # Only the queues' strides are used: a larger mmap_size maps nothing more.
        length = mmap_offset + stride * num_queues
        check_mappable(fd, length, "inflight region")
        if budget is not None:
            budget.charge(length, "inflight region")
        try:
            mm = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            if budget is not None:
                budget.refund(length)
            raise
        self.mm: mmap.mmap | None = mm
        self._budget = budget
        self._length = length
        mmap_size = stride * num_queues
        # A queue worker process maps the same region: it gets the fd and these.
        self.fd = os.dup(fd)
        self.args = (mmap_size, mmap_offset, num_queues, queue_size, packed)
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.packed = packed
        base = memoryview(mm)[mmap_offset:mmap_offset + mmap_size]
        self.queues: list[InflightQueue | PackedInflightQueue] = []
        for i in range(num_queues):
            view = base[i * stride:(i + 1) * stride]
            if packed:
                self.queues.append(PackedInflightQueue(view, queue_size))
            elif os.environ.get(CHECK_ENV):
                self.queues.append(CheckedInflightQueue(view, queue_size, f"vq{i}"))
            else:
                self.queues.append(InflightQueue(view, queue_size))

    @staticmethod
    def create(num_queues: int, queue_size: int, packed: bool = False) -> tuple[int, int]:
        """A fresh zeroed memfd for GET_INFLIGHT_FD: (fd, size)."""
        size = inflight_queue_stride(queue_size, packed) * num_queues
        # Sealed: when it comes back (SET_INFLIGHT_FD, perhaps to a restarted vhostd)
        # nobody can have shrunk it under the mapping.
        return sealed_memfd("vhostd-inflight", size), size

    def close(self) -> None:
        if self._budget is not None:
            self._budget.refund(self._length)
            self._budget = None
        os.close(self.fd)
        for q in self.queues:
            q.release()
        if self.mm is not None:
            unmap(self.mm)
            self.mm = None
