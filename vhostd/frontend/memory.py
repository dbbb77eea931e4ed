"""Guest memory for the test front end: memfd-backed regions at chosen guest-physical addresses.

Each region is what QEMU would describe in SET_MEM_TABLE / ADD_MEM_REG: a guest-physical
address (GPA), a size, a "userspace address" (QVA, QEMU's own virtual address of the region;
here just a distinct fake number) and an mmap_offset (where the region starts inside the fd).
The back end maps the fd itself, so the front end only needs to keep its own shared mapping.
"""

from __future__ import annotations

import bisect
import fcntl
import mmap
import os
from collections.abc import Sequence
from typing import NamedTuple

PAGE_SIZE = 4096
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
# Fake QVAs: far from any GPA so a back end that mixes up the two address spaces fails loudly.
DEFAULT_QVA_BASE = 0x7F00_0000_0000


def align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


class RegionSpec(NamedTuple):
    """Requested layout of one region; ``qva`` None means ``DEFAULT_QVA_BASE + gpa``."""

    gpa: int
    size: int
    mmap_offset: int = 0
    qva: int | None = None


class GuestRegion:
    """One memfd region, mapped shared. ``buf`` covers exactly the guest-visible bytes."""

    __slots__ = ("buf", "cursor", "end", "fd", "gpa", "mm", "mmap_offset", "qva", "size")

    def __init__(self, gpa: int, size: int, qva: int, mmap_offset: int) -> None:
        if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE:
            raise ValueError(f"region gpa {gpa:#x} size {size:#x} must be page-aligned, non-empty")
        if mmap_offset < 0 or mmap_offset % PAGE_SIZE:
            raise ValueError(f"mmap_offset {mmap_offset:#x} must be page-aligned")
        self.gpa = gpa
        self.size = size
        self.end = gpa + size
        self.qva = qva
        self.mmap_offset = mmap_offset
        self.fd = os.memfd_create(f"vhostd-guest-{gpa:#x}",
                                  os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        # The fd is sparse: only pages that somebody touches get allocated, so generous
        # region sizes cost nothing.
        os.ftruncate(self.fd, mmap_offset + size)
        # Sealed as QEMU's memory-backend-memfd seals (seal=on): a back end may insist
        # that nobody can shrink the memory it maps.
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, SEALS)
        # Map the leading pad too, as a back end does (it maps from 0 to mmap_offset + size).
        self.mm = mmap.mmap(self.fd, mmap_offset + size, mmap.MAP_SHARED,
                            mmap.PROT_READ | mmap.PROT_WRITE)
        self.buf = memoryview(self.mm)[mmap_offset:mmap_offset + size]
        # Bump-allocator position, as a GPA.
        self.cursor = gpa

    def close(self) -> None:
        if self.fd < 0:
            return
        self.buf.release()
        try:
            self.mm.close()
        except BufferError:
            # A caller still holds a view; the mapping goes away with the last reference.
            pass
        os.close(self.fd)
        self.fd = -1

    def __repr__(self) -> str:
        return (f"GuestRegion(gpa={self.gpa:#x}, size={self.size:#x}, qva={self.qva:#x}, "
                f"mmap_offset={self.mmap_offset:#x})")


