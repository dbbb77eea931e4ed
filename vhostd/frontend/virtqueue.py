"""Driver side of a split virtqueue placed in ``GuestMemory``.

The per-request path (``add``/``publish``/``kick``/``reap``) uses precompiled ``struct``
objects on memoryviews and a shadow ``next`` array for the free list, so it creates no
objects beyond the small tuples it returns. Ring index stores rely on x86 TSO ordering
(plain stores are not reordered with each other), the same assumption the back end makes.
"""

from __future__ import annotations

import os
import select
import struct
from collections.abc import Sequence

from vhostd_proto.virtio import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)

from ..engine.barrier import full_barrier
from .memory import PAGE_SIZE, GuestMemory

_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")  # id, len
_DESC_PACK = _DESC.pack_into
_U16_UNPACK = _U16.unpack_from
_USED_UNPACK = _USED_ELEM.unpack_from

Buf = tuple[int, int]  # (gpa, len)


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """virtio spec: notify iff event_idx lies in [old_idx, new_idx) modulo 2^16."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)




# Store->load ordering for kick suppression; see vhostd/engine/barrier.py.
memory_barrier = full_barrier


def _new_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class SplitVirtqueue:
    """A split virtqueue of ``size`` entries (power of two) in guest memory.

    ``indirect_max`` > 0 reserves one indirect table of that many entries per head.
    """

    def __init__(self, mem: GuestMemory, index: int, size: int = 128, *,
                 indirect_max: int = 0) -> None:
        if size <= 0 or size & (size - 1) or size > 32768:
            raise ValueError(f"queue size {size} must be a power of two <= 32768")
        self.mem = mem
        self.index = index
        self.size = size
        self.mask = size - 1
        # Spec alignment is 16/2/4; page-aligning the descriptor table keeps the three parts
        # in one region and mimics what Linux's vring_create_virtqueue does.
        self.desc_gpa = mem.alloc(desc_table_size(size), PAGE_SIZE)
        self.avail_gpa = mem.alloc(avail_ring_size(size), 2)
        self.used_gpa = mem.alloc(used_ring_size(size), 4)
        self._desc = mem.view(self.desc_gpa, desc_table_size(size))
        self._avail = mem.view(self.avail_gpa, avail_ring_size(size))
        # One store per field: struct.pack_into zeroes a field before writing it,
        # and the device may read it in between.
        self._avail16 = self._avail.cast("H")
        self._used = mem.view(self.used_gpa, used_ring_size(size))
        self._used_event_off = 4 + 2 * size  # in the avail ring
        self._avail_event_off = 4 + 8 * size  # in the used ring
        self.indirect_max = indirect_max
        self.indirect_gpa = 0
        self._indirect: memoryview | None = None
        if indirect_max:
            nbytes = 16 * indirect_max * size
            self.indirect_gpa = mem.alloc(nbytes, 16)
            self._indirect = mem.view(self.indirect_gpa, nbytes)
        # Zero the rings: a reused allocation must not leak a stale used.idx.
        for view in (self._desc, self._avail, self._used):
            view[:] = bytes(len(view))
        self.kick_fd = _new_eventfd()
        self.call_fd = _new_eventfd()
        self.event_idx = False  # set once VIRTIO_RING_F_EVENT_IDX is negotiated
        self._reset_driver_state()

    def rebind(self, mem: GuestMemory) -> None:
        """Continue on ``mem``, a copy of this queue's memory at the same GPAs (the guest
        arrived on another host); driver state is kept."""
        self.mem = mem
        self._desc = mem.view(self.desc_gpa, desc_table_size(self.size))
        self._avail = mem.view(self.avail_gpa, avail_ring_size(self.size))
        self._avail16 = self._avail.cast("H")
        self._used = mem.view(self.used_gpa, used_ring_size(self.size))
        if self._indirect is not None:
            self._indirect = mem.view(self.indirect_gpa, len(self._indirect))

    def _reset_driver_state(self) -> None:
        size = self.size
        # Free list threaded through a shadow next array (never through guest memory, which a
        # hostile test may have scribbled on).
        self._next = [(i + 1) & self.mask for i in range(size)]
        self._chain_len = [0] * size
        self.free_head = 0
        self.num_free = size
        self.avail_idx = 0  # shadow of avail.idx including unpublished entries
        self.published_idx = 0  # last value written to avail.idx
        self.kicked_idx = 0  # avail.idx at the last notification
        self.last_used_idx = 0

    # -- guest-memory addresses as a front end reports them -------------------------------

    @property
    def desc_qva(self) -> int:
        return self.mem.gpa_to_qva(self.desc_gpa)

    @property
    def avail_qva(self) -> int:
        return self.mem.gpa_to_qva(self.avail_gpa)

    @property
    def used_qva(self) -> int:
        return self.mem.gpa_to_qva(self.used_gpa)

    @property
    def in_flight(self) -> int:
        return self.size - self.num_free

    # -- request path ---------------------------------------------------------------------

    def add(self, out_bufs: Sequence[Buf], in_bufs: Sequence[Buf] = (),
            indirect: bool = False) -> int:
        """Chain device-readable ``out_bufs`` then device-writable ``in_bufs``; return the head.

        The entry goes into the avail ring but is invisible to the device until ``publish``.
        """
        n = len(out_bufs) + len(in_bufs)
        if n == 0:
            raise ValueError("empty descriptor chain")
        head = self.free_head
        if indirect:
            if n > self.indirect_max:
                raise ValueError(f"{n} buffers exceed the indirect table of {self.indirect_max}")
            if self.num_free < 1:
                raise BlockingIOError("virtqueue full")
            table = self._indirect
            assert table is not None
            base = head * self.indirect_max
            last = n - 1
            k = 0
            for addr, length in out_bufs:
                _DESC_PACK(table, (base + k) * 16, addr, length,
                           VIRTQ_DESC_F_NEXT if k < last else 0, k + 1 if k < last else 0)
                k += 1
            for addr, length in in_bufs:
                flags = VIRTQ_DESC_F_WRITE | (VIRTQ_DESC_F_NEXT if k < last else 0)
                _DESC_PACK(table, (base + k) * 16, addr, length, flags, k + 1 if k < last else 0)
                k += 1
            _DESC_PACK(self._desc, head * 16, self.indirect_gpa + base * 16, n * 16,
                       VIRTQ_DESC_F_INDIRECT, 0)
            self.free_head = self._next[head]
            self._chain_len[head] = 1
            self.num_free -= 1
        else:
            if n > self.num_free:
                raise BlockingIOError(f"virtqueue has {self.num_free} free descriptors, need {n}")
            nxt = self._next
            desc = self._desc
            i = head
            last = n - 1
            k = 0
            for addr, length in out_bufs:
                j = nxt[i]
                _DESC_PACK(desc, i * 16, addr, length, VIRTQ_DESC_F_NEXT if k < last else 0, j)
                i = j
                k += 1
            for addr, length in in_bufs:
                j = nxt[i]
                flags = VIRTQ_DESC_F_WRITE | (VIRTQ_DESC_F_NEXT if k < last else 0)
                _DESC_PACK(desc, i * 16, addr, length, flags, j)
                i = j
                k += 1
            self.free_head = i
            self._chain_len[head] = n
            self.num_free -= n
        self._avail16[2 + (self.avail_idx & self.mask)] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return head

    def publish(self) -> None:
        """Make added entries visible: store avail.idx (after the ring entries, TSO-ordered)."""
        self._avail16[1] = self.avail_idx
        self.published_idx = self.avail_idx

    def kick(self, force: bool = False) -> bool:
        """Notify the device if it asked for it; return whether the kick eventfd was written."""
        new = self.published_idx
        old = self.kicked_idx
        if new == old and not force:
            return False
        if force:
            notify = True
        else:
            # The avail.idx store must be visible before avail_event / used.flags is loaded
            # (x86 may reorder a store with a later load), else a kick can be lost; Linux's
            # virtqueue_kick_prepare has the same full barrier.
            memory_barrier()
            if self.event_idx:
                notify = vring_need_event(_U16_UNPACK(self._used, self._avail_event_off)[0],
                                          new, old)
            else:
                notify = not (_U16_UNPACK(self._used, 0)[0] & VIRTQ_USED_F_NO_NOTIFY)
        self.kicked_idx = new
        if notify:
            os.eventfd_write(self.kick_fd, 1)
        return notify

    def reap(self) -> list[tuple[int, int]]:
        """Consume new used-ring entries; return ``[(head, used_len), ...]`` and free chains."""
        used = self._used
        idx = _U16_UNPACK(used, 2)[0]
        last = self.last_used_idx
        if idx == last:
            return []
        out = []
        mask = self.mask
        nxt = self._next
        chain_len = self._chain_len
        while last != idx:
            head, length = _USED_UNPACK(used, 4 + 8 * (last & mask))
            n = chain_len[head]
            if n == 0:
                raise RuntimeError(f"device returned head {head} which is not in flight")
            chain_len[head] = 0
            tail = head
            for _ in range(n - 1):
                tail = nxt[tail]
            nxt[tail] = self.free_head
            self.free_head = head
            self.num_free += n
            out.append((head, length))
            last = (last + 1) & 0xFFFF
        self.last_used_idx = last
        if self.event_idx:
            # Ask for a notification when the next entry is used; the barrier orders that
            # store before the caller's next used.idx check.
            self._avail16[self._used_event_off >> 1] = last
            memory_barrier()
        return out

    def wait_call(self, timeout: float | None) -> bool:
        """Wait for the call eventfd; consume it and return True, or False on timeout."""
        r, _, _ = select.select([self.call_fd], [], [], timeout)
        if not r:
            return False
        try:
            os.eventfd_read(self.call_fd)
        except BlockingIOError:
            return False
        return True

    def drain_call(self) -> int:
        """Consume a pending call notification without waiting (0 if none)."""
        try:
            return os.eventfd_read(self.call_fd)
        except BlockingIOError:
            return 0

    # -- raw access for hostile tests (bypasses the free list) ----------------------------

    def raw_write_desc(self, i: int, addr: int, length: int, flags: int, next_: int) -> None:
        _DESC_PACK(self._desc, (i & self.mask) * 16, addr, length, flags, next_)

    def raw_read_desc(self, i: int) -> tuple[int, int, int, int]:
        return _DESC.unpack_from(self._desc, (i & self.mask) * 16)

    def raw_write_indirect(self, gpa: int, descs: Sequence[tuple[int, int, int, int]]) -> None:
        """Write an arbitrary table of (addr, len, flags, next) anywhere in guest memory."""
        table = bytearray(16 * len(descs))
        for k, d in enumerate(descs):
            _DESC_PACK(table, 16 * k, *d)
        self.mem.write(gpa, table)

    def raw_put_avail(self, head: int, publish: bool = True) -> None:
        """Append ``head`` to the avail ring without touching the free list."""
        self._avail16[2 + (self.avail_idx & self.mask)] = head & 0xFFFF
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()

    def raw_set_avail_ring(self, slot: int, head: int) -> None:
        self._avail16[2 + (slot & self.mask)] = head & 0xFFFF

    def raw_set_avail_idx(self, idx: int) -> None:
        """Store an arbitrary avail.idx (also moves the shadow index)."""
        idx &= 0xFFFF
        self._avail16[1] = idx
        self.avail_idx = self.published_idx = idx

    def raw_set_avail_flags(self, flags: int) -> None:
        self._avail16[0] = flags

    def raw_set_used_event(self, idx: int) -> None:
        self._avail16[self._used_event_off >> 1] = idx & 0xFFFF

    def used_idx(self) -> int:
        return _U16_UNPACK(self._used, 2)[0]

    def used_flags(self) -> int:
        return _U16_UNPACK(self._used, 0)[0]

    def avail_event(self) -> int:
        return _U16_UNPACK(self._used, self._avail_event_off)[0]

    def raw_read_used(self, slot: int) -> tuple[int, int]:
        return _USED_UNPACK(self._used, 4 + 8 * (slot & self.mask))

    def raw_kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    def close(self) -> None:
        for name in ("kick_fd", "call_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        for view in (self._desc, self._avail, self._used, self._indirect):
            if view is not None:
                view.release()

