"""Inflight I/O tracking (split-queue layout of vhostd_proto.inflight).

While a chain is being served its descriptor entry is flagged in a region shared
with the front end, so a back end started after a crash can resubmit exactly the
chains that were taken and not completed. Hot-path writes use precompiled structs.
"""

from __future__ import annotations

import mmap
import os
import struct

from vhostd_proto.inflight import INFLIGHT_VERSION, inflight_queue_stride

# Header: features u64, version u16, desc_num u16, last_batch_head u16, used_idx u16.
HEADER = struct.Struct("<QHHHH")
# Descriptor entry: inflight u8, 5 pad, next u16, counter u64.
ENTRY = struct.Struct("<B5xHQ")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_COUNTER = struct.Struct("<Q")
_VERSION_OFF = 8
_USED_IDX_OFF = 14


class InflightQueue:
    """One queue's slice of the inflight region."""

    def __init__(self, view: memoryview, queue_size: int) -> None:
        self.view = view
        self.queue_size = queue_size
        self.counter = 0

    @property
    def valid(self) -> bool:
        version = _U16.unpack_from(self.view, _VERSION_OFF)[0]
        desc_num = _U16.unpack_from(self.view, 10)[0]
        return version == INFLIGHT_VERSION and desc_num == self.queue_size

    @property
    def used_idx(self) -> int:
        return _U16.unpack_from(self.view, _USED_IDX_OFF)[0]

    def init(self, queue_size: int, used_idx: int) -> None:
        self.view[: 16 + 16 * queue_size] = bytes(16 + 16 * queue_size)
        HEADER.pack_into(self.view, 0, 0, INFLIGHT_VERSION, queue_size, 0, used_idx)
        self.counter = 0

    def take(self, head: int) -> None:
        self.counter += 1
        ENTRY.pack_into(self.view, 16 + 16 * head, 1, 0, self.counter)

    def completed(self, heads: list[int], used_idx: int) -> None:
        """Called after the used index covering ``heads`` was published."""
        view = self.view
        for head in heads:
            _U8.pack_into(view, 16 + 16 * head, 0)
        _U16.pack_into(view, _USED_IDX_OFF, used_idx)

    def pending_heads(self) -> list[int]:
        """Heads still flagged, oldest first."""
        found = []
        for head in range(self.queue_size):
            flag, _next, counter = ENTRY.unpack_from(self.view, 16 + 16 * head)
            if flag:
                found.append((counter, head))
        found.sort()
        if found:
            self.counter = found[-1][0]
        return [head for _, head in found]


class InflightRegion:
    """The whole shared region: one stride per queue, back to back."""

    def __init__(self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int,
                 queue_size: int) -> None:
        stride = inflight_queue_stride(queue_size)
        if mmap_size < stride * num_queues:
            raise ValueError(f"inflight region of {mmap_size} bytes is too small for "
                             f"{num_queues} queues of {queue_size}")
        self.mm = mmap.mmap(fd, mmap_offset + mmap_size, mmap.MAP_SHARED,
                            mmap.PROT_READ | mmap.PROT_WRITE)
        self.num_queues = num_queues
        self.queue_size = queue_size
        base = memoryview(self.mm)[mmap_offset:mmap_offset + mmap_size]
        self.queues = [
            InflightQueue(base[i * stride:(i + 1) * stride], queue_size)
            for i in range(num_queues)
        ]

    @staticmethod
    def create(num_queues: int, queue_size: int) -> tuple[int, int]:
        """A fresh zeroed memfd for GET_INFLIGHT_FD: (fd, size)."""
        size = inflight_queue_stride(queue_size) * num_queues
        fd = os.memfd_create("vhostd-inflight", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            raise
        return fd, size

    def close(self) -> None:
        for q in self.queues:
            q.view.release()
        try:
            self.mm.close()
        except BufferError:
            pass
