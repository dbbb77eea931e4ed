"""Device side of a packed virtqueue (VIRTIO_F_RING_PACKED).

One descriptor ring shared by both sides: the driver makes a descriptor available by
setting its AVAIL flag to the driver's wrap counter (and USED to the opposite), the
device hands a buffer back by writing a descriptor with both flags equal to its own
wrap counter, at its next used position, carrying the buffer id and the written
length. A chain's buffer id is in its last descriptor; a used descriptor consumes as
many ring slots as the chain had. Used descriptors are published in the order the
chains were taken: a request that completes before an older one still at the device
waits for it (``_order``). So a used descriptor never overwrites a descriptor still in
flight, and the inflight region stays exact (below).

Inflight tracking (vhostd/engine/inflight.py has the layout and the argument): a
taken chain's descriptors are copied into the region and its head entry flagged;
writing its used descriptor is followed by the new used position in the region and
then the flag's clearing. At ring start a valid region, not SET_VRING_BASE (stale
after a crash in QEMU 7.2), gives the ring position, and the chains still flagged
are served again from their copies. This relies on in-order publication.

The driver area holds the driver's event suppression (when to interrupt), the device
area the device's (when to kick). The device asks for every kick (flags ENABLE), which
cannot lose one; it interrupts per the driver's ENABLE / DISABLE / DESC setting.

Same rules as the split engine: struct on memoryviews, hostile input checked, a ring
that breaks the rules stops with a log line and a signal on its err fd.
"""

from __future__ import annotations

import logging
import struct
from collections import deque

from .barrier import full_barrier
from .inflight import PackedInflightQueue
from .memory import GuestMemory, GuestMemoryError
from .virtqueue import VIRTQ_MAX_SIZE, RingError, SplitVirtqueue, _signal

log = logging.getLogger(__name__)

PDESC = struct.Struct("<QIHH")  # addr, len, id, flags
_pdesc_unpack = PDESC.unpack_from
_U16 = struct.Struct("<H")
_u16_unpack = _U16.unpack_from
_ID_LEN = struct.Struct("<IH")  # len at offset 8, id at offset 12

VRING_PACKED_DESC_F_AVAIL = 1 << 7
VRING_PACKED_DESC_F_USED = 1 << 15
F_NEXT = 1
F_WRITE = 2
F_INDIRECT = 4
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2
EVENT_SUPPRESS_SIZE = 4  # le16 off_wrap; le16 flags


