"""The control socket: QMP, QEMU's machine protocol, on a unix socket.

Programs that already speak QMP (``qemu.qmp``'s ``QMPClient``, ``qmp-shell``, libvirt-style
tools) can ask a running vhostd about its devices, read request counters, resize a disk
and be told what happens (front ends coming and going, rings needing reset, I/O errors).
The schema of every command and event is in docs/control.md.

The wire protocol is QMP's: the server greets with ``{"QMP": {"version", "capabilities"}}``;
the client must run ``qmp_capabilities`` first (before it, any other command fails with
``CommandNotFound`` and no events are sent); commands are ``{"execute", "arguments", "id"}``
and get ``{"return", "id"}`` or ``{"error": {"class", "desc"}, "id"}``, one at a time and
in order; events are ``{"event", "data", "timestamp"}``. Input is any stream of JSON texts
(one per line, several per line, one spread over many reads); output is one JSON text per
line ending in CRLF.

Every client is its own connection: garbage gets a ``GenericError`` and the connection
stays; a client that stops reading is dropped (with a log line) once its unread output
passes :data:`MAX_OUTPUT`, so it never holds the daemon up.

The daemon is reached only through :class:`ControlTarget`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any, Protocol

from ..core import events
from ..devices.stats import OPS, max_bucket_ns, percentile_ns

log = logging.getLogger("vhostd.control")

# A client's output not yet read past this is a client that does not read: dropped.
MAX_OUTPUT = 1 << 20
# Input: one JSON text at most this long, nested at most this deep.
MAX_INPUT = 1 << 20
MAX_DEPTH = 64
# Commands read but not yet answered before the server stops reading from a client.
MAX_QUEUED = 16
# Events delivered at most once per this many seconds per device (the last one of a
# burst is delivered when the second ends).
RATE_LIMITED = {events.IO_ERROR: 1.0}
LOG_LEVELS = ("debug", "info", "warning", "error")


class ControlTarget(Protocol):
    """What the control socket and the metrics endpoint need of the daemon.

    ``device_stats``, ``resize`` and ``devices`` raise KeyError for an unknown device."""

    def devices(self) -> list[dict[str, Any]]:
        """Every device, as ``query-devices`` returns them."""

    async def device_stats(self, name: str | None = None) -> list[dict[str, Any]]:
        """Per-queue counters of one device or all (devinfo.device_stats)."""

    async def resize(self, name: str) -> dict[str, Any]:
        """Re-read the device's image size, as SIGHUP does: ``{"size", "changed"}``."""

    def set_log_level(self, level: str) -> None:
        """debug, info, warning or error."""


def vhostd_version() -> str:
    try:
        return package_version("vhostd")
    except PackageNotFoundError:
        return "0.0.0"


def version_info() -> dict[str, Any]:
    """QMP's VersionInfo, with vhostd's own version in the triple."""
    parts = [int(p) if p.isdigit() else 0 for p in vhostd_version().split(".")[:3]]
    parts += [0] * (3 - len(parts))
    return {"qemu": {"major": parts[0], "minor": parts[1], "micro": parts[2]},
            "package": f"vhostd {vhostd_version()}"}


class QmpError(Exception):
    """A command failed: QMP error ``klass`` (GenericError, CommandNotFound,
    DeviceNotFound) with a message for a person."""

    def __init__(self, klass: str, desc: str) -> None:
        super().__init__(desc)
        self.klass = klass
        self.desc = desc


# ---- input: a stream of JSON texts ---------------------------------------------------
# Inside a string only the quote, the backslash and control characters matter; inside
# an object or array only brackets, quotes and control characters (and 0xff, never in
# UTF-8). A control character other than tab, CR or LF is a lexical error: what was
# read of the current text is dropped, which is how QMP clients bring the server's
# parser back to a known state.
_IN_STRING = re.compile(rb'["\\\x00-\x1f\xff]')
_IN_VALUE = re.compile(rb'[\[\]{}"\x00-\x08\x0b\x0c\x0e-\x1f\xff]')
_SCALAR_END = re.compile(rb'[ \t\r\n\[\]{}"\x00-\x1f\xff]')
_SPACE = b" \t\r\n"


