"""The owner's admin command set (vhostd/devices/owner.py ``AdminCommands``) on real members.

Each member is a real ``Member`` of a ``VhostUserHandler`` over a ``BlkDevice`` on a
temporary image; one
test group also connects a member to test-owned guest RAM (unit_support.GuestRam) through
the protocol core, so its parts carry live ring state. Commands and expected results are
written with plain ``struct`` from the reference layouts (virtio-admin-migration.md
sections 1.3-1.7 and 2), never with the construct definitions under test.
"""

from __future__ import annotations

import logging
import os
import random
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from unit_support import (
    F_WRITE,
    GuestRam,
    Ring,
    eventfd_count,
    frame,
    mem_table,
    state,
    u64,
    vring_addr,
    vring_fd,
)

from vhostd.core.member import MemberMode
from vhostd.devices.blk import BlkDevice, BlkOptions
from vhostd.devices.owner import DEV_PARTS_OBJECTS_LIMIT, AdminCommands, OwnerDevice
from vhostd.storage.file import FileStorage
from vhostd.vhost_user.handler import VhostUserHandler
from vhostd.vhost_user.member import Member
from vhostd_proto.vhost_user import Request as R

# ---- constants, written from the reference tables ----------------------------------

SELF, SRIOV = 0, 1
LIST_QUERY, LIST_USE = 0x0, 0x1
CAP_ID_LIST_QUERY, DEVICE_CAP_GET, DRIVER_CAP_SET = 0x7, 0x8, 0x9
CREATE, QUERY, MODIFY, DESTROY = 0xA, 0xB, 0xC, 0xD
METADATA_GET, PARTS_GET, PARTS_SET, MODE_SET = 0xE, 0xF, 0x10, 0x11

OK, ENXIO, ENOMEM, EBUSY, EEXIST, EINVAL = 0, 6, 12, 16, 17, 22
Q_OK, Q_INVALID_COMMAND, Q_INVALID_OPCODE, Q_INVALID_FIELD = 0, 1, 2, 3
Q_INVALID_GROUP, Q_INVALID_MEMBER, Q_NORESOURCE = 4, 5, 6

GET, SET = 0, 1
M_SIZE, M_COUNT, M_LIST = 0, 1, 2
SELECTED, ALL = 0, 1
STOP, RESUME, FREEZE = 0x01, 0x00, 0x03

DEV_FEATURES, DRV_FEATURES, PCI_COMMON_CFG, DEVICE_STATUS = 0x100, 0x101, 0x102, 0x103
VQ_CFG, VQ_NOTIFY_CFG, VQ_STATE, WCE = 0x104, 0x105, 0x5F0, 0x5F1
OPTIONAL = 0x01

# Linux's VIRTIO_DEV_PARTS_ADMIN_CMD_BITMAP: bits 7, 8, 9, 0xa, 0xd, 0xe, 0xf, 0x10, 0x11.
LINUX_BITMAP = sum(1 << op for op in (7, 8, 9, 0xA, 0xD, 0xE, 0xF, 0x10, 0x11))
# Everything vhostd supports on group 1 (adds 0, 1, 0xb, 0xc) and on group 0.
# The spec's opcodes plus vhostd's vendor dirty-tracking commands 0x30-0x32.
SRIOV_SUPPORTED = LINUX_BITMAP | 1 << 0 | 1 << 1 | 1 << 0xB | 1 << 0xC | 7 << 0x30
SELF_SUPPORTED = sum(1 << op for op in (0, 1, 7, 8, 9))

# What a vhostd blk member offers (virtio bits only): SIZE_MAX 1, SEG_MAX 2, BLK_SIZE 6,
# FLUSH 9, TOPOLOGY 10, CONFIG_WCE 11, MQ 12, DISCARD 13, WRITE_ZEROES 14,
# INDIRECT_DESC 28, EVENT_IDX 29, VERSION_1 32, RING_PACKED 34.
BLK_DEV_FEATURES = 0x5_3000_7E46
PROTOCOL_FEATURES_BIT = 1 << 30
# What the test driver acks: VERSION_1, FLUSH, CONFIG_WCE (no EVENT_IDX: every batch signals).
DRIVER_ACK = 1 << 32 | 1 << 9 | 1 << 11

IMAGE = 1 << 20

# ---- command builders ----------------------------------------------------------------


def obj_hdr(obj_id: int, rtype: int = 0) -> bytes:
    return struct.pack("<H2xI", rtype, obj_id)


def create_data(obj_id: int, kind: int, flags: int = 0, rtype: int = 0) -> bytes:
    return obj_hdr(obj_id, rtype) + struct.pack("<QB7x", flags, kind)


def metadata_data(obj_id: int, mtype: int) -> bytes:
    return obj_hdr(obj_id) + struct.pack("<B7x", mtype)


def get_data(obj_id: int, gtype: int = ALL, hdrs: bytes = b"") -> bytes:
    return obj_hdr(obj_id) + struct.pack("<B7x", gtype) + hdrs


def part_hdr(ptype: int, length: int, selector: bytes = bytes(8), flags: int = 0) -> bytes:
    return struct.pack("<HBB8sI", ptype, flags, 0, selector, length)


def part(ptype: int, value: bytes, selector: bytes = bytes(8), flags: int = 0) -> bytes:
    return part_hdr(ptype, len(value), selector, flags) + value


def vq(index: int) -> bytes:
    return struct.pack("<H6x", index)


Parsed = tuple[int, int, bytes, bytes]  # type, flags, selector, value


def parse_parts(data: bytes) -> list[Parsed]:
    out = []
    off = 0
    while off < len(data):
        ptype, flags, _res, sel, length = struct.unpack_from("<HBB8sI", data, off)
        off += 16
        out.append((ptype, flags, sel, data[off:off + length]))
        off += length
    assert off == len(data), "parts overrun the result"
    return out


def join(parts: list[Parsed]) -> bytes:
    return b"".join(part(t, v, s, f) for t, f, s, v in parts)


def value_of(parts: list[Parsed], ptype: int, selector: bytes = bytes(8)) -> bytes:
    found = [v for t, _f, s, v in parts if t == ptype and s == selector]
    assert len(found) == 1, (hex(ptype), selector)
    return found[0]


def replace(parts: list[Parsed], ptype: int, value: bytes,
            selector: bytes = bytes(8)) -> list[Parsed]:
    return [(t, f, s, value if (t, s) == (ptype, selector) else v) for t, f, s, v in parts]


# ---- members -----------------------------------------------------------------------


class Watcher:
    """Loop stub: remembers readers so a test can deliver a kick; runs ``call_soon``
    callbacks at once."""

    def __init__(self) -> None:
        self.readers: dict[int, tuple[Callable[..., Any], tuple[Any, ...]]] = {}

    def add_reader(self, fd: int, callback: Callable[..., Any], *args: Any) -> None:
        self.readers[fd] = (callback, args)

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        callback(*args)

    def kick(self, fd: int) -> None:
        os.eventfd_write(fd, 1)
        entry = self.readers.get(fd)
        if entry is not None:  # a stopped member does not watch: the kick waits
            callback, args = entry
            callback(*args)


@pytest.fixture
def watcher() -> Watcher:
    return Watcher()


@pytest.fixture
def members(tmp_path: Path, watcher: Watcher) -> Iterator[list[Member]]:
    """Three blk members; the third has two queues."""
    out = []
    for i, nq in ((1, 1), (2, 1), (3, 2)):
        path = tmp_path / f"m{i}.img"
        with open(path, "wb") as f:
            f.truncate(IMAGE)
        dev = BlkDevice(f"member{i}", FileStorage(str(path)),
                        BlkOptions(num_queues=nq, queue_size=16))
        out.append(Member(VhostUserHandler(dev, watcher)))
    yield out
    for m in out:
        if m.handler.protocol is not None:
            assert m.handler.disconnect() is None
        m.handler.device.close()


