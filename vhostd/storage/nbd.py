"""NBD storage: an export of an NBD server (qemu-nbd, nbdkit, ...) through libnbd.

libnbd's asynchronous API runs on the event loop: the connection's socket is watched
for reading (and, while libnbd has bytes it could not send, for writing through a
private epoll whose fd the loop watches, so a watcher that only watches for reading
suffices); after each notification finished commands are collected with
``aio_peek_command_completed`` (no callbacks: libnbd forbids calling back into a
handle from one, and the device may submit a flush from its completion).

Reads and writes go straight between guest memory and libnbd (``Buffer.from_buffer``
shares the view), one NBD command per guest buffer. DISCARD maps to TRIM, WRITE_ZEROES
to WRITE_ZEROES (NO_HOLE unless the driver allows unmapping) where the server offers
them; without TRIM a discard does nothing (it is advisory), without WRITE_ZEROES zeroes
are written; without FLUSH a flush has nothing to do.

Reconnect: when the connection dies, the commands it carried wait and a new connection
is tried with backoff; once it is up they are sent again. A request that has waited
``reconnect_delay`` seconds fails with EIO, and so do new ones until the server is back.
With ``connections`` > 1 and a server that allows multi-conn, requests are spread over
several connections.
"""

from __future__ import annotations

import errno
import logging
import select
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from typing import Any

from ..engine.loop import FdWatcher
from ..engine.timer import OneShotTimer
from .base import DONE, PENDING, Completion, ignore_batch_done, ignore_completion

log = logging.getLogger(__name__)

try:
    import nbd  # Debian's python3-libnbd
except ImportError:  # pragma: no cover - install-deps installs it
    nbd = None

OP_READ, OP_WRITE, OP_FLUSH, OP_TRIM, OP_ZERO = range(5)
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 2.0
CHUNK = 1 << 28  # largest TRIM/WRITE_ZEROES/zero write sent as one command
ZERO_CHUNK = 1 << 20


class _Timer(OneShotTimer):
    """A one-shot timer whose delay is chosen at each arming."""

    def arm_after(self, seconds: float) -> None:
        us = max(1, int(seconds * 1e6))
        self._spec.it_value.tv_sec = us // 1_000_000
        self._spec.it_value.tv_nsec = us % 1_000_000 * 1000
        self.arm()


class NbdError(Exception):
    """The export cannot be used (bad URI, no server, no such export)."""


def check_uri(uri: str) -> None:
    """Accept ``nbd://HOST[:PORT]/EXPORT`` and ``nbd+unix:///EXPORT?socket=PATH``."""
    u = urllib.parse.urlsplit(uri)
    if u.scheme == "nbd":
        if not u.hostname:
            raise NbdError(f"{uri}: nbd:// needs a host")
        try:
            u.port  # noqa: B018 - parses the port
        except ValueError as e:
            raise NbdError(f"{uri}: {e}") from None
    elif u.scheme == "nbd+unix":
        if u.netloc:
            raise NbdError(f"{uri}: nbd+unix:// takes no host (nbd+unix:///EXPORT?socket=PATH)")
        if not urllib.parse.parse_qs(u.query).get("socket"):
            raise NbdError(f"{uri}: nbd+unix:// needs ?socket=PATH")
    else:
        raise NbdError(f"{uri}: not an NBD URI (nbd://HOST[:PORT]/EXPORT or "
                       f"nbd+unix:///EXPORT?socket=PATH)")


def _errno(e: Any) -> int:
    n = getattr(e, "errnum", 0)
    return n if isinstance(n, int) and n > 0 else errno.EIO


class _Req:
    __slots__ = ("error", "flags", "iov", "length", "offset", "op", "parts", "since", "token")

    def __init__(self, op: int, token: Any, offset: int = 0, length: int = 0,
                 iov: list[memoryview] | None = None, flags: int = 0) -> None:
        self.op = op
        self.token = token
        self.offset = offset
        self.length = length
        self.iov = iov
        self.flags = flags
        self.parts = 0
        self.error = 0
        self.since = 0.0  # when it began to wait for a connection