class JsonSplitter:
    """Cuts a byte stream into top-level JSON texts, however they are spread over
    reads. :meth:`feed` returns each complete text (bytes, still to be parsed) or, for
    input that cannot be a JSON text, a :class:`QmpError`."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0  # how far buf has been scanned
        self.start: int | None = None  # where the current text began
        self.kind = ""  # "value" (object, array, string) or "scalar"
        self.depth = 0
        self.in_string = False
        # Why the current text will be refused (too long, nested too deep): it is
        # scanned to its end without keeping it, then answered with one error.
        self.refuse: str | None = None

    def feed(self, data: bytes) -> list[bytes | QmpError]:
        self.buf += data
        out: list[bytes | QmpError] = []
        while (item := self._next()) is not None:
            out.append(item)
        keep = self.pos if self.start is None else self.start
        if keep:
            del self.buf[:keep]
            self.pos -= keep
            if self.start is not None:
                self.start = 0
        if self.start is not None and len(self.buf) > MAX_INPUT and self.refuse is None:
            self.refuse = f"input longer than {MAX_INPUT} bytes"
        if self.refuse is not None and self.start is not None:
            # Keep scanning (to find its end) but not the bytes themselves.
            del self.buf[:self.pos]
            self.pos = 0
        return out

    def _reset(self, at: int) -> None:
        self.start = None
        self.pos = at
        self.depth = 0
        self.in_string = False
        self.refuse = None

    def _error(self, at: int, what: str) -> QmpError:
        self._reset(at)
        return QmpError("GenericError", f"JSON parse error, {what}")

    def _finish(self, end: int) -> bytes | QmpError:
        assert self.start is not None
        text = bytes(self.buf[self.start:end])
        refuse = self.refuse
        self._reset(end)
        if refuse is not None:
            return QmpError("GenericError", f"JSON parse error, {refuse}")
        return text

    def _next(self) -> bytes | QmpError | None:
        buf = self.buf
        n = len(buf)
        if self.start is None:
            i = self.pos
            while i < n and buf[i] in _SPACE:
                i += 1
            self.pos = i
            if i == n:
                return None
            c = buf[i]
            self.start = i
            self.pos = i + 1
            if c in b"{[":
                self.kind, self.depth = "value", 1
            elif c == 0x22:  # '"'
                self.kind, self.depth, self.in_string = "value", 0, True
            elif c < 0x20 or c == 0xFF:
                return self._error(i + 1, f"invalid character {c:#04x}")
            elif c in b"]}":
                return self._error(i + 1, f"unexpected {chr(c)!r}")
            else:
                self.kind = "scalar"
        if self.kind == "scalar":
            m = _SCALAR_END.search(buf, self.pos)
            if m is None:
                self.pos = n
                return None
            return self._finish(m.start())
        while True:
            if self.in_string:
                m = _IN_STRING.search(buf, self.pos)
                if m is None:
                    self.pos = n
                    return None
                c = buf[m.start()]
                if c == 0x22:
                    self.in_string = False
                    self.pos = m.end()
                    if self.depth == 0:
                        return self._finish(m.end())
                elif c == 0x5C:  # backslash: the next byte is escaped
                    if m.end() >= n:
                        self.pos = m.start()
                        return None
                    self.pos = m.end() + 1
                else:
                    return self._error(m.end(), f"invalid character {c:#04x} in a string")
            else:
                m = _IN_VALUE.search(buf, self.pos)
                if m is None:
                    self.pos = n
                    return None
                c = buf[m.start()]
                self.pos = m.end()
                if c == 0x22:
                    self.in_string = True
                elif c in b"{[":
                    self.depth += 1
                    if self.depth > MAX_DEPTH and self.refuse is None:
                        self.refuse = f"nesting deeper than {MAX_DEPTH}"
                elif c in b"}]":
                    self.depth -= 1
                    if self.depth == 0:
                        return self._finish(m.end())
                else:
                    return self._error(m.end(), f"invalid character {c:#04x}")


# ---- commands -------------------------------------------------------------------------
@dataclass
class Command:
    """A command: its handler and its arguments (name -> (type, required))."""

    run: Callable[[dict[str, Any]], Any]
    params: dict[str, tuple[type, bool]] = field(default_factory=dict)


_TYPE_NAMES = {str: "string", int: "int", list: "array", dict: "object", bool: "boolean"}


def _check_arguments(command: Command, args: dict[str, Any]) -> None:
    for key, value in args.items():
        if key not in command.params:
            raise QmpError("GenericError", f"Parameter '{key}' is unexpected")
        kind = command.params[key][0]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise QmpError("GenericError", f"Invalid parameter type for '{key}', expected: "
                                           f"{_TYPE_NAMES[kind]}")
    for key, (_, required) in command.params.items():
        if required and key not in args:
            raise QmpError("GenericError", f"Parameter '{key}' is missing")


def queue_stats_qmp(q: dict[str, Any]) -> dict[str, Any]:
    """A queue's counters as query-device-stats shows them."""
    buckets = q["latency_buckets"]
    return {
        "queue": q["queue"], "served-by": q["served-by"], "live": q["live"],
        "requests": q["requests"], "ops": q["ops"],
        "bytes-read": q["bytes_read"], "bytes-written": q["bytes_written"],
        "errors": q["errors"], "in-flight": q["in_flight"],
        "latency-ns": {"p50": percentile_ns(buckets, 0.5), "p90": percentile_ns(buckets, 0.9),
                       "p99": percentile_ns(buckets, 0.99), "max-bucket": max_bucket_ns(buckets),
                       "sum": q["latency_sum_ns"]},
    }