class Admin:
    """AdminCommands with assertion helpers."""

    def __init__(self, commands: AdminCommands) -> None:
        self.c = commands

    def run(self, opcode: int, group: int = SRIOV, member: int = 0, data: bytes = b"",
            capacity: int = 1 << 16) -> tuple[int, int, bytes]:
        return self.c.execute(struct.pack("<HH12xQ", opcode, group, member) + data, capacity)

    def ok(self, opcode: int, group: int = SRIOV, member: int = 0, data: bytes = b"",
           capacity: int = 1 << 16) -> bytes:
        status, qual, result = self.run(opcode, group, member, data, capacity)
        assert (status, qual) == (OK, Q_OK), (hex(opcode), status, qual)
        return result

    def err(self, expect: tuple[int, int], opcode: int, group: int = SRIOV, member: int = 0,
            data: bytes = b"", capacity: int = 1 << 16) -> None:
        status, qual, result = self.run(opcode, group, member, data, capacity)
        assert (status, qual) == expect, (hex(opcode), status, qual)
        assert result == b""

    # Linux's owner activation (reference 5.1)
    def activate(self, limit: int = 4, use: int = LINUX_BITMAP) -> None:
        supported = int.from_bytes(self.ok(LIST_QUERY, SRIOV, capacity=8), "little")
        self.ok(LIST_USE, SRIOV, data=(supported & use).to_bytes(8, "little"))
        caps = int.from_bytes(self.ok(CAP_ID_LIST_QUERY, SELF, capacity=8), "little")
        assert caps & 1
        cap = self.ok(DEVICE_CAP_GET, SELF, data=struct.pack("<H6x", 0), capacity=2)
        assert min(cap) >= limit
        self.ok(DRIVER_CAP_SET, SELF, data=struct.pack("<H6xBB", 0, limit, limit))

    def create(self, member: int, obj_id: int, kind: int) -> None:
        self.ok(CREATE, SRIOV, member, create_data(obj_id, kind))

    def get_all(self, member: int, obj_id: int) -> bytes:
        return self.ok(PARTS_GET, SRIOV, member, get_data(obj_id))

    def parts(self, member: int, obj_id: int = 9) -> list[Parsed]:
        """Create a GET object, read ALL, destroy it."""
        self.create(member, obj_id, GET)
        try:
            return parse_parts(self.get_all(member, obj_id))
        finally:
            self.ok(DESTROY, SRIOV, member, obj_hdr(obj_id))

    def set_parts(self, member: int, data: bytes, obj_id: int = 8) -> tuple[int, int]:
        self.create(member, obj_id, SET)
        try:
            status, qual, _ = self.run(PARTS_SET, SRIOV, member, obj_hdr(obj_id) + data)
            return status, qual
        finally:
            self.ok(DESTROY, SRIOV, member, obj_hdr(obj_id))

    def mode(self, member: int, flags: int) -> None:
        self.ok(MODE_SET, SRIOV, member, bytes([flags]))


@pytest.fixture
def admin(members: list[Member]) -> Admin:
    return Admin(AdminCommands(members))


@pytest.fixture
def active(admin: Admin) -> Admin:
    """Activated like Linux, but with every supported opcode enabled (0, 1, 0xb, 0xc too)."""
    admin.activate(limit=16, use=SRIOV_SUPPORTED)
    return admin


def _field() -> tuple[int, int]:
    return EINVAL, Q_INVALID_FIELD


# ---- a member with a live ring in test-owned guest RAM -----------------------------

DESC, AVAIL, USED = 0x0, 0x400, 0x800
SLOTS = 0x1000
RING = 16


class Guest:
    """Drives queue 0 of one member the way QEMU and a guest driver would."""

    def __init__(self, backend: VhostUserHandler, ram: GuestRam, watcher: Watcher,
                 eventfd: Callable[[], int]) -> None:
        self.backend = backend
        self.ram = ram
        self.watcher = watcher
        self.ring = Ring(ram, RING, DESC, AVAIL, USED)
        self.call_fd = eventfd()
        self.kick_fd = eventfd()
        self.next_head = 0
        self.proto = backend.connect()
        a, b = ram.regions
        self.send(frame(R.GET_FEATURES))
        self.send(frame(R.GET_PROTOCOL_FEATURES))
        self.send(frame(R.SET_PROTOCOL_FEATURES, u64(self.proto.info.protocol_features)))
        self.send(frame(R.SET_OWNER))
        self.send(frame(R.SET_FEATURES, u64(DRIVER_ACK | PROTOCOL_FEATURES_BIT)))
        self.send(frame(R.SET_VRING_CALL, vring_fd(0)), [os.dup(self.call_fd)])
        self.send(frame(R.SET_MEM_TABLE, mem_table((a.gpa, a.size, a.qva, a.offset),
                                                   (b.gpa, b.size, b.qva, b.offset))),
                  [os.dup(a.fd), os.dup(b.fd)])
        self.send(frame(R.SET_VRING_NUM, state(0, RING)))
        self.send(frame(R.SET_VRING_BASE, state(0, 0)))
        self.send(frame(R.SET_VRING_ADDR, vring_addr(0, 0, ram.qva(DESC), ram.qva(USED),
                                                     ram.qva(AVAIL))))
        kick = os.dup(self.kick_fd)
        self.send(frame(R.SET_VRING_KICK, vring_fd(0)), [kick])
        self.backend_kick = kick  # the back end's copy, watched by the stub
        self.send(frame(R.SET_VRING_ENABLE, state(0, 1)))

    def send(self, data: bytes, fds: list[int] | None = None) -> list[Any]:
        return [self.backend.handle(m) for m in self.proto.receive(data, fds or [])]

    def write(self, sector: int, fill: int) -> int:
        """Queue (publish, no kick) a one-sector write; return its head."""
        head = self.next_head
        self.next_head = (head + 3) % (RING - RING % 3)
        slot = SLOTS + head * 0x400
        self.ram.write(slot, struct.pack("<IIQ", 1, 0, sector))
        self.ram.write(slot + 0x10, bytes([fill]) * 512)
        self.ram.write(slot + 0x210, b"\xff")
        self.ring.chain(head, [(slot, 16, 0), (slot + 0x10, 512, 0), (slot + 0x210, 1, F_WRITE)])
        self.ring.publish(head)
        return head

    def status(self, head: int) -> int:
        return self.ram.read(SLOTS + head * 0x400 + 0x210, 1)[0]

    def kick(self) -> None:
        self.watcher.kick(self.backend_kick)

    def ring_bytes(self) -> bytes:
        return self.ram.read(0, 0x2000)


@pytest.fixture
def guest(members: list[Member], ram: GuestRam, watcher: Watcher,
          eventfd: Callable[[], int]) -> Guest:
    """Member 1 connected and running queue 0, four writes done."""
    g = Guest(members[0].handler, ram, watcher, eventfd)
    for k in range(4):
        g.write(k, 0x10 + k)
    g.kick()
    assert g.ring.used_idx == 4
    eventfd_count(g.call_fd)
    return g


# =====================================================================================
# group, opcode and member validation (reference 1.4, 1.5, 1.7)
# =====================================================================================


@pytest.mark.parametrize("group", [2, 3, 0x7FFF, 0xFFFF])
def test_unknown_group_is_invalid_group(admin: Admin, group: int) -> None:
    admin.err((EINVAL, Q_INVALID_GROUP), LIST_QUERY, group)
    admin.err((EINVAL, Q_INVALID_GROUP), LIST_USE, group, data=u64(3))
    admin.activate()
    admin.err((EINVAL, Q_INVALID_GROUP), MODE_SET, group, 1, b"\x01")