class _Conn:
    """One NBD connection (one libnbd handle)."""

    def __init__(self, owner: NbdStorage, h: Any) -> None:
        self.owner = owner
        self.h: Any = h
        self.fd = -1
        self.cmds: dict[int, _Req] = {}
        self.ready = False
        self.ep: Any = None  # epoll for write readiness, while libnbd needs it
        self.leaving = False  # the server answered ESHUTDOWN: it is going away

    def watch(self, watcher: FdWatcher) -> None:
        self.fd = self.h.aio_get_fd()
        watcher.add_reader(self.fd, self.owner._readable, self)
        self.update_direction()

    def update_direction(self) -> None:
        try:
            want = self.h.aio_get_direction() & nbd.AIO_DIRECTION_WRITE
        except nbd.Error:
            want = 0
        watcher = self.owner.watcher
        if want and self.ep is None and watcher is not None and self.fd >= 0:
            self.ep = select.epoll()
            self.ep.register(self.fd, select.EPOLLOUT)
            watcher.add_reader(self.ep.fileno(), self.owner._writable, self)
        elif not want and self.ep is not None:
            self.stop_writing()

    def stop_writing(self) -> None:
        if self.ep is not None:
            if self.owner.watcher is not None:
                self.owner.watcher.remove_reader(self.ep.fileno())
            self.ep.close()
            self.ep = None

    def close(self) -> None:
        self.stop_writing()
        if self.fd >= 0 and self.owner.watcher is not None:
            try:
                self.owner.watcher.remove_reader(self.fd)
            except OSError:
                pass  # libnbd already closed the socket of a dead connection
        self.fd = -1
        self.h = None  # libnbd closes a handle when its last reference goes


