"""The asyncio shell: listening sockets, connections, fd passing.

This is the only layer that touches sockets. It moves bytes and fds between a unix
socket and the sans-I/O protocol core, hands each validated message to the device's
:class:`~vhostd.engine.backend.VhostUserBackend`, and sends the replies back.
A front end that breaks the protocol gets a log line and a closed connection; the
server then waits for the next front end, and other devices are not affected.
"""

from __future__ import annotations

import array
import asyncio
import errno
import logging
import os
import socket
import stat

from vhostd_proto import vhost_user as vu
from vhostd_proto.vhost_user import BackendRequest
from vhostd_proto.vhost_user import Request as R

from ..core.protocol import BackendProtocol, Message, ProtocolError
from ..engine.backend import VhostUserBackend
from ..engine.memory import close_fds
from .loopguard import guard

log = logging.getLogger(__name__)

_FD_SPACE = socket.CMSG_SPACE(vu.VHOST_USER_MAX_FDS * 4)


class FrontEndGone(Exception):
    """The front end closed (or reset) the connection before its reply was sent."""


class StartupError(Exception):
    """The daemon cannot start; the message is the one-line reason."""


def bind_unix(path: str, mode: int = 0o600) -> socket.socket:
    """A listening socket at ``path``, replacing a stale socket file only."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise StartupError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: a leftover from an earlier run
        else:
            raise StartupError(f"{path} is in use by another process")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise StartupError(f"cannot bind {path}: {e.strerror}") from e
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.listen(1)
    return sock


def adopt_listening_fd(fd: int) -> socket.socket:
    """The inherited listening socket of ``--fd``."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        if e.errno == errno.ENOTSOCK:
            os.close(fd)
        raise StartupError(f"--fd={fd}: {e.strerror}") from e
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise StartupError(f"--fd={fd} is not a unix stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise StartupError(f"--fd={fd} is not a listening socket")
    return sock


class Connection:
    """One front end on one device."""

    def __init__(self, server: DeviceServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.loop = server.loop
        self.backend = server.backend
        self.log = server.log
        self.protocol: BackendProtocol = self.backend.connect()
        self.backend_channel: socket.socket | None = None
        self.backend.send_backend_message = self.send_backend_message
        self.closed = False
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._readable)
        guard(self.loop).watch(id(self), self._recheck)

    def _recheck(self) -> None:
        """The loop may have dropped this socket (loopguard): read what is waiting, up
        to the hang-up of a front end that has gone, and watch the socket again."""
        if self.closed or not self._readable():
            return
        while not self.closed and self._readable():
            pass
        if not self.closed:
            fd = self.sock.fileno()
            self.loop.remove_reader(fd)
            self.loop.add_reader(fd, self._readable)

    def _readable(self) -> bool:
        try:
            return self._read_some()
        except FrontEndGone as e:
            self.log.info("front end went away before its reply (%s); closing the connection",
                          e)
            self.close()
        except ProtocolError as e:
            close_fds(e.fds)
            self.log.error("front end protocol error: %s; closing the connection", e)
            self.close()
        except Exception:
            self.log.exception("internal error handling a front-end message; closing the "
                               "connection")
            self.close()
        return False

    def _read_some(self) -> bool:
        # Read only up to the end of the current header or payload, so fds stay
        # paired with the message they were sent with.
        want = self.protocol.bytes_needed()
        try:
            data, ancdata, flags, _ = self.sock.recvmsg(want, _FD_SPACE)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            self.log.info("front end connection error: %s", e.strerror)
            self.close()
            return False
        fds = _take_fds(ancdata)
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError(f"more than {vu.VHOST_USER_MAX_FDS} fds in one message", fds)
        if not data:
            close_fds(fds)
            self.log.info("front end disconnected")
            self.close()
            return False
        msgs = self.protocol.receive(data, fds)
        for i, msg in enumerate(msgs):
            if self.closed:
                close_fds(msg.fds)
                continue
            try:
                self._dispatch(msg)
            except Exception:
                # Messages after the one that failed still own their fds.
                close_fds([fd for m in msgs[i + 1:] for fd in m.fds])
                raise
        return True

    def _dispatch(self, msg: Message) -> None:
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("<- %s", msg.describe())
        if msg.request is R.SET_BACKEND_REQ_FD:
            self._set_backend_channel(msg.fds[0])
            reply = self.protocol.ack(msg, True)
            out = (reply, []) if reply is not None else None
        else:
            out = self.backend.handle(msg)
        if out is not None:
            data, fds = out
            try:
                self._send(data, fds)
            finally:
                close_fds(fds)

    def _send(self, data: bytes, fds: list[int]) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        # Replies are small and the front end waits for them; a full socket buffer
        # means the front end is not reading, which is fatal for the connection.
        try:
            sent = self.sock.sendmsg([data], anc)
        except BlockingIOError:
            raise ProtocolError("front end does not read its replies") from None
        except OSError as e:
            raise FrontEndGone(e.strerror or str(e)) from None
        if sent != len(data):
            raise ProtocolError("front end does not read its replies")

    def _set_backend_channel(self, fd: int) -> None:
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None
        try:
            self.backend_channel = socket.socket(fileno=fd)
        except OSError as e:
            os.close(fd)
            raise ProtocolError(f"SET_BACKEND_REQ_FD: the fd is not a socket ({e.strerror})"
                                ) from e
        self.backend_channel.setblocking(False)

    def send_backend_message(self, request: BackendRequest, payload: bytes) -> bool:
        chan = self.backend_channel
        if chan is None:
            return False
        hdr = vu.Header.build({"request": request, "flags": vu.VHOST_USER_VERSION,
                               "size": len(payload)})
        try:
            chan.send(hdr + payload)
        except OSError as e:
            self.log.warning("cannot send %s to the front end: %s", request.name, e)
            return False
        self.log.debug("-> backend channel %s", request.name)
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        guard(self.loop).forget(id(self))
        self.loop.remove_reader(self.sock.fileno())
        close_fds(self.protocol.pending_fds())
        self.backend.disconnect()
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None
        self.sock.close()
        self.server.connection_closed(self)


def _take_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


class DeviceServer:
    """A device's listening socket; serves one front end at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, backend: VhostUserBackend,
                 sock: socket.socket, path: str | None) -> None:
        self.loop = loop
        self.backend = backend
        self.sock = sock
        self.path = path  # unlinked on close only if we bound it
        self.log = logging.getLogger(f"vhostd.{backend.device.name}")
        self.connection: Connection | None = None
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.log.error("accept failed: %s", e)
            return
        if self.connection is not None:
            # The current one may have gone without the loop noticing (loopguard).
            self.connection._recheck()
        if self.connection is not None:
            self.log.warning("refusing a second front end while one is connected")
            conn.close()
            return
        self.log.info("front end connected")
        self.connection = Connection(self, conn)

    def connection_closed(self, conn: Connection) -> None:
        if self.connection is conn:
            self.connection = None
            self.log.info("waiting for a front end on %s", self.path or "inherited socket")

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        if self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