def test_sriov_group_without_members_is_invalid_group() -> None:
    a = Admin(AdminCommands([]))
    a.err((EINVAL, Q_INVALID_GROUP), LIST_QUERY, SRIOV)
    a.err((EINVAL, Q_INVALID_GROUP), LIST_USE, SRIOV, data=u64(LINUX_BITMAP | 3))
    a.err((EINVAL, Q_INVALID_GROUP), MODE_SET, SRIOV, 1, b"\x01")
    # the self group still works
    assert int.from_bytes(a.ok(LIST_QUERY, SELF), "little") == SELF_SUPPORTED


def test_list_query_reports_supported_opcodes_per_group(admin: Admin) -> None:
    res = admin.ok(LIST_QUERY, SRIOV, capacity=8)
    assert res == SRIOV_SUPPORTED.to_bytes(8, "little") == bytes.fromhex("83ff030000000700")
    assert admin.ok(LIST_QUERY, SELF) == SELF_SUPPORTED.to_bytes(8, "little")


@pytest.mark.parametrize("opcode", [0x2, 0x6, 0x12, 0x13, 0x7FFF, 0x8000, 0xFFFF])
def test_unknown_opcode_is_invalid_opcode(active: Admin, opcode: int) -> None:
    active.err((EINVAL, Q_INVALID_OPCODE), opcode, SRIOV, 1)
    active.err((EINVAL, Q_INVALID_OPCODE), opcode, SELF, 0)


@pytest.mark.parametrize("opcode", [CREATE, QUERY, MODIFY, DESTROY, METADATA_GET, PARTS_GET,
                                    PARTS_SET, MODE_SET])
def test_member_opcodes_are_not_supported_on_the_self_group(active: Admin, opcode: int) -> None:
    active.ok(LIST_USE, SELF, data=u64(SELF_SUPPORTED))
    active.err((EINVAL, Q_INVALID_OPCODE), opcode, SELF, 0, create_data(0, GET))


@pytest.mark.parametrize("opcode", [CAP_ID_LIST_QUERY, DEVICE_CAP_GET, DRIVER_CAP_SET, CREATE,
                                    DESTROY, METADATA_GET, PARTS_GET, PARTS_SET, MODE_SET])
def test_only_list_commands_work_before_list_use(admin: Admin, opcode: int) -> None:
    group = SELF if opcode in (CAP_ID_LIST_QUERY, DEVICE_CAP_GET, DRIVER_CAP_SET) else SRIOV
    member = 0 if group == SELF else 1
    admin.err((EINVAL, Q_INVALID_OPCODE), opcode, group, member, create_data(0, GET))
    if group == SELF:
        admin.err((EINVAL, Q_INVALID_OPCODE), opcode, SRIOV, 0)
    admin.ok(LIST_QUERY, SRIOV)
    admin.ok(LIST_QUERY, SELF)
    admin.ok(LIST_USE, SRIOV, data=u64(SRIOV_SUPPORTED))
    admin.ok(LIST_USE, SELF, data=u64(SELF_SUPPORTED))


def test_opcode_not_enabled_by_list_use_is_invalid_opcode(admin: Admin) -> None:
    admin.ok(LIST_USE, SRIOV, data=u64(1 << MODE_SET | 3))
    admin.ok(MODE_SET, SRIOV, 1, b"\x00")
    for op in (CREATE, DESTROY, METADATA_GET, PARTS_GET, PARTS_SET, QUERY, MODIFY):
        admin.err((EINVAL, Q_INVALID_OPCODE), op, SRIOV, 1, create_data(0, GET))


def test_validation_order_group_then_opcode_then_member(admin: Admin) -> None:
    # all three wrong: the group is reported
    admin.err((EINVAL, Q_INVALID_GROUP), 0x12, 5, 99)
    # opcode unknown and member wrong: the opcode
    admin.err((EINVAL, Q_INVALID_OPCODE), 0x12, SRIOV, 99)
    # opcode known but not yet enabled, member wrong: still the opcode
    admin.err((EINVAL, Q_INVALID_OPCODE), MODE_SET, SRIOV, 99, b"\x01")
    admin.activate()
    admin.err((EINVAL, Q_INVALID_MEMBER), MODE_SET, SRIOV, 99, b"\x01")
    # member checked before the command data
    admin.err((EINVAL, Q_INVALID_MEMBER), MODE_SET, SRIOV, 0, b"\xff")


@pytest.mark.parametrize("member", [0, 4, 5, 1 << 32, (1 << 64) - 1])
def test_member_outside_1_to_n_is_invalid_member(active: Admin, member: int) -> None:
    for op, data in ((MODE_SET, b"\x01"), (CREATE, create_data(0, GET)),
                     (DESTROY, obj_hdr(0)), (METADATA_GET, metadata_data(0, M_SIZE)),
                     (PARTS_GET, get_data(0)), (PARTS_SET, obj_hdr(0)),
                     (QUERY, obj_hdr(0) + bytes(8)), (MODIFY, create_data(0, GET))):
        active.err((EINVAL, Q_INVALID_MEMBER), op, SRIOV, member, data)
    active.mode(3, STOP)  # the last member exists
    active.mode(3, RESUME)


def test_self_group_needs_member_zero(active: Admin) -> None:
    active.err((EINVAL, Q_INVALID_MEMBER), LIST_QUERY, SELF, 1)
    active.err((EINVAL, Q_INVALID_MEMBER), CAP_ID_LIST_QUERY, SELF, 1)
    active.err((EINVAL, Q_INVALID_MEMBER), DEVICE_CAP_GET, SELF, 7, struct.pack("<H6x", 0))
    active.ok(CAP_ID_LIST_QUERY, SELF, 0)


@pytest.mark.parametrize(("group", "bits"), [
    (SRIOV, 1 << 2),  # legacy: not supported
    (SRIOV, 1 << 0x12),
    (SRIOV, 1 << 64),  # second word
    (SELF, 1 << MODE_SET),
    (SELF, 1 << CREATE),
])
def test_list_use_with_unsupported_bits_is_invalid_field(admin: Admin, group: int,
                                                         bits: int) -> None:
    used = (SRIOV_SUPPORTED if group == SRIOV else SELF_SUPPORTED) | bits
    admin.err(_field(), LIST_USE, group, data=used.to_bytes(16, "little"))
    # nothing changed: the list commands still work, the others are still blocked
    admin.ok(LIST_QUERY, group)
    admin.err((EINVAL, Q_INVALID_OPCODE), CAP_ID_LIST_QUERY, group)


def test_list_use_without_bits_0_and_1_blocks_the_list_commands(admin: Admin) -> None:
    admin.ok(LIST_USE, SRIOV, data=u64(LINUX_BITMAP))  # what Linux sends
    admin.err((EINVAL, Q_INVALID_OPCODE), LIST_QUERY, SRIOV)
    admin.err((EINVAL, Q_INVALID_OPCODE), LIST_USE, SRIOV, data=u64(SRIOV_SUPPORTED))
    # each group keeps its own list
    admin.ok(LIST_QUERY, SELF)
    admin.ok(MODE_SET, SRIOV, 1, b"\x00")


def test_list_use_with_short_data_reads_zeros(admin: Admin) -> None:
    admin.ok(LIST_USE, SRIOV, data=b"\x03")  # bits 0 and 1 in one byte
    admin.ok(LIST_QUERY, SRIOV)
    admin.err((EINVAL, Q_INVALID_OPCODE), MODE_SET, SRIOV, 1, b"\x00")
    admin.ok(LIST_USE, SRIOV)  # no data at all: enables nothing
    admin.err((EINVAL, Q_INVALID_OPCODE), LIST_QUERY, SRIOV)