def device_stats_qmp(device: dict[str, Any]) -> dict[str, Any]:
    queues = [queue_stats_qmp(q) for q in device["queues"]]
    total: dict[str, Any] = {k: sum(q[k] for q in queues)
                             for k in ("requests", "bytes-read", "bytes-written", "errors",
                                       "in-flight")}
    total["ops"] = {op: sum(q["ops"][op] for q in queues) for op in OPS}
    return {"device": device["device"], "live": all(q["live"] for q in queues), **total,
            "queues": queues}


# ---- the server -----------------------------------------------------------------------
class ControlServer:
    """The QMP server on one listening unix socket."""

    def __init__(self, target: ControlTarget, sock: socket.socket, path: str | None) -> None:
        self.target = target
        self.sock = sock
        self.path = path  # unlinked on close
        self.clients: set[QmpConnection] = set()
        self.started = time.monotonic()
        self.server: asyncio.AbstractServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._limits: dict[tuple[str, Any], _Limit] = {}
        self.commands: dict[str, Command] = {
            "qmp_capabilities": Command(self._capabilities, {"enable": (list, False)}),
            "query-commands": Command(self._query_commands),
            "query-version": Command(lambda a: version_info()),
            "query-status": Command(self._query_status),
            "query-devices": Command(lambda a: self.target.devices()),
            "query-device-stats": Command(self._query_device_stats, {"device": (str, False)}),
            "device-resize": Command(self._device_resize, {"device": (str, True)}),
            "set-log-level": Command(self._set_log_level, {"level": (str, True)}),
        }

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.server = await self.loop.create_unix_server(
            lambda: QmpConnection(self), sock=self.sock)
        events.subscribe(self._on_event)
        log.info("control socket (QMP) on %s", self.path or f"fd {self.sock.fileno()}")

    async def close(self) -> None:
        events.unsubscribe(self._on_event)
        for limit in self._limits.values():
            if limit.timer is not None:
                limit.timer.cancel()
        if self.server is not None:
            self.server.close()
        for client in list(self.clients):
            client.drop()
        for client in list(self.clients):
            await client.finished()
        if self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    # ---- commands ----
    def _capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        for cap in args.get("enable", []):
            raise QmpError("GenericError", f"Capability '{cap}' is not offered")
        return {}

    def _query_commands(self, args: dict[str, Any]) -> list[dict[str, str]]:
        return [{"name": name} for name in self.commands]

    def _query_status(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"running": True, "status": "running",
                "uptime": round(time.monotonic() - self.started, 3)}

    async def _query_device_stats(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        name = args.get("device")
        try:
            devices = await self.target.device_stats(name)
        except KeyError:
            raise _no_device(name) from None
        return [device_stats_qmp(d) for d in devices]

    async def _device_resize(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self.target.resize(args["device"])
        except KeyError:
            raise _no_device(args["device"]) from None

    def _set_log_level(self, args: dict[str, Any]) -> dict[str, Any]:
        level = args["level"]
        if level not in LOG_LEVELS:
            raise QmpError("GenericError", f"Parameter 'level' must be one of "
                                           f"{', '.join(LOG_LEVELS)}")
        self.target.set_log_level(level)
        log.info("log level set to %s", level)
        return {}

    async def execute(self, name: str, args: dict[str, Any]) -> Any:
        command = self.commands.get(name)
        if command is None:
            raise QmpError("CommandNotFound", f"The command {name} has not been found")
        _check_arguments(command, args)
        result = command.run(args)
        if isinstance(result, Awaitable):
            result = await result
        return result

    # ---- events ----
    def _on_event(self, name: str, data: dict[str, Any]) -> None:
        now = time.time()
        stamp = {"seconds": int(now), "microseconds": int(now % 1 * 1_000_000)}
        message = {"event": name, "data": data, "timestamp": stamp}
        loop = self.loop
        if loop is None:
            return
        if threading.get_ident() != self._loop_thread:
            loop.call_soon_threadsafe(self._deliver, name, message)
        else:
            self._deliver(name, message)

    def _deliver(self, name: str, message: dict[str, Any]) -> None:
        period = RATE_LIMITED.get(name)
        if period is not None:
            key = (name, message["data"].get("device"))
            limit = self._limits.setdefault(key, _Limit())
            now = time.monotonic()
            if now < limit.until:
                # Within the period: keep the last one, delivered when it ends.
                limit.pending = message
                if limit.timer is None:
                    assert self.loop is not None
                    limit.timer = self.loop.call_at(limit.until, self._release, key, period)
                return
            limit.until = now + period
        self._broadcast(message)

    def _release(self, key: tuple[str, Any], period: float) -> None:
        limit = self._limits[key]
        limit.timer = None
        if limit.pending is not None:
            message, limit.pending = limit.pending, None
            limit.until = time.monotonic() + period
            self._broadcast(message)

    def _broadcast(self, message: dict[str, Any]) -> None:
        line = encode(message)
        for client in list(self.clients):
            if client.negotiated:
                client.send(line)


@dataclass
class _Limit:
    until: float = 0.0
    pending: dict[str, Any] | None = None
    timer: asyncio.TimerHandle | None = None


def _no_device(name: object) -> QmpError:
    return QmpError("DeviceNotFound", f"Device '{name}' not found")


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\r\n"


class QmpConnection(asyncio.Protocol):
    """One client: reads JSON texts, answers them one at a time, in order."""

    def __init__(self, server: ControlServer) -> None:
        self.server = server
        self.splitter = JsonSplitter()
        self.queue: deque[bytes | QmpError] = deque()
        self.wakeup = asyncio.Event()
        self.negotiated = False
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.reading_paused = False
        self.name = "control client"

    # ---- asyncio.Protocol ----
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = transport  # type: ignore[assignment]
        # pause_writing() fires past the high-water mark: the client does not read.
        transport.set_write_buffer_limits(high=MAX_OUTPUT)
        sock = transport.get_extra_info("socket")
        try:
            pid = peer_pid(sock)
        except (OSError, AttributeError):  # not every transport's socket can tell
            pid = 0
        if pid:
            self.name = f"control client (pid {pid})"
        self.server.clients.add(self)
        log.debug("%s connected", self.name)
        self.send(encode({"QMP": {"version": version_info(), "capabilities": []}}))
        self.task = asyncio.get_running_loop().create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        self.queue.extend(self.splitter.feed(data))
        if self.queue:
            self.wakeup.set()
        if len(self.queue) >= MAX_QUEUED and not self.reading_paused:
            assert self.transport is not None
            self.transport.pause_reading()  # answer what is queued first
            self.reading_paused = True

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        assert self.transport is not None
        log.warning("%s does not read its replies (%d bytes unread); dropping it", self.name,
                    self.transport.get_write_buffer_size())
        self.drop()

    def resume_writing(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.clients.discard(self)
        log.debug("%s disconnected", self.name)
        if self.task is not None:
            self.task.cancel()

    # ----
    def drop(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    async def finished(self) -> None:
        if self.task is not None:
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    def send(self, line: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(line)

    async def _serve(self) -> None:
        while True:
            while not self.queue:
                self.wakeup.clear()
                await self.wakeup.wait()
            item = self.queue.popleft()
            if self.reading_paused and len(self.queue) < MAX_QUEUED // 2:
                assert self.transport is not None
                self.transport.resume_reading()
                self.reading_paused = False
            reply = await self._answer(item)
            self.send(encode(reply))

    async def _answer(self, item: bytes | QmpError) -> dict[str, Any]:
        ident: dict[str, Any] = {}
        try:
            if isinstance(item, QmpError):
                raise item
            try:
                request = json.loads(item)
            except (ValueError, RecursionError) as e:
                raise QmpError("GenericError", f"JSON parse error, {_reason(e)}") from None
            if not isinstance(request, dict):
                raise QmpError("GenericError", "QMP input must be a JSON object")
            if "id" in request:
                ident = {"id": request["id"]}
            for key in request:
                if key not in ("execute", "arguments", "id"):
                    raise QmpError("GenericError", f"QMP input member '{key}' is unexpected")
            name = request.get("execute")
            if name is None:
                raise QmpError("GenericError", "QMP input lacks member 'execute'")
            if not isinstance(name, str):
                raise QmpError("GenericError", "QMP input member 'execute' must be a string")
            args = request.get("arguments", {})
            if not isinstance(args, dict):
                raise QmpError("GenericError",
                               "QMP input member 'arguments' must be an object")
            if not self.negotiated and name != "qmp_capabilities":
                raise QmpError("CommandNotFound", "Expecting capabilities negotiation with "
                                                  "'qmp_capabilities' first")
            if self.negotiated and name == "qmp_capabilities":
                raise QmpError("CommandNotFound", "Capabilities negotiation is already "
                                                  "complete; command ignored")
            result = await self.server.execute(name, args)
            if name == "qmp_capabilities":
                self.negotiated = True
            return {"return": result, **ident}
        except QmpError as e:
            return {"error": {"class": e.klass, "desc": e.desc}, **ident}
        except Exception as e:
            log.exception("internal error in a control command")
            return {"error": {"class": "GenericError", "desc": f"internal error: {e}"},
                    **ident}


def _reason(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at offset {e.pos}"
    if isinstance(e, UnicodeDecodeError):
        return "input is not UTF-8"
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e)


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_pid(sock: socket.socket | None) -> int:
    """The pid of the process at the other end of a unix socket (0 if unknown)."""
    if sock is None or sock.family != socket.AF_UNIX:
        return 0
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return _UCRED.unpack(raw)[0]
