"""Hypervisor-side admin driver: talks to an owner device's admin virtqueue.

``AdminDriver`` connects to the owner's socket as a vhost-user front end, puts the
admin queue in its own shared memory, and submits virtio 1.4 admin commands one at
a time (commands on one queue complete in order, so one in flight is enough). The
typed helpers follow Linux's vfio-virtio driver where it has an opinion: one
device-parts object per member at a time, limits set to min(get, set).
"""

from __future__ import annotations

import os
import select
import struct
from dataclasses import dataclass

from vhostd_proto import virtio_admin as va
from vhostd_proto.vhost_user import VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature
from vhostd_proto.virtio import Feature
from vhostd_proto.virtio_admin import AdminCmd as C
from vhostd_proto.virtio_admin import AdminQualifier as Q
from vhostd_proto.virtio_admin import AdminStatus as S
from vhostd_proto.virtio_admin import GroupType as G
from vhostd_proto.virtio_admin import VhostdAdminCmd as V

from .client import VhostUserClient
from .memory import PAGE_SIZE, GuestMemory, RegionSpec
from .virtqueue import SplitVirtqueue

SRIOV = G.VIRTIO_ADMIN_GROUP_TYPE_SRIOV
SELF = G.VIRTIO_ADMIN_GROUP_TYPE_SELF
GET = va.VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_GET
SET = va.VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_SET
ADMIN_QUEUE_SIZE = 64
CMD_BUF = 64 * 1024  # room for command data and for results


def status_name(status: int) -> str:
    try:
        return S(status).name
    except ValueError:
        return f"status {status}"


def qualifier_name(qualifier: int) -> str:
    try:
        return Q(qualifier).name
    except ValueError:
        return f"qualifier {qualifier:#x}"


def opcode_name(opcode: int) -> str:
    try:
        return C(opcode).name
    except ValueError:
        return f"opcode {opcode:#x}"


class AdminCommandError(Exception):
    """An admin command completed with a status other than OK."""

    def __init__(self, opcode: int, status: int, qualifier: int) -> None:
        super().__init__(f"{opcode_name(opcode)} failed: {status_name(status)} "
                         f"({qualifier_name(qualifier)})")
        self.opcode = opcode
        self.status = status
        self.qualifier = qualifier


@dataclass
class AdminResult:
    status: int
    qualifier: int
    result: bytes
    used_len: int