def test_capability_commands_follow_linux_quirks(admin: Admin) -> None:
    """Linux enables the cap opcodes in the SR-IOV LIST_USE only, then sends them on group 0
    (fix 16c22c56d428); older kernels send them on group 1 (reference 1.7 quirks 2, 3)."""
    admin.ok(LIST_USE, SRIOV, data=u64(LINUX_BITMAP))
    for group in (SELF, SRIOV):
        assert admin.ok(CAP_ID_LIST_QUERY, group, capacity=8) == u64(1)
        assert admin.ok(DEVICE_CAP_GET, group, data=struct.pack("<H6x", 0), capacity=2) == \
            bytes([DEV_PARTS_OBJECTS_LIMIT, DEV_PARTS_OBJECTS_LIMIT])
        admin.ok(DRIVER_CAP_SET, group, data=struct.pack("<H6xBB", 0, 3, 3))
    admin.create(1, 2, GET)
    admin.err(_field(), CREATE, SRIOV, 1, create_data(3, GET))


def test_capability_commands_on_group_1_need_its_list_use(admin: Admin) -> None:
    admin.ok(LIST_USE, SRIOV, data=u64(1 << MODE_SET))  # no capability bits at all
    admin.err((EINVAL, Q_INVALID_OPCODE), CAP_ID_LIST_QUERY, SRIOV)
    admin.err((EINVAL, Q_INVALID_OPCODE), CAP_ID_LIST_QUERY, SELF)


# =====================================================================================
# capabilities (reference 2.2)
# =====================================================================================


def test_device_cap_get(active: Admin) -> None:
    assert active.ok(DEVICE_CAP_GET, SELF, data=struct.pack("<H6x", 0), capacity=2) == \
        bytes([32, 32])
    # truncated data reads as zeros: id 0
    assert active.ok(DEVICE_CAP_GET, SELF, capacity=2) == bytes([32, 32])
    for cap_id in (1, 0x800, 0xFFFF):
        active.err((ENXIO, Q_INVALID_FIELD), DEVICE_CAP_GET, SELF,
                   data=struct.pack("<H6x", cap_id))
        active.err((ENXIO, Q_INVALID_FIELD), DRIVER_CAP_SET, SELF,
                   data=struct.pack("<H6xBB", cap_id, 1, 1))


@pytest.mark.parametrize(("get", "set_"), [(33, 1), (1, 33), (255, 255)])
def test_driver_cap_set_above_device_limits_is_invalid_field(active: Admin, get: int,
                                                             set_: int) -> None:
    active.err(_field(), DRIVER_CAP_SET, SELF, data=struct.pack("<H6xBB", 0, get, set_))
    # unchanged: the limit from activation (16) still holds
    active.create(1, 15, GET)
    active.err(_field(), CREATE, SRIOV, 1, create_data(16, SET))


def test_driver_cap_set_below_an_existing_object_is_ebusy(active: Admin) -> None:
    active.create(1, 5, GET)
    active.create(2, 3, SET)
    active.err((EBUSY, Q_INVALID_FIELD), DRIVER_CAP_SET, SELF,
               data=struct.pack("<H6xBB", 0, 5, 16))
    active.err((EBUSY, Q_INVALID_FIELD), DRIVER_CAP_SET, SELF,
               data=struct.pack("<H6xBB", 0, 16, 3))
    active.ok(DRIVER_CAP_SET, SELF, data=struct.pack("<H6xBB", 0, 6, 4))
    active.ok(DESTROY, SRIOV, 1, obj_hdr(5))
    active.ok(DESTROY, SRIOV, 2, obj_hdr(3))
    active.ok(DRIVER_CAP_SET, SELF, data=struct.pack("<H6xBB", 0, 0, 0))
    active.err(_field(), CREATE, SRIOV, 1, create_data(0, GET))


def test_no_objects_before_driver_cap_set(admin: Admin) -> None:
    admin.ok(LIST_USE, SRIOV, data=u64(LINUX_BITMAP))
    admin.err(_field(), CREATE, SRIOV, 1, create_data(0, GET))
    admin.err(_field(), CREATE, SRIOV, 1, create_data(0, SET))


# =====================================================================================
# resource objects (reference 2.3)
# =====================================================================================


def test_object_id_must_be_below_the_limit(admin: Admin) -> None:
    admin.activate(limit=4)
    admin.create(1, 3, GET)
    admin.err(_field(), CREATE, SRIOV, 1, create_data(4, GET))
    admin.err(_field(), CREATE, SRIOV, 1, create_data(0xFFFFFFFF, SET))


def test_duplicate_object_id_is_eexist(active: Admin) -> None:
    active.create(1, 2, GET)
    active.err((EEXIST, Q_INVALID_FIELD), CREATE, SRIOV, 1, create_data(2, GET))
    # ids are one pool per owner: another member or kind does not help
    active.err((EEXIST, Q_INVALID_FIELD), CREATE, SRIOV, 2, create_data(2, SET))
    assert EEXIST == 17


def test_unknown_object_is_enxio(active: Admin) -> None:
    active.mode(1, STOP)
    for op, data in ((DESTROY, obj_hdr(7)), (METADATA_GET, metadata_data(7, M_SIZE)),
                     (PARTS_GET, get_data(7)), (PARTS_SET, obj_hdr(7)),
                     (QUERY, obj_hdr(7) + bytes(8)), (MODIFY, create_data(7, GET))):
        active.err((ENXIO, Q_INVALID_FIELD), op, SRIOV, 1, data)


@pytest.mark.parametrize(("data", "why"), [
    (create_data(0, GET, rtype=1), "resource type 1"),
    (create_data(0, GET, rtype=0x200), "device-type resource type"),
    (create_data(0, GET, flags=1), "flags"),
    (create_data(0, 2), "dev-parts type 2"),
    (create_data(0, 0xFF), "dev-parts type 255"),
])
def test_create_with_bad_fields_is_invalid_field(active: Admin, data: bytes, why: str) -> None:
    active.err(_field(), CREATE, SRIOV, 1, data)
    active.create(1, 0, GET)  # nothing was created


def test_object_of_wrong_kind_or_member_is_invalid_field(active: Admin) -> None:
    active.create(1, 1, GET)
    active.create(1, 2, SET)
    active.create(2, 3, GET)
    active.mode(1, STOP)
    parts = active.get_all(1, 1)
    # a GET object cannot SET, a SET object cannot GET or read metadata
    active.err(_field(), PARTS_SET, SRIOV, 1, obj_hdr(1) + parts)
    active.err(_field(), PARTS_GET, SRIOV, 1, get_data(2))
    active.err(_field(), METADATA_GET, SRIOV, 1, metadata_data(2, M_SIZE))
    # another member's object
    active.err(_field(), PARTS_GET, SRIOV, 1, get_data(3))
    active.err(_field(), METADATA_GET, SRIOV, 2, metadata_data(1, M_SIZE))
    active.err(_field(), DESTROY, SRIOV, 2, obj_hdr(1))
    active.err(_field(), QUERY, SRIOV, 2, obj_hdr(1) + bytes(8))
    # the right pairing works
    active.ok(PARTS_SET, SRIOV, 1, obj_hdr(2) + parts)
    active.ok(DESTROY, SRIOV, 1, obj_hdr(1))


def test_destroy_then_recreate_the_same_id(active: Admin) -> None:
    for kind in (GET, SET, GET):
        active.create(2, 4, kind)
        active.ok(DESTROY, SRIOV, 2, obj_hdr(4))
        active.err((ENXIO, Q_INVALID_FIELD), DESTROY, SRIOV, 2, obj_hdr(4))
    active.create(3, 4, SET)  # and for another member


