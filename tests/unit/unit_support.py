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
from vhostd.engine.memory import GuestMemory
from vhostd.engine.packed import PackedVirtqueue, set_layout
from vhostd.engine.seals import sealed_memfd
from vhostd.engine.virtqueue import SplitVirtqueue
from vhostd.vhost_user.handler import ENGINE_FEATURES, PROTOCOL_FEATURES, VhostUserHandler
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
    """What the back end offers (vhostd/vhost_user/handler.py PROTOCOL_FEATURES by default)."""
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
        fd = sealed_memfd("vhostd-test-ram", mmap_offset + size)
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


class FakeDevice:
    """The smallest VirtioDevice: ``num_queues`` queues of ``max_queue_size`` whose
    requests go to one handler (a Recorder, typically)."""

    name = "fake"

    def __init__(self, handler: Callable[[int, list[memoryview], list[memoryview]], int],
                 num_queues: int = 1, max_queue_size: int = 8) -> None:
        self.handler = handler
        self.num_queues = num_queues
        self.max_queue_size = max_queue_size
        self.resets = 0

    def device_features(self) -> int:
        return 0

    def make_handler(self, queue: Any) -> Callable[[int, list[memoryview], list[memoryview]],
                                                    int]:
        return self.handler

    def get_config(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        pass

    def features_acked(self, features: int) -> None:
        pass

    def reset(self) -> None:
        self.resets += 1

    def disconnected(self) -> None:
        pass

    def refresh_capacity(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def worker_spec(self) -> tuple[dict[str, object], list[int]]:
        return {"kind": "fake"}, []

    def get_parts(self) -> list[tuple[int, bytes]]:
        return []

    def part_lengths(self) -> list[tuple[int, int]]:
        return []

    def check_part(self, part_type: int, value: bytes) -> None:
        pass

    def apply_part(self, part_type: int, value: bytes) -> None:
        pass


class FakeLoop:
    """The engine's Loop without a loop: readers are remembered, ``call_soon`` callbacks
    run at :meth:`run_soon`."""

    def __init__(self) -> None:
        self.readers: dict[int, tuple[Callable[..., Any], tuple[Any, ...]]] = {}
        self.soon: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def add_reader(self, fd: int, callback: Callable[..., Any], *args: Any) -> None:
        self.readers[fd] = (callback, args)

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        self.soon.append((callback, args))

    def run_soon(self) -> None:
        soon, self.soon = self.soon, []
        for callback, args in soon:
            callback(*args)


# ---- packed rings (virtio 1.1+ 2.8) --------------------------------------------

PF_AVAIL = 1 << 7
PF_USED = 1 << 15
EVENT_ENABLE, EVENT_DISABLE, EVENT_DESC = 0, 1, 2
NOT_THE_ID = 0xBEEF  # put in every descriptor of a chain but the last


def packed_avail_flags(wrap: int) -> int:
    """AVAIL/USED bits of a descriptor the driver makes available in lap ``wrap``."""
    return PF_AVAIL if wrap else PF_USED


def packed_used_flags(wrap: int) -> int:
    """AVAIL/USED bits of a descriptor the device used in lap ``wrap``."""
    return PF_AVAIL | PF_USED if wrap else 0


@dataclass
class UsedDesc:
    slot: int
    id: int
    len: int
    flags: int


class PackedRing:
    """A packed ring in guest RAM, driven by the test the way a driver would: it keeps
    its own next-avail and next-used positions and wrap counters."""

    def __init__(self, ram: GuestRam, size: int, desc: int, driver: int, device: int) -> None:
        self.ram = ram
        self.size = size
        self.desc_gpa, self.driver_gpa, self.device_gpa = desc, driver, device
        self.next_avail, self.avail_wrap = 0, 1
        self.next_used, self.used_wrap = 0, 1
        self.slots: dict[int, int] = {}  # buffer id -> ring slots of its chain
        ram.write(desc, bytes(16 * size))
        ram.write(driver, bytes(4))
        ram.write(device, bytes(4))

    # raw access
    def write_desc(self, slot: int, addr: int, length: int, buf_id: int, flags: int) -> None:
        self.ram.write(self.desc_gpa + 16 * slot, DESC_FMT.pack(addr, length, buf_id, flags))

    def read_desc(self, slot: int) -> tuple[int, int, int, int]:
        """(addr, len, id, flags) of ring slot ``slot``."""
        return DESC_FMT.unpack(self.ram.read(self.desc_gpa + 16 * slot, 16))

    def set_position(self, slot: int, wrap: int) -> None:
        """Where the driver continues (as after SET_VRING_BASE)."""
        self.next_avail = self.next_used = slot
        self.avail_wrap = self.used_wrap = wrap

    # driver side
    def add(self, buf_id: int, bufs: list[tuple[int, int, int]]) -> int:
        """Make a chain of (addr, len, flags) available; the id goes into its last
        descriptor only. The head's flags are written last. Returns the head slot."""
        head = self.next_avail
        head_flags = 0
        for k, (addr, length, flags) in enumerate(bufs):
            last = k == len(bufs) - 1
            f = flags | (0 if last else F_NEXT) | packed_avail_flags(self.avail_wrap)
            slot = self.next_avail
            self.write_desc(slot, addr, length, buf_id if last else NOT_THE_ID,
                            f & ~(PF_AVAIL | PF_USED) if k == 0 else f)
            if k == 0:
                head_flags = f
            self.next_avail += 1
            if self.next_avail == self.size:
                self.next_avail = 0
                self.avail_wrap ^= 1
        # Publishing: the head's AVAIL/USED bits go in last (x86 keeps stores in order).
        self.ram.write(self.desc_gpa + 16 * head + 14, struct.pack("<H", head_flags))
        self.slots[buf_id] = len(bufs)
        return head

    def add_indirect(self, buf_id: int, table: int, bufs: list[tuple[int, int, int]],
                     ring_flags: int = 0) -> int:
        """One ring descriptor pointing at an indirect table of (addr, len, flags)."""
        for k, (addr, length, flags) in enumerate(bufs):
            self.ram.write(table + 16 * k, DESC_FMT.pack(addr, length, 0, flags))
        head = self.next_avail
        self.write_desc(head, table, 16 * len(bufs), buf_id,
                        F_INDIRECT | ring_flags | packed_avail_flags(self.avail_wrap))
        self.next_avail += 1
        if self.next_avail == self.size:
            self.next_avail = 0
            self.avail_wrap ^= 1
        self.slots[buf_id] = 1
        return head

    def take_used(self) -> list[UsedDesc]:
        """Every used descriptor the device wrote since the last call, in order."""
        out: list[UsedDesc] = []
        while self.slots:  # like a driver, look only while buffers are outstanding
            _, length, buf_id, flags = self.read_desc(self.next_used)
            want = packed_used_flags(self.used_wrap)
            if flags & (PF_AVAIL | PF_USED) != want:
                return out
            # Only AVAIL/USED are checked: the other flag bits of a used descriptor are
            # not the driver's business (WRITE is optional).
            out.append(UsedDesc(self.next_used, buf_id, length, flags & (PF_AVAIL | PF_USED)))
            assert buf_id in self.slots, f"device used unknown buffer id {buf_id}"
            self.next_used += self.slots.pop(buf_id)
            if self.next_used >= self.size:
                self.next_used -= self.size
                self.used_wrap ^= 1
        return out

    def set_driver_event(self, flags: int, off: int = 0, wrap: int = 0) -> None:
        self.ram.write(self.driver_gpa, struct.pack("<HH", off | wrap << 15, flags))

    @property
    def device_event(self) -> tuple[int, int]:
        """(off_wrap, flags) of the device's event suppression."""
        return struct.unpack("<HH", self.ram.read(self.device_gpa, 4))

    # the device under test
    def queue(self, handler: Callable[[int, list[memoryview], list[memoryview]], int], *,
              event_idx: bool = False, indirect: bool = True, call_fd: int | None = None,
              err_fd: int | None = None, base: int | None = None, addr_flags: int = 0,
              log_addr: int = 0, start: bool = True) -> PackedVirtqueue:
        """A queue made packed the way SET_FEATURES does it, configured for this ring."""
        q = SplitVirtqueue(0, handler)
        set_layout(q, packed=True)
        assert isinstance(q, PackedVirtqueue)
        q.set_num(self.size)
        # SET_VRING_ADDR: desc, used (device area), avail (driver area), log.
        q.set_addr(addr_flags, self.ram.qva(self.desc_gpa), self.ram.qva(self.device_gpa),
                   self.ram.qva(self.driver_gpa), log_addr)
        q.set_features(event_idx=event_idx, indirect=indirect)
        q.call_fd, q.err_fd = call_fd, err_fd
        if base is not None:
            q.set_base(base)
        q.enabled = True
        if start:
            q.start(self.ram.memory)
        return q


# ---- a front end on a VhostUserHandler, through the protocol core -------------------

DRIVER_QS = 8
DRIVER_RINGS = [(0x0000, 0x0200, 0x0400), (0x1000, 0x1200, 0x1400)]
DRIVER_BUF = 0x4000


class Conn:
    """One front end on a handler with two queues of DRIVER_QS, both started (QEMU 7.2's
    steps), whose guest makes one-byte device-writable requests."""

    def __init__(self, handler: VhostUserHandler, ram: GuestRam,
                 eventfd: Callable[[], int]) -> None:
        self.h = handler
        self.ram = ram
        self.proto: BackendProtocol = handler.connect()
        self.rings = [Ring(ram, DRIVER_QS, *r) for r in DRIVER_RINGS]
        a, b = ram.regions
        self.send(frame(R.GET_FEATURES))
        self.send(frame(R.GET_PROTOCOL_FEATURES))
        self.send(frame(R.SET_PROTOCOL_FEATURES, u64(self.proto.info.protocol_features)))
        self.send(frame(R.SET_OWNER))
        self.send(frame(R.SET_FEATURES, u64(self.proto.info.features & ~(1 << 34))))
        self.send(frame(R.SET_MEM_TABLE, mem_table((a.gpa, a.size, a.qva, a.offset),
                                                   (b.gpa, b.size, b.qva, b.offset))),
                  [os.dup(a.fd), os.dup(b.fd)])
        for i, ring in enumerate(self.rings):
            self.send(frame(R.SET_VRING_CALL, vring_fd(i)), [eventfd()])
            self.send(frame(R.SET_VRING_NUM, state(i, DRIVER_QS)))
            self.send(frame(R.SET_VRING_BASE, state(i, 0)))
            self.send(frame(R.SET_VRING_ADDR, vring_addr(
                i, 0, ram.qva(ring.desc_gpa), ram.qva(ring.used_gpa), ram.qva(ring.avail_gpa))))
            self.send(frame(R.SET_VRING_KICK, vring_fd(i)), [eventfd()])
            self.send(frame(R.SET_VRING_ENABLE, state(i, 1)))

    def send(self, data: bytes, fds: list[int] | None = None) -> Any:
        out = None
        for msg in self.proto.receive(data, fds or []):
            out = self.h.handle(msg)
        return out

    def requests(self, q: int, heads: list[int]) -> None:
        ring = self.rings[q]
        for head in heads:
            ring.desc(head, DRIVER_BUF + 0x100 * q + 0x10 * head, 1, F_WRITE)
        ring.publish(*heads)
        self.h.queues[q].process()
