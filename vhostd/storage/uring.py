"""A small io_uring in pure Python: the kernel's submission and completion rings,
reached through ``syscall(2)`` and ``mmap``.

Requests go straight between guest memory and the file: a submission queue entry
carries the address of the guest buffer (or of an iovec array that lists guest
buffers), so there is no copy and no thread. Entries queue in the shared submission
ring and reach the kernel together, with one ``io_uring_enter`` per batch; the kernel
posts completions to the completion ring and bumps an eventfd registered with the
ring, which the event loop watches. The loop reaps every completion at once.

Only x86-64 is supported: its stores are seen in program order, so writing an entry
and then the ring's tail needs no explicit barrier (the engine relies on the same).

The caller keeps the buffers of a request alive until its completion is reaped: this
module holds a reference to whatever it is given (``keep``) until then.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import select
import struct
import time
from collections.abc import Callable
from typing import Any

# Syscall numbers (x86-64) and constants of <linux/io_uring.h>.
SYS_IO_URING_SETUP = 425
SYS_IO_URING_ENTER = 426
SYS_IO_URING_REGISTER = 427

IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000

IORING_ENTER_GETEVENTS = 1 << 0
IORING_SQ_CQ_OVERFLOW = 1 << 1  # in the SQ ring's flags
IORING_REGISTER_EVENTFD = 4
IORING_FEAT_NODROP = 1 << 1

IORING_OP_NOP = 0
IORING_OP_READV = 1
IORING_OP_WRITEV = 2
IORING_OP_FSYNC = 3
IORING_OP_READ = 22
IORING_OP_WRITE = 23
IORING_FSYNC_DATASYNC = 1 << 0

# struct io_uring_params: 10 u32 (sq_entries ... resv[3]), then io_sqring_offsets and
# io_cqring_offsets (8 u32 and a u64 each).
_PARAMS = struct.Struct("<10I8IQ8IQ")
# struct io_uring_sqe (64 bytes): opcode, flags, ioprio, fd, off, addr, len, rw_flags,
# user_data, buf_index, personality, splice_fd_in, addr3, pad.
SQE = struct.Struct("<BBHiQQIIQHHiQQ")
# struct io_uring_cqe (16 bytes): user_data, res, flags.
CQE = struct.Struct("<QiI")
IOVEC = struct.Struct("<QQ")

log = logging.getLogger("vhostd.storage")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

Report = Callable[[Any, int], None]  # (token, result: bytes >= 0 or -errno)

# Buffers of operations a closed ring never saw finish (the kernel may still use them).
_abandoned: list[Any] = []


def _forget(token: Any, res: int) -> None:
    """Completions reaped while closing: nobody waits for them."""


def _sys(nr: int, *args: Any) -> int:
    r = _syscall(nr, *args)
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return r


def address(buf: Any) -> int:
    """The address of a writable buffer's first byte. TypeError if read-only."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def unavailable() -> str | None:
    """Why io_uring cannot be used here (a sentence), or None if it can."""
    try:
        ring = Ring(2)
    except OSError as e:
        if e.errno == errno.ENOSYS:
            return "io_uring is not supported by this kernel (ENOSYS)"
        if e.errno == errno.EPERM:
            return ("io_uring is disabled on this host (EPERM: see "
                    "/proc/sys/kernel/io_uring_disabled, or a seccomp policy)")
        return f"io_uring cannot be set up: {e.strerror}"
    ring.close()
    return None