def test_query_0xb_and_modify_0xc_follow_the_opcode_table(active: Admin) -> None:
    """The table reading: 0xb = QUERY (returns the specific data), 0xc = MODIFY."""
    active.ok(CREATE, SRIOV, 1, create_data(3, GET))
    assert active.ok(QUERY, SRIOV, 1, obj_hdr(3) + bytes(8)) == bytes(8)
    # MODIFY has no result; QUERY then returns what MODIFY set
    assert active.ok(MODIFY, SRIOV, 1, create_data(3, GET)) == b""
    assert active.ok(QUERY, SRIOV, 1, obj_hdr(3) + bytes(8)) == bytes(8)
    # an object serves GET or SET for its whole life: MODIFY cannot switch it
    active.err(_field(), MODIFY, SRIOV, 1, create_data(3, SET))
    assert active.ok(QUERY, SRIOV, 1, obj_hdr(3) + bytes(8)) == bytes(8)
    assert active.ok(PARTS_GET, SRIOV, 1, get_data(3), capacity=4096)
    # a failed MODIFY changes nothing
    active.err(_field(), MODIFY, SRIOV, 1, create_data(3, 7))
    active.err(_field(), MODIFY, SRIOV, 1, create_data(3, GET, flags=2))
    assert active.ok(QUERY, SRIOV, 1, obj_hdr(3) + bytes(8)) == bytes(8)
    # QUERY data shorter than hdr+flags reads zeros; unknown ids are ENXIO
    active.ok(CREATE, SRIOV, 1, create_data(4, SET))
    assert active.ok(QUERY, SRIOV, 1, obj_hdr(4)) == bytes.fromhex("0100000000000000")
    active.err((ENXIO, Q_INVALID_FIELD), QUERY, SRIOV, 1, obj_hdr(5) + bytes(8))
    active.err((ENXIO, Q_INVALID_FIELD), MODIFY, SRIOV, 1, create_data(5, GET))


def test_modify_cannot_change_the_kind(active: Admin) -> None:
    active.ok(DRIVER_CAP_SET, SELF, data=struct.pack("<H6xBB", 0, 8, 2))
    active.create(1, 5, GET)
    active.err(_field(), MODIFY, SRIOV, 1, create_data(5, SET))
    assert active.ok(QUERY, SRIOV, 1, obj_hdr(5) + bytes(8)) == bytes(8)


# =====================================================================================
# DEV_PARTS_SET checks (reference 2.7, 6 item 5): nothing staged on any failure
# =====================================================================================


def _stopped_member_parts(a: Admin, member: int = 1) -> list[Parsed]:
    a.mode(member, STOP)
    return a.parts(member)


def test_parts_set_on_a_running_member_is_ebusy(active: Admin,
                                                members: list[Member]) -> None:
    parts = join(active.parts(1))
    active.create(1, 2, SET)
    active.err((EBUSY, Q_INVALID_COMMAND), PARTS_SET, SRIOV, 1, obj_hdr(2) + parts)
    assert members[0].staged is None
    active.mode(1, STOP)
    active.ok(PARTS_SET, SRIOV, 1, obj_hdr(2) + parts)
    active.mode(1, FREEZE)  # frozen is stopped too
    active.ok(PARTS_SET, SRIOV, 1, obj_hdr(2) + parts)


def _bad_lists(p: list[Parsed]) -> list[tuple[str, bytes]]:
    """Faulty part lists derived from a member's own (valid) GET output."""
    dev = value_of(p, DEV_FEATURES)
    tail = [x for x in p if x[0] != DEV_FEATURES]
    by_type = {t: [x for x in p if x[0] == t] for t, *_ in p}
    body = join(p)
    return [
        ("drv-features-short", join(replace(p, DRV_FEATURES, bytes(4)))),
        ("drv-features-long", join(replace(p, DRV_FEATURES, bytes(16)))),
        ("status-long", join(replace(p, DEVICE_STATUS, b"\x0f\x00"))),
        ("vq-cfg-short", join(replace(p, VQ_CFG, bytes(31), vq(0)))),
        ("vq-notify-long", join(replace(p, VQ_NOTIFY_CFG, bytes(9), vq(0)))),
        ("vq-state-short", join(replace(p, VQ_STATE, bytes(4), vq(0)))),
        ("wce-long", join(replace(p, WCE, b"\x00\x00"))),
        ("numq-long", join(replace(p, PCI_COMMON_CFG, bytes(4), struct.pack("<I4x", 18)))),
        ("dev-features-mismatch",
         join(replace(p, DEV_FEATURES, u64(int.from_bytes(dev, "little") ^ 1 << 9)))),
        ("dev-features-zero", join(replace(p, DEV_FEATURES, bytes(8)))),
        ("drv-features-not-offered", join(replace(p, DRV_FEATURES, u64(DRIVER_ACK | 1 << 63)))),
        ("drv-features-in-order", join(replace(p, DRV_FEATURES, u64(DRIVER_ACK | 1 << 35)))),
        ("drv-features-protocol-bit",
         join(replace(p, DRV_FEATURES, u64(DRIVER_ACK | PROTOCOL_FEATURES_BIT)))),
        ("numq-mismatch", join(replace(p, PCI_COMMON_CFG, b"\x02\x00", struct.pack("<I4x", 18)))),
        ("pci-common-no-field",
         join(by_type[DEV_FEATURES] + by_type[DRV_FEATURES] + by_type[PCI_COMMON_CFG])
         + part(PCI_COMMON_CFG, bytes(2), struct.pack("<I4x", 19))),
        ("order-drv-after-status",
         join(by_type[DEV_FEATURES] + by_type[PCI_COMMON_CFG] + by_type[DEVICE_STATUS]
              + by_type[DRV_FEATURES])),
        ("order-notify-before-cfg",
         join(by_type[DEV_FEATURES] + by_type[DRV_FEATURES] + by_type[VQ_NOTIFY_CFG]
              + by_type[VQ_CFG])),
        ("order-common-after-vendor", body + join(by_type[DEVICE_STATUS])),
        ("order-dev-features-last", join(tail + by_type[DEV_FEATURES])),
        ("duplicate-status",
         join(by_type[DRV_FEATURES] + by_type[DEVICE_STATUS] + by_type[DEVICE_STATUS])),
        ("duplicate-vq-cfg", join(by_type[DRV_FEATURES] + by_type[VQ_CFG] + by_type[VQ_CFG])),
        ("duplicate-wce", body + join(by_type[WCE])),
        ("unknown-common", join(by_type[DRV_FEATURES]) + part(0x1FF, b"\x00")),
        ("unknown-device-type", body + part(0x200, b"\x00")),
        ("unknown-reserved-range", body + part(0x600, b"")),
        ("vq-state-no-such-queue", body + part(VQ_STATE, bytes(8), vq(1))),
        ("vq-cfg-size-not-pow2",
         join(replace(p, VQ_CFG, struct.pack("<HHHHQQQ", 24, 0, 1, 0, 0, 0, 0), vq(0)))),
        ("vq-cfg-size-too-big",
         join(replace(p, VQ_CFG, struct.pack("<HHHHQQQ", 32, 0, 1, 0, 0, 0, 0), vq(0)))),
        ("vq-cfg-enabled-2",
         join(replace(p, VQ_CFG, struct.pack("<HHHHQQQ", 16, 0, 2, 0, 0, 0, 0), vq(0)))),
        ("vq-notify-off", join(replace(p, VQ_NOTIFY_CFG, struct.pack("<HH4x", 1, 0), vq(0)))),
        ("vq-state-wrap", join(replace(p, VQ_STATE, struct.pack("<HHBB2x", 0, 0, 1, 0), vq(0)))),
        ("wce-2", join(replace(p, WCE, b"\x02"))),
        ("truncated-value", body + part_hdr(DEVICE_STATUS, 1)),
        ("stray-bytes", body + b"\x03\x01\x00"),
        ("huge-length", body + part_hdr(WCE, 0xFFFFFFFF) + b"\x00"),
    ]


