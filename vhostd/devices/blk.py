"""virtio-blk device on a :class:`~vhostd.storage.StorageBackend`.

The request handler is the hottest code in the daemon: it parses the 16-byte
request header with a precompiled struct, hands the data to the storage backend in
one vectored call straight between guest memory and the store, and writes the status
byte. When the storage completes inline (a page-cache hit) so does the request; else
the handler returns PENDING and the storage's completion, on the loop thread, writes
the status byte and completes the request on its queue.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from vhostd_proto.virtio_admin import PartType
from vhostd_proto.virtio_blk import (
    BLK_CONFIG_WCE_OFFSET,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_SECTOR_SIZE,
    VIRTIO_BLK_T_BARRIER,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    BlkConfig,
    BlkFeature,
    BlkRequestType,
    BlkStatus,
)

from ..core import events
from ..engine.loop import FdWatcher
from ..engine.virtqueue import PENDING, Handler, SplitVirtqueue, scatter
from ..storage.base import PENDING as STORAGE_PENDING
from ..storage.base import StorageBackend
from ..storage.registry import storage_from_spec
from .ratelimit import RateLimitedLog
from .stats import (
    OP_DISCARD,
    OP_FLUSH,
    OP_GET_ID,
    OP_OTHER,
    OP_READ,
    OP_WRITE,
    OP_WRITE_ZEROES,
    OPS,
    QueueStats,
)

log = logging.getLogger(__name__)

# Field layouts of vhostd_proto.virtio_blk.BlkOuthdr / DiscardWriteZeroes.
OUTHDR = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")

T_IN = BlkRequestType.VIRTIO_BLK_T_IN
T_OUT = BlkRequestType.VIRTIO_BLK_T_OUT
T_FLUSH = BlkRequestType.VIRTIO_BLK_T_FLUSH
T_GET_ID = BlkRequestType.VIRTIO_BLK_T_GET_ID
T_DISCARD = BlkRequestType.VIRTIO_BLK_T_DISCARD
T_WRITE_ZEROES = BlkRequestType.VIRTIO_BLK_T_WRITE_ZEROES
S_OK = BlkStatus.VIRTIO_BLK_S_OK
S_IOERR = BlkStatus.VIRTIO_BLK_S_IOERR
S_UNSUPP = BlkStatus.VIRTIO_BLK_S_UNSUPP
SECTOR = VIRTIO_BLK_SECTOR_SIZE

MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per segment
MAX_DISCARD_SEG = 32
MAX_WRITE_ZEROES_SECTORS = 1 << 22
MAX_WRITE_ZEROES_SEG = 32
SIZE_MAX = 1 << 20
SEG_MAX_QUEUE = 128


@dataclass
class BlkOptions:
    num_queues: int = 1
    queue_size: int = 1024  # largest queue the front end may configure (QEMU's maximum)
    logical_block_size: int = 512
    serial: str = ""
    writeback: bool = True  # initial write-cache mode (the driver can change it)
    # Where the device keeps the state a driver changed (wce), so a restarted daemon
    # serves the guest in the mode it chose: QEMU does not send it again.
    state_path: str | None = None
    # Request tracing: log lines per second (0: off).
    trace_rate: int = 0


class BlkDevice:
    """A virtio-blk device: config space, features and the request handler."""

    def __init__(self, name: str, storage: StorageBackend, options: BlkOptions) -> None:
        if options.logical_block_size < SECTOR or options.logical_block_size & (
            options.logical_block_size - 1
        ):
            raise ValueError(f"logical block size {options.logical_block_size} is not a power "
                             f"of two of at least 512")
        if not 1 <= options.num_queues <= 256:
            raise ValueError(f"num-queues {options.num_queues} is not between 1 and 256")
        qs = options.queue_size
        if qs < 4 or qs > 32768 or qs & (qs - 1):
            raise ValueError(f"queue-size {qs} is not a power of two between 4 and 32768")
        self.name = name
        self.storage = storage
        self.options = options
        self.num_queues = options.num_queues
        self.max_queue_size = options.queue_size
        self.wce = 1 if options.writeback else 0
        self._load_state()
        self.capacity = storage.size() // SECTOR
        self.refused = 0  # requests failed for their shape (logged, rate-limited)
        self.io_errors = 0  # requests the storage failed
        serial = options.serial or os.path.basename(getattr(storage, "path", name))
        self.serial = serial.encode()[:VIRTIO_BLK_ID_BYTES]
        # Request counters per queue (the control socket reads them).
        self.queue_stats = [QueueStats() for _ in range(self.num_queues)]
        self._queues: list[tuple[SplitVirtqueue, dict[int, _Pending], QueueStats]] = []
        storage.on_complete = self._on_complete
        # A storage that reports completions in batches (one read of an NBD socket
        # brings every reply in it) says when a batch ends: its used entries are
        # published, and the driver signalled, once per queue then.
        self._batched = bool(getattr(storage, "batches_completions", False))
        self._unpublished: list[SplitVirtqueue] = []
        self._named_unpublished: set[int] = set()  # rings overdue() named so
        if self._batched:
            storage.on_batch_done = self._publish_batch  # type: ignore[attr-defined]
        self._no_status = RateLimitedLog(log)
        self._error_log = RateLimitedLog(log)
        self._tracer = RateLimitedLog(logging.getLogger("vhostd.trace"),
                                      rate=options.trace_rate, burst=options.trace_rate)
        # Called when a size re-read that completed later changed the capacity.
        self.on_resize: Callable[[], None] | None = None
        self._resizing = False
        self._resize_inline = False

    # ---- VirtioDevice ------------------------------------------------------
    def device_features(self) -> int:
        bits = [
            BlkFeature.VIRTIO_BLK_F_SIZE_MAX,
            BlkFeature.VIRTIO_BLK_F_SEG_MAX,
            BlkFeature.VIRTIO_BLK_F_BLK_SIZE,
            BlkFeature.VIRTIO_BLK_F_TOPOLOGY,
            BlkFeature.VIRTIO_BLK_F_FLUSH,
            BlkFeature.VIRTIO_BLK_F_CONFIG_WCE,
            BlkFeature.VIRTIO_BLK_F_MQ,
            BlkFeature.VIRTIO_BLK_F_DISCARD,
            BlkFeature.VIRTIO_BLK_F_WRITE_ZEROES,
        ]
        if self.storage.read_only:
            bits.append(BlkFeature.VIRTIO_BLK_F_RO)
        return sum(1 << b for b in bits)

    def config(self) -> bytes:
        lbs = self.options.logical_block_size
        per_block = lbs // SECTOR
        return BlkConfig.build({
            "capacity": self.capacity,
            "size_max": SIZE_MAX,
            # What a 128-entry ring can carry without indirect descriptors (QEMU's
            # default queue); with them, one indirect table holds the segments.
            "seg_max": min(self.max_queue_size, SEG_MAX_QUEUE) - 2,
            "cylinders": 0, "heads": 0, "sectors": 0,
            "blk_size": lbs,
            # One logical block per physical block of 4 KiB at least.
            "physical_block_exp": max(0, (4096 // lbs).bit_length() - 1),
            "alignment_offset": 0,
            "min_io_size": 1,
            "opt_io_size": 0,
            "wce": self.wce,
            "num_queues": self.num_queues,
            "max_discard_sectors": MAX_DISCARD_SECTORS,
            "max_discard_seg": MAX_DISCARD_SEG,
            "discard_sector_alignment": max(per_block, 4096 // SECTOR),
            "max_write_zeroes_sectors": MAX_WRITE_ZEROES_SECTORS,
            "max_write_zeroes_seg": MAX_WRITE_ZEROES_SEG,
            "write_zeroes_may_unmap": 1,
            "unused1": b"\0\0\0",
        })

    def get_config(self, offset: int, size: int) -> bytes:
        data = self.config()
        out = data[offset:offset + size]
        return out + bytes(size - len(out))

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        # The driver may write only the write-cache byte.
        if offset != BLK_CONFIG_WCE_OFFSET or len(data) != 1:
            raise ValueError(f"config write of {len(data)} bytes at {offset} is not the wce "
                             f"field")
        if data[0] not in (0, 1):
            raise ValueError(f"wce value {data[0]} is not 0 or 1")
        self._set_wce(data[0])

    def features_acked(self, features: int) -> None:
        pass

    def reset(self) -> None:
        try:
            self._set_wce(1 if self.options.writeback else 0)
        except ValueError as e:
            log.error("%s: reset: %s", self.name, e)
            self.wce = 1 if self.options.writeback else 0

    def _set_wce(self, wce: int) -> None:
        if self.wce == wce:
            return
        log.info("%s: write cache %s", self.name, "writeback" if wce else "writethrough")
        if not wce:
            # What was cached must be stable before writethrough: the flush is issued
            # now; its completion (logged if it fails) does not hold the control path.
            try:
                self.storage.flush(_FLUSH_TOKEN)
            except OSError as e:
                raise ValueError(f"cannot flush before switching to writethrough: {e}") from e
        self.wce = wce
        self._save_state()

    def _load_state(self) -> None:
        path = self.options.state_path
        if not path or not os.path.exists(path):
            return
        try:
            with open(path) as f:
                state = json.load(f)
            wce = int(state["wce"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"unreadable state file {path}: {e}") from e
        if wce not in (0, 1):
            raise ValueError(f"state file {path}: wce {wce} is not 0 or 1")
        self.wce = wce
        log.info("%s: write cache %s (from %s)", self.name,
                 "writeback" if wce else "writethrough", path)

    def _save_state(self) -> None:
        path = self.options.state_path
        if not path:
            return
        tmp = f"{path}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"wce": self.wce}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # a crash leaves the old or the new state, never half
        except OSError as e:
            log.error("%s: cannot save state to %s: %s; a restart would lose it", self.name,
                      path, e)

    def disconnected(self) -> None:
        pass  # config (wce) belongs to the device and outlives a front end

    def close(self) -> None:
        self.storage.close()

    # ---- serving queues in a worker process ----------------------------------
    def worker_spec(self) -> tuple[dict[str, object], list[int]]:
        """What a queue worker needs to serve this device's requests: the current
        driver-visible state and what builds its own storage backend on the same
        store (open files travel as fds, which stay ours; NBD opens its own
        connection)."""
        o = self.options
        storage_spec, fds = self.storage.worker_spec()
        return ({"kind": "blk", "name": self.name, "storage": storage_spec,
                 "wce": self.wce, "capacity": self.capacity,
                 "options": {"num_queues": o.num_queues, "queue_size": o.queue_size,
                             "logical_block_size": o.logical_block_size,
                             "serial": o.serial, "trace_rate": o.trace_rate}}, fds)

    @classmethod
    def from_worker_spec(cls, spec: dict[str, object], fds: list[int]) -> BlkDevice:
        """The worker side of :meth:`worker_spec`; adopts ``fds``."""
        options = BlkOptions(**spec["options"])  # type: ignore[arg-type]
        storage = storage_from_spec(spec["storage"], fds)  # type: ignore[arg-type]
        device = cls(str(spec["name"]), storage, options)
        device.wce = int(spec["wce"])  # type: ignore[call-overload]
        device.capacity = int(spec["capacity"])  # type: ignore[call-overload]
        return device

    # ---- device parts (vendor: the one config byte the driver writes) -------
    def get_parts(self) -> list[tuple[int, bytes]]:
        return [(PartType.VHOSTD_BLK_PART_WCE, bytes([self.wce]))]

    def part_lengths(self) -> list[tuple[int, int]]:
        return [(PartType.VHOSTD_BLK_PART_WCE, 1)]

    def check_part(self, part_type: int, value: bytes) -> None:
        if part_type == PartType.VHOSTD_BLK_PART_WCE and value[0] not in (0, 1):
            raise ValueError(f"wce value {value[0]} is not 0 or 1")

    def apply_part(self, part_type: int, value: bytes) -> None:
        if part_type == PartType.VHOSTD_BLK_PART_WCE:
            self._set_wce(value[0])

    def refresh_capacity(self) -> bool:
        """Re-read the store's size; True if the capacity changed now. A store that
        learns its size later (NBD) calls :attr:`on_resize` then, and the next call
        applies it."""
        if not self._resizing:
            self._resizing = True
            self._resize_inline = True
            self.storage.refresh_size(self._size_refreshed)
            self._resize_inline = False
        capacity = self.storage.size() // SECTOR
        if capacity == self.capacity:
            return False
        log.info("%s: capacity %d -> %d sectors", self.name, self.capacity, capacity)
        self.capacity = capacity
        return True

    def _size_refreshed(self, error: int) -> None:
        self._resizing = False
        if error:
            log.warning("%s: cannot re-read the size: %s", self.name, os.strerror(error))
            return
        if (not self._resize_inline and self.on_resize is not None
                and self.storage.size() // SECTOR != self.capacity):
            self._resizing = True  # the call on_resize makes applies it without a re-read
            try:
                self.on_resize()
            finally:
                self._resizing = False

    # ---- data path ---------------------------------------------------------
    def start(self, watcher: FdWatcher) -> None:
        """Completions of storage requests arrive on ``watcher``'s loop from now on."""
        self.storage.start(watcher)

    def make_handler(self, queue: SplitVirtqueue) -> Handler:
        """The request handler of ``queue``: it completes a request inline (the used
        length) when its storage did, else returns PENDING and completes it through
        :meth:`_on_complete` (``queue.complete``) when the storage reports."""
        storage = self.storage
        unpack_hdr = OUTHDR.unpack_from
        readv = storage.readv
        writev = storage.writev
        read_only = storage.read_only
        qname = queue.name
        queue.status_tail = True  # the status byte ends every request's writable part
        walk_begin = getattr(storage, "walk_begin", None)
        if walk_begin is not None:
            # The storage submits what one walk of the ring took together.
            queue.walk_begin = walk_begin
            queue.walk_end = storage.walk_end  # type: ignore[attr-defined]
        index = queue.index
        stats = QueueStats()
        if index < len(self.queue_stats):
            self.queue_stats[index] = stats
        pending: dict[int, _Pending] = {}
        slot = len(self._queues)
        self._queues.append((queue, pending, stats))
        base = slot << 16
        clock = time.monotonic_ns
        completed = stats.completed

        def handle(head: int, readable: list[memoryview], writable: list[memoryview]) -> int:
            t0 = clock()
            if not writable:
                self._no_status.log(logging.WARNING, "%s: request at head %d has no status "
                                    "byte; dropped", qname, head)
                completed(OP_OTHER, 0, False, clock() - t0)
                return 0
            last = writable[-1]
            status = last[len(last) - 1:]
            if len(last) > 1:
                data_in = writable[:-1]
                data_in.append(last[:-1])
            else:
                data_in = writable[:-1]
            if readable and len(readable[0]) >= 16:
                first = readable[0]
                rtype, _prio, sector = unpack_hdr(first)
                data_out = readable[1:]
                if len(first) > 16:
                    data_out.insert(0, first[16:])
            else:
                # The header is split over descriptors: gather just its 16 bytes.
                hdr, data_out = _split_header(readable)
                if hdr is None:
                    self._refuse(qname, head, "a request header shorter than 16 bytes")
                    status[0] = S_IOERR
                    completed(OP_OTHER, 0, False, clock() - t0)
                    return 1
                rtype, _prio, sector = unpack_hdr(hdr)
            rtype &= ~VIRTIO_BLK_T_BARRIER
            try:
                if rtype == T_IN:
                    n = sum(map(len, data_in))
                    if sector + ((n + SECTOR - 1) >> 9) > self.capacity:
                        self._refuse(qname, head, f"a read of {n} bytes at sector {sector} "
                                     f"beyond the capacity of {self.capacity} sectors")
                        status[0] = S_IOERR
                        completed(OP_READ, 0, False, clock() - t0)
                        return 1
                    if readv(data_in, sector << 9, base | head):
                        pending[head] = _Pending(status, n + 1, OP_READ, n, t0, rtype, sector)
                        stats.in_flight += 1
                        return PENDING
                    status[0] = S_OK
                    completed(OP_READ, n, True, clock() - t0)
                    return n + 1
                if rtype == T_OUT:
                    n = sum(map(len, data_out))
                    if read_only or sector + ((n + SECTOR - 1) >> 9) > self.capacity:
                        if not read_only:
                            self._refuse(qname, head, f"a write of {n} bytes at sector "
                                         f"{sector} beyond the capacity of {self.capacity} "
                                         f"sectors")
                        status[0] = S_IOERR
                        completed(OP_WRITE, 0, False, clock() - t0)
                        return 1
                    if writev(data_out, sector << 9, base | head):
                        p = _Pending(status, 1, OP_WRITE, n, t0, rtype, sector)
                        p.then_flush = not self.wce
                        pending[head] = p
                        stats.in_flight += 1
                        return PENDING
                    if not self.wce and storage.flush(base | head):
                        pending[head] = _Pending(status, 1, OP_WRITE, n, t0, rtype, sector)
                        stats.in_flight += 1
                        return PENDING
                    status[0] = S_OK
                    completed(OP_WRITE, n, True, clock() - t0)
                    return 1
                return self._slow_request(head, base | head, rtype, sector, data_out, data_in,
                                          status, pending, stats, t0)
            except OSError as e:
                pending.pop(head, None)
                self._io_error(queue, rtype, sector, e.errno or errno.EIO)
                status[0] = S_IOERR
                completed(_op_of(rtype), 0, False, clock() - t0)
                return 1

        if self.options.trace_rate > 0:
            return self._traced(handle, queue, pending)
        return handle

    def _traced(self, handle: Handler, queue: SplitVirtqueue,
                pending: dict[int, _Pending]) -> Handler:
        """``handle`` that also logs every request it completes inline (the others are
        logged at completion)."""
        qname = queue.name

        def traced(head: int, readable: list[memoryview], writable: list[memoryview]) -> int:
            t0 = time.monotonic_ns()
            n = handle(head, readable, writable)
            if n == PENDING:
                return n
            hdr, _ = _split_header(readable)
            rtype, sector = (OUTHDR.unpack(hdr)[0], OUTHDR.unpack(hdr)[2]) if hdr else (-1, 0)
            status = writable[-1][-1] if writable and len(writable[-1]) else -1
            length = sum(map(len, readable)) + sum(map(len, writable))
            self._trace_line(qname, head, rtype, sector, length, status,
                             time.monotonic_ns() - t0, "inline")
            return n

        return traced

    def _trace_line(self, qname: str, head: int, rtype: int, sector: int, length: int,
                    status: int, elapsed_ns: int, how: str) -> None:
        kind = _TYPE_NAMES.get(rtype & ~VIRTIO_BLK_T_BARRIER, f"type{rtype}")
        self._tracer.log(logging.INFO, "%s head %d %s sector %d len %d status %s %.1f us "
                         "(%s)", qname, head, kind, sector, length,
                         _STATUS_NAMES.get(status, str(status)), elapsed_ns / 1000, how)

    def _on_complete(self, token: int, error: int) -> None:
        """A storage operation of request ``token`` finished (on the loop thread)."""
        if token == _FLUSH_TOKEN:
            if error:
                log.error("%s: flush before writethrough failed: %s", self.name,
                          os.strerror(error))
            return
        queue, pending, stats = self._queues[token >> 16]
        head = token & 0xFFFF
        p = pending.get(head)
        if p is None:
            return  # the device was reset under it: nobody waits for it
        if error and not p.error:
            p.error = error
        p.parts -= 1
        if p.parts > 0:
            return
        if not p.error and p.then_flush:
            # Writethrough: the write completes once it is stable.
            p.then_flush = False
            p.parts = 1
            try:
                if self.storage.flush(token):
                    return
            except OSError as e:
                p.error = e.errno or errno.EIO
            p.parts = 0
        del pending[head]
        ok = not p.error
        if not ok:
            self._io_error(queue, p.rtype, p.sector, p.error)
        stats.in_flight -= 1
        try:
            p.status[0] = S_OK if ok else S_IOERR
        except (ValueError, IndexError):
            # Guest memory gone: the ring stopped without waiting (it drops the
            # completion, and the inflight region keeps the request for a restart).
            self._complete(queue, head, 1)
            return
        elapsed = time.monotonic_ns() - p.t0
        stats.completed(p.op, p.nbytes if ok else 0, ok, elapsed)
        if self.options.trace_rate > 0:
            self._trace_line(queue.name, head, p.rtype, p.sector, p.nbytes,
                             S_OK if ok else S_IOERR, elapsed, "completed later")
        self._complete(queue, head, p.used if ok else 1)

    def _complete(self, queue: SplitVirtqueue, head: int, used: int) -> None:
        if not self._batched:
            queue.complete(head, used)
            return
        # Published at the end of the storage's batch (_publish_batch). The inflight
        # region stays exact meanwhile: the request is still flagged there until the
        # publish records it done.
        queue.complete(head, used, publish=False)
        if queue not in self._unpublished:
            self._unpublished.append(queue)

    def _publish_batch(self) -> None:
        """The storage reported its last completion of this loop turn: publish each
        queue's new used entries and signal its driver once."""
        queues = self._unpublished
        while queues:
            queues.pop().publish()

    def overdue(self, older_than_ns: int) -> list[str]:
        """A line for each request the storage has held longer than ``older_than_ns``
        and that no earlier call named, and one for each ring whose completed requests
        wait to be published; the storage's own state closes a non-empty list."""
        now = time.monotonic_ns()
        lines = []
        for queue, pending, _stats in self._queues:
            for head, p in pending.items():
                if p.overdue or now - p.t0 < older_than_ns:
                    continue
                p.overdue = True
                kind = _TYPE_NAMES.get(p.rtype, f"type {p.rtype}")
                lines.append(f"{queue.name} head {head}: {kind} at sector {p.sector} not "
                             f"completed by the storage after {(now - p.t0) / 1e9:.0f} s")
        named = self._named_unpublished
        named.intersection_update(id(q) for q in self._unpublished)
        for queue in self._unpublished:
            if id(queue) not in named:
                named.add(id(queue))
                lines.append(f"{queue.name}: completed requests not yet published (used "
                             f"idx {queue.used_idx})")
        if lines:
            lines.append(f"storage: {self.storage.state()}")
        return lines

    def _io_error(self, queue: SplitVirtqueue, rtype: int, sector: int, err: int) -> None:
        self.io_errors += 1
        self._error_log.log(logging.ERROR, "%s: request type %d at sector %d failed: %s",
                            queue.name, rtype, sector, os.strerror(err))
        events.emit(events.IO_ERROR, device=self.name, queue=queue.index,
                    op=OPS[_op_of(rtype)], sector=sector, error=os.strerror(err))

    def _refuse(self, qname: str, head: int, what: str) -> None:
        """Log a request refused for its shape, without flooding the log."""
        self.refused += 1
        if self.refused <= 10 or self.refused % 1000 == 0:
            log.warning("%s: head %d: %s (refused with IOERR; %d so far)", qname, head, what,
                        self.refused)

    def _slow_request(self, head: int, token: int, rtype: int, sector: int,
                      data_out: list[memoryview], data_in: list[memoryview],
                      status: memoryview, pending: dict[int, _Pending], stats: QueueStats,
                      t0: int) -> int:
        op = _op_of(rtype)
        if rtype == T_FLUSH:
            if self.storage.flush(token):
                pending[head] = _Pending(status, 1, op, 0, t0, rtype, sector)
                stats.in_flight += 1
                return PENDING
            status[0] = S_OK
            stats.completed(op, 0, True, time.monotonic_ns() - t0)
            return 1
        if rtype == T_GET_ID:
            ident = self.serial + bytes(VIRTIO_BLK_ID_BYTES - len(self.serial))
            written = scatter(ident, data_in)
            status[0] = S_OK
            stats.completed(op, 0, True, time.monotonic_ns() - t0)
            return written + 1
        if rtype in (T_DISCARD, T_WRITE_ZEROES):
            # Bound the copy by what a valid request can carry before joining.
            if sum(map(len, data_out)) > SEGMENT.size * max(MAX_DISCARD_SEG,
                                                           MAX_WRITE_ZEROES_SEG):
                result = S_UNSUPP
            else:
                p = _Pending(status, 1, op, 0, t0, rtype, sector)
                pending[head] = p
                result = self._discard_or_zero(rtype, b"".join(data_out), token, p)
                if result is None:
                    if p.parts > 0:
                        stats.in_flight += 1
                        return PENDING
                    del pending[head]
                    result = S_IOERR if p.error else S_OK
                else:
                    del pending[head]
            status[0] = result
            stats.completed(op, 0, result == S_OK, time.monotonic_ns() - t0)
            return 1
        status[0] = S_UNSUPP
        stats.completed(op, 0, False, time.monotonic_ns() - t0)
        return 1

    def _discard_or_zero(self, rtype: int, payload: bytes, token: int,
                         p: _Pending) -> int | None:
        """A status for a request refused or answered at once, or None once the
        segments are submitted (``p.parts`` of them still running; a flush follows
        in writethrough mode)."""
        if self.storage.read_only:
            return S_IOERR
        discard = rtype == T_DISCARD
        max_seg = MAX_DISCARD_SEG if discard else MAX_WRITE_ZEROES_SEG
        max_sectors = MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS
        if not payload or len(payload) % SEGMENT.size or len(payload) // SEGMENT.size > max_seg:
            return S_UNSUPP
        segments = list(SEGMENT.iter_unpack(payload))
        for sector, num, flags in segments:
            if num > max_sectors or sector + num > self.capacity:
                return S_IOERR
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (
                discard and flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            ):
                return S_UNSUPP
        p.then_flush = not self.wce
        p.parts = 0
        for sector, num, flags in segments:
            if discard:
                r = self.storage.discard(sector << 9, num << 9, token)
            else:
                r = self.storage.write_zeroes(sector << 9, num << 9,
                                              bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
                                              token)
            p.parts += r == STORAGE_PENDING
        if p.parts == 0 and p.then_flush:
            p.then_flush = False
            if self.storage.flush(token):
                p.parts = 1
        return None


