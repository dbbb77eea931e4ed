"""The owner device: an admin virtqueue that manages the member devices (virtio 1.4).

The owner is a vhost-user device of its own. It offers VIRTIO_F_ADMIN_VQ and serves
one admin virtqueue, placed right after its regular queues (none by default, or the
queues of its own disk); see docs/admin-over-vhost-user.md. Its members, 1..N, form
group type 1 (SR-IOV); group type 0 is the owner itself.

Admin commands start in queue order on the event loop. A command may have to wait
(a stop waits for the member's requests still at its storage; a member's rings may be
coming home from a queue worker): its chain then completes later, out of order, while
the admin queue goes on with commands for other members. Commands for the same member
run one after the other, in queue order.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

from vhostd_proto import virtio_admin as va
from vhostd_proto.device_parts import (
    Part,
    PartsFormatError,
    decode_headers,
    decode_parts,
    encode_parts,
)
from vhostd_proto.virtio import Feature
from vhostd_proto.virtio_admin import AdminCmd as C
from vhostd_proto.virtio_admin import AdminQualifier as Q
from vhostd_proto.virtio_admin import AdminStatus as S
from vhostd_proto.virtio_admin import GroupType as G
from vhostd_proto.virtio_admin import VhostdAdminCmd as V

from ..core.member import MemberMode
from ..core.pending import Pending, after
from ..engine.dirtytrack import MAX_RANGES, TrackerError
from ..engine.virtqueue import PENDING, Handler, SplitVirtqueue, scatter
from ..vhost_user.member import Member, TrackerBusy
from ..vhost_user.parts import PartsError, select
from .blk import BlkDevice

log = logging.getLogger("vhostd.owner")

ADMIN_QUEUE_SIZE_MAX = 1024
# The largest command the owner reads: a DEV_PARTS_SET for members with many queues.
ADMIN_COMMAND_MAX = 4 << 20
# How many device-parts objects the owner can hold at once (each limit is a u8).
DEV_PARTS_OBJECTS_LIMIT = 32

_SELF_OPCODES = frozenset({
    C.VIRTIO_ADMIN_CMD_LIST_QUERY, C.VIRTIO_ADMIN_CMD_LIST_USE,
    C.VIRTIO_ADMIN_CMD_CAP_ID_LIST_QUERY, C.VIRTIO_ADMIN_CMD_DEVICE_CAP_GET,
    C.VIRTIO_ADMIN_CMD_DRIVER_CAP_SET,
})
_CAP_OPCODES = frozenset({
    C.VIRTIO_ADMIN_CMD_CAP_ID_LIST_QUERY, C.VIRTIO_ADMIN_CMD_DEVICE_CAP_GET,
    C.VIRTIO_ADMIN_CMD_DRIVER_CAP_SET,
})
# Commands whose group_member_id names a member.
_MEMBER_OPCODES = frozenset({
    V.VHOSTD_ADMIN_CMD_DIRTY_TRACK_START, V.VHOSTD_ADMIN_CMD_DIRTY_TRACK_REPORT,
    V.VHOSTD_ADMIN_CMD_DIRTY_TRACK_STOP,
    C.VIRTIO_ADMIN_CMD_RESOURCE_OBJ_CREATE, C.VIRTIO_ADMIN_CMD_RESOURCE_OBJ_QUERY,
    C.VIRTIO_ADMIN_CMD_RESOURCE_OBJ_MODIFY, C.VIRTIO_ADMIN_CMD_RESOURCE_OBJ_DESTROY,
    C.VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_GET, C.VIRTIO_ADMIN_CMD_DEV_PARTS_GET,
    C.VIRTIO_ADMIN_CMD_DEV_PARTS_SET, C.VIRTIO_ADMIN_CMD_DEV_MODE_SET,
})
_ALWAYS = frozenset({C.VIRTIO_ADMIN_CMD_LIST_QUERY, C.VIRTIO_ADMIN_CMD_LIST_USE})
_KIND_NAMES = {va.VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_GET: "GET",
               va.VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_SET: "SET"}
_STOPPED = 1 << va.VIRTIO_ADMIN_CMD_DEV_MODE_F_STOPPED
_FROZEN = 1 << va.VHOSTD_ADMIN_CMD_DEV_MODE_F_FROZEN


class AdminError(Exception):
    def __init__(self, status: int, qualifier: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.qualifier = qualifier


def _invalid(qualifier: int, message: str) -> AdminError:
    return AdminError(S.VIRTIO_ADMIN_STATUS_EINVAL, qualifier, message)


def _field(message: str) -> AdminError:
    return _invalid(Q.VIRTIO_ADMIN_STATUS_Q_INVALID_FIELD, message)


def bitmap(opcodes: frozenset[int] | set[int]) -> int:
    return sum(1 << op for op in opcodes)


def _words(value: int, nbytes: int) -> bytes:
    return value.to_bytes(max(8, (nbytes + 7) // 8 * 8), "little")


@dataclass
class ResourceObject:
    id: int
    kind: int  # VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_GET or _SET
    member: int
    specific: bytes  # resource_obj_specific_data of the last CREATE or MODIFY


class AdminState:
    """What an owner reset clears: enabled opcodes, driver capabilities, objects."""

    def __init__(self) -> None:
        self.enabled: dict[int, frozenset[int]] = {
            G.VIRTIO_ADMIN_GROUP_TYPE_SELF: _ALWAYS,
            G.VIRTIO_ADMIN_GROUP_TYPE_SRIOV: _ALWAYS,
        }
        self.limits = (0, 0)  # (GET, SET) objects the driver enabled
        self.objects: dict[int, ResourceObject] = {}


# (status, qualifier, command-specific result)
Outcome = tuple[int, int, bytes]
# A command's result: now, or later.
Result = bytes | Pending[bytes]


class AdminCommands:
    """Executes admin commands against the member group; no ring or socket here."""

    def __init__(self, members: list[Member]) -> None:
        self.members = members
        self.state = AdminState()
        # Members with a command still running: the commands waiting behind it.
        self._waiting: dict[int, list[tuple[Callable[[], Outcome | Pending[Outcome]],
                                            Pending[Outcome]]]] = {}
        self._handlers: dict[int, Callable[[int, int, bytes, int], Result]] = {
            C.VIRTIO_ADMIN_CMD_LIST_QUERY: self._list_query,
            C.VIRTIO_ADMIN_CMD_LIST_USE: self._list_use,
            C.VIRTIO_ADMIN_CMD_CAP_ID_LIST_QUERY: self._cap_id_list_query,
            C.VIRTIO_ADMIN_CMD_DEVICE_CAP_GET: self._device_cap_get,
            C.VIRTIO_ADMIN_CMD_DRIVER_CAP_SET: self._driver_cap_set,
            C.VIRTIO_ADMIN_CMD_RESOURCE_OBJ_CREATE: self._obj_create,
            C.VIRTIO_ADMIN_CMD_RESOURCE_OBJ_MODIFY: self._obj_modify,
            C.VIRTIO_ADMIN_CMD_RESOURCE_OBJ_QUERY: self._obj_query,
            C.VIRTIO_ADMIN_CMD_RESOURCE_OBJ_DESTROY: self._obj_destroy,
            C.VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_GET: self._metadata_get,
            C.VIRTIO_ADMIN_CMD_DEV_PARTS_GET: self._parts_get,
            C.VIRTIO_ADMIN_CMD_DEV_PARTS_SET: self._parts_set,
            C.VIRTIO_ADMIN_CMD_DEV_MODE_SET: self._mode_set,
            V.VHOSTD_ADMIN_CMD_DIRTY_TRACK_START: self._track_start,
            V.VHOSTD_ADMIN_CMD_DIRTY_TRACK_REPORT: self._track_report,
            V.VHOSTD_ADMIN_CMD_DIRTY_TRACK_STOP: self._track_stop,
        }

    def reset(self) -> None:
        self.state = AdminState()
        # Write tracking was the admin driver's: it ends with it.
        for member in self.members:
            member.stop_tracking()

    def supported(self, group: int) -> frozenset[int]:
        if group == G.VIRTIO_ADMIN_GROUP_TYPE_SELF:
            return _SELF_OPCODES
        return frozenset(self._handlers)

    # ---- entry point -------------------------------------------------------
    def execute(self, command: bytes, capacity: int) -> Outcome | Pending[Outcome]:
        """Run one command: (status, qualifier, result) now, or a Pending of it.
        ``capacity`` is the room for the command-specific result."""
        if len(command) < va.ADMIN_CMD_HDR_SIZE:
            command = command + bytes(va.ADMIN_CMD_HDR_SIZE - len(command))
        opcode, group, _reserved, member = struct.unpack_from("<HH12sQ", command)
        data = command[va.ADMIN_CMD_HDR_SIZE:]
        try:
            self._validate(opcode, group, member)
        except AdminError as e:
            return self._failed(opcode, group, member, e)

        def run() -> Outcome | Pending[Outcome]:
            try:
                result = self._handlers[opcode](group, member, data, capacity)
            except Exception as e:
                return self._failed(opcode, group, member, e)
            if isinstance(result, Pending):
                return _outcome_later(result, lambda e: self._failed(opcode, group, member, e))
            return S.VIRTIO_ADMIN_STATUS_OK, Q.VIRTIO_ADMIN_STATUS_Q_OK, result

        if opcode not in _MEMBER_OPCODES:
            return run()
        return self._in_turn(member, run)

    def _in_turn(self, member: int, run: Callable[[], Outcome | Pending[Outcome]]
                 ) -> Outcome | Pending[Outcome]:
        """Run a member's command after the ones before it for that member."""
        waiting = self._waiting.get(member)
        if waiting is not None:
            later: Pending[Outcome] = Pending()
            waiting.append((run, later))
            return later
        result = run()
        if not isinstance(result, Pending):
            return result
        self._waiting[member] = []
        out: Pending[Outcome] = Pending()
        result.then(lambda p: self._done_then_next(member, p, out))
        return out

    def _done_then_next(self, member: int, p: Pending[Outcome], out: Pending[Outcome]
                        ) -> None:
        """Complete a member's command, then start the next one for that member, so
        the commands' used entries come in queue order."""
        out.resolve(p.result())  # outcomes are never errors (execute maps them)
        self._next(member)

    def _next(self, member: int) -> None:
        waiting = self._waiting[member]
        while waiting:
            run, later = waiting.pop(0)
            result = run()
            if isinstance(result, Pending):
                result.then(lambda p, later=later: self._done_then_next(member, p, later))
                return
            later.resolve(result)
        del self._waiting[member]

    @staticmethod
    def _failed(opcode: int, group: int, member: int, e: Exception) -> Outcome:
        if isinstance(e, AdminError):
            log.info("admin command %s (group %d, member %d) failed: %s: %s",
                     _opcode_name(opcode), group, member, _status_name(e.status), e)
            return e.status, e.qualifier, b""
        if isinstance(e, PartsError):
            log.info("admin command %s for member %d failed: %s", _opcode_name(opcode),
                     member, e)
            return e.status, e.qualifier, b""
        log.error("internal error in admin command %s", _opcode_name(opcode),
                  exc_info=(type(e), e, e.__traceback__))
        return (S.VIRTIO_ADMIN_STATUS_EINVAL, Q.VIRTIO_ADMIN_STATUS_Q_INVALID_COMMAND, b"")

    def _validate(self, opcode: int, group: int, member: int) -> None:
        # The spec's order: group, then opcode, then member.
        if group not in (G.VIRTIO_ADMIN_GROUP_TYPE_SELF, G.VIRTIO_ADMIN_GROUP_TYPE_SRIOV):
            raise _invalid(Q.VIRTIO_ADMIN_STATUS_Q_INVALID_GROUP, f"no group type {group}")
        if group == G.VIRTIO_ADMIN_GROUP_TYPE_SRIOV and not self.members:
            raise _invalid(Q.VIRTIO_ADMIN_STATUS_Q_INVALID_GROUP, "the owner has no members")
        if opcode not in self.supported(group):
            raise _invalid(Q.VIRTIO_ADMIN_STATUS_Q_INVALID_OPCODE,
                           f"opcode {opcode:#x} is not supported for group type {group}")
        if not self._enabled(opcode, group):
            raise _invalid(Q.VIRTIO_ADMIN_STATUS_Q_INVALID_OPCODE,
                           f"{_opcode_name(opcode)} is not enabled by LIST_USE")
        if opcode in _MEMBER_OPCODES and not 1 <= member <= len(self.members):
            raise _invalid(Q.VIRTIO_ADMIN_STATUS_Q_INVALID_MEMBER,
                           f"no member {member} (members are 1..{len(self.members)})")
        if group == G.VIRTIO_ADMIN_GROUP_TYPE_SELF and member != 0:
            raise _invalid(Q.VIRTIO_ADMIN_STATUS_Q_INVALID_MEMBER,
                           f"member {member} in the self group (must be 0)")

    def _enabled(self, opcode: int, group: int) -> bool:
        enabled = self.state.enabled
        if opcode in enabled[group]:
            return True
        # Linux enables the capability commands in the SR-IOV group's LIST_USE only,
        # then sends them on the self group: accept either list for them.
        return opcode in _CAP_OPCODES and any(opcode in e for e in enabled.values())

    # ---- LIST_QUERY / LIST_USE ---------------------------------------------
    def _list_query(self, group: int, member: int, data: bytes, capacity: int) -> bytes:
        return _words(bitmap(self.supported(group)), 8)

    def _list_use(self, group: int, member: int, data: bytes, capacity: int) -> bytes:
        used = int.from_bytes(data, "little") if data else 0
        extra = used & ~bitmap(self.supported(group))
        if extra:
            raise _field(f"LIST_USE enables opcodes {extra:#x} not supported for group {group}")
        self.state.enabled[group] = frozenset(op for op in self.supported(group)
                                              if used >> op & 1)
        return b""

    # ---- capabilities ------------------------------------------------------
    def _cap_id_list_query(self, group: int, member: int, data: bytes, capacity: int) -> bytes:
        return _words(1 << va.VIRTIO_DEV_PARTS_CAP, 8)

    def _device_cap_get(self, group: int, member: int, data: bytes, capacity: int) -> bytes:
        cap_id = int.from_bytes(data[:2].ljust(2, b"\0"), "little")
        if cap_id != va.VIRTIO_DEV_PARTS_CAP:
            raise AdminError(S.VIRTIO_ADMIN_STATUS_ENXIO, Q.VIRTIO_ADMIN_STATUS_Q_INVALID_FIELD,
                             f"no capability {cap_id}")
        return bytes([DEV_PARTS_OBJECTS_LIMIT, DEV_PARTS_OBJECTS_LIMIT])

    def _driver_cap_set(self, group: int, member: int, data: bytes, capacity: int) -> bytes:
        data = data.ljust(10, b"\0")
        cap_id = int.from_bytes(data[:2], "little")
        if cap_id != va.VIRTIO_DEV_PARTS_CAP:
            raise AdminError(S.VIRTIO_ADMIN_STATUS_ENXIO, Q.VIRTIO_ADMIN_STATUS_Q_INVALID_FIELD,
                             f"no capability {cap_id}")
        get_limit, set_limit = data[8], data[9]
        if get_limit > DEV_PARTS_OBJECTS_LIMIT or set_limit > DEV_PARTS_OBJECTS_LIMIT:
            raise _field(f"limits {get_limit}/{set_limit} exceed the device's "
                         f"{DEV_PARTS_OBJECTS_LIMIT}")
        for obj in self.state.objects.values():
            is_get = obj.kind == va.VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_GET
            limit = get_limit if is_get else set_limit
            if obj.id >= limit:
                raise AdminError(S.VIRTIO_ADMIN_STATUS_EBUSY,
                                 Q.VIRTIO_ADMIN_STATUS_Q_INVALID_FIELD,
                                 f"object {obj.id} still exists above the new limit")
        self.state.limits = (get_limit, set_limit)
        return b""

    # ---- resource objects --------------------------------------------------
    @staticmethod
    def _obj_hdr(data: bytes) -> tuple[int, int]:
        data = data.ljust(8, b"\0")
        rtype, _res, obj_id = struct.unpack_from("<H2sI", data)
        if rtype != va.VIRTIO_RESOURCE_OBJ_DEV_PARTS:
            raise _field(f"no resource object type {rtype:#x}")
        return rtype, obj_id

    def _parse_create(self, data: bytes) -> tuple[int, int]:
        _rtype, obj_id = self._obj_hdr(data)
        data = data.ljust(24, b"\0")
        flags = int.from_bytes(data[8:16], "little")
        if flags:
            raise _field(f"resource object flags {flags:#x}")
        kind = data[16]
        if kind not in _KIND_NAMES:
            raise _field(f"device-parts object type {kind}")
        return obj_id, kind

    def _obj_create(self, group: int, member: int, data: bytes, capacity: int) -> bytes:
        obj_id, kind = self._parse_create(data)
        limit = self.state.limits[kind]
        if obj_id >= limit:
            raise _field(f"object id {obj_id} is not below the {_KIND_NAMES[kind]} limit "
                         f"{limit} the driver set")
        if obj_id in self.state.objects:
            raise AdminError(S.VIRTIO_ADMIN_STATUS_EEXIST, Q.VIRTIO_ADMIN_STATUS_Q_INVALID_FIELD,
                             f"object {obj_id} exists")
        self.state.objects[obj_id] = ResourceObject(obj_id, kind, member,
                                                    data.ljust(24, b"\0")[16:24])
        return b""

    def _object(self, obj_id: int, member: int, kind: int | None = None) -> ResourceObject:
        obj = self.state.objects.get(obj_id)
        if obj is None:
            raise AdminError(S.VIRTIO_ADMIN_STATUS_ENXIO, Q.VIRTIO_ADMIN_STATUS_Q_INVALID_FIELD,
                             f"no object {obj_id}")
        if obj.member != member:
            raise _field(f"object {obj_id} belongs to member {obj.member}")
        if kind is not None and obj.kind != kind:
            raise _field(f"object {obj_id} is a {_KIND_NAMES[obj.kind]} object")
        return obj

    def _obj_modify(self, group: int, member: int, data: bytes, capacity: int) -> bytes:
        obj_id, kind = self._parse_create(data)
        obj = self._object(obj_id, member)
        if kind != obj.kind:
            # An object serves GET or SET for its whole life.
            raise _field(f"object {obj_id} is a {_KIND_NAMES[obj.kind]} object; MODIFY "
                         f"cannot make it {_KIND_NAMES[kind]}")
        obj.specific = data.ljust(24, b"\0")[16:24]
        return b""

    def _obj_query(self, group: int, member: int, data: bytes, capacity: int) -> bytes:
        _rtype, obj_id = self._obj_hdr(data)
        return self._object(obj_id, member).specific

    def _obj_destroy(self, group: int, member: int, data: bytes, capacity: int) -> bytes:
        _rtype, obj_id = self._obj_hdr(data)
        self._object(obj_id, member)
        del self.state.objects[obj_id]
        return b""

    # ---- device parts ------------------------------------------------------
    def _member(self, member: int) -> Member:
        return self.members[member - 1]

    def _metadata_get(self, group: int, member: int, data: bytes, capacity: int) -> Result:
        _rtype, obj_id = self._obj_hdr(data)
        self._object(obj_id, member, va.VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_GET)
        mtype = data.ljust(16, b"\0")[8]
        if mtype not in (va.VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_SIZE,
                         va.VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_COUNT,
                         va.VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_LIST):
            raise _field(f"metadata type {mtype}")
        if mtype in (va.VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_SIZE,
                     va.VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_COUNT) and capacity < 8:
            # Spec: ENOMEM when the result buffer cannot hold the response, for every
            # metadata type (a cut size would read as a different size).
            raise AdminError(S.VIRTIO_ADMIN_STATUS_ENOMEM, Q.VIRTIO_ADMIN_STATUS_Q_NORESOURCE,
                             f"metadata needs 8 bytes, buffer has {capacity}")

        def metadata(parts: list[Part]) -> bytes:
            if mtype == va.VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_SIZE:
                return struct.pack("<I4x", len(encode_parts(parts)))
            if mtype == va.VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_TYPE_COUNT:
                return struct.pack("<I4x", len(parts))
            result = struct.pack("<I4x", len(parts)) + b"".join(p.header() for p in parts)
            if len(result) > capacity:
                raise AdminError(S.VIRTIO_ADMIN_STATUS_ENOMEM,
                                 Q.VIRTIO_ADMIN_STATUS_Q_NORESOURCE,
                                 f"header list needs {len(result)} bytes, buffer has {capacity}")
            return result

        return after(self._member(member).parts(), metadata)

    def _parts_get(self, group: int, member: int, data: bytes, capacity: int) -> Result:
        _rtype, obj_id = self._obj_hdr(data)
        self._object(obj_id, member, va.VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_GET)
        gtype = data.ljust(16, b"\0")[8]
        if gtype not in (va.VIRTIO_ADMIN_CMD_DEV_PARTS_GET_TYPE_SELECTED,
                         va.VIRTIO_ADMIN_CMD_DEV_PARTS_GET_TYPE_ALL):
            raise _field(f"get type {gtype}")

        def encode(parts: list[Part]) -> bytes:
            if gtype == va.VIRTIO_ADMIN_CMD_DEV_PARTS_GET_TYPE_SELECTED:
                parts = select(parts, decode_headers(data[16:]))
            result = encode_parts(parts)
            if len(result) > capacity:
                # A cut part list would be unusable: refuse instead of truncating.
                raise AdminError(S.VIRTIO_ADMIN_STATUS_ENOMEM,
                                 Q.VIRTIO_ADMIN_STATUS_Q_NORESOURCE,
                                 f"parts need {len(result)} bytes, buffer has {capacity}")
            return result

        return after(self._member(member).parts(), encode)

    def _parts_set(self, group: int, member: int, data: bytes, capacity: int) -> Result:
        _rtype, obj_id = self._obj_hdr(data)
        self._object(obj_id, member, va.VIRTIO_RESOURCE_OBJ_DEV_PARTS_TYPE_SET)
        try:
            parts = decode_parts(data[8:])
        except PartsFormatError as e:
            raise _field(str(e)) from e
        return after(self._member(member).stage_parts(parts), lambda _: b"")

    def _mode_set(self, group: int, member: int, data: bytes, capacity: int) -> Result:
        flags = data[0] if data else 0
        if flags & ~(_STOPPED | _FROZEN):
            raise _field(f"mode flags {flags:#x}")
        if flags == _FROZEN:
            raise _field("freeze needs the STOPPED bit too")
        mode = (MemberMode.FROZEN if flags & _FROZEN else
                MemberMode.STOPPED if flags & _STOPPED else MemberMode.RUNNING)
        return after(self._member(member).set_mode(mode), lambda _: b"")


    # ---- vendor: device-side dirty page tracking ----------------------------
    def _track_start(self, group: int, member: int, data: bytes, capacity: int) -> Result:
        data = data.ljust(8, b"\0")
        page_size, count = struct.unpack_from("<II", data)
        if count > MAX_RANGES:
            raise _field(f"{count} ranges (at most {MAX_RANGES})")
        data = data.ljust(8 + 16 * count, b"\0")
        ranges = [struct.unpack_from("<QQ", data, 8 + 16 * i) for i in range(count)]
        try:
            started = self._member(member).start_tracking(page_size, ranges)
        except TrackerBusy as e:
            raise AdminError(S.VIRTIO_ADMIN_STATUS_EBUSY, Q.VIRTIO_ADMIN_STATUS_Q_INVALID_COMMAND,
                             str(e)) from e
        except TrackerError as e:
            raise _field(str(e)) from e
        return after(started, lambda _: b"")

    def _track_report(self, group: int, member: int, data: bytes, capacity: int) -> Result:
        tracker = self._member(member).tracker
        if tracker is None:
            raise _invalid(Q.VIRTIO_ADMIN_STATUS_Q_INVALID_COMMAND,
                           f"member {member} does not track writes")
        flags = int.from_bytes(data[:4].ljust(4, b"\0"), "little")
        if flags & ~(1 << va.VHOSTD_DIRTY_TRACK_REPORT_F_CLEAR):
            raise _field(f"report flags {flags:#x}")
        if tracker.report_size() > capacity:
            raise AdminError(S.VIRTIO_ADMIN_STATUS_ENOMEM, Q.VIRTIO_ADMIN_STATUS_Q_NORESOURCE,
                             f"report needs {tracker.report_size()} bytes, buffer has "
                             f"{capacity}")
        return self._member(member).tracking_report(
            clear=bool(flags & 1 << va.VHOSTD_DIRTY_TRACK_REPORT_F_CLEAR))

    def _track_stop(self, group: int, member: int, data: bytes, capacity: int) -> Result:
        return after(self._member(member).stop_tracking(), lambda _: b"")