def _bad_ids() -> list[str]:
    return [name for name, _ in _bad_lists(_sample_parts())]


def _sample_parts() -> list[Parsed]:
    return [(DEV_FEATURES, 1, bytes(8), u64(BLK_DEV_FEATURES)),
            (DRV_FEATURES, 0, bytes(8), u64(0)),
            (PCI_COMMON_CFG, 0, struct.pack("<I4x", 18), b"\x01\x00"),
            (DEVICE_STATUS, 0, bytes(8), b"\x00"),
            (VQ_CFG, 0, vq(0), bytes(32)), (VQ_NOTIFY_CFG, 0, vq(0), bytes(8)),
            (VQ_STATE, 0, vq(0), bytes(8)), (WCE, 0, bytes(8), b"\x01")]


@pytest.mark.parametrize("name", _bad_ids())
def test_bad_part_list_is_invalid_field_and_stages_nothing(
        active: Admin, members: list[Member], guest: Guest, name: str) -> None:
    before = _stopped_member_parts(active)
    assert [t for t, *_ in before] == [t for t, *_ in _sample_parts()]
    # Every list also carries valid changes (write cache off, another status), so a
    # partly applied list would show at resume.
    changed = replace(replace(before, WCE, b"\x00"), DEVICE_STATUS, b"\x07")
    active.ok(CREATE, SRIOV, 1, create_data(1, SET))
    data = dict(_bad_lists(changed))[name]
    status, qual, _ = active.run(PARTS_SET, SRIOV, 1, obj_hdr(1) + data)
    assert (status, qual) == _field(), name
    assert members[0].staged is None
    ring = guest.ring_bytes()
    active.mode(1, RESUME)
    assert guest.ring_bytes() == ring
    assert active.parts(1) == before
    assert members[0].handler.device.wce == 1


def test_failed_set_keeps_an_earlier_successful_set(active: Admin,
                                                    members: list[Member]) -> None:
    p = _stopped_member_parts(active, 2)
    active.ok(CREATE, SRIOV, 2, create_data(1, SET))
    active.ok(PARTS_SET, SRIOV, 2, obj_hdr(1) + join(replace(p, WCE, b"\x00")))
    bad = join(replace(p, DEVICE_STATUS, b"\x0f")) + part(0x1FF, b"")
    active.err(_field(), PARTS_SET, SRIOV, 2, obj_hdr(1) + bad)
    assert members[1].handler.device.wce == 1  # not before resume
    active.mode(2, RESUME)
    after = active.parts(2)
    assert value_of(after, WCE) == b"\x00"
    assert value_of(after, DEVICE_STATUS) == value_of(p, DEVICE_STATUS)


@pytest.mark.parametrize(("ptype", "length"), [(VQ_CFG, 32), (VQ_STATE, 8)])
def test_duplicate_part_with_dirty_selector_reserved_bytes_is_rejected(
        active: Admin, members: list[Member], ptype: int, length: int) -> None:
    p = _stopped_member_parts(active, 1)
    dirty = vq(0)[:2] + b"\x01" + bytes(5)  # queue 0, reserved byte set
    value = (struct.pack("<HHHHQQQ", 16, 0, 1, 0, 0x1000, 0x2000, 0x3000)
             if ptype == VQ_CFG else struct.pack("<HHBB2x", 7, 7, 0, 0))
    assert len(value) == length
    at = next(i for i, x in enumerate(p) if x[0] == ptype) + 1
    data = join([*p[:at], (ptype, 0, dirty, value), *p[at:]])
    assert active.set_parts(1, data) == _field()
    assert members[0].staged is None


def test_unknown_optional_parts_are_ignored(active: Admin,
                                            members: list[Member]) -> None:
    p = _stopped_member_parts(active, 2)
    data = (part(0x1FE, b"\xaa" * 3, flags=OPTIONAL)
            + join(replace(p, WCE, b"\x00"))
            + part(0x300, b"\xbb", flags=OPTIONAL) + part(0x700, b"", flags=OPTIONAL))
    assert active.set_parts(2, data) == (OK, Q_OK)
    active.mode(2, RESUME)
    assert value_of(active.parts(2), WCE) == b"\x00"
    assert members[1].handler.device.wce == 0


def test_dev_features_part_is_checked_not_applied(active: Admin) -> None:
    p = _stopped_member_parts(active, 2)
    # without the OPTIONAL flag, or left out entirely: both fine
    no_flag = [(t, 0 if t == DEV_FEATURES else f, s, v) for t, f, s, v in p]
    assert active.set_parts(2, join(no_flag)) == (OK, Q_OK)
    assert active.set_parts(2, join([x for x in p if x[0] != DEV_FEATURES])) == (OK, Q_OK)
    assert active.set_parts(2, b"") == (OK, Q_OK)  # an empty list changes nothing
    active.mode(2, RESUME)
    assert active.parts(2) == p


# =====================================================================================
# DEV_PARTS_GET and METADATA (reference 2.5, 2.6, 2.9)
# =====================================================================================


def test_get_all_order_and_values(active: Admin) -> None:
    p = active.parts(3)  # two queues, never connected
    assert [(t, s) for t, _f, s, _v in p] == [
        (DEV_FEATURES, bytes(8)), (DRV_FEATURES, bytes(8)),
        (PCI_COMMON_CFG, struct.pack("<I4x", 18)), (DEVICE_STATUS, bytes(8)),
        (VQ_CFG, vq(0)), (VQ_CFG, vq(1)), (VQ_NOTIFY_CFG, vq(0)), (VQ_NOTIFY_CFG, vq(1)),
        (VQ_STATE, vq(0)), (VQ_STATE, vq(1)), (WCE, bytes(8))]
    assert [f for _t, f, _s, _v in p] == [OPTIONAL] + [0] * 10
    assert value_of(p, DEV_FEATURES) == u64(BLK_DEV_FEATURES)
    assert value_of(p, DRV_FEATURES) == u64(0)
    assert value_of(p, PCI_COMMON_CFG, struct.pack("<I4x", 18)) == b"\x02\x00"
    assert value_of(p, DEVICE_STATUS) == b"\x00"
    assert value_of(p, VQ_CFG, vq(1)) == bytes(32)
    assert value_of(p, VQ_NOTIFY_CFG, vq(1)) == struct.pack("<HH4x", 1, 0)
    assert value_of(p, VQ_STATE, vq(1)) == bytes(8)
    assert value_of(p, WCE) == b"\x01"


def test_get_all_of_a_live_member(active: Admin, guest: Guest) -> None:
    p = active.parts(1)
    assert value_of(p, DRV_FEATURES) == u64(DRIVER_ACK)  # bit 30 is vhost-user's, not virtio's
    assert value_of(p, DEVICE_STATUS) == b"\x0f"  # ACK | DRIVER | DRIVER_OK | FEATURES_OK
    assert value_of(p, VQ_CFG, vq(0)) == struct.pack("<HHHHQQQ", RING, 0, 1, 0, DESC, AVAIL,
                                                      USED)
    assert value_of(p, VQ_STATE, vq(0)) == struct.pack("<HHBB2x", 4, 4, 0, 0)


