"""Device-side write tracking for the owner's vendor dirty-tracking commands.

The hypervisor asks the owner to record which guest pages a member writes within
given guest-physical ranges, at a page size it chooses, then reads (and clears) one
bitmap per range. This is the "write records" idea the virtio 1.4 device-parts work
left out; docs/admin-over-vhost-user.md specifies the commands.
"""

from __future__ import annotations

from .dirtylog import set_bit_run

MAX_RANGES = 64
MAX_BITMAP_BYTES = 16 << 20


class TrackerError(ValueError):
    pass


class WriteTracker:
    def __init__(self, page_size: int, ranges: list[tuple[int, int]]) -> None:
        if page_size < 4096 or page_size > 1 << 30 or page_size & (page_size - 1):
            raise TrackerError(f"page size {page_size} is not a power of two from 4096 to 1 GiB")
        if not 1 <= len(ranges) <= MAX_RANGES:
            raise TrackerError(f"{len(ranges)} ranges (1..{MAX_RANGES} allowed)")
        self.shift = page_size.bit_length() - 1
        self.page_size = page_size
        self.ranges: list[tuple[int, int, bytearray]] = []
        total = 0
        for gpa, length in ranges:
            if length == 0 or gpa + length > 1 << 64:
                raise TrackerError(f"range {gpa:#x}+{length:#x} is empty or wraps")
            pages = (length + page_size - 1) >> self.shift
            nbytes = (pages + 63) // 64 * 8
            total += nbytes
            if total > MAX_BITMAP_BYTES:
                raise TrackerError("the ranges need more than 16 MiB of bitmap")
            self.ranges.append((gpa, length, bytearray(nbytes)))
        self.marked = 0

    def mark(self, gpa: int, length: int) -> None:
        if length <= 0:
            return
        end = gpa + length
        shift = self.shift
        for start, size, bitmap in self.ranges:
            lo = max(gpa, start)
            hi = min(end, start + size)
            if lo >= hi:
                continue
            first = (lo - start) >> shift
            last = (hi - 1 - start) >> shift
            self.marked += last - first + 1
            set_bit_run(bitmap, first, last)

    def report_size(self) -> int:
        return 8 + sum(len(b) for _, _, b in self.ranges)

    def report(self, clear: bool) -> bytes:
        """``le32 page_size; le32 num_ranges;`` then each range's bitmap (le64 words)."""
        out = bytearray(self.page_size.to_bytes(4, "little"))
        out += len(self.ranges).to_bytes(4, "little")
        for _, _, bitmap in self.ranges:
            out += bitmap
            if clear:
                bitmap[:] = bytes(len(bitmap))
        return bytes(out)

    # ---- a worker process tracks a copy; its marks come back here ------------
    def params(self) -> tuple[int, list[tuple[int, int]]]:
        return self.page_size, [(gpa, length) for gpa, length, _ in self.ranges]

    def bitmaps(self) -> list[bytes]:
        return [bytes(bitmap) for _, _, bitmap in self.ranges]

    def merge(self, bitmaps: list[bytes], marked: int) -> None:
        """OR in the bitmaps of a tracker made from :meth:`params`."""
        for (_, _, bitmap), other in zip(self.ranges, bitmaps, strict=True):
            merged = int.from_bytes(bitmap, "little") | int.from_bytes(other, "little")
            bitmap[:] = merged.to_bytes(len(bitmap), "little")
        self.marked += marked