class Ring:
    """One io_uring. ``prep_*`` queue an operation and return at once; :meth:`submit`
    hands the queued ones to the kernel; :meth:`reap` reports finished ones through
    ``report(token, res)`` (``res`` the kernel's result: bytes moved, or -errno)."""

    def __init__(self, entries: int = 128) -> None:
        params = bytearray(_PARAMS.size)
        pbuf = (ctypes.c_char * len(params)).from_buffer(params)
        self.efd = -1
        self.report: Report | None = None
        self._maps: list[mmap.mmap] = []
        self._slots: list[Any] = []
        self._sqw: memoryview | None = None
        self._cqw: memoryview | None = None
        self.in_kernel = 0  # submitted, not yet reaped
        self.queued = 0  # prepared, not yet submitted
        self.overflow_flushes = 0  # times completions had to be fetched from the kernel
        self.fd = _sys(SYS_IO_URING_SETUP, ctypes.c_uint(entries), pbuf)
        try:
            self._map(params)
        except BaseException:
            self.close()
            raise
        # user_data -> (token, what must stay alive), and free user_data slots.
        self._slots = [None] * self.cq_entries
        self._free = list(range(self.cq_entries - 1, -1, -1))

    def _map(self, params: bytearray) -> None:
        f = _PARAMS.unpack(params)
        sq_entries, cq_entries, _flags = f[0], f[1], f[2]
        self.features = f[5]
        _sq_head, sq_tail, sq_mask, _sq_n, sq_flags, _dropped, sq_array = f[10:17]
        cq_head, cq_tail, cq_mask, _cq_n, _overflow, cqes = f[19:25]
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        populate = getattr(mmap, "MAP_POPULATE", 0)
        sq = mmap.mmap(self.fd, sq_array + sq_entries * 4, mmap.MAP_SHARED | populate, prot,
                       offset=IORING_OFF_SQ_RING)
        self._maps.append(sq)
        cq = mmap.mmap(self.fd, cqes + cq_entries * CQE.size, mmap.MAP_SHARED | populate,
                       prot, offset=IORING_OFF_CQ_RING)
        self._maps.append(cq)
        sqes = mmap.mmap(self.fd, sq_entries * SQE.size, mmap.MAP_SHARED | populate, prot,
                         offset=IORING_OFF_SQES)
        self._maps.append(sqes)
        self.sq_entries = sq_entries
        self.cq_entries = cq_entries
        self._sq = memoryview(sq)
        self._cq = memoryview(cq)
        self._sqes = memoryview(sqes)
        # The heads, tails and flags the kernel reads and writes while we do: 32-bit
        # views, so each is loaded and stored in one move. struct.pack_into and
        # unpack_from go byte by byte: the kernel could read a head half written (a
        # carry into the third byte makes it 65535 behind, the completion ring looks
        # full and completions go to the overflow list), and a tail read half old,
        # half new can run past the completions actually posted.
        self._sqw = self._sq.cast("I")
        self._cqw = self._cq.cast("I")
        self._sq_tail = sq_tail >> 2
        self._sq_flags = sq_flags >> 2
        self._sq_mask = self._sqw[sq_mask >> 2]
        self._cq_head = cq_head >> 2
        self._cq_tail = cq_tail >> 2
        self._cq_mask = self._cqw[cq_mask >> 2]
        self._cqes = cqes
        # The index array maps ring slots to entries one to one, once and for all.
        for i in range(sq_entries):
            self._sqw[(sq_array >> 2) + i] = i
        self._tail = self._sqw[self._sq_tail]

    # ---- setup ---------------------------------------------------------------------
    def register_eventfd(self) -> int:
        """An eventfd the kernel bumps on completions (the loop watches it)."""
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        arg = ctypes.c_int32(efd)
        try:
            _sys(SYS_IO_URING_REGISTER, self.fd, IORING_REGISTER_EVENTFD,
                 ctypes.byref(arg), 1)
        except OSError:
            os.close(efd)
            raise
        self.efd = efd
        return efd

    def close(self, settle: float = 2.0) -> None:
        """Release the ring. Operations still in the kernel are waited for up to
        ``settle`` seconds (not reported); what is left then keeps its buffers for
        good, since the kernel may still write into them after the ring is gone."""
        if self.fd >= 0 and getattr(self, "_cq", None) is not None and self._slots:
            try:
                self.submit()
            except OSError:
                pass
            self.report = _forget
            deadline = time.monotonic() + settle
            while self.in_kernel > 0:
                left = deadline - time.monotonic()
                if left <= 0 or self.efd < 0:
                    break
                select.select([self.efd], [], [], left)
                try:
                    os.eventfd_read(self.efd)
                except BlockingIOError:
                    pass
                self.reap()
            if self.in_kernel > 0:
                _abandoned.extend(s for s in self._slots if s is not None)
        for view in ("_sqw", "_cqw", "_sq", "_cq", "_sqes"):
            v = getattr(self, view, None)
            if v is not None:
                v.release()
                setattr(self, view, None)
        for m in self._maps:
            m.close()
        self._maps = []
        if self.efd >= 0:
            os.close(self.efd)
            self.efd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._slots = []
        self._free = []
        self.in_kernel = 0
        self.queued = 0

    # ---- submission ----------------------------------------------------------------
    def space(self) -> int:
        """Entries that can still be prepared (bounded by the completion ring, so
        completions are never dropped)."""
        return min(len(self._free), self.sq_entries - self.queued)

    def _prep(self, op: int, fd: int, off: int, addr: int, length: int, rw_flags: int,
              token: Any, keep: Any) -> None:
        slot = self._free.pop()  # IndexError: the caller did not check space()
        self._slots[slot] = (token, keep)
        idx = self._tail & self._sq_mask
        SQE.pack_into(self._sqes, idx * 64, op, 0, 0, fd, off, addr, length, rw_flags, slot,
                      0, 0, 0, 0, 0)
        self._tail = (self._tail + 1) & 0xFFFFFFFF
        self._sqw[self._sq_tail] = self._tail  # type: ignore[index]
        self.queued += 1

    def prep_rw(self, write: bool, fd: int, addr: int, length: int, offset: int,
                token: Any, keep: Any) -> None:
        """A read or write of one buffer at ``addr``."""
        self._prep(IORING_OP_WRITE if write else IORING_OP_READ, fd, offset, addr, length,
                   0, token, keep)

    def prep_rwv(self, write: bool, fd: int, iovecs: bytearray, count: int, offset: int,
                 token: Any, keep: Any) -> None:
        """A vectored read or write; ``iovecs`` holds ``count`` packed struct iovec
        (it is kept alive with ``keep`` until the completion)."""
        self._prep(IORING_OP_WRITEV if write else IORING_OP_READV, fd, offset,
                   address(iovecs), count, 0, token, (keep, iovecs))

    def prep_fsync(self, fd: int, datasync: bool, token: Any) -> None:
        self._prep(IORING_OP_FSYNC, fd, 0, 0, 0, IORING_FSYNC_DATASYNC if datasync else 0,
                   token, None)

    def prep_nop(self, token: Any) -> None:
        self._prep(IORING_OP_NOP, -1, 0, 0, 0, 0, token, None)

    def submit(self, wait: int = 0) -> int:
        """Hand every prepared entry to the kernel (one system call), waiting for
        ``wait`` completions if asked. Returns how many were submitted."""
        queued = self.queued
        if not queued and not wait:
            return 0
        # GETEVENTS also moves completions parked in the overflow list to the ring.
        flags = IORING_ENTER_GETEVENTS if wait or self.overflowed() else 0
        while True:
            try:
                n = _sys(SYS_IO_URING_ENTER, self.fd, queued, wait, flags, None, 0)
                break
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                if e.errno in (errno.EAGAIN, errno.EBUSY):
                    # Kernel short of memory or the CQ is full: reap, then try later.
                    return 0
                raise
        self.queued -= n
        self.in_kernel += n
        return n

    # ---- completion ----------------------------------------------------------------
    def overflowed(self) -> bool:
        """Completions wait in the kernel's overflow list: the completion ring shows
        none of them (nor any later one) until an ``io_uring_enter`` with GETEVENTS
        moves them over, and the eventfd is not bumped for them."""
        sqw = self._sqw
        return sqw is not None and bool(sqw[self._sq_flags] & IORING_SQ_CQ_OVERFLOW)

    def reap(self) -> int:
        """Report every completion posted so far, also those the kernel kept in its
        overflow list; returns how many."""
        n = self._reap()
        while self.overflowed():
            # The ring was full in the kernel's eyes; only a GETEVENTS enter brings
            # the parked completions (and every later one) to the ring.
            self.overflow_flushes += 1
            if self.overflow_flushes == 1:
                log.info("io_uring: the kernel parked completions in its overflow list; "
                         "fetching them (counted from now on in the storage state)")
            try:
                _sys(SYS_IO_URING_ENTER, self.fd, 0, 0, IORING_ENTER_GETEVENTS, None, 0)
            except OSError as e:
                if e.errno not in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                    raise
            got = self._reap()
            n += got
            if not got:
                break
        return n

    def _reap(self) -> int:
        cq = self._cq
        cqw = self._cqw
        head = cqw[self._cq_head]  # type: ignore[index]
        tail = cqw[self._cq_tail]  # type: ignore[index]
        if head == tail:
            return 0
        mask = self._cq_mask
        base = self._cqes
        unpack = CQE.unpack_from
        slots = self._slots
        free = self._free
        done: list[tuple[Any, int]] = []
        n = 0
        while head != tail:
            user_data, res, _flags = unpack(cq, base + (head & mask) * 16)
            head = (head + 1) & 0xFFFFFFFF
            token = slots[user_data][0]
            slots[user_data] = None  # drops the buffers' references
            free.append(user_data)
            done.append((token, res))
            n += 1
        # Free the entries first: a report may prepare new operations.
        cqw[self._cq_head] = head  # type: ignore[index]
        self.in_kernel -= n
        report = self.report
        for token, res in done:
            report(token, res)  # type: ignore[misc]
        return n


def pack_iovecs(iov: list[Any]) -> tuple[bytearray, list[Any]]:
    """The struct iovec array of ``iov`` (writable buffers) and what keeps it valid."""
    arr = bytearray(16 * len(iov))
    pack = IOVEC.pack_into
    pos = 0
    for b in iov:
        pack(arr, pos, address(b), len(b))
        pos += 16
    return arr, iov