class GuestMemory:
    """A set of non-overlapping regions plus GPA access helpers and a bump allocator."""

    def __init__(self, layout: Sequence[RegionSpec | tuple[int, ...]] = ()) -> None:
        self.regions: list[GuestRegion] = []
        self._starts: list[int] = []
        for spec in layout:
            self.add_region(*spec)

    def clone_layout(self, qva_shift: int = 1 << 40) -> GuestMemory:
        """Empty memory with the same guest-physical layout: a migration destination.

        Its front-end virtual addresses differ (``qva_shift``), as a second QEMU's would;
        the allocator continues where this one stands, so addresses handed out here stay
        free there."""
        other = GuestMemory([RegionSpec(r.gpa, r.size, r.mmap_offset, r.qva + qva_shift)
                             for r in self.regions])
        for mine, theirs in zip(self.regions, other.regions, strict=True):
            theirs.cursor = mine.cursor
        return other

    # -- regions -------------------------------------------------------------------------

    def add_region(self, gpa: int, size: int, mmap_offset: int = 0,
                   qva: int | None = None) -> GuestRegion:
        for r in self.regions:
            if gpa < r.end and r.gpa < gpa + size:
                raise ValueError(f"region at {gpa:#x}+{size:#x} overlaps {r!r}")
        region = GuestRegion(gpa, size, DEFAULT_QVA_BASE + gpa if qva is None else qva,
                             mmap_offset)
        i = bisect.bisect(self._starts, gpa)
        self._starts.insert(i, gpa)
        self.regions.insert(i, region)
        return region

    def region_at(self, gpa: int) -> GuestRegion:
        i = bisect.bisect(self._starts, gpa) - 1
        if i >= 0:
            r = self.regions[i]
            if gpa < r.end:
                return r
        raise ValueError(f"GPA {gpa:#x} is not guest memory")

    def gpa_to_qva(self, gpa: int) -> int:
        r = self.region_at(gpa)
        return r.qva + (gpa - r.gpa)

    def qva_to_gpa(self, qva: int) -> int:
        for r in self.regions:
            if r.qva <= qva < r.qva + r.size:
                return r.gpa + (qva - r.qva)
        raise ValueError(f"QVA {qva:#x} is not guest memory")

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    # -- access --------------------------------------------------------------------------

    def view(self, gpa: int, length: int) -> memoryview:
        """Zero-copy view of ``length`` bytes that must lie inside one region."""
        r = self.region_at(gpa)
        off = gpa - r.gpa
        if off + length > r.size:
            raise ValueError(f"{gpa:#x}+{length:#x} crosses the end of {r!r}")
        return r.buf[off:off + length]

    def _pieces(self, gpa: int, length: int) -> list[tuple[memoryview, int, int]]:
        """(region buf, offset, count) pieces covering a possibly region-straddling range."""
        out = []
        while length > 0:
            r = self.region_at(gpa)
            off = gpa - r.gpa
            n = min(length, r.size - off)
            out.append((r.buf, off, n))
            gpa += n
            length -= n
        return out

    def read(self, gpa: int, length: int) -> bytes:
        pieces = self._pieces(gpa, length)
        if len(pieces) == 1:
            buf, off, n = pieces[0]
            return bytes(buf[off:off + n])
        return b"".join(bytes(buf[off:off + n]) for buf, off, n in pieces)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        src = memoryview(data).cast("B")
        pos = 0
        for buf, off, n in self._pieces(gpa, len(src)):
            buf[off:off + n] = src[pos:pos + n]
            pos += n

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        for buf, off, n in self._pieces(gpa, length):
            buf[off:off + n] = bytes([byte]) * n

    # -- allocation ----------------------------------------------------------------------

    def alloc(self, size: int, align: int = 8, region: GuestRegion | None = None) -> int:
        """Bump-allocate ``size`` bytes inside one region (the first that has room)."""
        if size <= 0 or align <= 0 or align & (align - 1):
            raise ValueError(f"bad allocation size {size} / align {align}")
        for r in (region,) if region is not None else self.regions:
            start = align_up(r.cursor, align)
            if start + size <= r.end:
                r.cursor = start + size
                return start
        raise MemoryError(f"no region has {size:#x} free bytes (align {align:#x})")

    def alloc_straddling(self, size: int, before: int, boundary: int | None = None) -> int:
        """Place a buffer so its first ``before`` bytes end one region and the rest start the
        next, GPA-contiguous region (at GPA ``boundary``, or the first such boundary).

        Consumes the tail of the lower region and the head of the upper one, so it only works
        while the upper region's head is still unallocated.
        """
        if not 0 < before < size:
            raise ValueError("a straddling buffer needs bytes on both sides")
        for lo, hi in zip(self.regions, self.regions[1:], strict=False):
            if lo.end != hi.gpa or (boundary is not None and hi.gpa != boundary):
                continue
            start = lo.end - before
            if lo.cursor > start or hi.cursor != hi.gpa or hi.gpa + size - before > hi.end:
                raise MemoryError(f"boundary {hi.gpa:#x} has no room for a straddling buffer")
            lo.cursor = lo.end
            hi.cursor = hi.gpa + size - before
            return start
        raise ValueError("no pair of GPA-contiguous regions"
                         + ("" if boundary is None else f" at {boundary:#x}"))

    def mark(self) -> tuple[int, ...]:
        """Allocator state, to hand to ``release`` (stack-like freeing for tests)."""
        return tuple(r.cursor for r in self.regions)

    def release(self, mark: tuple[int, ...]) -> None:
        for r, cursor in zip(self.regions, mark, strict=True):
            r.cursor = cursor

    def close(self) -> None:
        for r in self.regions:
            r.close()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
