"""File storage: a raw image file or block device, buffered or with O_DIRECT.

The fast path is one vectored call straight between guest memory and the file, made
inline only where it cannot wait for the disk:

* reads try ``preadv(..., RWF_NOWAIT)``: a page-cache hit returns at inline cost; a miss
  (EAGAIN) or a partial hit goes to the slow path for the rest;
* buffered writes use ``pwritev(..., RWF_NOWAIT)`` where the file system supports it.
  Where it does not (ext4 answers EOPNOTSUPP), a page-aligned write is made inline (it
  only copies into the page cache) unless the last inline write was throttled (it took
  longer than :data:`THROTTLED_NS`): writes then go to the slow path for a while; an
  unaligned write may have to read its first and last page, so it goes there too;
* flush, discard and write-zeroes always take the slow path;
* with O_DIRECT (``direct``) every transfer waits for the disk, so all take the slow
  path; guest buffers whose address or length is not a multiple of the file's direct
  I/O alignment go through an aligned bounce buffer, and a request whose offset or
  length is not aligned is made through a second, buffered descriptor (the kernel
  keeps the two coherent: a direct read writes back dirty cached pages first).

The slow path is io_uring (storage/uring.py: requests go from guest memory to the
kernel without a thread or a copy, submitted in batches) or a thread pool
(storage/threads.py), chosen by ``aio`` (``--aio``); without io_uring (kernel or
policy) the default falls back to threads. Discard and write-zeroes always use the
thread pool (they are rare and take several calls). Before :meth:`FileStorage.start`
gives it an event loop, everything completes inline, blocking if it must.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import select
import time
from collections.abc import Callable
from typing import Any

from ..engine.loop import FdWatcher
from ..engine.timer import PeriodicTimer
from . import uring
from .base import DONE, PENDING, Completion, ignore_batch_done, ignore_completion
from .threads import ThreadPool

log = logging.getLogger(__name__)

# Linux fallocate(2) modes; the os module exposes only posix_fallocate.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
TMPFS_MAGIC = 0x01021994

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_fstatfs = _libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_fstatfs.restype = ctypes.c_int

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
PAGE = mmap.PAGESIZE
# An inline buffered write that took longer than this met dirty-page throttling (or
# had to read from the disk): writes go to the slow path for THROTTLE_BACKOFF_NS.
THROTTLED_NS = 1_000_000
THROTTLE_BACKOFF_NS = 1_000_000_000
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)

AIO_KINDS = ("threads", "io_uring")
# The default slow path (measured: docs/performance.md) when io_uring is available.
DEFAULT_AIO = "io_uring"
# Submission entries per ring (the completion ring has twice as many); a request that
# finds the ring full goes to the thread pool.
RING_ENTRIES = 256
# How often a ring with operations in the kernel is looked at for completions the
# kernel parked in its overflow list (they bump no eventfd): rare, so a slow look.
RING_SWEEP_US = 50_000


class AioUnavailable(Exception):
    """The slow path asked for cannot be used here (a one-line reason)."""


_uring_reason: list[str | None] = []  # memo of uring.unavailable()


def choose_aio(aio: str | None) -> str:
    """The slow path to use: ``aio`` if it works here (AioUnavailable if it was asked
    for and does not), or the default, falling back to threads with one INFO line."""
    if aio is not None and aio not in AIO_KINDS:
        raise ValueError(f"aio={aio!r}: expected one of {', '.join(AIO_KINDS)}")
    want = aio or DEFAULT_AIO
    if want == "threads":
        return want
    if not _uring_reason:
        _uring_reason.append(uring.unavailable())
        if _uring_reason[0] is not None and aio is None:
            log.info("%s; file storage uses a thread pool instead", _uring_reason[0])
    why = _uring_reason[0]
    if why is None:
        return "io_uring"
    if aio is not None:
        raise AioUnavailable(f"aio=io_uring: {why}")
    return "threads"


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fs_type(fd: int) -> int:
    """The file system's magic number (statfs f_type), or 0 if unknown."""
    buf = ctypes.create_string_buffer(128)
    if _fstatfs(fd, buf) != 0:
        return 0
    return int.from_bytes(buf.raw[:8], "little")