def test_metadata_size_count_list_agree_with_get_all(active: Admin, guest: Guest) -> None:
    for member in (1, 3):
        active.create(member, member, GET)
        result = active.get_all(member, member)
        parts = parse_parts(result)
        size = active.ok(METADATA_GET, SRIOV, member, metadata_data(member, M_SIZE), capacity=8)
        assert size == struct.pack("<I4x", len(result))
        count = active.ok(METADATA_GET, SRIOV, member, metadata_data(member, M_COUNT))
        assert count == struct.pack("<I4x", len(parts))
        lst = active.ok(METADATA_GET, SRIOV, member, metadata_data(member, M_LIST))
        assert lst == struct.pack("<I4x", len(parts)) + b"".join(
            part_hdr(t, len(v), s, f) for t, f, s, v in parts)
        active.err(_field(), METADATA_GET, SRIOV, member, metadata_data(member, 3))
        active.err(_field(), PARTS_GET, SRIOV, member, get_data(member, 2))


def test_result_buffer_too_small_is_enomem(active: Admin) -> None:
    active.create(3, 0, GET)
    result = active.get_all(3, 0)
    active.err((ENOMEM, Q_NORESOURCE), PARTS_GET, SRIOV, 3, get_data(0), capacity=len(result) - 1)
    active.err((ENOMEM, Q_NORESOURCE), PARTS_GET, SRIOV, 3, get_data(0), capacity=0)
    assert active.ok(PARTS_GET, SRIOV, 3, get_data(0), capacity=len(result)) == result
    lst = active.ok(METADATA_GET, SRIOV, 3, metadata_data(0, M_LIST))
    active.err((ENOMEM, Q_NORESOURCE), METADATA_GET, SRIOV, 3, metadata_data(0, M_LIST),
               capacity=len(lst) - 1)
    active.err((ENOMEM, Q_NORESOURCE), METADATA_GET, SRIOV, 3, metadata_data(0, M_LIST),
               capacity=8)
    assert active.ok(METADATA_GET, SRIOV, 3, metadata_data(0, M_LIST), capacity=len(lst)) == lst
    # SIZE and COUNT too (virtio 1.4, DEV_PARTS_METADATA_GET: ENOMEM when the result
    # buffer cannot hold the response, for every type), never a cut result with OK
    for mtype in (M_SIZE, M_COUNT):
        for capacity in (0, 4, 7):
            active.err((ENOMEM, Q_NORESOURCE), METADATA_GET, SRIOV, 3,
                       metadata_data(0, mtype), capacity=capacity)
        assert len(active.ok(METADATA_GET, SRIOV, 3, metadata_data(0, mtype), capacity=8)) == 8
    # the object is still usable: ENOMEM had no side effect
    active.ok(DESTROY, SRIOV, 3, obj_hdr(0))


def test_get_selected_returns_the_named_parts_in_canonical_order(active: Admin) -> None:
    active.create(3, 0, GET)
    every = parse_parts(active.get_all(3, 0))
    wanted = (part_hdr(WCE, 0) + part_hdr(VQ_CFG, 0, vq(1)) + part_hdr(DEVICE_STATUS, 0)
              + part_hdr(0x1FF, 0)  # not a part this member has: skipped
              + part_hdr(VQ_CFG, 0, vq(7))  # no queue 7: skipped
              + part_hdr(WCE, 0))  # named twice: once
    got = parse_parts(active.ok(PARTS_GET, SRIOV, 3, get_data(0, SELECTED, wanted)))
    assert got == [x for x in every if (x[0], x[2]) in
                   {(DEVICE_STATUS, bytes(8)), (VQ_CFG, vq(1)), (WCE, bytes(8))}]
    assert [t for t, *_ in got] == [DEVICE_STATUS, VQ_CFG, WCE]
    assert active.ok(PARTS_GET, SRIOV, 3, get_data(0, SELECTED)) == b""


# =====================================================================================
# DEV_MODE_SET (reference 2.4, 6)
# =====================================================================================


@pytest.mark.parametrize("flags", [0x02, 0x04, 0x05, 0x80, 0xFF])
def test_mode_set_invalid_flags(active: Admin, members: list[Member],
                                flags: int) -> None:
    active.err(_field(), MODE_SET, SRIOV, 1, bytes([flags]))
    assert members[0].mode is MemberMode.RUNNING
    active.mode(1, STOP)
    active.err(_field(), MODE_SET, SRIOV, 1, bytes([flags]))
    assert members[0].mode is MemberMode.STOPPED


def test_mode_set_with_no_data_resumes(active: Admin, members: list[Member]) -> None:
    active.mode(2, STOP)
    assert members[1].mode is MemberMode.STOPPED
    active.ok(MODE_SET, SRIOV, 2)  # truncated data reads as zero: resume
    assert members[1].mode is MemberMode.RUNNING
    active.mode(2, STOP)
    active.ok(MODE_SET, SRIOV, 2, b"\x00\xff\xff")  # extra bytes are ignored
    assert members[1].mode is MemberMode.RUNNING


def test_stop_and_resume_are_idempotent(active: Admin, members: list[Member],
                                        guest: Guest) -> None:
    for _ in range(2):
        active.mode(1, STOP)
        assert members[0].mode is MemberMode.STOPPED
    for _ in range(2):
        active.mode(1, RESUME)
        assert members[0].mode is MemberMode.RUNNING
    head = guest.write(9, 0x99)
    guest.kick()
    assert guest.status(head) == 0 and guest.ring.used_idx == 5


def test_stopped_member_touches_no_guest_memory_and_resumes_kicks(
        active: Admin, guest: Guest) -> None:
    active.mode(1, STOP)
    heads = [guest.write(20 + k, 0x40 + k) for k in range(3)]
    ring = guest.ring_bytes()
    guest.kick()
    assert guest.backend_kick not in guest.watcher.readers  # left in the eventfd
    guest.send(frame(R.SET_VRING_ENABLE, state(0, 1)))  # a ring message: no processing
    assert guest.ring_bytes() == ring
    assert eventfd_count(guest.call_fd) == 0
    p = active.parts(1)
    assert value_of(p, VQ_STATE, vq(0)) == struct.pack("<HHBB2x", 4, 4, 0, 0)
    active.mode(1, RESUME)
    assert guest.ring.used_idx == 7
    assert [guest.status(h) for h in heads] == [0, 0, 0]
    assert eventfd_count(guest.call_fd) == 1


def test_freeze_snapshots_the_parts(active: Admin, members: list[Member],
                                    guest: Guest) -> None:
    active.mode(1, FREEZE)
    assert members[0].mode is MemberMode.FROZEN
    snap = active.parts(1)
    assert value_of(snap, WCE) == b"\x01"
    # the driver writes the config while frozen: the parts stay the snapshot
    guest.send(frame(R.SET_CONFIG, struct.pack("<III", 32, 1, 0) + b"\x00"))
    assert members[0].handler.device.wce == 0
    assert active.parts(1) == snap
    # freezing again, or stopping and freezing, is fine
    active.mode(1, FREEZE)
    # resume leaves freeze: the parts are live again
    active.mode(1, RESUME)
    assert members[0].mode is MemberMode.RUNNING
    assert value_of(active.parts(1), WCE) == b"\x00"


def test_stopped_but_not_frozen_parts_follow_the_driver(active: Admin, guest: Guest) -> None:
    active.mode(1, STOP)
    guest.send(frame(R.SET_CONFIG, struct.pack("<III", 32, 1, 0) + b"\x00"))
    assert value_of(active.parts(1), WCE) == b"\x00"
    active.mode(1, FREEZE)  # stopped -> frozen takes the snapshot now
    guest.send(frame(R.SET_CONFIG, struct.pack("<III", 32, 1, 0) + b"\x01"))
    assert value_of(active.parts(1), WCE) == b"\x00"
    active.mode(1, STOP)  # frozen -> stopped: live again
    assert value_of(active.parts(1), WCE) == b"\x01"
    active.mode(1, RESUME)