class AdminDriver:
    """A vhost-user front end for an owner device, driving its admin queue."""

    def __init__(self, socket_path: str | os.PathLike[str], timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.client = VhostUserClient(socket_path, timeout=timeout)
        self.mem = GuestMemory([RegionSpec(0, 4 << 20)])
        self.objects: dict[int, int] = {}  # object id -> the member it belongs to
        self.limit = 0  # device-parts objects the driver enabled (activate)
        self._next_id = 0
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        c = self.client
        features = c.get_features()
        if not features >> Feature.VIRTIO_F_ADMIN_VQ & 1:
            raise RuntimeError("the device does not offer VIRTIO_F_ADMIN_VQ: not an owner")
        protocol = c.get_protocol_features()
        want = protocol & (1 << ProtocolFeature.MQ | 1 << ProtocolFeature.REPLY_ACK
                           | 1 << ProtocolFeature.CONFIG)
        c.set_protocol_features(want)
        # The admin queue comes right after the owner's regular queues, so it is
        # the last queue GET_QUEUE_NUM counts.
        self.queue_num = c.get_queue_num() if want >> ProtocolFeature.MQ & 1 else 1
        self.admin_index = self.queue_num - 1
        c.set_owner()
        self.vq = SplitVirtqueue(self.mem, self.admin_index, ADMIN_QUEUE_SIZE)
        self.cmd_gpa = self.mem.alloc(CMD_BUF, PAGE_SIZE)
        self.res_gpa = self.mem.alloc(CMD_BUF, PAGE_SIZE)
        self.err_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        c.set_vring_call(self.admin_index, self.vq.call_fd)
        c.set_vring_err(self.admin_index, self.err_fd)
        c.set_features(1 << Feature.VIRTIO_F_VERSION_1 | 1 << Feature.VIRTIO_F_ADMIN_VQ
                       | (features & 1 << VHOST_USER_F_PROTOCOL_FEATURES))
        c.set_mem_table(list(self.mem.regions), need_reply=c.reply_ack)
        i = self.admin_index
        c.set_vring_num(i, self.vq.size)
        c.set_vring_base(i, 0)
        c.set_vring_addr(i, self.vq.desc_qva, self.vq.used_qva, self.vq.avail_qva)
        c.set_vring_kick(i, self.vq.kick_fd)
        if features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            c.set_vring_enable(i, True)
        c.get_features()  # a round trip: the ring is live once this returns

    # ---- raw commands ------------------------------------------------------
    def submit(self, opcode: int, group: int = SRIOV, member: int = 0, data: bytes = b"",
               result_size: int = 8, out_segments: int = 1) -> AdminResult:
        """One command; return whatever the device answered (no status check)."""
        if len(data) > CMD_BUF - va.ADMIN_CMD_HDR_SIZE or result_size > CMD_BUF - 8:
            raise ValueError("command or result larger than the driver's buffers")
        cmd = struct.pack("<HH12xQ", opcode, group, member) + data
        self.mem.write(self.cmd_gpa, cmd)
        self.mem.fill(self.res_gpa, 8 + result_size, 0xFF)
        outs = _split(self.cmd_gpa, len(cmd), out_segments)
        ins = [(self.res_gpa, va.ADMIN_STATUS_SIZE)]
        if result_size:
            ins.append((self.res_gpa + va.ADMIN_STATUS_SIZE, result_size))
        head = self.vq.add(outs, ins)
        self.vq.publish()
        self.vq.kick(force=True)
        used = self._wait(head)
        status, qualifier = struct.unpack("<HH", self.mem.read(self.res_gpa, 4))
        result = self.mem.read(self.res_gpa + 8, max(0, used - 8))
        return AdminResult(status, qualifier, result, used)

    def _wait(self, head: int) -> int:
        while True:
            for done, used in self.vq.reap():
                if done == head:
                    return used
            r, _, _ = select.select([self.vq.call_fd, self.err_fd], [], [], self.timeout)
            if not r:
                raise TimeoutError("the owner did not complete the admin command")
            if self.err_fd in r:
                raise RuntimeError("the owner stopped its admin queue (ring error)")
            try:
                os.eventfd_read(self.vq.call_fd)
            except BlockingIOError:
                pass

    def command(self, opcode: int, group: int = SRIOV, member: int = 0, data: bytes = b"",
                result_size: int = 0) -> bytes:
        """One command that must succeed; return its result."""
        r = self.submit(opcode, group, member, data, result_size)
        if r.status != S.VIRTIO_ADMIN_STATUS_OK:
            raise AdminCommandError(opcode, r.status, r.qualifier)
        return r.result

    # ---- Linux's owner activation (reference 5.1) --------------------------
    def activate(self, vendor: bool = False) -> int:
        """LIST_QUERY, LIST_USE, capabilities, as Linux does; return the device-parts
        object limit. ``vendor`` also enables vhostd's vendor commands (dirty
        tracking) in the same LIST_USE."""
        supported = int.from_bytes(self.command(C.VIRTIO_ADMIN_CMD_LIST_QUERY, SRIOV,
                                                result_size=8), "little")
        mask = va.VIRTIO_DEV_PARTS_ADMIN_CMD_BITMAP
        if vendor:
            mask |= sum(1 << op for op in V)
        use = supported & mask
        self.command(C.VIRTIO_ADMIN_CMD_LIST_USE, SRIOV, data=use.to_bytes(8, "little"))
        caps = int.from_bytes(self.command(C.VIRTIO_ADMIN_CMD_CAP_ID_LIST_QUERY, SELF,
                                           result_size=8), "little")
        if not caps >> va.VIRTIO_DEV_PARTS_CAP & 1:
            raise RuntimeError("the owner lacks VIRTIO_DEV_PARTS_CAP")
        cap = self.command(C.VIRTIO_ADMIN_CMD_DEVICE_CAP_GET, SELF,
                           data=struct.pack("<H6x", va.VIRTIO_DEV_PARTS_CAP), result_size=2)
        limit = min(cap[0], cap[1])
        self.command(C.VIRTIO_ADMIN_CMD_DRIVER_CAP_SET, SELF,
                     data=struct.pack("<H6xBB", va.VIRTIO_DEV_PARTS_CAP, limit, limit))
        self.limit = limit
        return limit

    def member_count(self) -> int:
        """How many members the group has (after :meth:`activate`).

        There is no command that lists members; probe with a metadata read of an
        object that cannot exist: a real member answers ENXIO, one past the last
        INVALID_MEMBER."""
        probe = struct.pack("<H2xIB7x", 0, 0xFFFFFFFF, 0)
        for n in range(1 << 16):
            r = self.submit(C.VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_GET, SRIOV, n + 1, probe, 8)
            if r.qualifier in (Q.VIRTIO_ADMIN_STATUS_Q_INVALID_MEMBER,
                               Q.VIRTIO_ADMIN_STATUS_Q_INVALID_GROUP):
                return n
            if r.status != S.VIRTIO_ADMIN_STATUS_ENXIO:
                raise AdminCommandError(C.VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_GET, r.status,
                                        r.qualifier)
        raise RuntimeError("the owner reports more than 65536 members")

    # ---- member operations -------------------------------------------------
    def set_mode(self, member: int, stopped: bool, frozen: bool = False) -> None:
        flags = (1 << va.VIRTIO_ADMIN_CMD_DEV_MODE_F_STOPPED if stopped else 0) | (
            1 << va.VHOSTD_ADMIN_CMD_DEV_MODE_F_FROZEN if frozen else 0)
        self.command(C.VIRTIO_ADMIN_CMD_DEV_MODE_SET, SRIOV, member, bytes([flags]))

    def stop(self, member: int) -> None:
        self.set_mode(member, True)

    def resume(self, member: int) -> None:
        self.set_mode(member, False)

    def freeze(self, member: int) -> None:
        self.set_mode(member, True, frozen=True)

    def create_object(self, member: int, kind: int) -> int:
        obj_id = self._free_id()
        self.command(C.VIRTIO_ADMIN_CMD_RESOURCE_OBJ_CREATE, SRIOV, member,
                     struct.pack("<H2xIQB7x", va.VIRTIO_RESOURCE_OBJ_DEV_PARTS, obj_id, 0, kind))
        self.objects[obj_id] = member
        return obj_id

    def destroy_object(self, member: int, obj_id: int) -> None:
        self.command(C.VIRTIO_ADMIN_CMD_RESOURCE_OBJ_DESTROY, SRIOV, member,
                     struct.pack("<H2xI", va.VIRTIO_RESOURCE_OBJ_DEV_PARTS, obj_id))
        self.objects.pop(obj_id, None)

    def _free_id(self) -> int:
        for i in range(self.limit or 1 << 8):
            if i not in self.objects:
                return i
        raise RuntimeError("no free device-parts object id")

    def parts_size(self, member: int, obj_id: int) -> int:
        r = self.command(C.VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_GET, SRIOV, member,
                         struct.pack("<H2xIB7x", 0, obj_id,
                                     va.VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_SIZE), 8)
        return struct.unpack_from("<I", r)[0]

    def parts_get_obj(self, member: int, obj_id: int) -> bytes:
        size = self.parts_size(member, obj_id)
        if size == 0:
            raise RuntimeError(f"member {member} reports 0 bytes of parts")
        # Like Linux: a whole number of pages, at least SIZE.
        room = (size + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
        return self.command(C.VIRTIO_ADMIN_CMD_DEV_PARTS_GET, SRIOV, member,
                            struct.pack("<H2xIB7x", 0, obj_id,
                                        va.VIRTIO_ADMIN_CMD_DEV_PARTS_GET_TYPE_ALL), room)

    def parts_set_obj(self, member: int, obj_id: int, parts: bytes) -> None:
        self.command(C.VIRTIO_ADMIN_CMD_DEV_PARTS_SET, SRIOV, member,
                     struct.pack("<H2xI", 0, obj_id) + parts)

    def parts_get(self, member: int) -> bytes:
        """Create a GET object, read every part, destroy the object."""
        obj = self.create_object(member, GET)
        try:
            return self.parts_get_obj(member, obj)
        finally:
            self.destroy_object(member, obj)

    def parts_set(self, member: int, parts: bytes) -> None:
        """Create a SET object, write the parts, destroy the object (member stopped)."""
        obj = self.create_object(member, SET)
        try:
            self.parts_set_obj(member, obj, parts)
        finally:
            self.destroy_object(member, obj)

    def move(self, source: int, dest: int, freeze: bool = False) -> bytes:
        """Stop ``source``, copy its parts into stopped ``dest``, resume ``dest``.

        The source stays stopped (its state now lives in ``dest``). Returns the parts.
        """
        self.stop(dest)
        if freeze:
            self.freeze(source)
        else:
            self.stop(source)
        parts = self.parts_get(source)
        self.parts_set(dest, parts)
        self.resume(dest)
        return parts

    # ---- vendor: device-side dirty tracking ---------------------------------
    def track_start(self, member: int, ranges: list[tuple[int, int]],
                    page_size: int = 4096) -> None:
        data = struct.pack("<II", page_size, len(ranges)) + b"".join(
            struct.pack("<QQ", gpa, length) for gpa, length in ranges)
        self.command(V.VHOSTD_ADMIN_CMD_DIRTY_TRACK_START, SRIOV, member, data)

    def track_report(self, member: int, ranges: list[tuple[int, int]],
                     page_size: int = 4096, clear: bool = True) -> set[int]:
        """Guest-physical addresses of the pages reported written (and clear them)."""
        sizes = [((length + page_size - 1) // page_size + 63) // 64 * 8
                 for _, length in ranges]
        flags = 1 << va.VHOSTD_DIRTY_TRACK_REPORT_F_CLEAR if clear else 0
        result = self.command(V.VHOSTD_ADMIN_CMD_DIRTY_TRACK_REPORT, SRIOV, member,
                              struct.pack("<I4x", flags), 8 + sum(sizes))
        pages: set[int] = set()
        off = 8
        for (gpa, _length), size in zip(ranges, sizes, strict=True):
            bitmap = int.from_bytes(result[off:off + size], "little")
            off += size
            page = 0
            while bitmap:
                if bitmap & 1:
                    pages.add(gpa + page * page_size)
                bitmap >>= 1
                page += 1
        return pages

    def track_stop(self, member: int) -> None:
        self.command(V.VHOSTD_ADMIN_CMD_DIRTY_TRACK_STOP, SRIOV, member)

    def close(self) -> None:
        for fd in (getattr(self, "err_fd", None),):
            if fd is not None:
                os.close(fd)
        self.client.close()
        self.mem.close()

    def __enter__(self) -> AdminDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _split(gpa: int, length: int, pieces: int) -> list[tuple[int, int]]:
    """Cut one buffer into ``pieces`` descriptors (tests use it for odd layouts)."""
    if pieces <= 1 or length < pieces:
        return [(gpa, length)]
    step = length // pieces
    out = [(gpa + i * step, step) for i in range(pieces - 1)]
    out.append((gpa + (pieces - 1) * step, length - step * (pieces - 1)))
    return out

