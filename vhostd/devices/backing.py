"""Storage behind a block device.

:class:`BlockBackend` is the interface a virtio-blk device uses; :class:`FileBackend`
serves a raw image file with synchronous vectored I/O straight into guest memory.
A network backend (NBD) fits behind the same interface later.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from typing import Protocol

# Linux fallocate(2) modes; the os module exposes only posix_fallocate.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class BlockBackend(Protocol):
    read_only: bool

    def size(self) -> int: ...
    def readv(self, iov: list[memoryview], offset: int) -> None: ...
    def writev(self, iov: list[memoryview], offset: int) -> None: ...
    def flush(self) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None: ...
    def close(self) -> None: ...


class FileBackend:
    """A raw image file (regular file or block device)."""

    def __init__(self, path: str, read_only: bool = False, fd: int | None = None) -> None:
        """Open ``path``, or adopt ``fd`` (already open on it, e.g. passed to a queue
        worker process, so both processes serve the very same file)."""
        self.path = path
        self.read_only = read_only
        flags = os.O_RDONLY if read_only else os.O_RDWR
        self.fd = os.open(path, flags | os.O_CLOEXEC) if fd is None else fd
        self.punch_hole = True
        self.zero_range = True

    def size(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_END)

    def readv(self, iov: list[memoryview], offset: int) -> None:
        self._transfer(iov, offset, write=False)

    def writev(self, iov: list[memoryview], offset: int) -> None:
        self._transfer(iov, offset, write=True)

    def _transfer(self, iov: list[memoryview], offset: int, write: bool) -> None:
        """One vectored call straight between guest memory and the file."""
        if len(iov) > IOV_MAX:
            for i in range(0, len(iov), IOV_MAX):
                part = iov[i:i + IOV_MAX]
                self._transfer(part, offset, write)
                offset += sum(map(len, part))
            return
        want = sum(map(len, iov))
        got = (os.pwritev if write else os.preadv)(self.fd, iov, offset)
        if got != want:
            self._finish_short(iov, offset, got, want, write)

    def _finish_short(self, iov: list[memoryview], offset: int, done: int, want: int,
                      write: bool) -> None:
        """Continue a short transfer; a read at end of file is an error."""
        while done < want:
            rest: list[memoryview] = []
            skip = done
            for b in iov:
                if skip >= len(b):
                    skip -= len(b)
                    continue
                rest.append(b[skip:])
                skip = 0
            n = (os.pwritev if write else os.preadv)(self.fd, rest, offset + done)
            if n == 0:
                raise OSError(errno.EIO, "unexpected end of file")
            done += n

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        if not self.punch_hole:
            return  # discard is advisory
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self.punch_hole = False

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
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
        chunk = bytes(min(length, 1 << 20))
        while length:
            n = os.pwrite(self.fd, chunk[:min(length, len(chunk))], offset)
            offset += n
            length -= n

    def close(self) -> None:
        os.close(self.fd)
