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
from typing import TYPE_CHECKING

from .memory import unmap
from .seals import check_mappable

if TYPE_CHECKING:
    from .memory import MappingBudget

log = logging.getLogger(__name__)

VHOST_LOG_PAGE = 4096
_PAGE_SHIFT = 12


def set_bit_run(bitmap: memoryview | bytearray, first: int, last: int) -> None:
    """Set bits ``first`` to ``last`` (inclusive, bit b in byte b // 8): whole bytes
    at once, so a run of a million pages costs one slice assignment, not a million
    Python steps."""
    fb, lb = first >> 3, last >> 3
    lo = (0xFF << (first & 7)) & 0xFF
    hi = 0xFF >> (7 - (last & 7))
    if fb == lb:
        bitmap[fb] |= lo & hi
        return
    bitmap[fb] |= lo
    if lb - fb > 1:
        bitmap[fb + 1:lb] = b"\xff" * (lb - fb - 1)
    bitmap[lb] |= hi


def written_ranges(ranges: list[tuple[int, int]], used: int,
                   status_tail: bool = False) -> list[tuple[int, int]]:
    """The parts of a chain's device-writable ranges (in chain order) that a used
    length of ``used`` says were written: the first ``used`` bytes; with
    ``status_tail``, the first ``used - 1`` bytes and the very last byte (the status
    byte a virtio-blk request ends with, written even when no data moved)."""
    if used <= 0:
        return []
    total = sum(length for _, length in ranges)
    if used >= total:
        return ranges
    out: list[tuple[int, int]] = []
    left = used - 1 if status_tail else used
    for gpa, length in ranges:
        if left <= 0:
            break
        take = min(length, left)
        out.append((gpa, take))
        left -= take
    if status_tail:
        for gpa, length in reversed(ranges):
            if length:
                out.append((gpa + length - 1, 1))
                break
    return out


class DirtyLog:
    def __init__(self, fd: int, mmap_size: int, mmap_offset: int,
                 budget: MappingBudget | None = None) -> None:
        if mmap_size == 0:
            raise ValueError("dirty log of size 0")
        length = mmap_offset + mmap_size
        check_mappable(fd, length, "dirty log")
        if budget is not None:
            budget.charge(length, "dirty log")
        try:
            mm = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            if budget is not None:
                budget.refund(length)
            raise
        self.mm: mmap.mmap | None = mm
        self._budget = budget
        self._length = length
        self.bitmap = memoryview(mm)[mmap_offset:mmap_offset + mmap_size]
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
        set_bit_run(bitmap, first, last)

    def close(self) -> None:
        if self._budget is not None:
            self._budget.refund(self._length)
            self._budget = None
        os.close(self.fd)
        self.bitmap.release()
        if self.mm is not None:
            unmap(self.mm)
            self.mm = None
