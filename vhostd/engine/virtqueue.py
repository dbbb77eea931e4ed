"""Device side of a split virtqueue: the data-path engine.

Hot path rules (docs/architecture.md): guest ring memory is read and written with
precompiled ``struct.Struct`` objects on memoryviews, never with construct; a kick
drains every available chain, and the used index is published and the driver
signalled once per batch. Everything read from the ring is hostile: indices,
lengths, chain shapes and addresses are checked, and a ring that breaks the rules
stops with a log line and a signal on its err fd instead of harming the daemon.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable

from vhostd_proto.vhost_user import VHOST_VRING_F_LOG
from vhostd_proto.virtio import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_MAX_SIZE,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)

from ..core import events
from .barrier import full_barrier
from .dirtylog import DirtyLog, written_ranges
from .dirtytrack import WriteTracker
from .inflight import InflightQueue
from .loop import FdWatcher
from .memory import GuestMemory, GuestMemoryError
from .timer import OneShotTimer

log = logging.getLogger(__name__)

# Field layouts of vhostd_proto.virtio.VirtqDesc / VirtqUsedElem, precompiled.
DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")
U16 = struct.Struct("<H")
_desc_unpack = DESC.unpack_from
_u16_unpack = U16.unpack_from
_used_pack = USED_ELEM.pack_into

VHOST_VRING_F_LOG_MASK = 1 << VHOST_VRING_F_LOG

# Kick batching (EVENT_IDX): after a drain of n chains, avail_event is set up to
# n/2 (at most KICK_AHEAD_MAX) entries past the device's position, so a driver that
# keeps its queue full kicks once per several requests, and the device publishes
# (and interrupts) once per bigger batch. Under TCG kicks and interrupts cost the
# guest far more than serving costs vhostd (docs/performance.md). A fallback timer
# (``defer``, kick_wait_us()) looks at the ring anyway, so entries the driver adds
# without crossing avail_event wait at most that long.
KICK_AHEAD_MAX = 16
# ``vhostd --kick-batch-wait=US`` (0: no batching); the variable reaches queue workers.
KICK_WAIT_ENV = "VHOSTD_KICK_BATCH_WAIT_US"
KICK_WAIT_DEFAULT_US = 100


def kick_wait_us() -> int:
    """The fallback wait of kick batching in microseconds; 0 turns batching off."""
    try:
        return max(0, int(os.environ.get(KICK_WAIT_ENV, KICK_WAIT_DEFAULT_US)))
    except ValueError:
        return KICK_WAIT_DEFAULT_US

# Handler result meaning "the device completes this request later" with
# complete(head, length): storage that waits, an admin command that waits for a member.
# Such requests are ``outstanding``; whatever needs a quiet ring waits for them with
# quiesce() / when_idle() instead of blocking.
PENDING = -1

# A request handler gets the chain head and the device-readable and device-writable
# buffers in chain order; it returns the used length, or PENDING.
Handler = Callable[[int, list[memoryview], list[memoryview]], int]


def scatter(data: bytes, bufs: list[memoryview]) -> int:
    """Copy ``data`` into device-writable buffers in order, as far as they reach; the
    number of bytes written."""
    off = 0
    for buf in bufs:
        if off == len(data):
            break
        n = min(len(buf), len(data) - off)
        buf[:n] = data[off:off + n]
        off += n
    return off


class RingError(Exception):
    """The driver broke the virtqueue rules; the queue must stop."""


def _signal(fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass  # counter saturated: the reader will wake anyway
    except OSError as e:
        log.warning("cannot signal eventfd %d: %s", fd, e)


class SplitVirtqueue:
    """One split virtqueue of a device.

    Configuration arrives piecewise (SET_VRING_NUM/BASE/ADDR, kick/call/err fds);
    :meth:`start` resolves the ring addresses against guest memory and
    :meth:`process` drains it.
    """

    def __init__(self, index: int, handler: Handler, max_size: int = VIRTQ_MAX_SIZE,
                 name: str = "") -> None:
        self.index = index
        self.handler = handler
        self.max_size = max_size
        self.name = name or f"vq{index}"
        self.size = 0
        # Ring addresses are kept guest-physical; SET_VRING_ADDR's front-end virtual
        # addresses wait in _qva until a memory table can translate them.
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self._qva: tuple[int, int, int] | None = None
        self._have_gpa = False
        self.log_addr = 0
        self.addr_flags = 0
        self.vector = 0  # MSI-X vector as device parts carry it; no vhost-user meaning
        self.last_avail_idx = 0
        self.used_idx = 0
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.started = False
        self.enabled = False
        self.broken = False
        self.suspended = False  # the owner stopped the member: touch no guest memory
        self.event_idx = False
        self.indirect = False
        self.inflight: InflightQueue | None = None
        self.memory: GuestMemory | None = None
        self.desc: memoryview | None = None
        self.avail: memoryview | None = None
        self.used: memoryview | None = None
        # The used ring as 16-bit words: fields the driver reads while the device runs
        # (used.idx, avail_event) must change with one store. struct.pack_into zeroes
        # a field before writing it, so a driver could read 0 in between.
        self._used16: memoryview | None = None
        self._desc16: memoryview | None = None  # a packed ring's, for the same reason
        self._used_event_off = 0
        self._avail_event_off = 0
        self._batch: list[int] = []  # heads whose used entries are not yet published
        self._signalled_used = 0
        self._signalled_valid = False
        self.dirty_log: DirtyLog | None = None  # set while QEMU migrates (LOG_ALL)
        self.tracker: WriteTracker | None = None  # set while the owner tracks writes
        # The device writes its last writable byte whatever the used length says
        # (virtio-blk's status byte); set by the device's make_handler.
        self.status_tail = False
        self._pending_writes: dict[int, list[tuple[int, int]]] = {}
        self.requests = 0  # statistics: chains completed
        # Arms a short timer that calls process(): set while this process serves the
        # ring with its kick eventfd; it lets avail_event run ahead (kick batching).
        self.defer: Callable[[], None] | None = None
        self._timer: OneShotTimer | None = None
        self.kicks = 0  # statistics: driver notifications read from the kick eventfd
        self._resubmit: list[int] = []
        self.outstanding = 0  # requests the device completes later (handler said PENDING)
        self.quiescing = False  # take no new chains: a stop waits for the outstanding ones
        self._idle_waiters: list[Callable[[], None]] = []
        # Called around each walk of the ring (the device's make_handler sets them): a
        # storage that queues submissions hands a walk's worth to the kernel at once.
        self.walk_begin: Callable[[], None] | None = None
        self.walk_end: Callable[[], None] | None = None

    # ---- moving between processes (queue workers) ----------------------------
    # A ring at rest (every taken chain completed and published) is fully described
    # by its configuration and its position; fds and mappings travel separately.
    CONFIG_FIELDS = ("index", "size", "desc_addr", "avail_addr", "used_addr", "log_addr",
                     "addr_flags", "event_idx", "indirect", "enabled", "max_size", "name")
    POSITION_FIELDS = ("last_avail_idx", "used_idx", "_signalled_used", "_signalled_valid",
                       "requests", "kicks", "_resubmit", "broken")

    def export_state(self) -> dict[str, object]:
        """Configuration and position of a resolved ring at rest."""
        assert not self._batch and not self.outstanding, "ring is not at rest"
        state: dict[str, object] = {f: getattr(self, f)
                                    for f in self.CONFIG_FIELDS + self.POSITION_FIELDS}
        state["packed"] = False
        state["inflight_counter"] = getattr(self.inflight, "counter", 0)
        return state

    def import_position(self, state: dict[str, object]) -> None:
        """Take over the position another process reached with this ring."""
        for f in self.POSITION_FIELDS:
            setattr(self, f, state[f])
        if self.inflight is not None:
            self.inflight.counter = state["inflight_counter"]

    def import_state(self, state: dict[str, object], memory: GuestMemory) -> None:
        """Become the ring ``state`` describes, running on ``memory``."""
        for f in self.CONFIG_FIELDS:
            setattr(self, f, state[f])
        self._qva = None
        self._have_gpa = True
        self.memory = memory
        self.started = True
        self.import_position(state)
        self.resolve()
        attach = getattr(self.inflight, "attach", None)
        if attach is not None:
            attach(self)  # --check-rings

    # ---- configuration -----------------------------------------------------
    def set_num(self, num: int) -> None:
        if num == 0 or num & (num - 1) or num > self.max_size:
            raise ValueError(f"queue size {num} is not a power of two up to {self.max_size}")
        self.size = num

    def set_addr(self, flags: int, desc: int, used: int, avail: int, log_addr: int) -> None:
        """Ring addresses from SET_VRING_ADDR (front-end virtual addresses)."""
        self.addr_flags = flags
        self._qva = (desc, used, avail)
        self.log_addr = log_addr

    def set_gpa(self, desc: int, avail: int, used: int) -> None:
        """Ring addresses in guest-physical space (from device parts)."""
        self._qva = None
        self.desc_addr, self.avail_addr, self.used_addr = desc, avail, used
        self._have_gpa = True

    def translate_addr(self) -> None:
        """Turn pending front-end virtual ring addresses into guest-physical ones."""
        if self._qva is None or self.memory is None:
            return
        desc, used, avail = self._qva
        try:
            gpas = [self.memory.qva_to_gpa(a) for a in (desc, avail, used)]
        except GuestMemoryError as e:
            raise RingError(f"{self.name}: ring not in guest memory: {e}") from e
        self.desc_addr, self.avail_addr, self.used_addr = gpas
        self._qva = None
        self._have_gpa = True

    def ring_gpas(self) -> tuple[int, int, int] | None:
        """The guest-physical (descriptor, driver, device) area addresses of a configured
        ring whose addresses translate; None otherwise."""
        if not self.configured:
            return None
        try:
            self.translate_addr()
        except RingError:
            return None
        return (self.desc_addr, self.avail_addr, self.used_addr) if self._qva is None else None

    def unconfigure(self) -> None:
        """Forget size and addresses (device reset, or parts saying "not set up")."""
        self.size = 0
        self._qva = None
        self._have_gpa = False
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.drop_views()
        self.last_avail_idx = self.used_idx = 0
        self.vector = 0

    @property
    def configured(self) -> bool:
        return bool(self.size) and (self._qva is not None or self._have_gpa)

    def set_features(self, event_idx: bool, indirect: bool) -> None:
        self.event_idx = event_idx
        self.indirect = indirect

    # ---- lifecycle ---------------------------------------------------------
    def start(self, memory: GuestMemory) -> None:
        """Resolve the ring against guest memory and pick up where the driver is.

        The used index is read from guest memory; with an inflight region, chains
        that were taken but not completed by an earlier back end are resubmitted.
        """
        if not self._begin(memory):
            return
        try:
            self.resolve()
        except RingError as e:
            self.fail(str(e))
            return
        self.used_idx = _u16_unpack(self.used, 2)[0]
        self._signalled_valid = False
        if self.inflight is not None:
            attach = getattr(self.inflight, "attach", None)
            if attach is not None:
                attach(self)  # --check-rings
            self._recover_inflight()

    def _begin(self, memory: GuestMemory) -> bool:
        """Common start: mark the ring started; False if it has nothing to run yet."""
        self.memory = memory
        self.started = True
        self.broken = False
        self._resubmit = []  # only this start's inflight recovery may fill it
        # Kick fd before any configuration: the ring waits for its addresses (from
        # the front end or from device parts) and starts then.
        return self.configured

    def resolve(self) -> None:
        """(Re)translate ring addresses, e.g. after the memory table changed."""
        if self.memory is None or not self.size:
            raise RingError(f"{self.name}: started without a size or memory table")
        self.translate_addr()
        n = self.size
        try:
            self.desc = self.memory.gpa(self.desc_addr, desc_table_size(n))
            self.avail = self.memory.gpa(self.avail_addr, avail_ring_size(n))
            self.used = self.memory.gpa(self.used_addr, used_ring_size(n))
            self._used16 = self.used.cast("H")
        except GuestMemoryError as e:
            self.drop_views()
            raise RingError(f"{self.name}: ring not in guest memory: {e}") from e
        self._used_event_off = 4 + 2 * n
        self._avail_event_off = 4 + 8 * n

    def stop(self) -> int:
        """Stop the ring and return the next available index to process.

        Callers wait for :meth:`quiesce` first, so nothing this queue took is still
        outstanding; publish what is left before answering. A request still at the
        device (a forced stop) stays flagged in the inflight region, and its late
        completion is dropped: a restarted back end serves it again.
        """
        if self.outstanding:
            log.warning("%s: stopped with %d request(s) still at the device", self.name,
                        self.outstanding)
        if self.started and not self.broken:
            self._publish()
        self.started = False
        self.quiescing = False
        self._resubmit = []
        self.drop_views()
        return self.base()

    def quiesce(self, callback: Callable[[], None]) -> None:
        """Take no new chains, and call ``callback`` once every taken chain has completed
        and its used entry is published (now, if none is outstanding)."""
        self.quiescing = True
        self.when_idle(callback)

    def when_idle(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once no request is outstanding (now, if none is)."""
        if not self.outstanding:
            if self.started and not self.broken:
                self._publish()
            callback()
        else:
            self._idle_waiters.append(callback)

    def _idle(self) -> None:
        if self.started and not self.broken:
            self._publish()
        waiters, self._idle_waiters = self._idle_waiters, []
        for cb in waiters:
            try:
                cb()
            except Exception:
                log.exception("%s: internal error after the last outstanding request",
                              self.name)

    def base(self) -> int:
        """The ring position GET_VRING_BASE reports: the next available index."""
        return self.last_avail_idx

    def suspend(self) -> None:
        """The owner stops the member: publish what is complete, then touch nothing."""
        if self.started and not self.broken:
            self._publish()
        self.suspended = True

    def start_batching(self, watcher: FdWatcher) -> None:
        """Kick batching, served by this process: the fallback timer on ``watcher``
        (none with ``--kick-batch-wait=0``). OSError: no timerfd."""
        self.stop_batching()
        wait = kick_wait_us()
        if wait:
            self._timer = OneShotTimer(watcher, self.process, wait)
            self.defer = self._timer.arm

    def stop_batching(self) -> None:
        """This process stops serving the ring: a kick for every request, no timer."""
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        self.defer = None

    def drop_views(self) -> None:
        """Forget the ring's views of guest memory (they pin its mappings)."""
        self.desc = self.avail = self.used = self._used16 = self._desc16 = None

    def detach_memory(self) -> None:
        self.drop_views()
        self.memory = None

    def fail(self, why: str) -> None:
        """Stop processing: the driver broke the ring (or its memory vanished)."""
        if not self.broken:
            log.error("%s: %s; queue stopped until the front end restarts it", self.name, why)
            events.emit(events.DEVICE_NEEDS_RESET, device=self.name.partition("/")[0],
                        queue=self.index, reason=why)
        self.broken = True
        _signal(self.err_fd)

    @property
    def ready(self) -> bool:
        return (self.started and self.enabled and not self.broken and not self.suspended
                and not self.quiescing and self.avail is not None)

    def describe(self) -> str:
        """One line of state for a person (SIGUSR1)."""
        state = ("broken" if self.broken else "suspended" if self.suspended
                 else "running" if self.ready else "started" if self.started
                 else "stopped")
        return (f"{self.name}: {state}, size {self.size}, {self.position()}, "
                f"served {self.requests}, kicks {self.kicks}, outstanding {self.outstanding}")

    def position(self) -> str:
        line = f"next avail {self.last_avail_idx}, next used {self.used_idx}"
        if self.avail is not None and self.used is not None:
            line += (f" (guest memory: avail.idx {_u16_unpack(self.avail, 2)[0]}, "
                     f"used.idx {_u16_unpack(self.used, 2)[0]})")
        return line

    # ---- data path ---------------------------------------------------------
    def kicked(self, fd: int) -> bool:
        """The kick eventfd ``fd`` is readable: count the kicks and serve the ring.
        False if the fd cannot be read: the ring has failed and the caller must stop
        watching the fd, or the loop would spin on it."""
        try:
            self.kicks += os.eventfd_read(fd)
        except BlockingIOError:
            pass
        except OSError as e:
            self.stop_batching()
            self.fail(f"cannot read the kick eventfd: {e.strerror}")
            return False
        self.process()
        return True

    def process(self) -> None:
        """Drain every available chain, then publish and signal once."""
        if not self.ready:
            return
        begin = self.walk_begin
        if begin is not None:
            begin()
            try:
                self._process()
            finally:
                self.walk_end()  # type: ignore[misc]
        else:
            self._process()

    def _process(self) -> None:
        if self._resubmit:
            self.resubmit()
            if not self.ready:
                return
        self._guarded(self._drain, "serving the ring")

    def _guarded(self, work: Callable[[], None], what: str) -> None:
        """Run ``work`` (which serves chains), then publish. A broken ring stops; so
        does a bug (not the driver's fault): completed work is still published and
        the queue stops rather than report a position past a request it lost."""
        try:
            work()
        except RingError as e:
            self._publish()
            self.fail(str(e))
            return
        except Exception as e:
            log.exception("%s: internal error %s", self.name, what)
            self._publish()
            self.fail(f"internal error: {e!r}")
            return
        self._publish()

    def _drain(self) -> None:
        avail = self.avail
        num = self.size
        handler = self.handler
        walk = self._walk
        inflight = self.inflight
        push = self.push_used
        served = 0
        while True:
            avail_idx = _u16_unpack(avail, 2)[0]
            pending = (avail_idx - self.last_avail_idx) & 0xFFFF
            if pending == 0:
                if not self.event_idx:
                    return
                # Ask for a kick at the next entry (or a few later: kick batching),
                # then look once more: the driver may have added one before it could
                # see the new avail_event.
                defer = self.defer
                ahead = min(served >> 1, KICK_AHEAD_MAX) if defer is not None else 0
                self._used16[self._avail_event_off >> 1] = (  # type: ignore[index]
                    self.last_avail_idx + ahead) & 0xFFFF
                if self.dirty_log is not None or self.tracker is not None:
                    self._mark_used(self._avail_event_off, 2)
                full_barrier()
                if _u16_unpack(avail, 2)[0] == self.last_avail_idx:
                    if ahead:
                        defer()  # type: ignore[misc]
                    return
                continue
            served += pending
            if pending > num:
                raise RingError(f"avail index jumped from {self.last_avail_idx} to {avail_idx} "
                                f"on a queue of {num}")
            logging = self.dirty_log is not None or self.tracker is not None
            for _ in range(pending):
                slot = 4 + 2 * (self.last_avail_idx % num)
                head = _u16_unpack(avail, slot)[0]
                if head >= num:
                    raise RingError(f"available head {head} is not below queue size {num}")
                if not logging:
                    readable, writable = walk(head)
                else:
                    written: list[tuple[int, int]] = []
                    readable, writable = walk(head, written)
                self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
                if inflight is not None:
                    inflight.take(head)
                n = handler(head, readable, writable)
                if logging:
                    if n >= 0:
                        self._mark_writes(written, n)
                    else:
                        self._pending_writes[head] = written
                if n >= 0:
                    push(head, n)
                else:
                    self.outstanding += 1

    def _walk(self, head: int, written: list[tuple[int, int]] | None = None
              ) -> tuple[list[memoryview], list[memoryview]]:
        """Resolve a descriptor chain into readable and writable buffer views.

        With ``written``, also collect the guest-physical ranges the device may
        write, for the dirty log."""
        table = self.desc
        table_len = self.size
        gpa_iov = self.memory.gpa_iov  # type: ignore[union-attr]
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        i = head
        seen = 0
        in_indirect = False
        while True:
            if seen >= table_len:
                raise RingError(f"chain at head {head} is longer than its table "
                                f"({table_len}) or loops")
            seen += 1
            addr, length, flags, nxt = _desc_unpack(table, 16 * i)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    raise RingError(f"chain at head {head}: indirect descriptor inside an "
                                    f"indirect table")
                if not self.indirect:
                    raise RingError(f"chain at head {head}: indirect descriptor without "
                                    f"VIRTIO_RING_F_INDIRECT_DESC")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise RingError(f"chain at head {head}: indirect descriptor with NEXT")
                if length == 0 or length % 16 or length // 16 > VIRTQ_MAX_SIZE:
                    raise RingError(f"chain at head {head}: indirect table length {length}")
                try:
                    table = self.memory.gpa(addr, length)  # type: ignore[union-attr]
                except GuestMemoryError as e:
                    raise RingError(f"chain at head {head}: indirect table: {e}") from e
                table_len = length // 16
                in_indirect = True
                i = 0
                seen = 0
                continue
            try:
                if flags & VIRTQ_DESC_F_WRITE:
                    gpa_iov(addr, length, writable)
                    if written is not None:
                        written.append((addr, length))
                else:
                    if writable:
                        raise RingError(f"chain at head {head}: readable descriptor after a "
                                        f"writable one")
                    gpa_iov(addr, length, readable)
            except GuestMemoryError as e:
                raise RingError(f"chain at head {head}: {e}") from e
            if not flags & VIRTQ_DESC_F_NEXT:
                return readable, writable
            i = nxt
            if i >= table_len:
                raise RingError(f"chain at head {head}: next index {i} is outside its "
                                f"table of {table_len}")

    def push_used(self, head: int, length: int) -> None:
        """Write a used entry; it becomes visible at the next publish."""
        used = self.used
        if used is None:
            return
        _used_pack(used, 4 + 8 * (self.used_idx % self.size), head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._batch.append(head)
        self.requests += 1

    def complete(self, head: int, length: int, publish: bool = True) -> None:
        """Completion of a PENDING request, in any order: write its used entry and
        (unless ``publish`` is False: the caller completes a batch and calls
        :meth:`publish` once) publish it and signal the driver."""
        self.outstanding -= 1
        written = self._pending_writes.pop(head, None)
        if self.started and not self.broken and self.used is not None:
            if written is None and (self.dirty_log is not None or self.tracker is not None):
                # Taken before logging began: its buffers are still the device's until
                # the used entry is written, so walk the chain again to learn them.
                written = []
                try:
                    self._walk(head, written)
                except RingError as e:
                    self.fail(str(e))
                    written = None
            if not self.broken:
                if written:
                    self._mark_writes(written, length)
                self.push_used(head, length)
                if publish:
                    self._publish()
        if not self.outstanding and self._idle_waiters:
            self._idle()

    def publish(self) -> None:
        """Publish used entries written by ``complete(..., publish=False)``."""
        if self.started and not self.broken:
            self._publish()

    def _publish(self) -> None:
        batch = self._batch
        if not batch or self.used is None:
            return
        old = (self.used_idx - len(batch)) & 0xFFFF
        new = self.used_idx
        # x86-64 keeps stores in order, so the used entries are visible before idx.
        self._used16[1] = new  # type: ignore[index]
        if self.dirty_log is not None or self.tracker is not None:
            # Entries, idx and avail_event all live in the used ring.
            self._mark_used(0, used_ring_size(self.size))
        if self.inflight is not None:
            self.inflight.completed(batch, new)
        self._batch = []
        if self._needs_signal(old, new):
            _signal(self.call_fd)

    def _mark_writes(self, written: list[tuple[int, int]], used: int) -> None:
        """Mark what a chain's used length says the device wrote, not every byte it
        could have written (a refused request writes its status byte only)."""
        ranges = written_ranges(written, used, self.status_tail)
        for log in (self.dirty_log, self.tracker):
            if log is not None:
                for gpa, length in ranges:
                    log.mark(gpa, length)

    def _mark_used(self, offset: int, length: int) -> None:
        """Used-ring bytes written: QEMU's log wants them at log_guest_addr (when the
        ring asked for logging), the owner's tracker at the ring's own address."""
        if self.dirty_log is not None and self.addr_flags & VHOST_VRING_F_LOG_MASK:
            self.dirty_log.mark(self.log_addr + offset, length)
        if self.tracker is not None:
            self.tracker.mark(self.used_addr + offset, length)

    def _needs_signal(self, old: int, new: int) -> bool:
        # used.idx was just stored; the driver's flags or used_event must be read after.
        full_barrier()
        if not self.event_idx:
            return not _u16_unpack(self.avail, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT
        # Entries published since the last signal all count; after (re)start there
        # is no last signal, so signal to be safe.
        valid = self._signalled_valid
        if valid:
            old = self._signalled_used
        self._signalled_used = new
        self._signalled_valid = True
        if not valid:
            return True
        used_event = _u16_unpack(self.avail, self._used_event_off)[0]
        return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)

    # ---- reconnect ---------------------------------------------------------
    def _recover_inflight(self) -> None:
        inflight = self.inflight
        assert inflight is not None and self.used is not None
        if not inflight.valid:
            inflight.init(self.size, self.used_idx)
            return
        # A batch published just before a crash is still flagged: the used ring
        # itself says which heads it holds.
        # The used ring is guest memory: take only head ids that can exist, and no
        # more entries than the ring holds.
        published = min((self.used_idx - inflight.used_idx) & 0xFFFF, self.size)
        done = [head for i in range(inflight.used_idx, inflight.used_idx + published)
                if (head := USED_ELEM.unpack_from(self.used, 4 + 8 * (i % self.size))[0])
                < self.size]
        inflight.settle(done, self.used_idx)
        heads = inflight.pending_heads()
        if heads:
            log.info("%s: resubmitting %d request(s) left in flight by the previous "
                     "back end", self.name, len(heads))
        # The front end sent the used index as base; the chains in flight follow it.
        self.last_avail_idx = (self.used_idx + len(heads)) & 0xFFFF
        self._resubmit = heads

    def resubmit(self) -> None:
        """Run chains recovered from the inflight region, oldest first."""
        heads = self._resubmit
        if not heads or not self.ready:
            return
        self._resubmit = []

        def serve_all() -> None:
            for head in heads:
                written: list[tuple[int, int]] = []
                readable, writable = self._walk(head, written)
                self._serve(head, readable, writable, written)

        self._guarded(serve_all, "resubmitting requests")

    def _serve(self, head: int, readable: list[memoryview], writable: list[memoryview],
               written: list[tuple[int, int]]) -> None:
        """Hand a resolved chain to the device and account for its writes."""
        n = self.handler(head, readable, writable)
        if n >= 0:
            self._mark_writes(written, n)
            self.push_used(head, n)
        else:
            self.outstanding += 1
            self._pending_writes[head] = written
