"""Sans-I/O vhost-user back-end protocol core.

Bytes and file descriptors go in (:meth:`BackendProtocol.receive`), validated and
parsed messages come out; replies are built by :meth:`BackendProtocol.reply` and
:meth:`BackendProtocol.ack`. Nothing here touches a socket, an fd or guest memory:
fds are plain integers that the caller owns until a message hands them on.

What is legal is data, not code: :data:`RULES` says for every request which payload
size, how many fds, which protocol feature gate and whether ownership is required,
and which ring state it touches (so rings served by worker processes come back only
for those); :data:`RING_TRANSITIONS` says which ring-phase changes a request makes. Anything
outside those tables raises :class:`ProtocolError`, which the shell answers by
logging the reason and closing that connection.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from vhostd_proto import vhost_user as vu
from vhostd_proto.vhost_user import ProtocolFeature as PF
from vhostd_proto.vhost_user import Request as R

log = logging.getLogger(__name__)


class ProtocolError(Exception):
    """The front end broke the protocol; the connection must be closed.

    ``fds`` are the descriptors that came with the offending message; the caller
    owns them and must close them.
    """

    def __init__(self, why: str, fds: Iterable[int] = ()) -> None:
        super().__init__(why)
        self.fds = list(fds)


class ReplyKind(enum.Enum):
    NONE = "none"  # never a body; an ack when NEED_REPLY and REPLY_ACK
    BODY = "body"  # always answered with a body
    ALWAYS_ACK = "always-ack"  # answered with a u64 even without REPLY_ACK


class RingPhase(enum.Enum):
    STOPPED = "stopped"
    STARTED = "started"


class RingScope(enum.Enum):
    """The ring state a request reads or changes. Its handler runs with those rings in
    the main process: rings a queue worker serves are called back for it first."""

    NONE = "none"  # no ring state: handled while every ring runs, wherever it runs
    ONE = "one"  # the ring the request names
    ALL = "all"  # every ring of the device (memory, features, logs, config, reset)


class RingArg(enum.Enum):
    NONE = "none"
    STATE = "state"  # payload begins with a u32 ring index
    FD = "fd"  # payload is a vring-fd u64: index in bits 0-7, NOFD in bit 8


def _fixed(n: int) -> Callable[[bytes], bool]:
    return lambda p: len(p) == n


def _mem_table_size(p: bytes) -> bool:
    if len(p) < 8:
        return False
    n = int.from_bytes(p[:4], "little")
    return n <= vu.VHOST_MEMORY_BASELINE_NREGIONS and len(p) == 8 + 32 * n


def _config_size(p: bytes) -> bool:
    if len(p) < 12:
        return False
    offset = int.from_bytes(p[0:4], "little")
    size = int.from_bytes(p[4:8], "little")
    return (
        size <= vu.VHOST_USER_MAX_CONFIG_SIZE
        and offset + size <= vu.VHOST_USER_MAX_CONFIG_SIZE
        and len(p) == 12 + size
    )


@dataclass(frozen=True)
class Rule:
    """What a request must look like to be accepted."""

    size_ok: Callable[[bytes], bool]
    size_text: str
    fds: tuple[int, int] = (0, 0)
    gate: PF | None = None
    needs_owner: bool = False
    reply: ReplyKind = ReplyKind.NONE
    ring: RingArg = RingArg.NONE
    parse: Any = None  # a construct Struct for the payload, if it has one
    rings: RingScope = RingScope.NONE


def _rule(size: int, **kw: Any) -> Rule:
    return Rule(size_ok=_fixed(size), size_text=f"{size}", **kw)


RULES: dict[R, Rule] = {
    R.GET_FEATURES: _rule(0, reply=ReplyKind.BODY),
    R.SET_FEATURES: _rule(8, parse=vu.U64, rings=RingScope.ALL),
    R.SET_OWNER: _rule(0),
    R.RESET_OWNER: _rule(0, rings=RingScope.ALL),
    R.GET_PROTOCOL_FEATURES: _rule(0, reply=ReplyKind.BODY),
    R.SET_PROTOCOL_FEATURES: _rule(8, parse=vu.U64),
    R.GET_QUEUE_NUM: _rule(0, gate=PF.MQ, reply=ReplyKind.BODY),
    R.GET_MAX_MEM_SLOTS: _rule(0, gate=PF.CONFIGURE_MEM_SLOTS, reply=ReplyKind.BODY),
    R.SET_MEM_TABLE: Rule(
        size_ok=_mem_table_size,
        size_text="8 + 32 * nregions (nregions <= 8)",
        fds=(0, vu.VHOST_MEMORY_BASELINE_NREGIONS),
        needs_owner=True,
        parse=vu.MemoryTable,
        rings=RingScope.ALL,
    ),
    R.ADD_MEM_REG: _rule(
        40, fds=(1, 1), gate=PF.CONFIGURE_MEM_SLOTS, needs_owner=True,
        parse=vu.SingleMemoryRegion, rings=RingScope.ALL,
    ),
    R.REM_MEM_REG: _rule(
        40, fds=(0, 1), gate=PF.CONFIGURE_MEM_SLOTS, needs_owner=True,
        parse=vu.SingleMemoryRegion, rings=RingScope.ALL,
    ),
    R.SET_BACKEND_REQ_FD: _rule(0, fds=(1, 1), gate=PF.BACKEND_REQ),
    R.SET_VRING_NUM: _rule(8, needs_owner=True, ring=RingArg.STATE, parse=vu.VringState,
                           rings=RingScope.ONE),
    R.SET_VRING_BASE: _rule(8, needs_owner=True, ring=RingArg.STATE, parse=vu.VringState,
                            rings=RingScope.ONE),
    R.SET_VRING_ADDR: _rule(40, needs_owner=True, ring=RingArg.STATE, parse=vu.VringAddr,
                            rings=RingScope.ONE),
    R.GET_VRING_BASE: _rule(
        8, needs_owner=True, ring=RingArg.STATE, reply=ReplyKind.BODY, parse=vu.VringState,
        rings=RingScope.ONE,
    ),
    R.SET_VRING_KICK: _rule(8, fds=(0, 1), needs_owner=True, ring=RingArg.FD, parse=vu.U64,
                            rings=RingScope.ONE),
    R.SET_VRING_CALL: _rule(8, fds=(0, 1), needs_owner=True, ring=RingArg.FD, parse=vu.U64,
                            rings=RingScope.ONE),
    R.SET_VRING_ERR: _rule(8, fds=(0, 1), needs_owner=True, ring=RingArg.FD, parse=vu.U64,
                           rings=RingScope.ONE),
    R.SET_VRING_ENABLE: _rule(8, ring=RingArg.STATE, parse=vu.VringState,
                              rings=RingScope.ONE),
    R.GET_CONFIG: Rule(
        size_ok=_config_size, size_text="12 + size (size <= 256)", gate=PF.CONFIG,
        reply=ReplyKind.BODY, parse=vu.Config,
    ),
    R.SET_CONFIG: Rule(
        size_ok=_config_size, size_text="12 + size (size <= 256)", gate=PF.CONFIG,
        parse=vu.Config,
        rings=RingScope.ALL,  # the write-cache mode: a worker's device has a copy
    ),
    R.GET_INFLIGHT_FD: _rule(
        24, gate=PF.INFLIGHT_SHMFD, needs_owner=True, reply=ReplyKind.BODY, parse=vu.Inflight
    ),
    R.SET_INFLIGHT_FD: _rule(
        24, fds=(1, 1), gate=PF.INFLIGHT_SHMFD, needs_owner=True, parse=vu.Inflight,
        rings=RingScope.ALL,
    ),
    R.RESET_DEVICE: _rule(0, gate=PF.RESET_DEVICE, rings=RingScope.ALL),
    R.SET_LOG_BASE: _rule(
        16, fds=(1, 1), gate=PF.LOG_SHMFD, needs_owner=True, reply=ReplyKind.ALWAYS_ACK,
        parse=vu.LogBase, rings=RingScope.ALL,
    ),
}

# (request, phase before) -> phase after. A ring request whose pair is missing is
# illegal in that phase; requests absent from every pair (CALL, ERR, ENABLE) are legal
# in any phase and leave it unchanged.
RING_TRANSITIONS: dict[tuple[R, RingPhase], RingPhase] = {
    (R.SET_VRING_NUM, RingPhase.STOPPED): RingPhase.STOPPED,
    (R.SET_VRING_BASE, RingPhase.STOPPED): RingPhase.STOPPED,
    (R.SET_VRING_ADDR, RingPhase.STOPPED): RingPhase.STOPPED,
    # QEMU re-sends the addresses of a running ring to switch dirty logging.
    (R.SET_VRING_ADDR, RingPhase.STARTED): RingPhase.STARTED,
    (R.SET_VRING_KICK, RingPhase.STOPPED): RingPhase.STARTED,
    (R.SET_VRING_KICK, RingPhase.STARTED): RingPhase.STARTED,
    (R.GET_VRING_BASE, RingPhase.STARTED): RingPhase.STOPPED,
    (R.GET_VRING_BASE, RingPhase.STOPPED): RingPhase.STOPPED,
}
_PHASED = {req for req, _ in RING_TRANSITIONS}

# Requests after which every ring is stopped again.
_RESETS = {R.RESET_OWNER, R.RESET_DEVICE}


@dataclass(frozen=True)
class DeviceInfo:
    """What the back end offers; fixed for the life of a connection."""

    features: int
    protocol_features: int
    num_queues: int
    max_mem_slots: int = 509


@dataclass
class Message:
    """One validated request from the front end."""

    request: R
    flags: int
    payload: bytes
    fds: list[int]
    body: Any = None  # the parsed payload (a construct Container) or None
    ring: int | None = None

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & vu.VHOST_USER_NEED_REPLY_MASK)

    @property
    def fd(self) -> int | None:
        return self.fds[0] if self.fds else None

    def describe(self) -> str:
        """One line for debug logs: the request, its fields and its fd count."""
        parts = [self.request.name]
        if self.body is not None:
            parts.append(_fields(self.body))
        if self.fds:
            parts.append(f"fds={len(self.fds)}")
        return " ".join(parts)


def _fields(body: Any) -> str:
    out = []
    for key, value in body.items():
        if key.startswith("_"):
            continue
        if isinstance(value, dict):
            out.append(f"{key}=({_fields(value)})")
        elif isinstance(value, list):
            out.append(f"{key}=[{', '.join(_fields(v) for v in value)}]")
        elif isinstance(value, bytes):
            out.append(f"{key}={value[:16].hex()}{'...' if len(value) > 16 else ''}")
        elif isinstance(value, int) and value > 0xFFFF:
            out.append(f"{key}={value:#x}")
        else:
            out.append(f"{key}={value}")
    return " ".join(out)


@dataclass
class _Partial:
    header: bytes = b""
    payload: bytearray = field(default_factory=bytearray)
    fds: list[int] = field(default_factory=list)
    request: int = 0
    flags: int = 0
    size: int = -1


class BackendProtocol:
    """State of one front-end connection, as seen by the back end."""

    def __init__(self, info: DeviceInfo) -> None:
        self.info = info
        self.acked_features = 0
        self.protocol_features = 0
        self.protocol_features_set = False
        self.owner = False
        self.rings = [RingPhase.STOPPED] * info.num_queues
        self._partial = _Partial()

    # ---- input -------------------------------------------------------------
    def bytes_needed(self) -> int:
        """How many bytes complete the current header or payload."""
        p = self._partial
        if p.size < 0:
            return vu.VHOST_USER_HDR_SIZE - len(p.header)
        return p.size - len(p.payload)

    def receive(self, data: bytes, fds: Iterable[int] = ()) -> list[Message]:
        """Feed bytes (and the fds that came with them); return complete messages.

        fds belong to the message being assembled when they arrive, which is how
        SCM_RIGHTS pairs them with the header they were sent with.
        """
        out: list[Message] = []
        p = self._partial
        p.fds.extend(fds)
        view = memoryview(data)
        while True:
            if p.size < 0:
                take = vu.VHOST_USER_HDR_SIZE - len(p.header)
                p.header += bytes(view[:take])
                view = view[take:]
                if len(p.header) < vu.VHOST_USER_HDR_SIZE:
                    break
                p.request = int.from_bytes(p.header[0:4], "little")
                p.flags = int.from_bytes(p.header[4:8], "little")
                p.size = int.from_bytes(p.header[8:12], "little")
                if p.size > vu.VHOST_USER_MAX_PAYLOAD:
                    self._partial = _Partial()
                    raise ProtocolError(
                        f"{self._name(p.request)} declares {p.size} payload bytes, more "
                        f"than any request carries", p.fds + [fd for m in out for fd in m.fds],
                    )
            take = p.size - len(p.payload)
            p.payload += view[:take]
            view = view[take:]
            if len(p.payload) < p.size:
                break
            self._partial = _Partial()
            try:
                msg = self._validate(p)
            except ProtocolError as e:
                # Messages completed earlier in this chunk die with the connection;
                # their fds must be closed too.
                for done in out:
                    e.fds.extend(done.fds)
                raise
            p = self._partial
            out.append(msg)
            if not view:
                break
        return out

    def pending_fds(self) -> list[int]:
        """fds received for a message that never completed (close them on teardown)."""
        return list(self._partial.fds)

    # ---- validation --------------------------------------------------------
    @staticmethod
    def _name(request: int) -> str:
        try:
            return R(request).name
        except ValueError:
            return f"request {request}"

    def _validate(self, p: _Partial) -> Message:
        name = self._name(p.request)
        try:
            req = R(p.request)
        except ValueError:
            raise ProtocolError(f"unknown request id {p.request}", p.fds) from None
        rule = RULES.get(req)
        if rule is None:
            raise ProtocolError(f"{name} is not supported by this back end", p.fds)
        if p.flags & vu.VHOST_USER_VERSION_MASK != vu.VHOST_USER_VERSION:
            raise ProtocolError(f"{name}: unsupported version in flags {p.flags:#x}", p.fds)
        if p.flags & vu.VHOST_USER_REPLY_MASK:
            raise ProtocolError(f"{name}: front end sent a message with the REPLY flag", p.fds)
        payload = bytes(p.payload)
        if not rule.size_ok(payload):
            raise ProtocolError(
                f"{name}: payload is {len(payload)} bytes, expected {rule.size_text}", p.fds
            )
        lo, hi = rule.fds
        if req is R.SET_MEM_TABLE:
            lo = hi = int.from_bytes(payload[:4], "little")
        elif rule.ring is RingArg.FD:
            nofd = bool(int.from_bytes(payload[:8], "little") & vu.VHOST_USER_VRING_NOFD_MASK)
            lo = hi = 0 if nofd else 1
        if not lo <= len(p.fds) <= hi:
            want = f"{lo}" if lo == hi else f"{lo}..{hi}"
            raise ProtocolError(f"{name}: carries {len(p.fds)} fds, expected {want}", p.fds)
        if rule.gate is not None and not self.protocol_features & (1 << rule.gate):
            raise ProtocolError(
                f"{name} needs protocol feature {rule.gate.name}, which was not negotiated",
                p.fds,
            )
        if rule.needs_owner and not self.owner:
            raise ProtocolError(f"{name} before SET_OWNER", p.fds)
        ring = None
        if rule.ring is not RingArg.NONE:
            if rule.ring is RingArg.FD:
                raw = int.from_bytes(payload[:8], "little")
                ring = raw & vu.VHOST_USER_VRING_IDX_MASK
            else:
                raw = ring = int.from_bytes(payload[:4], "little")
            if rule.ring is RingArg.FD and raw & ~0x1FF:
                raise ProtocolError(f"{name}: reserved bits set in {raw:#x}", p.fds)
            if ring >= self.info.num_queues:
                raise ProtocolError(
                    f"{name}: ring {ring} does not exist (device has "
                    f"{self.info.num_queues})", p.fds,
                )
        if req is R.SET_VRING_ENABLE and not self.protocol_features_set:
            raise ProtocolError("SET_VRING_ENABLE before protocol features were negotiated", p.fds)
        if ring is not None and req in _PHASED:
            nxt = RING_TRANSITIONS.get((req, self.rings[ring]))
            if nxt is None:
                raise ProtocolError(f"{name} on ring {ring} while it is {self.rings[ring].value}",
                              p.fds)
            self.rings[ring] = nxt
        body = rule.parse.parse(payload) if rule.parse is not None else None
        self._apply(req, body)
        return Message(req, p.flags, payload, list(p.fds), body, ring)

    def _apply(self, req: R, body: Any) -> None:
        """Connection-level state that the core itself tracks."""
        if req is R.SET_OWNER:
            self.owner = True
        elif req is R.SET_PROTOCOL_FEATURES:
            offered = self.info.protocol_features
            if body.u64 & ~offered:
                log.warning("front end acked protocol features %#x that were not offered; "
                            "ignoring them", body.u64 & ~offered)
            self.protocol_features = body.u64 & offered
            self.protocol_features_set = True
        elif req is R.SET_FEATURES:
            offered = self.info.features
            if body.u64 & ~offered:
                log.warning("front end acked features %#x that were not offered; "
                            "ignoring them", body.u64 & ~offered)
            self.acked_features = body.u64 & offered
        elif req in _RESETS:
            self.rings = [RingPhase.STOPPED] * self.info.num_queues
            self.acked_features = 0

    # ---- output ------------------------------------------------------------
    def has(self, feature: PF) -> bool:
        return bool(self.protocol_features & (1 << feature))

    @staticmethod
    def reply(msg: Message, payload: bytes) -> bytes:
        """A reply carrying ``payload`` for ``msg`` (flags are exactly 0x5)."""
        return (
            msg.request.to_bytes(4, "little")
            + vu.VHOST_USER_REPLY_FLAGS.to_bytes(4, "little")
            + len(payload).to_bytes(4, "little")
            + payload
        )

    def ack(self, msg: Message, ok: bool) -> bytes | None:
        """The u64 status reply ``msg`` asks for, or None when none is due."""
        rule = RULES[msg.request]
        if rule.reply is ReplyKind.BODY:
            raise ValueError(f"{msg.request.name} is answered with a body, not an ack")
        due = rule.reply is ReplyKind.ALWAYS_ACK or (
            msg.need_reply and self.has(PF.REPLY_ACK)
        )
        if not due:
            return None
        return self.reply(msg, (0 if ok else 1).to_bytes(8, "little"))

    def answer_local(self, msg: Message) -> bytes | None:
        """Replies the core can give from :class:`DeviceInfo` alone."""
        info = self.info
        value = {
            R.GET_FEATURES: info.features,
            R.GET_PROTOCOL_FEATURES: info.protocol_features,
            R.GET_QUEUE_NUM: info.num_queues,
            R.GET_MAX_MEM_SLOTS: info.max_mem_slots,
        }.get(msg.request)
        if value is None:
            return None
        return self.reply(msg, value.to_bytes(8, "little"))