class _Pending:
    """A request whose storage operations complete later."""

    __slots__ = ("error", "nbytes", "op", "overdue", "parts", "rtype", "sector", "status",
                 "t0", "then_flush", "used")

    def __init__(self, status: memoryview, used: int, op: int, nbytes: int, t0: int,
                 rtype: int, sector: int) -> None:
        self.status = status
        self.used = used
        self.op = op
        self.nbytes = nbytes
        self.t0 = t0
        self.rtype = rtype
        self.sector = sector
        self.parts = 1
        self.error = 0
        self.then_flush = False
        self.overdue = False  # logged as overdue (once)


_FLUSH_TOKEN = 0xFFFF_FFFF << 16  # the flush before writethrough; no request waits

_TYPE_NAMES = {T_IN: "read", T_OUT: "write", T_FLUSH: "flush", T_GET_ID: "get-id",
               T_DISCARD: "discard", T_WRITE_ZEROES: "write-zeroes"}
_STATUS_NAMES = {S_OK: "OK", S_IOERR: "IOERR", S_UNSUPP: "UNSUPP"}
_OPS = {T_IN: OP_READ, T_OUT: OP_WRITE, T_FLUSH: OP_FLUSH, T_GET_ID: OP_GET_ID,
        T_DISCARD: OP_DISCARD, T_WRITE_ZEROES: OP_WRITE_ZEROES}


def _op_of(rtype: int) -> int:
    return _OPS.get(rtype, OP_OTHER)


def _split_header(readable: list[memoryview]) -> tuple[bytes | None, list[memoryview]]:
    """The first 16 readable bytes, and the views after them (no copy of the data)."""
    hdr = b""
    for i, buf in enumerate(readable):
        need = 16 - len(hdr)
        if len(buf) >= need:
            hdr += bytes(buf[:need])
            rest = readable[i + 1:]
            if len(buf) > need:
                rest.insert(0, buf[need:])
            return hdr, rest
        hdr += bytes(buf)
    return None, []
