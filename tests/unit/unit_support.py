"""Helpers shared by the unit tests (imported by them and by conftest.py).

Everything that puts bytes on the wire or into guest memory is written here with
plain ``struct`` from the layouts in the reference, never with the construct
definitions under test, so a wrong definition cannot agree with itself.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from vhostd.core.protocol import BackendProtocol, DeviceInfo, Message
from vhostd.engine.backend import ENGINE_FEATURES, PROTOCOL_FEATURES
from vhostd.engine.memory import GuestMemory
from vhostd.engine.virtqueue import SplitVirtqueue
from vhostd_proto.vhost_user import Request as R

# ---- construct results as plain data ------------------------------------------


def plain(obj: Any) -> Any:
    """A construct Container/ListContainer as dicts and lists, without ``_io``."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    return obj


# ---- vhost-user messages ------------------------------------------------------

# Some virtio-blk bits (FLUSH, CONFIG_WCE, MQ) on top of what the engine offers.
# The unit tests lay out split rings: leave RING_PACKED (bit 34) out of what is acked.
FEATURES = ENGINE_FEATURES & ~(1 << 34) | 1 << 9 | 1 << 11 | 1 << 12
NUM_QUEUES = 2


def make_info(protocol_features: int = PROTOCOL_FEATURES) -> DeviceInfo:
    """What the back end offers (vhostd/engine/backend.py PROTOCOL_FEATURES by default)."""
    return DeviceInfo(features=FEATURES, protocol_features=protocol_features,
                      num_queues=NUM_QUEUES)


FLAGS = 0x1  # version 1
NEED_REPLY = 0x9  # version 1 | NEED_REPLY
NOFD = 0x100


def frame(req: int, payload: bytes = b"", flags: int = FLAGS, size: int | None = None) -> bytes:
    """Header + payload; ``size`` overrides the declared payload size."""
    declared = len(payload) if size is None else size
    return struct.pack("<III", int(req), flags, declared) + payload


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def state(index: int, num: int = 0) -> bytes:
    return struct.pack("<II", index, num)


def vring_fd(index: int, nofd: bool = False, extra: int = 0) -> bytes:
    return u64(index | (NOFD if nofd else 0) | extra)


def vring_addr(index: int, flags: int = 0, desc: int = 0, used: int = 0, avail: int = 0,
               log: int = 0) -> bytes:
    # Order on the wire: desc, used, avail, log.
    return struct.pack("<IIQQQQ", index, flags, desc, used, avail, log)


def mem_region(gpa: int, size: int, uaddr: int, offset: int = 0) -> bytes:
    return struct.pack("<QQQQ", gpa, size, uaddr, offset)


def mem_table(*regions: tuple[int, int, int, int], nregions: int | None = None) -> bytes:
    n = len(regions) if nregions is None else nregions
    return struct.pack("<II", n, 0) + b"".join(mem_region(*r) for r in regions)


def single_region(gpa: int, size: int, uaddr: int, offset: int = 0) -> bytes:
    return bytes(8) + mem_region(gpa, size, uaddr, offset)


def config_payload(offset: int, size: int, flags: int = 0, data: bytes | None = None) -> bytes:
    return struct.pack("<III", offset, size, flags) + (bytes(size) if data is None else data)


def inflight_payload(mmap_size: int = 0, mmap_offset: int = 0, num_queues: int = 2,
                     queue_size: int = 128) -> bytes:
    return struct.pack("<QQHH4x", mmap_size, mmap_offset, num_queues, queue_size)


def log_base(mmap_size: int, mmap_offset: int = 0) -> bytes:
    return struct.pack("<QQ", mmap_size, mmap_offset)


def feed(proto: BackendProtocol, data: bytes, fds: Iterable[int] = ()) -> list[Message]:
    return proto.receive(data, list(fds))


def feed_one(proto: BackendProtocol, data: bytes, fds: Iterable[int] = ()) -> Message:
    msgs = proto.receive(data, list(fds))
    assert len(msgs) == 1, msgs
    return msgs[0]


def negotiate(proto: BackendProtocol, acked: int | None = None, owner: bool = True) -> None:
    """Realize steps 1-3 (and 7) of reference 6.1."""
    feed_one(proto, frame(R.GET_FEATURES))
    feed_one(proto, frame(R.GET_PROTOCOL_FEATURES))
    pf = proto.info.protocol_features if acked is None else acked
    feed_one(proto, frame(R.SET_PROTOCOL_FEATURES, u64(pf)))
    if owner:
        feed_one(proto, frame(R.SET_OWNER))


def reply_fields(data: bytes) -> tuple[int, int, int, bytes]:
    request, flags, size = struct.unpack_from("<III", data)
    return request, flags, size, data[12:]


# ---- disk images ---------------------------------------------------------------

IMAGE_SIZE = 1 << 20  # the unit tests' disk image: 2048 sectors


# ---- eventfds -----------------------------------------------------------------