def _address(buf: memoryview) -> int:
    """The address of a writable buffer's first byte, or -1 (read-only: bounce it)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))
    except TypeError:
        return -1


def _rest(iov: list[memoryview], skip: int) -> list[memoryview]:
    """``iov`` without its first ``skip`` bytes (views, no copy)."""
    out: list[memoryview] = []
    for b in iov:
        if skip >= len(b):
            skip -= len(b)
            continue
        out.append(b[skip:] if skip else b)
        skip = 0
    return out


def transfer(fd: int, iov: list[memoryview], offset: int, write: bool) -> None:
    """Blocking vectored transfer of all of ``iov``; a read past the end is EIO."""
    call = os.pwritev if write else os.preadv
    while iov:
        part = iov[:IOV_MAX]
        want = sum(map(len, part))
        done = 0
        while done < want:
            n = call(fd, _rest(part, done) if done else part, offset + done)
            if n == 0:
                raise OSError(errno.EIO, "unexpected end of file")
            done += n
        offset += want
        iov = iov[IOV_MAX:]


def direct_alignment(fd: int) -> int:
    """The alignment O_DIRECT wants of buffers, lengths and offsets on ``fd``: 512 if
    a 512-byte read at a 512-byte buffer offset works, else the page size."""
    buf = mmap.mmap(-1, 2 * PAGE)
    try:
        try:
            os.preadv(fd, [memoryview(buf)[512:1024]], 0)
            return 512
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            return PAGE
    finally:
        buf.close()


class FileStorage:
    """A raw image file (regular file or block device)."""

    batches_completions = True

    def __init__(self, path: str, read_only: bool = False, fd: int | None = None,
                 direct: bool = False, buffered_fd: int | None = None,
                 aio: str | None = None) -> None:
        """Open ``path``, or adopt ``fd`` (already open on it, e.g. passed to a queue
        worker process, so both processes serve the very same file; with ``direct``
        also ``buffered_fd``). ``aio``: the slow path, ``threads`` or ``io_uring``
        (None: the default; AioUnavailable if io_uring is asked for and cannot run)."""
        self.path = path
        self.read_only = read_only
        self.direct = direct
        self.aio = choose_aio(aio)
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self.fd = os.open(path, flags | (os.O_DIRECT if direct else 0)) if fd is None else fd
        self.bfd = self.fd  # buffered descriptor: the same one unless direct
        try:
            if direct:
                self.bfd = os.open(path, flags) if buffered_fd is None else buffered_fd
                self.align = direct_alignment(self.fd)
            else:
                self.align = 1
        except OSError:
            self.close()
            raise
        self.punch_hole = True
        self.zero_range = True
        self.on_complete: Completion = ignore_completion
        self.on_batch_done: Callable[[], None] = ignore_batch_done
        self.pool: ThreadPool | None = None
        self.ring: uring.Ring | None = None
        self._rung = False  # the ring's eventfd was written to submit a batch
        self._walking = 0  # inside a walk of a virtqueue: its end submits (walk_end)
        self._sweep: PeriodicTimer | None = None  # looks for parked completions
        self._watcher: FdWatcher | None = None
        self._slow_writes_until = 0
        self._nowait_reads = bool(_RWF_NOWAIT)
        self._nowait_writes = False
        self._inline_reads = False  # memory-backed (tmpfs): nothing to wait for
        if not direct:
            self._probe_nowait()

    def _probe_nowait(self) -> None:
        """Which inline calls this file system supports with RWF_NOWAIT."""
        if not _RWF_NOWAIT:
            return
        try:
            os.preadv(self.fd, [bytearray(1)], 0, _RWF_NOWAIT)
        except BlockingIOError:
            pass
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            self._nowait_reads = False
            # tmpfs has no RWF_NOWAIT, but its reads never wait for a disk.
            self._inline_reads = fs_type(self.fd) == TMPFS_MAGIC
        # Whether writes take RWF_NOWAIT is learnt from the first one (a write of
        # nothing succeeds whatever the file system supports).
        self._nowait_writes = not self.read_only

    def describe(self) -> str:
        how = "O_DIRECT" if self.direct else (
            "buffered, RWF_NOWAIT reads" if self._nowait_reads else "buffered")
        return f"{self.path} ({how}, {self.aio})"

    # ---- lifecycle ---------------------------------------------------------------
    def start(self, watcher: FdWatcher) -> None:
        if self.pool is None:
            self.pool = ThreadPool(os.path.basename(self.path) or "file")
            self.pool.start(watcher, self._report)
            self.pool.batch_end = self._batch_end
        if self.aio == "io_uring" and self.ring is None:
            # Each process serving queues (the main one, every queue worker) has its
            # own ring, made here on its own loop.
            ring = uring.Ring(RING_ENTRIES)
            try:
                self._sweep = PeriodicTimer(watcher, self._ring_sweep, RING_SWEEP_US)
                efd = ring.register_eventfd()
                ring.report = self._ring_done
                watcher.add_reader(efd, self._ring_ready)
            except BaseException:
                if self._sweep is not None:
                    self._sweep.close()
                    self._sweep = None
                ring.close()
                raise
            self.ring = ring
            self._watcher = watcher

    def _report(self, token: Any, error: int) -> None:
        self.on_complete(token, error)

    def _batch_end(self) -> None:
        self.on_batch_done()

    def in_flight(self) -> int:
        n = self.pool.pending if self.pool is not None else 0
        if self.ring is not None:
            n += self.ring.in_kernel + self.ring.queued
        return n

    def state(self) -> str:
        """What is at the kernel and the threads now (the overdue watchdog's line)."""
        parts = [self.describe()]
        ring = self.ring
        if ring is not None:
            parts.append(f"io_uring {ring.queued} queued, {ring.in_kernel} in the kernel, "
                         f"doorbell {'rung' if self._rung else 'quiet'}, completions "
                         f"fetched from the overflow list {ring.overflow_flushes} time(s)")
        if self.pool is not None:
            parts.append(f"thread pool {self.pool.pending} pending")
        return "; ".join(parts)

    def poll(self, timeout: float) -> None:
        """Block up to ``timeout`` seconds for completions (a ring that must come to
        rest at once); they are reported as usual."""
        ring = self.ring
        if ring is not None and (ring.in_kernel or ring.queued):
            ring.submit()
            fds = [ring.efd]
            if self.pool is not None and self.pool.pending:
                fds.append(self.pool._efd)
            select.select(fds, [], [], timeout)
            self._ring_ready()
            if self.pool is not None and self.pool.pending:
                self.pool.poll(0)
        elif self.pool is not None:
            self.pool.poll(timeout)

    # ---- io_uring --------------------------------------------------------------------
    def _ring_ready(self) -> None:
        """The ring's eventfd: completions were posted, or a batch waits to be
        submitted (see :meth:`_ring_submit`)."""
        ring = self.ring
        if ring is None:
            return
        try:
            os.eventfd_read(ring.efd)
        except BlockingIOError:
            pass
        self._rung = False
        if ring.queued:
            ring.submit()
        if ring.reap():
            if ring.queued:  # rest of short transfers, flushes of writethrough
                ring.submit()
            self.on_batch_done()
        if ring.queued:
            # The kernel took none for now (EAGAIN: short of memory); nothing else
            # would bring the loop back here if nothing is in the kernel either.
            self._ring_doorbell(ring)

    def _ring_submit(self, ring: uring.Ring) -> None:
        """Submit now when nothing is at the disk (a lone request waits for nobody);
        else leave it queued: the end of the virtqueue walk that took it submits every
        request the walk took in one system call (:meth:`walk_end`). Outside a walk,
        ring the eventfd once: the loop submits when it comes back to it."""
        sweep = self._sweep
        if sweep is not None and not sweep.armed:
            sweep.arm()
        if not ring.in_kernel:
            ring.submit()
            if not ring.queued:
                return
            # The kernel took none (short of memory): try again from the loop.
        elif self._walking:
            return
        self._ring_doorbell(ring)

    def _ring_doorbell(self, ring: uring.Ring) -> None:
        """Have the loop come back to the ring (:meth:`_ring_ready`) and submit what is
        queued: one eventfd write, however many ask before it does."""
        if not self._rung:
            self._rung = True
            os.eventfd_write(ring.efd, 1)

    def _ring_sweep(self) -> None:
        """Every :data:`RING_SWEEP_US` while operations are in the kernel: completions
        the kernel parked in its overflow list bump no eventfd, so look for them."""
        ring = self.ring
        if ring is None:
            return
        if ring.overflowed():
            self._ring_ready()
        if not (ring.in_kernel or ring.queued) and self._sweep is not None:
            self._sweep.disarm()

    def walk_begin(self) -> None:
        """A virtqueue walk begins: requests it takes are submitted at its end."""
        self._walking += 1

    def walk_end(self) -> None:
        self._walking -= 1
        ring = self.ring
        if self._walking or ring is None or not ring.queued:
            return
        ring.submit()
        if ring.queued:
            self._ring_doorbell(ring)  # the kernel took none: try again from the loop

    def _ring_rw(self, ring: uring.Ring, fd: int, iov: list[memoryview], offset: int,
                 token: Any, write: bool, bounce: mmap.mmap | None = None) -> bool:
        """Queue a transfer on the ring; False if it cannot take it (full, or a
        read-only buffer it cannot address) and the caller must use the pool."""
        if ring.space() < 1:
            ring.submit()
            if ring.space() < 1:
                return False
        op = _RingOp(token, fd, iov, offset, write, bounce)
        try:
            if bounce is not None:
                view = memoryview(bounce)
                op.want = len(view)
                ring.prep_rw(write, fd, uring.address(view), len(view), offset, op, view)
            elif len(iov) == 1:
                b = iov[0]
                op.want = len(b)
                ring.prep_rw(write, fd, uring.address(b), len(b), offset, op, None)
            else:
                if len(iov) > IOV_MAX:
                    return False
                arr, _ = uring.pack_iovecs(iov)
                op.want = sum(map(len, iov))
                ring.prep_rwv(write, fd, arr, len(iov), offset, op, None)
        except TypeError:
            return False  # read-only guest buffer
        self._ring_submit(ring)
        return True

    def _ring_done(self, op: Any, res: int) -> None:
        if type(op) is not _RingOp:
            self.on_complete(op, -res if res < 0 else 0)  # a flush: op is the token
            return
        if res < 0:
            self._ring_finish(op, -res)
            return
        if res == op.want:
            self._ring_finish(op, 0)
            return
        if res == 0:
            self._ring_finish(op, errno.EIO)  # past the end of the file
            return
        # A short transfer: the rest goes in again (views of the same buffers).
        op.offset += res
        if op.bounce is not None:
            view = memoryview(op.bounce)[op.done + res:op.done + op.want]
            op.done += res
            op.want -= res
            ring = self.ring
            assert ring is not None
            ring.prep_rw(op.write, op.fd, uring.address(view), len(view), op.offset, op, view)
            return
        op.iov = _rest(op.iov, res)
        ring = self.ring
        assert ring is not None
        if not self._ring_rw(ring, op.fd, op.iov, op.offset, op.token, op.write):
            assert self.pool is not None
            fd, iov, offset, write = op.fd, op.iov, op.offset, op.write
            self.pool.submit(lambda: transfer(fd, iov, offset, write), op.token)

    def _ring_finish(self, op: _RingOp, error: int) -> None:
        bounce = op.bounce
        if bounce is not None:
            if not error and not op.write:
                view = memoryview(bounce)
                pos = 0
                try:
                    for b in op.iov:
                        b[:] = view[pos:pos + len(b)]
                        pos += len(b)
                except (ValueError, IndexError):
                    error = errno.EFAULT  # guest memory went away meanwhile
                view.release()
            try:
                bounce.close()
            except BufferError:
                pass  # a view of it is still alive somewhere: freed with it
        self.on_complete(op.token, error)

    def size(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_END)

    def refresh_size(self, done: Callable[[int], None]) -> None:
        done(0)  # size() asks the kernel every time

    def worker_spec(self) -> tuple[dict[str, Any], list[int]]:
        fds = [self.fd, self.bfd] if self.direct else [self.fd]
        return {"kind": "file", "path": self.path, "read_only": self.read_only,
                "direct": self.direct, "aio": self.aio}, fds

    @classmethod
    def from_spec(cls, spec: dict[str, Any], fds: list[int]) -> FileStorage:
        direct = bool(spec.get("direct"))
        aio = spec.get("aio")
        return cls(str(spec["path"]), bool(spec["read_only"]), fd=fds[0], direct=direct,
                   buffered_fd=fds[1] if direct else None,
                   aio=str(aio) if aio is not None else None)

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.close()
            self._sweep = None
        if self.ring is not None:
            if self._watcher is not None and self.ring.efd >= 0:
                self._watcher.remove_reader(self.ring.efd)
            self._watcher = None
            self.ring.close()
            self.ring = None
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.bfd != self.fd and self.bfd >= 0:
            os.close(self.bfd)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = self.bfd = -1

    # ---- data path -----------------------------------------------------------------
    def _slow(self, job: Callable[[], None], token: Any) -> int:
        pool = self.pool
        if pool is None:
            job()  # no loop yet: block
            return DONE
        pool.submit(job, token)
        return PENDING

    def readv(self, iov: list[memoryview], offset: int, token: Any) -> int:
        if self.direct:
            return self._direct(iov, offset, token, False)
        if self._nowait_reads and len(iov) <= IOV_MAX:
            try:
                got = os.preadv(self.fd, iov, offset, _RWF_NOWAIT)
            except BlockingIOError:
                got = 0
            want = sum(map(len, iov))
            if got == want:
                return DONE
            if got:
                iov = _rest(iov, got)
                offset += got
        elif self._inline_reads and len(iov) <= IOV_MAX:
            got = os.preadv(self.fd, iov, offset)
            if got != sum(map(len, iov)):
                transfer(self.fd, _rest(iov, got), offset + got, False)
            return DONE
        fd = self.fd
        ring = self.ring
        if ring is not None and self._ring_rw(ring, fd, iov, offset, token, False):
            return PENDING
        return self._slow(lambda: transfer(fd, iov, offset, False), token)

    def writev(self, iov: list[memoryview], offset: int, token: Any) -> int:
        if self.direct:
            return self._direct(iov, offset, token, True)
        fd = self.fd
        if self._nowait_writes and len(iov) <= IOV_MAX:
            try:
                got = os.pwritev(fd, iov, offset, _RWF_NOWAIT)
            except BlockingIOError:
                got = 0
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
                self._nowait_writes = False
                return self.writev(iov, offset, token)
            want = sum(map(len, iov))
            if got == want:
                return DONE
            if got:
                iov = _rest(iov, got)
                offset += got
        elif not (offset | sum(map(len, iov))) & (PAGE - 1) and len(iov) <= IOV_MAX:
            t0 = time.monotonic_ns()
            if t0 >= self._slow_writes_until:
                transfer(fd, iov, offset, True)
                t1 = time.monotonic_ns()
                if t1 - t0 > THROTTLED_NS and self.pool is not None:
                    self._slow_writes_until = t1 + THROTTLE_BACKOFF_NS
                return DONE
        ring = self.ring
        if ring is not None and self._ring_rw(ring, fd, iov, offset, token, True):
            return PENDING
        return self._slow(lambda: transfer(fd, iov, offset, True), token)

    def _direct(self, iov: list[memoryview], offset: int, token: Any, write: bool) -> int:
        align = self.align
        mask = align - 1
        want = sum(map(len, iov))
        ring = self.ring
        if (offset | want) & mask:
            fd = self.bfd  # no whole blocks: the buffered descriptor
            if ring is not None and self._ring_rw(ring, fd, iov, offset, token, write):
                return PENDING
            return self._slow(lambda: transfer(fd, iov, offset, write), token)
        fd = self.fd
        for b in iov:
            if len(b) & mask or _address(b) & mask:
                if ring is not None and want:
                    bounce = mmap.mmap(-1, want)
                    if write:
                        _gather(bounce, iov)
                    if self._ring_rw(ring, fd, iov, offset, token, write, bounce):
                        return PENDING
                    bounce.close()
                return self._slow(lambda: _bounced(fd, iov, offset, want, write), token)
        if ring is not None and self._ring_rw(ring, fd, iov, offset, token, write):
            return PENDING
        return self._slow(lambda: transfer(fd, iov, offset, write), token)

    def flush(self, token: Any) -> int:
        fd = self.fd
        ring = self.ring
        if ring is not None:
            if ring.space() < 1:
                ring.submit()
            if ring.space() >= 1:
                ring.prep_fsync(fd, True, token)
                self._ring_submit(ring)
                return PENDING
        return self._slow(lambda: os.fdatasync(fd), token)

    def discard(self, offset: int, length: int, token: Any) -> int:
        if not self.punch_hole:
            return DONE  # discard is advisory
        return self._slow(lambda: self._discard(offset, length), token)

    def _discard(self, offset: int, length: int) -> None:
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self.punch_hole = False

    def write_zeroes(self, offset: int, length: int, unmap: bool, token: Any) -> int:
        return self._slow(lambda: self._write_zeroes(offset, length, unmap), token)

    def _write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        if unmap and self.punch_hole:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self.punch_hole = False
        if self.zero_range:
            try:
                fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self.zero_range = False
        chunk = mmap.mmap(-1, min(length, 1 << 20))  # zeroed and page-aligned
        try:
            view = memoryview(chunk)
            while length:
                n = min(length, len(chunk))
                transfer(self.bfd, [view[:n]], offset, True)
                offset += n
                length -= n
            view.release()
        finally:
            chunk.close()


class _RingOp:
    """A transfer on the ring: what a short one needs to go on, and its bounce
    buffer (O_DIRECT with unaligned guest buffers)."""

    __slots__ = ("bounce", "done", "fd", "iov", "offset", "token", "want", "write")

    def __init__(self, token: Any, fd: int, iov: list[memoryview], offset: int, write: bool,
                 bounce: mmap.mmap | None) -> None:
        self.token = token
        self.fd = fd
        self.iov = iov
        self.offset = offset
        self.write = write
        self.bounce = bounce
        self.want = 0
        self.done = 0


def _gather(bounce: mmap.mmap, iov: list[memoryview]) -> None:
    view = memoryview(bounce)
    pos = 0
    for b in iov:
        view[pos:pos + len(b)] = b
        pos += len(b)
    view.release()


def _bounced(fd: int, iov: list[memoryview], offset: int, want: int, write: bool) -> None:
    """A direct transfer through one page-aligned buffer (guest buffers that are not
    aligned as O_DIRECT needs)."""
    bounce = mmap.mmap(-1, want)
    view = memoryview(bounce)
    try:
        if write:
            pos = 0
            for b in iov:
                view[pos:pos + len(b)] = b
                pos += len(b)
            transfer(fd, [view], offset, True)
        else:
            transfer(fd, [view], offset, False)
            pos = 0
            for b in iov:
                b[:] = view[pos:pos + len(b)]
                pos += len(b)
    finally:
        view.release()
        bounce.close()