def test_parts_take_effect_at_resume(active: Admin, members: list[Member],
                                     guest: Guest) -> None:
    p = _stopped_member_parts(active, 1)
    active.mode(2, STOP)
    assert active.set_parts(2, join(replace(p, WCE, b"\x00"))) == (OK, Q_OK)
    assert members[1].handler.device.wce == 1 and members[1].handler.features == 0
    active.mode(2, RESUME)
    q2 = active.parts(2)
    assert members[1].handler.device.wce == 0
    assert value_of(q2, DRV_FEATURES) == value_of(p, DRV_FEATURES)
    assert value_of(q2, DEVICE_STATUS) == value_of(p, DEVICE_STATUS)
    assert value_of(q2, VQ_CFG, vq(0)) == value_of(p, VQ_CFG, vq(0))
    assert value_of(q2, VQ_STATE, vq(0)) == value_of(p, VQ_STATE, vq(0))


# =====================================================================================
# resets
# =====================================================================================


def test_member_reset_returns_parts_to_defaults_and_the_member_running(
        active: Admin, members: list[Member], guest: Guest) -> None:
    defaults = active.parts(2)  # member 2 was never connected: default parts
    guest.send(frame(R.SET_CONFIG, struct.pack("<III", 32, 1, 0) + b"\x00"))
    live = _stopped_member_parts(active, 1)
    assert live != defaults
    # something staged must not survive the reset either
    assert active.set_parts(1, join(replace(live, DEVICE_STATUS, b"\x07"))) == (OK, Q_OK)
    guest.send(frame(R.RESET_DEVICE))
    assert members[0].mode is MemberMode.RUNNING
    assert members[0].staged is None
    assert active.parts(1) == defaults
    active.mode(1, RESUME)  # resume of a running member: nothing to apply
    assert active.parts(1) == defaults


def test_member_reset_while_frozen(active: Admin, members: list[Member],
                                   guest: Guest) -> None:
    defaults = active.parts(2)
    active.mode(1, FREEZE)
    members[0].handler._on_reset_device(None)  # type: ignore[arg-type]  # the reset path itself
    assert members[0].mode is MemberMode.RUNNING
    assert active.parts(1) == defaults


def test_owner_reset_destroys_objects_caps_and_reblocks_opcodes(
        active: Admin, members: list[Member]) -> None:
    active.create(1, 0, GET)
    active.create(2, 1, SET)
    active.mode(2, STOP)
    p = active.get_all(1, 0)
    active.ok(PARTS_SET, SRIOV, 2, obj_hdr(1) + p)
    active.c.reset()
    # member modes and staged parts are member state: they stay (docs 3, owner reset)
    assert members[1].mode is MemberMode.STOPPED and members[1].staged is not None
    for op, group in ((MODE_SET, SRIOV), (DESTROY, SRIOV), (CAP_ID_LIST_QUERY, SELF),
                      (CAP_ID_LIST_QUERY, SRIOV)):
        active.err((EINVAL, Q_INVALID_OPCODE), op, group, 1 if group else 0, obj_hdr(0))
    # a LIST_USE that succeeded before succeeds again; caps are back to 0
    active.ok(LIST_USE, SRIOV, data=u64(LINUX_BITMAP))
    active.err((ENXIO, Q_INVALID_FIELD), DESTROY, SRIOV, 1, obj_hdr(0))
    active.err((ENXIO, Q_INVALID_FIELD), DESTROY, SRIOV, 2, obj_hdr(1))
    active.err(_field(), CREATE, SRIOV, 1, create_data(0, GET))
    active.ok(DRIVER_CAP_SET, SELF, data=struct.pack("<H6xBB", 0, 2, 2))
    active.create(1, 0, GET)


def test_owner_device_reset_and_disconnect_reset_the_admin_state(
        members: list[Member]) -> None:
    owner = OwnerDevice(members)
    a = Admin(owner.commands)
    for clear in (owner.reset, owner.disconnected):
        a.activate()
        a.create(1, 0, GET)
        clear()
        a.err((EINVAL, Q_INVALID_OPCODE), DESTROY, SRIOV, 1, obj_hdr(0))


# =====================================================================================
# malformed commands
# =====================================================================================


def test_header_shorter_than_24_bytes_reads_zeros(active: Admin) -> None:
    c = active.c
    # nothing at all: LIST_QUERY on the self group, member 0
    assert c.execute(b"", 8) == (OK, Q_OK, u64(SELF_SUPPORTED))
    # opcode and group only: DEV_MODE_SET on group 1 for member 0
    assert c.execute(struct.pack("<HH", MODE_SET, SRIOV), 0) == (EINVAL, Q_INVALID_MEMBER, b"")
    assert c.execute(b"\x11", 0) == (EINVAL, Q_INVALID_OPCODE, b"")  # group 0
    assert c.execute(struct.pack("<HH12xB", MODE_SET, SRIOV, 1), 0) == (OK, Q_OK, b"")


@pytest.mark.parametrize("opcode", [CREATE, DESTROY, QUERY, MODIFY, METADATA_GET, PARTS_GET,
                                    PARTS_SET])
def test_truncated_object_commands_read_zeros(active: Admin, opcode: int) -> None:
    """No data: object type 0, id 0, GET kind, SIZE/SELECTED type."""
    if opcode == CREATE:
        active.ok(CREATE, SRIOV, 1)
        assert active.ok(QUERY, SRIOV, 1) == bytes(8)
        return
    status, qual, _ = active.run(opcode, SRIOV, 1)
    assert (status, qual) == (ENXIO, Q_INVALID_FIELD)
    active.ok(CREATE, SRIOV, 1, obj_hdr(0))  # 8 bytes: a GET object 0
    if opcode == METADATA_GET:
        assert active.ok(opcode, SRIOV, 1, obj_hdr(0)) == struct.pack(
            "<I4x", len(active.get_all(1, 0)))
    elif opcode == PARTS_GET:
        assert active.ok(opcode, SRIOV, 1, obj_hdr(0)) == b""  # SELECTED with no headers
    elif opcode == PARTS_SET:
        active.err(_field(), opcode, SRIOV, 1, obj_hdr(0))  # a GET object
    elif opcode == DESTROY:
        active.ok(opcode, SRIOV, 1, b"")
    else:
        active.ok(opcode, SRIOV, 1, b"")


@pytest.mark.parametrize("size", [0, 1, 23, 24, 25, 100, 4096, 1 << 16])
def test_random_commands_never_raise(active: Admin, size: int,
                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    rng = random.Random(size)
    for _ in range(200):
        raw = bytes(rng.randrange(256) for _ in range(min(size, 64))) + bytes(
            max(0, size - 64))
        # bias towards real opcodes and groups
        if len(raw) >= 4 and rng.random() < 0.7:
            raw = struct.pack("<HH", rng.choice([*range(0x12), 0x12]), rng.randrange(3)) + raw[4:]
        if len(raw) >= 24 and rng.random() < 0.7:
            raw = raw[:16] + struct.pack("<Q", rng.randrange(5)) + raw[24:]
        status, qual, result = active.c.execute(raw, rng.choice([0, 1, 8, 4096]))
        assert status in (OK, ENXIO, ENOMEM, EBUSY, EEXIST, EINVAL)
        assert (qual == Q_OK) == (status == OK)
        assert isinstance(result, bytes)
    assert "internal error" not in caplog.text