def _outcome_later(result: Pending[bytes], failed: Callable[[Exception], Outcome]
                   ) -> Pending[Outcome]:
    out: Pending[Outcome] = Pending()

    def done(p: Pending[bytes]) -> None:
        try:
            value = p.result()
        except Exception as e:
            out.resolve(failed(e))
            return
        out.resolve((S.VIRTIO_ADMIN_STATUS_OK, Q.VIRTIO_ADMIN_STATUS_Q_OK, value))

    result.then(done)
    return out


def _opcode_name(opcode: int) -> str:
    for enum_type, prefix in ((C, "VIRTIO_ADMIN_CMD_"), (V, "VHOSTD_ADMIN_CMD_")):
        try:
            return enum_type(opcode).name.removeprefix(prefix)
        except ValueError:
            pass
    return f"opcode {opcode:#x}"


def _status_name(status: int) -> str:
    try:
        return S(status).name.removeprefix("VIRTIO_ADMIN_STATUS_")
    except ValueError:
        return str(status)


class OwnerDevice:
    """A vhost-user device whose last queue is the admin queue.

    With ``disk`` the owner is also a virtio-blk device: its regular queues are the
    disk's, and the admin queue comes after them.
    """

    def __init__(self, members: list[Member], disk: BlkDevice | None = None,
                 name: str = "owner") -> None:
        self.name = name
        self.disk = disk
        self.commands = AdminCommands(members)
        self.admin_queue_index = disk.num_queues if disk else 0
        self.num_queues = self.admin_queue_index + 1
        self.max_queue_size = max(disk.max_queue_size if disk else 0, ADMIN_QUEUE_SIZE_MAX)

    @property
    def members(self) -> list[Member]:
        return self.commands.members

    def device_features(self) -> int:
        disk = self.disk.device_features() if self.disk else 0
        return disk | 1 << Feature.VIRTIO_F_ADMIN_VQ

    def make_handler(self, queue: SplitVirtqueue) -> Handler:
        if queue.index < self.admin_queue_index:
            assert self.disk is not None
            return self.disk.make_handler(queue)

        def admin(head: int, readable: list[memoryview], writable: list[memoryview]) -> int:
            return self._admin_request(queue, head, readable, writable)

        return admin

    def _admin_request(self, queue: SplitVirtqueue, head: int, readable: list[memoryview],
                       writable: list[memoryview]) -> int:
        room = sum(map(len, writable))
        if room == 0:
            # Nothing could report the outcome: run nothing.
            log.info("admin command at head %d has no device-writable part; dropped", head)
            return 0
        size = sum(map(len, readable))
        if size > ADMIN_COMMAND_MAX:
            # Larger than any command: refuse before copying guest memory.
            log.info("admin command of %d bytes refused", size)
            outcome: Outcome | Pending[Outcome] = (
                S.VIRTIO_ADMIN_STATUS_EINVAL, Q.VIRTIO_ADMIN_STATUS_Q_INVALID_COMMAND, b"")
        else:
            # A writable part shorter than the status still gets what fits of it (the
            # spec: a short buffer never fails a command by itself).
            outcome = self.commands.execute(b"".join(readable),
                                            max(0, room - va.ADMIN_STATUS_SIZE))
        if isinstance(outcome, Pending):
            outcome.then(lambda p: queue.complete(head, _write_result(p.result(), writable)))
            return PENDING
        return _write_result(outcome, writable)

    def get_config(self, offset: int, size: int) -> bytes:
        if self.disk:
            return self.disk.get_config(offset, size)
        return bytes(size)

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        if not self.disk:
            raise ValueError("the owner has no configuration space")
        self.disk.set_config(offset, data, flags)

    def features_acked(self, features: int) -> None:
        pass

    def reset(self) -> None:
        self.commands.reset()
        if self.disk:
            self.disk.reset()

    def refresh_capacity(self) -> bool:
        return self.disk.refresh_capacity() if self.disk else False

    def close(self) -> None:
        if self.disk:
            self.disk.close()

    def disconnected(self) -> None:
        # The admin driver went away: what it set up goes with it.
        self.commands.reset()

    def get_parts(self) -> list[tuple[int, bytes]]:
        return self.disk.get_parts() if self.disk else []

    def part_lengths(self) -> list[tuple[int, int]]:
        return self.disk.part_lengths() if self.disk else []

    def check_part(self, part_type: int, value: bytes) -> None:
        if self.disk:
            self.disk.check_part(part_type, value)

    def apply_part(self, part_type: int, value: bytes) -> None:
        if self.disk:
            self.disk.apply_part(part_type, value)


def _write_result(outcome: Outcome, writable: list[memoryview]) -> int:
    """The status and result into the command's device-writable buffers; the used length.
    Results are cut to the buffer (parts lists refuse earlier)."""
    status, qualifier, result = outcome
    return scatter(struct.pack("<HH4x", status, qualifier) + result, writable)