class NbdStorage:
    """An NBD export."""

    # One read of the socket may bring several replies: their completions are
    # reported in a run that ends with on_batch_done() (see base.py).
    batches_completions = True

    def __init__(self, uri: str, read_only: bool = False, reconnect_delay: float = 10.0,
                 connections: int = 1, info: dict[str, Any] | None = None) -> None:
        """Connect to ``uri`` now (blocking: for start-up, where failing is an error
        the daemon reports), or, given ``info`` (a queue worker), on :meth:`start`."""
        if nbd is None:
            raise NbdError("libnbd's Python binding (python3-libnbd) is not installed")
        check_uri(uri)
        self.uri = uri
        self.reconnect_delay = reconnect_delay
        self.on_complete: Completion = ignore_completion
        self.on_batch_done: Callable[[], None] = ignore_batch_done
        self._finished = False  # on_complete was called since the last on_batch_done
        self._busy = 0  # inside a loop callback: it ends the batch
        self.watcher: FdWatcher | None = None
        self.conns: list[_Conn] = []
        self.waiting: deque[_Req] = deque()
        self._down_since: float | None = None
        # Since when the server has answered ESHUTDOWN on every connection, if it has:
        # a reconnect then does not restart the reconnect delay (only an answer does).
        self._shutdown_since: float | None = None
        self._failing = False
        self._backoff = BACKOFF_MIN_S
        self._timer: _Timer | None = None
        self._resize_done: list[Callable[[int], None]] = []
        self._probe: _Conn | None = None
        self._pending = 0
        self._zero_buf: memoryview | None = None
        if info is None:
            h = self._handle()
            try:
                h.connect_uri(uri)
            except nbd.Error as e:
                raise NbdError(f"{uri}: {e.string}") from None
            info = self._info(h)
            conn = _Conn(self, h)
            conn.ready = True
            self.conns.append(conn)
        self.info = info
        self._size = int(info["size"])
        self.read_only = read_only or bool(info["read_only"])
        self.want_connections = max(1, connections) if info["multi_conn"] else 1

    @staticmethod
    def _handle() -> Any:
        h = nbd.NBD()
        h.set_handle_name("vhostd")
        return h

    @staticmethod
    def _info(h: Any) -> dict[str, Any]:
        return {"size": h.get_size(), "read_only": bool(h.is_read_only()),
                "flush": bool(h.can_flush()), "trim": bool(h.can_trim()),
                "zero": bool(h.can_zero()), "multi_conn": bool(h.can_multi_conn())}

    def describe(self) -> str:
        caps = [k for k in ("flush", "trim", "zero", "multi_conn") if self.info[k]]
        return f"{self.uri} ({self._size} bytes; {', '.join(caps) or 'no extras'})"

    # ---- lifecycle ---------------------------------------------------------------
    def start(self, watcher: FdWatcher) -> None:
        if self.watcher is not None:
            return
        self.watcher = watcher
        self._timer = _Timer(watcher, self._retry, int(BACKOFF_MIN_S * 1e6))
        for conn in self.conns:
            conn.watch(watcher)
        self._connect_more()

    def _connect_more(self) -> None:
        """Open connections until there are as many as wanted (asynchronously)."""
        for _ in range(self.want_connections - len(self.conns)):
            h = self._handle()
            try:
                h.aio_connect_uri(self.uri)
            except nbd.Error as e:
                self._connect_failed(f"cannot connect: {e.string}")
                return
            conn = _Conn(self, h)
            self.conns.append(conn)
            conn.watch(self.watcher)  # type: ignore[arg-type]
            self._check_connecting(conn)

    def _check_connecting(self, conn: _Conn) -> None:
        h = conn.h
        try:
            if h.aio_is_ready():
                size = h.get_size()
                if size != self._size:
                    log.warning("%s: the export is now %d bytes (was %d)", self.uri, size,
                                self._size)
                conn.ready = True
                # After ESHUTDOWN answers only an answer ends the outage (_finish):
                # until then the backoff grows and the log says nothing more.
                if self._shutdown_since is None:
                    self._connection_back()
                self._send_waiting()
                return
            if h.aio_is_connecting():
                conn.update_direction()
                return
            why = "the server closed the connection"
        except nbd.Error as e:
            why = e.string
        self._drop(conn)
        self._connect_failed(why)

    def _connection_back(self) -> None:
        if self._down_since is not None:
            log.info("%s: connected again after %.1f s", self.uri,
                     time.monotonic() - self._down_since)
        self._down_since = None
        self._failing = False
        self._backoff = BACKOFF_MIN_S

    def _connect_failed(self, why: str) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        if not self._failing:
            log.warning("%s: %s; retrying in %.1f s", self.uri, why, self._backoff)
        if self._timer is not None:
            self._timer.arm_after(self._backoff)
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
        self._expire(now)

    def _retry(self) -> None:
        self._busy += 1
        try:
            self._expire(time.monotonic())
            if len(self.conns) < self.want_connections:
                self._connect_more()
            elif self._down_since is not None:
                self._timer.arm_after(self._backoff)  # type: ignore[union-attr]
        finally:
            self._busy -= 1
        self._end_batch()

    def _expire(self, now: float) -> None:
        """Fail what waited longer than the reconnect delay."""
        if self._down_since is None or now - self._down_since < self.reconnect_delay:
            return
        if not self._failing:
            log.error("%s: no connection for %.0f s; failing requests with EIO until it "
                      "is back", self.uri, self.reconnect_delay)
        self._failing = True
        while self.waiting:
            req = self.waiting.popleft()
            self._finish(req, errno.EIO)

    def _drop(self, conn: _Conn) -> None:
        """A connection is gone: its commands wait for the next one."""
        if conn in self.conns:
            self.conns.remove(conn)
        conn.close()
        now = time.monotonic()
        requeue = {id(r): r for r in conn.cmds.values()}
        conn.cmds.clear()
        for req in requeue.values():
            req.parts = 0
            req.error = 0
            req.since = now
            self.waiting.append(req)
        if not any(c.ready for c in self.conns) and self._down_since is None:
            self._down_since = now
            log.warning("%s: connection lost; %d request(s) wait for a new one", self.uri,
                        len(requeue))

    # ---- loop callbacks --------------------------------------------------------------
    def _end_batch(self) -> None:
        """Report the end of a run of completions, unless a caller further out will."""
        if self._finished and not self._busy:
            self._finished = False
            self.on_batch_done()

    def _readable(self, conn: _Conn) -> None:
        self._busy += 1
        try:
            h = conn.h
            try:
                if conn.ready:
                    before = h.aio_in_flight()
                    h.aio_notify_read()
                    # libnbd takes one reply per notification and leaves the rest in
                    # the socket: read on while replies complete, so every reply
                    # already here is one batch of this loop turn (not one loop turn,
                    # publish and interrupt each). The last call finds the socket
                    # empty, or a reply not all there: the loop says when it is.
                    after = h.aio_in_flight()
                    while 0 < after < before:
                        before = after
                        h.aio_notify_read()
                        after = h.aio_in_flight()
                else:
                    h.aio_notify_read()
            except nbd.Error:
                pass
            self._after_notify(conn)
        finally:
            self._busy -= 1
        self._end_batch()

    def _writable(self, conn: _Conn) -> None:
        self._busy += 1
        try:
            if conn.ep is not None:
                conn.ep.poll(0)
            try:
                conn.h.aio_notify_write()
            except nbd.Error:
                pass
            self._after_notify(conn)
        finally:
            self._busy -= 1
        self._end_batch()

    def _after_notify(self, conn: _Conn) -> None:
        if conn is self._probe:
            self._probe_progress()
            return
        if not conn.ready:
            self._check_connecting(conn)
            if conn.ready or conn not in self.conns:
                return
        self._collect(conn)
        if conn.leaving:
            now = time.monotonic()
            if self._shutdown_since is None:
                self._shutdown_since = now
            self._drop(conn)
            if self._down_since is None or self._down_since > self._shutdown_since:
                self._down_since = self._shutdown_since
            self._connect_failed("the server is shutting down (ESHUTDOWN)")
            return
        if conn.h.aio_is_dead() or conn.h.aio_is_closed():
            self._drop(conn)
            self._connect_more()
            return
        conn.update_direction()

    def _collect(self, conn: _Conn) -> None:
        h = conn.h
        cmds = conn.cmds
        while cmds:
            try:
                cookie = h.aio_peek_command_completed()
            except nbd.Error:
                break
            if cookie <= 0:
                break
            err = 0
            try:
                h.aio_command_completed(cookie)
            except nbd.Error as e:
                err = _errno(e)
            req = cmds.pop(cookie, None)
            if req is None:
                continue
            if err and (err in (errno.ENOTCONN, errno.ESHUTDOWN)
                        or h.aio_is_dead() or h.aio_is_closed()):
                # Resent on the next connection with this one's others (_drop). A
                # server that says it shuts down may still keep the connection open:
                # the connection is dropped all the same (_after_notify).
                cmds[cookie] = req
                conn.leaving = True
                continue
            if err and not req.error:
                req.error = err
            req.parts -= 1
            if req.parts == 0:
                self._finish(req, req.error)

    def _finish(self, req: _Req, err: int) -> None:
        self._pending -= 1
        self._finished = True
        if not err and self._shutdown_since is not None:
            # The server answers again: the reconnect delay starts afresh next time.
            self._shutdown_since = None
            self._connection_back()
        self.on_complete(req.token, err)

    # ---- submitting -----------------------------------------------------------------
    def _pick(self) -> _Conn | None:
        """The ready connection with the fewest commands in flight."""
        conn = None
        for c in self.conns:
            if c.ready and (conn is None or len(c.cmds) < len(conn.cmds)):
                conn = c
        return conn

    def _submit(self, req: _Req) -> int:
        """Send ``req`` from a device's request handler: PENDING, DONE (nothing to
        send), or OSError when libnbd refuses it at once (the handler fails the
        request: a completion reported now would reach a request not yet pending)."""
        conns = self.conns
        conn = conns[0] if len(conns) == 1 else self._pick()
        if conn is None or not conn.ready:
            if self._failing:
                raise OSError(errno.EIO, f"{self.uri}: not connected")
            if self.watcher is None:
                raise OSError(errno.ENOTCONN, f"{self.uri}: not started")
            req.since = time.monotonic()
            self.waiting.append(req)
            self._pending += 1
            return PENDING
        self._pending += 1
        try:
            return self._send(conn, req, True)
        finally:
            # A connection found dead may have failed requests that waited too long.
            self._end_batch()

    def _send(self, conn: _Conn, req: _Req, inline: bool = False) -> int:
        """Issue ``req``'s commands on ``conn``: PENDING (completion reported later,
        also when the connection failed and the request waits for another). A request
        ``inline`` from the handler that has nothing to send returns DONE, and one
        libnbd refuses raises OSError; otherwise they are reported as completed."""
        h = conn.h
        cookies: list[int] = []
        try:
            op = req.op
            if op in (OP_READ, OP_WRITE):
                call = h.aio_pread if op == OP_READ else h.aio_pwrite
                off = req.offset
                for b in req.iov:  # type: ignore[union-attr]
                    cookies.append(call(nbd.Buffer.from_buffer(b), off))
                    off += len(b)
            elif op == OP_FLUSH:
                cookies.append(h.aio_flush())
            elif op in (OP_TRIM, OP_ZERO):
                off, end = req.offset, req.offset + req.length
                while off < end:
                    n = min(end - off, CHUNK)
                    if op == OP_TRIM:
                        cookies.append(h.aio_trim(n, off))
                    elif self.info["zero"]:
                        cookies.append(h.aio_zero(n, off, flags=req.flags))
                    else:
                        zero = self._zeroes()
                        while n:
                            k = min(n, len(zero))
                            cookies.append(h.aio_pwrite(nbd.Buffer.from_buffer(zero[:k]), off))
                            off += k
                            n -= k
                        continue
                    off += n
        except nbd.Error as e:
            for c in cookies:
                conn.cmds[c] = req
            req.parts += len(cookies)
            lost = e.errnum in (errno.ENOTCONN, errno.ESHUTDOWN)
            if h.aio_is_dead() or h.aio_is_closed() or (lost and not cookies):
                conn.cmds.setdefault(-1, req)
                self._drop(conn)
                self._connect_more()
                return PENDING
            # Refused by libnbd itself (e.g. beyond the export): the request fails.
            req.error = _errno(e)
            if req.parts == 0:
                if inline:
                    self._pending -= 1
                    raise OSError(req.error, f"{self.uri}: {e.string}") from None
                self._finish(req, req.error)
            return PENDING
        n = len(cookies)
        if n == 1:
            conn.cmds[cookies[0]] = req
        else:
            for c in cookies:
                conn.cmds[c] = req
            if not n:
                if inline:
                    self._pending -= 1
                    return DONE
                self._finish(req, 0)
        req.parts += n
        if h.aio_is_dead() or h.aio_is_closed():
            # libnbd found the connection gone while sending (and closed its socket,
            # so the loop would never hear of it).
            self._drop(conn)
            self._connect_more()
            return PENDING
        conn.update_direction()
        return PENDING

    def _send_waiting(self) -> None:
        while self.waiting:
            conn = self._pick()
            if conn is None:
                return
            req = self.waiting.popleft()
            self._send(conn, req)

    def _zeroes(self) -> memoryview:
        if self._zero_buf is None:
            self._zero_buf = memoryview(bytearray(ZERO_CHUNK))
        return self._zero_buf

    def readv(self, iov: list[memoryview], offset: int, token: Any) -> int:
        return self._submit(_Req(OP_READ, token, offset, iov=iov))

    def writev(self, iov: list[memoryview], offset: int, token: Any) -> int:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only export")
        return self._submit(_Req(OP_WRITE, token, offset, iov=iov))

    def flush(self, token: Any) -> int:
        if not self.info["flush"] or self.read_only:
            return DONE
        return self._submit(_Req(OP_FLUSH, token))

    def discard(self, offset: int, length: int, token: Any) -> int:
        if not self.info["trim"] or self.read_only:
            return DONE  # advisory
        return self._submit(_Req(OP_TRIM, token, offset, length))

    def write_zeroes(self, offset: int, length: int, unmap: bool, token: Any) -> int:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only export")
        flags = 0 if unmap else nbd.CMD_FLAG_NO_HOLE
        return self._submit(_Req(OP_ZERO, token, offset, length, flags=flags))

    def in_flight(self) -> int:
        return self._pending

    def state(self) -> str:
        """Where the requests are now (the overdue watchdog's line)."""
        up = sum(1 for c in self.conns if c.ready)
        at_server = sum(len(c.cmds) for c in self.conns)
        return (f"{self.describe()}; {self._pending} in flight, {at_server} at the server; "
                f"{up} of {len(self.conns)} connections up")

    def poll(self, timeout: float) -> None:
        """Block up to ``timeout`` seconds for the connections (a ring that must come
        to rest at once); completions are reported as usual."""
        rd = [c.fd for c in self.conns if c.fd >= 0]
        wr = [c.fd for c in self.conns if c.ep is not None]
        r, w, _ = select.select(rd, wr, [], timeout)
        for c in list(self.conns):
            if c.fd in w:
                self._writable(c)
            elif c.fd in r:
                self._readable(c)
        if not r and not w:
            self._retry()

    def size(self) -> int:
        return self._size

    def refresh_size(self, done: Callable[[int], None]) -> None:
        """A new connection learns the export's size (NBD tells it only in the
        handshake); the served connections stay."""
        self._resize_done.append(done)
        if self._probe is not None:
            return
        if self.watcher is None:
            self._resize_finish(errno.ENOTCONN)
            return
        h = self._handle()
        try:
            h.aio_connect_uri(self.uri)
        except nbd.Error as e:
            log.warning("%s: cannot re-read the size: %s", self.uri, e.string)
            self._resize_finish(_errno(e))
            return
        self._probe = _Conn(self, h)
        self._probe.watch(self.watcher)
        self._probe_progress()

    def _probe_progress(self) -> None:
        probe = self._probe
        assert probe is not None
        h = probe.h
        try:
            if h.aio_is_connecting():
                probe.update_direction()
                return
            if not h.aio_is_ready():
                raise nbd.Error("the server closed the connection", errno.ENOTCONN)
            size = h.get_size()
            err = 0
        except nbd.Error as e:
            log.warning("%s: cannot re-read the size: %s", self.uri, e.string)
            size, err = self._size, _errno(e)
        self._probe = None
        probe.close()
        if size != self._size:
            log.info("%s: export size %d -> %d bytes", self.uri, self._size, size)
            self._size = size
            self.info["size"] = size
        self._resize_finish(err)

    def _resize_finish(self, err: int) -> None:
        done, self._resize_done = self._resize_done, []
        for fn in done:
            fn(err)

    def worker_spec(self) -> tuple[dict[str, Any], list[int]]:
        return {"kind": "nbd", "uri": self.uri, "read_only": self.read_only,
                "reconnect_delay": self.reconnect_delay, "connections": 1,
                "info": dict(self.info)}, []

    @classmethod
    def from_spec(cls, spec: dict[str, Any], fds: list[int]) -> NbdStorage:
        return cls(str(spec["uri"]), bool(spec["read_only"]), float(spec["reconnect_delay"]),
                   int(spec["connections"]), info=dict(spec["info"]))

    def close(self) -> None:
        for conn in [*self.conns, *([self._probe] if self._probe else [])]:
            conn.close()
        self.conns = []
        self._probe = None
        self.waiting.clear()
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        self.watcher = None
