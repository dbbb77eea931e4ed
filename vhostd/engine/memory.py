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

from .seals import UnsafeMemory, check_mappable


def unmap(mm: mmap.mmap) -> None:
    """Unmap ``mm`` now, or, while views handed to in-flight I/O still pin it, as soon
    as the last of them goes. The caller must drop its own reference too: the mapping
    and the fd that ``mmap`` keeps for it live as long as the object does, and a
    released object can outlive its owner (an exception's traceback holds the frames
    that saw it)."""
    try:
        mm.close()
    except BufferError:
        pass


class GuestMemoryError(Exception):
    """An address range that is not entirely inside guest memory."""


# How much address space one front end may have vhostd map (guest RAM, dirty log,
# inflight region): enough for guests of hundreds of GiB, small against the 128 TiB
# of a process, so no front end can starve the others. --max-mapped-memory sets it
# (through this variable, which queue worker processes inherit).
MAX_MAPPED_ENV = "VHOSTD_MAX_MAPPED_MEMORY"
DEFAULT_MAX_MAPPED = 1 << 40


def max_mapped_default() -> int:
    try:
        return int(os.environ.get(MAX_MAPPED_ENV, "")) or DEFAULT_MAX_MAPPED
    except ValueError:
        return DEFAULT_MAX_MAPPED


class MappingBudget:
    """Bytes of address space one front end has vhostd map, against a limit."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = max_mapped_default() if limit is None else limit
        self.used = 0

    def charge(self, nbytes: int, what: str) -> None:
        if self.used + nbytes > self.limit:
            raise GuestMemoryError(
                f"{what}: mapping {nbytes} more bytes would exceed this front end's budget "
                f"({self.used} of {self.limit} bytes mapped; --max-mapped-memory)")
        self.used += nbytes

    def refund(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)


@dataclass(eq=False)
class Region:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    mm: mmap.mmap | None  # None once released
    view: memoryview  # exactly the region's bytes
    fd: int  # our own duplicate, so a queue worker process can map the region too
    budget: MappingBudget | None = None  # refunded on release

    @property
    def gpa_end(self) -> int:
        return self.guest_phys_addr + self.memory_size

    def release(self) -> None:
        if self.budget is not None:
            self.budget.refund(self.mmap_offset + self.memory_size)
            self.budget = None
        os.close(self.fd)
        self.view.release()
        if self.mm is not None:
            unmap(self.mm)
            self.mm = None


MAX_MEM_SLOTS = 509


class GuestMemory:
    """The region table of one front-end connection."""

    def __init__(self, budget: MappingBudget | None = None) -> None:
        self.regions: list[Region] = []
        self.generation = 0  # changes with every table change
        self.budget = budget if budget is not None else MappingBudget()

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
        what = f"region at GPA {guest_phys_addr:#x}"
        try:
            check_mappable(fd, length, what)
        except UnsafeMemory as e:
            raise GuestMemoryError(str(e)) from e
        self.budget.charge(length, what)
        try:
            # Map from offset 0: the offset need not be page aligned (hugetlbfs).
            mm = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as e:
            self.budget.refund(length)
            raise GuestMemoryError(f"cannot map region at GPA {guest_phys_addr:#x} "
                                   f"({length} bytes): {e}") from e
        view = memoryview(mm)[mmap_offset:length]
        region = Region(guest_phys_addr, memory_size, userspace_addr, mmap_offset, mm, view,
                        os.dup(fd), self.budget)
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
        # The new table replaces the old one: it gets the whole budget (both are mapped
        # for a moment, as a front end that re-sends its table expects).
        old_bytes = sum(r.mmap_offset + r.memory_size for r in old)
        self.budget.refund(old_bytes)
        for r in old:
            r.budget = None
        try:
            for entry in table:
                self.add(*entry)
        except GuestMemoryError:
            self.clear()
            self.regions = old
            self.budget.used += old_bytes
            for r in old:
                r.budget = self.budget
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
