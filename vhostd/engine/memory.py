"""Guest memory: the regions a front end shares, and address translation.

Two address spaces meet here (docs/architecture.md): ring addresses from
SET_VRING_ADDR are front-end virtual addresses (QVA, ``userspace_addr``), addresses
inside descriptors are guest-physical (GPA). Every translation is bounds-checked
against the region table; nothing outside a region is ever reachable.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

from vhostd_proto.vhost_user import VHOST_MEMORY_BASELINE_NREGIONS


class GuestMemoryError(Exception):
    """An address range that is not entirely inside guest memory."""


@dataclass(eq=False)
class Region:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    mm: mmap.mmap
    view: memoryview  # exactly the region's bytes
    fd: int  # our own duplicate, so a queue worker process can map the region too

    @property
    def gpa_end(self) -> int:
        return self.guest_phys_addr + self.memory_size

    def release(self) -> None:
        os.close(self.fd)
        self.view.release()
        try:
            self.mm.close()
        except BufferError:
            # Views handed to in-flight I/O still pin the mapping; it goes away with
            # the last of them.
            pass


MAX_MEM_SLOTS = 509


class GuestMemory:
    """The region table of one front-end connection."""

    def __init__(self) -> None:
        self.regions: list[Region] = []
        self.generation = 0  # changes with every table change

    # ---- table changes -----------------------------------------------------
    def add(self, fd: int, guest_phys_addr: int, memory_size: int, userspace_addr: int,
            mmap_offset: int) -> Region:
        """Map one region from ``fd``; the caller keeps ownership of ``fd``."""
        if memory_size == 0:
            raise GuestMemoryError("region of size 0")
        if len(self.regions) >= MAX_MEM_SLOTS:
            raise GuestMemoryError(f"more than {MAX_MEM_SLOTS} regions")
        end = guest_phys_addr + memory_size
        if end > 1 << 64 or userspace_addr + memory_size > 1 << 64:
            raise GuestMemoryError("region wraps the address space")
        for r in self.regions:
            if guest_phys_addr < r.gpa_end and r.guest_phys_addr < end:
                raise GuestMemoryError(
                    f"region at GPA {guest_phys_addr:#x} overlaps region at "
                    f"{r.guest_phys_addr:#x}"
                )
        length = mmap_offset + memory_size
        try:
            # Map from offset 0: the offset need not be page aligned (hugetlbfs).
            mm = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as e:
            raise GuestMemoryError(f"cannot map region at GPA {guest_phys_addr:#x} "
                                   f"({length} bytes): {e}") from e
        view = memoryview(mm)[mmap_offset:length]
        region = Region(guest_phys_addr, memory_size, userspace_addr, mmap_offset, mm, view,
                        os.dup(fd))
        self.regions.append(region)
        self.generation += 1
        self.regions.sort(key=lambda r: r.guest_phys_addr)
        return region

    def remove(self, guest_phys_addr: int, memory_size: int, userspace_addr: int) -> bool:
        """Drop the region matching all three fields; False if none does."""
        for r in self.regions:
            if (r.guest_phys_addr, r.memory_size, r.userspace_addr) == (
                guest_phys_addr, memory_size, userspace_addr
            ):
                self.regions.remove(r)
                r.release()
                self.generation += 1
                return True
        return False

    def clear(self) -> None:
        for r in self.regions:
            r.release()
        self.regions = []
        self.generation += 1

    def table(self) -> tuple[list[tuple[int, int, int, int]], list[int]]:
        """The regions as (gpa, size, qva, mmap_offset) and their fds (still ours),
        for a worker process that maps the same memory."""
        return ([(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
                 for r in self.regions], [r.fd for r in self.regions])

    def replace(self, table: list[tuple[int, int, int, int, int]]) -> None:
        """SET_MEM_TABLE: (fd, gpa, size, qva, mmap_offset) for each new region."""
        if len(table) > VHOST_MEMORY_BASELINE_NREGIONS:
            raise GuestMemoryError("too many regions")
        old, self.regions = self.regions, []
        try:
            for entry in table:
                self.add(*entry)
        except GuestMemoryError:
            self.clear()
            self.regions = old
            raise
        for r in old:
            r.release()

    # ---- translation -------------------------------------------------------
    def gpa(self, addr: int, length: int) -> memoryview:
        """``length`` bytes at guest-physical ``addr``, which must lie in one region."""
        for r in self.regions:
            off = addr - r.guest_phys_addr
            if 0 <= off and off + length <= r.memory_size:
                return r.view[off:off + length]
        raise GuestMemoryError(f"GPA range {addr:#x}+{length:#x} is not in one region")

    def gpa_iov(self, addr: int, length: int, out: list[memoryview]) -> None:
        """Append views covering ``length`` bytes at ``addr``, split at region edges."""
        regions = self.regions
        while length:
            for r in regions:
                off = addr - r.guest_phys_addr
                if 0 <= off < r.memory_size:
                    n = r.memory_size - off
                    if n >= length:
                        out.append(r.view[off:off + length])
                        return
                    out.append(r.view[off:])
                    addr += n
                    length -= n
                    break
            else:
                raise GuestMemoryError(f"GPA {addr:#x} (+{length:#x}) is outside guest memory")

    def qva(self, addr: int, length: int) -> memoryview:
        """``length`` bytes at front-end virtual ``addr``, inside one region."""
        for r in self.regions:
            off = addr - r.userspace_addr
            if 0 <= off and off + length <= r.memory_size:
                return r.view[off:off + length]
        raise GuestMemoryError(f"front-end address range {addr:#x}+{length:#x} "
                               f"is not in one region")

    def qva_to_gpa(self, addr: int) -> int:
        for r in self.regions:
            off = addr - r.userspace_addr
            if 0 <= off < r.memory_size:
                return r.guest_phys_addr + off
        raise GuestMemoryError(f"front-end address {addr:#x} is not in guest memory")
