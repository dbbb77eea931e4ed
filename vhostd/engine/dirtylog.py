"""The vhost-user dirty log: which guest pages the back end wrote during migration.

QEMU shares a bitmap (SET_LOG_BASE): bit p of byte p // 8 stands for guest-physical
page p of 4 KiB. While VHOST_F_LOG_ALL is negotiated the back end sets the bit of
every page it writes (request data, status bytes, used-ring entries of rings whose
addresses carry VHOST_VRING_F_LOG); QEMU harvests the bits with an atomic exchange.
One writer thread and QEMU's exchange-to-zero can at worst report a page twice,
never lose one.
"""

from __future__ import annotations

import logging
import mmap
import os

log = logging.getLogger(__name__)

VHOST_LOG_PAGE = 4096
_PAGE_SHIFT = 12


class DirtyLog:
    def __init__(self, fd: int, mmap_size: int, mmap_offset: int) -> None:
        if mmap_size == 0:
            raise ValueError("dirty log of size 0")
        self.mm = mmap.mmap(fd, mmap_offset + mmap_size, mmap.MAP_SHARED,
                            mmap.PROT_READ | mmap.PROT_WRITE)
        self.bitmap = memoryview(self.mm)[mmap_offset:mmap_offset + mmap_size]
        self.fd = os.dup(fd)  # for a queue worker process to map the same log
        self.offset = mmap_offset
        self.size = mmap_size
        self.pages = mmap_size * 8
        self.marked = 0  # page marks made (a page written twice counts twice)
        self._warned = False

    def mark(self, gpa: int, length: int) -> None:
        """Set the bits of every page in [gpa, gpa + length)."""
        if length <= 0:
            return
        bitmap = self.bitmap
        first = gpa >> _PAGE_SHIFT
        last = (gpa + length - 1) >> _PAGE_SHIFT
        if last >= self.pages:
            if not self._warned:
                log.warning("write at GPA %#x lies beyond the dirty log (%d pages)", gpa,
                            self.pages)
                self._warned = True
            if first >= self.pages:
                return
            last = self.pages - 1
        self.marked += last - first + 1
        if first == last:
            bitmap[first >> 3] |= 1 << (first & 7)
            return
        for page in range(first, last + 1):
            bitmap[page >> 3] |= 1 << (page & 7)

    def close(self) -> None:
        os.close(self.fd)
        self.bitmap.release()
        try:
            self.mm.close()
        except BufferError:
            pass