def eventfd_count(fd: int) -> int:
    """Read and reset a non-blocking eventfd; 0 if it was not signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


# ---- guest memory -------------------------------------------------------------


@dataclass
class RamRegion:
    fd: int
    gpa: int
    size: int
    qva: int
    offset: int
    mm: mmap.mmap  # the test's own mapping of the whole memfd

    def contains(self, gpa: int, n: int) -> bool:
        return self.gpa <= gpa and gpa + n <= self.gpa + self.size


class GuestRam:
    """memfd-backed guest RAM: a GuestMemory under test plus independent mappings."""

    def __init__(self) -> None:
        self.memory = GuestMemory()
        self.regions: list[RamRegion] = []

    def add(self, gpa: int, size: int, qva: int, mmap_offset: int = 0) -> RamRegion:
        fd = os.memfd_create("vhostd-test-ram", os.MFD_CLOEXEC)
        os.ftruncate(fd, mmap_offset + size)
        mm = mmap.mmap(fd, mmap_offset + size)
        self.memory.add(fd, gpa, size, qva, mmap_offset)
        region = RamRegion(fd, gpa, size, qva, mmap_offset, mm)
        self.regions.append(region)
        return region

    def _locate(self, gpa: int, n: int) -> tuple[RamRegion, int]:
        for r in self.regions:
            if r.contains(gpa, n):
                return r, r.offset + gpa - r.gpa
        raise AssertionError(f"test bug: GPA {gpa:#x}+{n:#x} not inside one region")

    def write(self, gpa: int, data: bytes) -> None:
        r, off = self._locate(gpa, len(data))
        r.mm[off:off + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        r, off = self._locate(gpa, n)
        return bytes(r.mm[off:off + n])

    def qva(self, gpa: int) -> int:
        r, _ = self._locate(gpa, 1)
        return r.qva + gpa - r.gpa

    def close(self) -> None:
        self.memory.clear()
        for r in self.regions:
            r.mm.close()
            os.close(r.fd)
        self.regions = []


DESC_FMT = struct.Struct("<QIHH")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


class Ring:
    """A split ring in guest RAM, driven by the test the way a driver would."""

    def __init__(self, ram: GuestRam, size: int, desc: int, avail: int, used: int) -> None:
        self.ram = ram
        self.size = size
        self.desc_gpa, self.avail_gpa, self.used_gpa = desc, avail, used
        self.avail_idx = 0
        ram.write(desc, bytes(16 * size))
        ram.write(avail, bytes(6 + 2 * size))
        ram.write(used, bytes(6 + 8 * size))

    # driver side
    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
             table: int | None = None) -> None:
        """Descriptor ``i`` of the ring's table, or of the indirect table at ``table``."""
        base = self.desc_gpa if table is None else table
        self.ram.write(base + 16 * i, DESC_FMT.pack(addr, length, flags, nxt))

    def chain(self, head: int, bufs: list[tuple[int, int, int]]) -> None:
        """Descriptors head, head+1, ... linked by NEXT; bufs are (addr, len, flags)."""
        for k, (addr, length, flags) in enumerate(bufs):
            last = k == len(bufs) - 1
            self.desc(head + k, addr, length, flags | (0 if last else F_NEXT), head + k + 1)

    def publish(self, *heads: int) -> None:
        for h in heads:
            self.ram.write(self.avail_gpa + 4 + 2 * (self.avail_idx % self.size),
                           struct.pack("<H", h))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        self.ram.write(self.avail_gpa + 2, struct.pack("<H", idx))

    def set_avail_flags(self, flags: int) -> None:
        self.ram.write(self.avail_gpa, struct.pack("<H", flags))

    def set_used_event(self, value: int) -> None:
        self.ram.write(self.avail_gpa + 4 + 2 * self.size, struct.pack("<H", value))

    def set_used_idx(self, idx: int) -> None:
        self.ram.write(self.used_gpa + 2, struct.pack("<H", idx))

    def write_used_elem(self, slot: int, head: int, length: int) -> None:
        self.ram.write(self.used_gpa + 4 + 8 * (slot % self.size), struct.pack("<II", head, length))

    # what the device published
    @property
    def used_idx(self) -> int:
        return struct.unpack("<H", self.ram.read(self.used_gpa + 2, 2))[0]

    def used_elems(self, start: int = 0, count: int | None = None) -> list[tuple[int, int]]:
        n = self.used_idx - start if count is None else count
        out = []
        for i in range(start, start + n):
            raw = self.ram.read(self.used_gpa + 4 + 8 * (i % self.size), 8)
            out.append(struct.unpack("<II", raw))
        return out

    @property
    def avail_event(self) -> int:
        return struct.unpack("<H", self.ram.read(self.used_gpa + 4 + 8 * self.size, 2))[0]

    # the device under test
    def queue(self, handler: Callable[[int, list[memoryview], list[memoryview]], int], *,
              index: int = 0, event_idx: bool = False, indirect: bool = True,
              call_fd: int | None = None, err_fd: int | None = None, base: int = 0,
              inflight: Any = None, start: bool = True) -> SplitVirtqueue:
        q = SplitVirtqueue(index, handler)
        q.set_num(self.size)
        q.set_addr(0, self.ram.qva(self.desc_gpa), self.ram.qva(self.used_gpa),
                   self.ram.qva(self.avail_gpa), 0)
        q.set_features(event_idx=event_idx, indirect=indirect)
        q.call_fd, q.err_fd = call_fd, err_fd
        q.last_avail_idx = base
        q.inflight = inflight
        q.enabled = True
        if start:
            q.start(self.ram.memory)
        return q


@dataclass
class Call:
    head: int
    readable: list[bytes]  # one entry per memoryview the device got
    writable: list[int]  # lengths of the writable memoryviews

    @property
    def data(self) -> bytes:
        return b"".join(self.readable)


@dataclass
class Recorder:
    """A virtqueue handler that records what it was given and returns a length."""

    result: int | Callable[[int], int] = 0
    fill: bytes = b""  # written at the start of the first writable buffer
    calls: list[Call] = field(default_factory=list)

    def __call__(self, head: int, readable: list[memoryview], writable: list[memoryview]) -> int:
        self.calls.append(Call(head, [bytes(r) for r in readable], [len(w) for w in writable]))
        if self.fill and writable:
            writable[0][:len(self.fill)] = self.fill
        return self.result(head) if callable(self.result) else self.result

    @property
    def heads(self) -> list[int]:
        return [c.head for c in self.calls]
