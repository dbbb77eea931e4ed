"""Blocking vhost-user front-end connection (the role QEMU plays), for tests and benchmarks.

Messages are built and parsed with the construct definitions in ``vhostd_proto.vhost_user``.
Like QEMU, the client writes one request and, when a reply is due, reads the very next
message and insists it is a proper reply (flags exactly 0x5, same request id).
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Protocol

from vhostd_proto.vhost_user import (
    U64,
    VHOST_MEMORY_BASELINE_NREGIONS,
    VHOST_USER_HDR_SIZE,
    VHOST_USER_MAX_FDS,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_FLAGS,
    VHOST_USER_VERSION,
    VHOST_USER_VRING_NOFD_MASK,
    Config,
    Header,
    Inflight,
    LogBase,
    MemoryTable,
    ProtocolFeature,
    Request,
    SingleMemoryRegion,
    VringAddr,
    VringState,
)

REQUEST_FLAGS = VHOST_USER_VERSION  # 0x1
REQUEST_FLAGS_NEED_REPLY = VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK  # 0x9
# Generous bound on reply payloads (QEMU's own limit is its message union, a few hundred
# bytes); guards against reading garbage sizes from a confused back end.
MAX_REPLY_PAYLOAD = 4096


class VhostUserProtocolError(Exception):
    """The back end sent something a QEMU front end would reject."""


class VhostUserNack(VhostUserProtocolError):
    """A REPLY_ACK reply carried a non-zero status."""

    def __init__(self, req: int, value: int) -> None:
        super().__init__(f"{_name(req)} failed: back end acked with {value:#x}")
        self.req = req
        self.value = value


class MemRegion(Protocol):
    """What a memory-table entry needs (``memory.GuestRegion`` satisfies it)."""

    gpa: int
    size: int
    qva: int
    mmap_offset: int
    fd: int


def _name(req: int) -> str:
    try:
        return Request(req).name
    except ValueError:
        return f"request {req}"


def _u64(value: int) -> bytes:
    return U64.build({"u64": value})


def _state(index: int, num: int) -> bytes:
    return VringState.build({"index": index, "num": num})


def _region(r: MemRegion) -> dict[str, int]:
    return {"guest_phys_addr": r.gpa, "memory_size": r.size, "userspace_addr": r.qva,
            "mmap_offset": r.mmap_offset}


class VhostUserClient:
    """One front-end connection to a back end listening on a unix socket ``path``."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 5.0,
                 connect_timeout: float = 5.0) -> None:
        self.path = os.fspath(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self.sock.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                # The back end may still be creating its listening socket.
                if time.monotonic() >= deadline:
                    self.sock.close()
                    raise
                time.sleep(0.01)
        self.sock.settimeout(timeout)
        # Negotiated protocol features; decides whether NEED_REPLY is used and an ack read.
        self.protocol_features = 0

    # -- framing --------------------------------------------------------------------------

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features >> ProtocolFeature.REPLY_ACK & 1)

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send arbitrary bytes (fds ride on the first byte), for malformed-message tests."""
        view = memoryview(data)
        sent = socket.send_fds(self.sock, [view], list(fds)) if fds else self.sock.send(view)
        while sent < len(view):
            sent += self.sock.send(view[sent:])

    def request(self, req: int, payload: bytes = b"", fds: Sequence[int] = (),
                need_reply: bool = False) -> None:
        """Send one request: 12-byte header (flags 0x1, or 0x9 with NEED_REPLY) + payload."""
        if len(fds) > VHOST_USER_MAX_FDS:
            raise ValueError(f"{len(fds)} fds: a front end sends at most {VHOST_USER_MAX_FDS}")
        flags = REQUEST_FLAGS_NEED_REPLY if need_reply else REQUEST_FLAGS
        hdr = Header.build({"request": req, "flags": flags, "size": len(payload)})
        self.send_raw(hdr + payload, fds)

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise ConnectionError(f"back end closed the connection ({got}/{n} bytes read)")
            got += k
        return bytes(buf)

    def recv_message(self) -> tuple[int, int, bytes, list[int]]:
        """Read any one message: (request, flags, payload, fds). No validation."""
        data, fds, _, _ = socket.recv_fds(self.sock, VHOST_USER_HDR_SIZE, VHOST_USER_MAX_FDS,
                                          socket.MSG_CMSG_CLOEXEC)
        if not data:
            raise ConnectionError("back end closed the connection")
        if len(data) < VHOST_USER_HDR_SIZE:
            data += self._recv_exact(VHOST_USER_HDR_SIZE - len(data))
        hdr = Header.parse(data)
        if hdr.size > MAX_REPLY_PAYLOAD:
            for fd in fds:
                os.close(fd)
            raise VhostUserProtocolError(f"reply to {_name(hdr.request)} has size {hdr.size}")
        payload = self._recv_exact(hdr.size) if hdr.size else b""
        return hdr.request, hdr.flags, payload, fds

    def recv_reply(self, req: int, size: int | None = None) -> tuple[bytes, list[int]]:
        """Read the reply to ``req``; enforce what QEMU enforces (flags 0x5, same id)."""
        got_req, flags, payload, fds = self.recv_message()
        problem = None
        if flags != VHOST_USER_REPLY_FLAGS:
            problem = f"flags {flags:#x}, expected {VHOST_USER_REPLY_FLAGS:#x}"
        elif got_req != req:
            problem = f"request id {got_req} ({_name(got_req)})"
        elif size is not None and len(payload) != size:
            problem = f"payload size {len(payload)}, expected {size}"
        if problem:
            for fd in fds:
                os.close(fd)
            raise VhostUserProtocolError(f"bad reply to {_name(req)}: {problem}")
        return payload, fds

    def _recv_u64(self, req: int) -> int:
        payload, fds = self.recv_reply(req, 8)
        for fd in fds:
            os.close(fd)
        return U64.parse(payload).u64

    def _send(self, req: int, payload: bytes = b"", fds: Sequence[int] = (),
              need_reply: bool = False) -> None:
        """Send; with ``need_reply`` and REPLY_ACK negotiated, wait for and check the ack."""
        ack = need_reply and self.reply_ack
        self.request(req, payload, fds, need_reply=ack)
        if ack:
            value = self._recv_u64(req)
            if value:
                raise VhostUserNack(req, value)

    def _get_u64(self, req: int) -> int:
        self.request(req)
        return self._recv_u64(req)

    # -- typed requests -------------------------------------------------------------------

    def get_features(self) -> int:
        return self._get_u64(Request.GET_FEATURES)

    def set_features(self, features: int, need_reply: bool = False) -> None:
        self._send(Request.SET_FEATURES, _u64(features), need_reply=need_reply)

    def set_owner(self) -> None:
        self._send(Request.SET_OWNER)

    def reset_owner(self) -> None:
        self._send(Request.RESET_OWNER)

    def get_protocol_features(self) -> int:
        return self._get_u64(Request.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        # QEMU never asks for an ack here; REPLY_ACK only applies from the next message on.
        self._send(Request.SET_PROTOCOL_FEATURES, _u64(features))
        self.protocol_features = features

    def get_queue_num(self) -> int:
        return self._get_u64(Request.GET_QUEUE_NUM)

    def get_max_mem_slots(self) -> int:
        return self._get_u64(Request.GET_MAX_MEM_SLOTS)

    def set_mem_table(self, regions: Sequence[MemRegion], need_reply: bool = True) -> None:
        if len(regions) > VHOST_MEMORY_BASELINE_NREGIONS:
            raise ValueError(f"SET_MEM_TABLE carries at most {VHOST_MEMORY_BASELINE_NREGIONS}")
        payload = MemoryTable.build({"nregions": len(regions),
                                     "regions": [_region(r) for r in regions]})
        self._send(Request.SET_MEM_TABLE, payload, [r.fd for r in regions], need_reply)

    def add_mem_reg(self, region: MemRegion, need_reply: bool = True) -> None:
        payload = SingleMemoryRegion.build({"region": _region(region)})
        self._send(Request.ADD_MEM_REG, payload, [region.fd], need_reply)

    def rem_mem_reg(self, region: MemRegion, need_reply: bool = True) -> None:
        # QEMU sends no fd with REM_MEM_REG; the back end matches on gpa/qva/size.
        payload = SingleMemoryRegion.build({"region": _region(region)})
        self._send(Request.REM_MEM_REG, payload, (), need_reply)

    def set_backend_req_fd(self, need_reply: bool = True) -> socket.socket:
        """Hand the back end one end of a socketpair; return ours (read CONFIG_CHANGE etc.)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._send(Request.SET_BACKEND_REQ_FD, b"", [theirs.fileno()], need_reply)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return ours

    def set_vring_num(self, index: int, num: int) -> None:
        self._send(Request.SET_VRING_NUM, _state(index, num))

    def set_vring_base(self, index: int, num: int) -> None:
        self._send(Request.SET_VRING_BASE, _state(index, num))

    def get_vring_base(self, index: int) -> int:
        self.request(Request.GET_VRING_BASE, _state(index, 0))
        payload, fds = self.recv_reply(Request.GET_VRING_BASE, 8)
        for fd in fds:
            os.close(fd)
        state = VringState.parse(payload)
        if state.index != index:
            raise VhostUserProtocolError(f"GET_VRING_BASE({index}) answered for {state.index}")
        return state.num

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int, log: int = 0,
                       flags: int = 0, need_reply: bool = False) -> None:
        payload = VringAddr.build({"index": index, "flags": flags, "desc_user_addr": desc,
                                   "used_user_addr": used, "avail_user_addr": avail,
                                   "log_guest_addr": log})
        self._send(Request.SET_VRING_ADDR, payload, need_reply=need_reply)

    def _vring_fd(self, req: int, index: int, fd: int | None) -> None:
        """KICK/CALL/ERR: fd attached, or ``None`` for the NOFD form (bit 8, no fd)."""
        if fd is None:
            self._send(req, _u64(index | VHOST_USER_VRING_NOFD_MASK))
        else:
            self._send(req, _u64(index), [fd])

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._vring_fd(Request.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._vring_fd(Request.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._vring_fd(Request.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._send(Request.SET_VRING_ENABLE, _state(index, int(enable)))

    def get_config(self, offset: int, size: int, flags: int = 0) -> bytes:
        payload = Config.build({"offset": offset, "size": size, "flags": flags,
                                "region": bytes(size)})
        self.request(Request.GET_CONFIG, payload)
        reply, fds = self.recv_reply(Request.GET_CONFIG, len(payload))
        for fd in fds:
            os.close(fd)
        return Config.parse(reply).region

    def set_config(self, offset: int, data: bytes, flags: int = 0,
                   need_reply: bool = True) -> None:
        payload = Config.build({"offset": offset, "size": len(data), "flags": flags,
                                "region": data})
        self._send(Request.SET_CONFIG, payload, need_reply=need_reply)

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[int, int, int | None]:
        """Return (mmap_size, mmap_offset, fd); size 0 and no fd means "not supported"."""
        payload = Inflight.build({"mmap_size": 0, "mmap_offset": 0, "num_queues": num_queues,
                                  "queue_size": queue_size})
        self.request(Request.GET_INFLIGHT_FD, payload)
        reply, fds = self.recv_reply(Request.GET_INFLIGHT_FD, Inflight.sizeof())
        info = Inflight.parse(reply)
        for fd in fds[1:]:
            os.close(fd)
        fd = fds[0] if fds else None
        if info.mmap_size and fd is None:
            raise VhostUserProtocolError("GET_INFLIGHT_FD reply has a size but no fd")
        return info.mmap_size, info.mmap_offset, fd

    def set_inflight_fd(self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int,
                        queue_size: int) -> None:
        payload = Inflight.build({"mmap_size": mmap_size, "mmap_offset": mmap_offset,
                                  "num_queues": num_queues, "queue_size": queue_size})
        self._send(Request.SET_INFLIGHT_FD, payload, [fd])

    def set_log_base(self, fd: int, size: int, offset: int = 0) -> None:
        """Hand the back end the dirty-log memfd (LOG_SHMFD). QEMU always reads a u64
        reply, NEED_REPLY or not, and checks only its id; a non-zero value raises here."""
        payload = LogBase.build({"mmap_size": size, "mmap_offset": offset})
        self.request(Request.SET_LOG_BASE, payload, [fd])
        value = self._recv_u64(Request.SET_LOG_BASE)
        if value:
            raise VhostUserNack(Request.SET_LOG_BASE, value)

    def reset_device(self) -> None:
        self._send(Request.RESET_DEVICE)

    def set_status(self, status: int) -> None:
        self._send(Request.SET_STATUS, _u64(status))

    def get_status(self) -> int:
        return self._get_u64(Request.GET_STATUS)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> VhostUserClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def recv_backend_message(sock: socket.socket, timeout: float | None = 1.0,
                         ) -> tuple[int, int, bytes, list[int]] | None:
    """Read one back-end -> front-end message (e.g. CONFIG_CHANGE_MSG) from the channel set
    up by ``set_backend_req_fd``: (request, flags, payload, fds), or None on timeout."""
    r, _, _ = select.select([sock], [], [], timeout)
    if not r:
        return None
    data, fds, _, _ = socket.recv_fds(sock, VHOST_USER_HDR_SIZE, VHOST_USER_MAX_FDS,
                                      socket.MSG_CMSG_CLOEXEC)
    if not data:
        raise ConnectionError("back end closed its request channel")
    while len(data) < VHOST_USER_HDR_SIZE:
        more = sock.recv(VHOST_USER_HDR_SIZE - len(data))
        if not more:
            raise ConnectionError("back end closed its request channel mid-header")
        data += more
    hdr = Header.parse(data)
    payload = b""
    while len(payload) < hdr.size:
        more = sock.recv(hdr.size - len(payload))
        if not more:
            raise ConnectionError("back end closed its request channel mid-payload")
        payload += more
    return hdr.request, hdr.flags, payload, fds


def ack_backend_message(sock: socket.socket, req: int, value: int = 0) -> None:
    """Answer a back-end request that had NEED_REPLY, as QEMU does (u64, flags 0x5)."""
    hdr = Header.build({"request": req, "flags": VHOST_USER_REPLY_FLAGS, "size": 8})
    sock.sendall(hdr + _u64(value))


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        os.close(fd)