class PackedVirtqueue(SplitVirtqueue):
    """A packed ring. It shares configuration, lifecycle and logging with the split
    engine; a queue becomes packed when VIRTIO_F_RING_PACKED is negotiated
    (:func:`set_layout`), keeping its identity (the event loop holds it)."""

    avail_wrap: int
    used_wrap: int
    # Chains taken while an older one is still at the device, oldest first, as
    # [buffer id, ring slots, used length or None while outstanding]; and the
    # outstanding ones by buffer id.
    _order: deque[list[int | None]]
    _by_id: dict[int, list[int | None]]
    inflight: PackedInflightQueue | None  # type: ignore[assignment]
    POSITION_FIELDS = (*SplitVirtqueue.POSITION_FIELDS, "avail_wrap", "used_wrap")

    def position(self) -> str:
        return (f"next avail slot {self.last_avail_idx} lap {self.avail_wrap}, "
                f"next used slot {self.used_idx} lap {self.used_wrap}")

    def export_state(self) -> dict[str, object]:
        state = super().export_state()
        state["packed"] = True
        return state

    def _init_packed(self) -> None:
        self.avail_wrap = 1
        self.used_wrap = 1
        self._order = deque()
        self._by_id = {}
        self._batch_old = 0
        self._batch_wrapped = False

    # ---- vhost-user base encoding -------------------------------------------
    def set_base(self, num: int) -> None:
        """SET_VRING_BASE: bits 0-14 next avail, bit 15 its wrap counter.

        The high half may carry a used position, but vhostd stops a ring only once its
        requests have completed, so the used position always equals the avail one; and QEMU
        7.2 fills that half from the split-ring used index of a packed ring's device
        area (a meaningless 0) after a stop, which would put used descriptors over
        live ones on the migration destination. So it is ignored."""
        self.last_avail_idx = num & 0x7FFF
        self.avail_wrap = num >> 15 & 1
        self.used_idx = self.last_avail_idx
        self.used_wrap = self.avail_wrap
        if self.started and self.inflight is not None and self.desc is not None:
            # A position from the owner's device parts, for a ring at rest: the
            # region follows it, nothing is in flight.
            self._resubmit = []
            if self.last_avail_idx < self.size:
                self.inflight.init(self.size, self.used_idx, self.used_wrap)

    def base(self) -> int:
        return (self.last_avail_idx | self.avail_wrap << 15
                | (self.used_idx | self.used_wrap << 15) << 16)

    # ---- lifecycle ---------------------------------------------------------
    def start(self, memory: GuestMemory) -> None:
        if not self._begin(memory):
            return
        self._order.clear()
        self._by_id.clear()
        if self.last_avail_idx >= self.size or self.used_idx >= self.size:
            self.fail(f"ring position {self.last_avail_idx}/{self.used_idx} is not below "
                      f"the queue size {self.size}")
            return
        try:
            self.resolve()
        except RingError as e:
            self.fail(str(e))
            return
        if self.inflight is not None:
            self._recover_inflight()
            if self.broken:
                return
        self._signalled_valid = False
        # Ask for every kick.
        self.used.cast("H")[1] = RING_EVENT_FLAGS_ENABLE  # type: ignore[union-attr]
        # The device area is where QEMU's log_guest_addr points for a packed ring.
        self._mark_used(2, 2)

    def resolve(self) -> None:
        if self.memory is None or not self.size:
            raise RingError(f"{self.name}: started without a size or memory table")
        self.translate_addr()
        try:
            # desc: the ring; avail: driver event suppression; used: device's.
            self.desc = self.memory.gpa(self.desc_addr, 16 * self.size)
            self.avail = self.memory.gpa(self.avail_addr, EVENT_SUPPRESS_SIZE)
            self.used = self.memory.gpa(self.used_addr, EVENT_SUPPRESS_SIZE)
            self._desc16 = self.desc.cast("H")  # flags publish a used descriptor: one store
        except GuestMemoryError as e:
            self.drop_views()
            raise RingError(f"{self.name}: ring not in guest memory: {e}") from e

    def unconfigure(self) -> None:
        super().unconfigure()
        self._init_packed()

    # ---- data path ---------------------------------------------------------
    def _drain(self) -> None:
        desc = self.desc
        num = self.size
        handler = self.handler
        walk = self._walk
        logging = self.dirty_log is not None or self.tracker is not None
        inflight = self.inflight
        while True:
            flags = _u16_unpack(desc, 16 * self.last_avail_idx + 14)[0]
            avail = flags & VRING_PACKED_DESC_F_AVAIL != 0
            used = flags & VRING_PACKED_DESC_F_USED != 0
            if avail != bool(self.avail_wrap) or used == bool(self.avail_wrap):
                return  # kicks stay enabled: the driver will kick for the next one
            written: list[tuple[int, int]] | None = [] if logging else None
            slot = self.last_avail_idx
            buf_id, count, readable, writable = walk(slot, written)
            pos = slot + count
            if pos >= num:
                pos -= num
                self.avail_wrap ^= 1
            self.last_avail_idx = pos
            if self._by_id and buf_id in self._by_id:
                raise RingError(f"buffer id {buf_id} made available again while in flight")
            if inflight is not None:
                inflight.take(slot, count, desc)
            n = handler(buf_id, readable, writable)
            if n >= 0 and not self._order:
                if written:
                    self._mark_writes(written, n)
                self._push(buf_id, n, count)
            else:
                if n < 0 and written is None:
                    # Logging may begin before it completes: learn its buffers now,
                    # while the chain's slots are certainly still the driver's.
                    written = []
                    walk(slot, written)
                self._hold(buf_id, count, n, written)

    def _hold(self, buf_id: int, count: int, n: int,
              written: list[tuple[int, int]] | None) -> None:
        """A chain that cannot publish yet: it is outstanding (``n`` < 0), or an older
        chain is."""
        if n >= 0:
            if written:
                self._mark_writes(written, n)
            self._order.append([buf_id, count, n])
            return
        entry: list[int | None] = [buf_id, count, None]
        self._order.append(entry)
        self._by_id[buf_id] = entry
        self._pending_writes[buf_id] = written or []
        self.outstanding += 1

    def _walk(self, head: int, written: list[tuple[int, int]] | None = None,
              saved: bytearray | None = None
              ) -> tuple[int, int, list[memoryview], list[memoryview]]:  # type: ignore[override]
        """The chain starting at ring slot ``head``: (buffer id, ring slots used,
        readable views, writable views). With ``saved``, the chain is that copy of
        its descriptors (from the inflight region), ``head`` being 0."""
        if saved is None:
            desc: memoryview | bytearray | None = self.desc
            num = self.size
        else:
            desc = saved
            num = len(saved) // 16
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        i = head
        count = 0
        while True:
            if count >= num:
                raise RingError(f"chain at slot {head} is longer than the ring ({num})")
            addr, length, buf_id, flags = _pdesc_unpack(desc, 16 * i)
            count += 1
            if flags & F_INDIRECT:
                if flags & F_NEXT or count != 1:
                    raise RingError(f"chain at slot {head}: indirect descriptor in a chain")
                if not self.indirect:
                    raise RingError(f"chain at slot {head}: indirect descriptor without "
                                    f"VIRTIO_RING_F_INDIRECT_DESC")
                self._walk_indirect(head, addr, length, readable, writable, written)
                return buf_id, 1, readable, writable
            self._take(head, addr, length, flags, readable, writable, written)
            if not flags & F_NEXT:
                return buf_id, count, readable, writable
            i += 1
            if i == num:
                i = 0

    def _walk_indirect(self, head: int, addr: int, length: int, readable: list[memoryview],
                       writable: list[memoryview],
                       written: list[tuple[int, int]] | None) -> None:
        if length == 0 or length % 16 or length // 16 > VIRTQ_MAX_SIZE:
            raise RingError(f"chain at slot {head}: indirect table length {length}")
        try:
            table = self.memory.gpa(addr, length)  # type: ignore[union-attr]
        except GuestMemoryError as e:
            raise RingError(f"chain at slot {head}: indirect table: {e}") from e
        for off in range(0, length, 16):
            a, n, _id, flags = _pdesc_unpack(table, off)
            if flags & F_INDIRECT:
                raise RingError(f"chain at slot {head}: indirect descriptor inside an "
                                f"indirect table")
            self._take(head, a, n, flags, readable, writable, written)

    def _take(self, head: int, addr: int, length: int, flags: int,
              readable: list[memoryview], writable: list[memoryview],
              written: list[tuple[int, int]] | None) -> None:
        """Add one descriptor's buffer to the chain being resolved."""
        try:
            if flags & F_WRITE:
                self.memory.gpa_iov(addr, length, writable)  # type: ignore[union-attr]
                if written is not None:
                    written.append((addr, length))
            else:
                if writable:
                    raise RingError(f"chain at slot {head}: readable descriptor after a "
                                    f"writable one")
                self.memory.gpa_iov(addr, length, readable)  # type: ignore[union-attr]
        except GuestMemoryError as e:
            raise RingError(f"chain at slot {head}: {e}") from e

    def _push(self, buf_id: int, length: int, count: int) -> None:
        """Write the used descriptor for a chain of ``count`` slots."""
        desc = self.desc
        if desc is None:
            return
        if not self._batch:
            self._batch_old = self.used_idx
            self._batch_wrapped = False
        slot = self.used_idx
        wrap = self.used_wrap
        off = 16 * slot
        _ID_LEN.pack_into(desc, off + 8, length, buf_id)
        flags = (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED) if wrap else 0
        # id and len before flags: x86 keeps the stores in this order.
        self._desc16[(off + 14) >> 1] = flags  # type: ignore[index]
        if self.dirty_log is not None or self.tracker is not None:
            self._mark_ring(off, 16)
        pos = slot + count
        if pos >= self.size:
            pos -= self.size
            self.used_wrap ^= 1
            self._batch_wrapped = True
        self.used_idx = pos
        if self.inflight is not None:
            # In order, the chain completed here was taken at this very slot.
            self.inflight.completed(slot, slot, wrap, pos, self.used_wrap)
        self._batch.append(buf_id)
        self.requests += 1

    def complete(self, head: int, length: int, publish: bool = True) -> None:
        """Completion of an outstanding chain (by buffer id); its used descriptor, and
        those of younger chains that completed before it, are written in take order."""
        self.outstanding -= 1
        written = self._pending_writes.pop(head, None)
        entry = self._by_id.pop(head, None)
        if entry is not None and self.started and not self.broken and self.desc is not None:
            if written:
                self._mark_writes(written, length)
            entry[2] = length
            order = self._order
            while order and order[0][2] is not None:
                buf_id, count, n = order.popleft()
                self._push(buf_id, n, count)  # type: ignore[arg-type]
            if publish:
                self._publish()
        if not self.outstanding and self._idle_waiters:
            self._idle()

    def _mark_ring(self, offset: int, length: int) -> None:
        # The used "ring" of a packed queue is the descriptor ring itself.
        if self.dirty_log is not None and self.addr_flags & 1:
            self.dirty_log.mark(self.desc_addr + offset, length)
        if self.tracker is not None:
            self.tracker.mark(self.desc_addr + offset, length)

    def _publish(self) -> None:
        if not self._batch or self.desc is None:
            return
        self._batch = []
        if self._needs_signal(self._batch_old, self.used_idx):
            _signal(self.call_fd)

    def _needs_signal(self, old: int, new: int) -> bool:
        full_barrier()
        off_wrap, flags = struct.unpack_from("<HH", self.avail, 0)
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            return True
        if self._batch_wrapped or not self._signalled_valid:
            self._signalled_valid = True
            return True  # over-signalling is always safe
        off = off_wrap & 0x7FFF
        if off_wrap >> 15 != self.used_wrap:
            off -= self.size
        return ((new - off - 1) & 0xFFFF) < ((new - old) & 0xFFFF)

    # ---- reconnect ---------------------------------------------------------
    def _recover_inflight(self) -> None:
        """Take the ring position and the chains in flight from the region (see
        vhostd/engine/inflight.py); a fresh region starts at the front end's base."""
        inflight = self.inflight
        assert inflight is not None and self.desc is not None
        if not inflight.valid:
            inflight.init(self.size, self.used_idx, self.used_wrap)
            return
        size = self.size
        sent = self.base()
        chains = inflight.pending()
        expect = None
        total = 0
        for slot, count, lap in chains:
            total += count
            if not 1 <= count <= size or total > size or expect not in (None, (slot, lap)):
                self.fail(f"inflight region is inconsistent: chain at slot {slot} (lap "
                          f"{lap}, {count} slots) does not follow the one before it")
                return
            expect = _advance(slot, lap, count, size)
        # The oldest chain's used descriptor may have been published just before the
        # crash: its head slot then carries the USED bit of the chain's lap (also if
        # the driver has since made the slot available again for the next lap).
        done = 0
        while chains:
            slot, count, lap = chains[0]
            flags = _u16_unpack(self.desc, 16 * slot + 14)[0]
            if bool(flags & VRING_PACKED_DESC_F_USED) != bool(lap):
                break
            inflight.completed(slot, slot, lap, *_advance(slot, lap, count, size))
            chains.pop(0)
            done += 1
        position = inflight.position()
        if chains:
            head, _, lap = chains[0]
            if position != (head, lap):
                log.warning("%s: inflight region's used position %s is not that of its "
                            "oldest chain in flight (slot %d, lap %d); using the chain's",
                            self.name, position, head, lap)
            self.used_idx, self.used_wrap = head, lap
            slot, count, lap = chains[-1]
            self.last_avail_idx, self.avail_wrap = _advance(slot, lap, count, size)
        else:
            if position[0] >= size or position[1] > 1:
                self.fail(f"inflight region's used position {position} is not on the ring")
                return
            self.used_idx, self.used_wrap = position
            self.last_avail_idx, self.avail_wrap = position
        if done or chains:
            log.info("%s: inflight region: %d request(s) completed by the previous back "
                     "end, resubmitting %d request(s)", self.name, done, len(chains))
        log.info("%s: ring position %#x from the inflight region (the front end sent %#x)",
                 self.name, self.base(), sent)
        self._resubmit = [slot for slot, _, _ in chains]

    def resubmit(self) -> None:
        """Serve the chains recovered from the inflight region again, oldest first,
        from the copies of their descriptors (their head slots may already hold used
        descriptors written before the crash)."""
        slots = self._resubmit
        inflight = self.inflight
        if not slots or not self.ready or inflight is None:
            return
        self._resubmit = []

        def serve_all() -> None:
            for slot in slots:
                saved = inflight.chain(slot)
                written: list[tuple[int, int]] = []
                buf_id, count, readable, writable = self._walk(0, written, saved)
                if 16 * count != len(saved):
                    raise RingError(f"saved chain at slot {slot} ends after {count} of "
                                    f"{len(saved) // 16} descriptors")
                if buf_id in self._by_id:
                    raise RingError(f"buffer id {buf_id} in flight twice")
                n = self.handler(buf_id, readable, writable)
                if n >= 0 and not self._order:
                    self._mark_writes(written, n)
                    self._push(buf_id, n, count)
                else:
                    self._hold(buf_id, count, n, written)

        self._guarded(serve_all, "resubmitting requests")


def _advance(slot: int, lap: int, count: int, size: int) -> tuple[int, int]:
    """The ring position ``count`` slots after (slot, lap)."""
    slot += count
    if slot >= size:
        return slot - size, lap ^ 1
    return slot, lap


def set_layout(q: SplitVirtqueue, packed: bool) -> None:
    """Make ``q`` a packed or a split queue, keeping its configuration and fds."""
    if packed and not isinstance(q, PackedVirtqueue):
        q.__class__ = PackedVirtqueue
        q._init_packed()  # type: ignore[attr-defined]
    elif not packed and isinstance(q, PackedVirtqueue):
        q.__class__ = SplitVirtqueue
