"""The asyncio shell: listening sockets, connections, fd passing.

This is the only layer that touches sockets. It moves bytes and fds between a unix
socket and the sans-I/O protocol core, hands each validated message to the device's
:class:`~vhostd.vhost_user.handler.VhostUserHandler`, and sends the replies back.
A reply may come later (a handler that waits for a ring to drain): the connection then
reads nothing more from that front end until it is sent, and the loop serves everyone
else meanwhile. A front end that breaks the protocol gets a log line and a closed
connection; the server then waits for the next front end, and other devices are not
affected.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat

from vhostd_proto import vhost_user as vu
from vhostd_proto.vhost_user import BackendRequest
from vhostd_proto.vhost_user import Request as R

from ..core import events
from ..core.pending import Pending
from ..core.protocol import BackendProtocol, Message, ProtocolError
from ..engine.loop import close_fds
from ..vhost_user.handler import Reply, VhostUserHandler
from .fdpass import anc_space, fds_ancillary, take_fds
from .loopguard import guard

log = logging.getLogger(__name__)

_FD_SPACE = anc_space(vu.VHOST_USER_MAX_FDS)


class FrontEndGone(Exception):
    """The front end closed (or reset) the connection before its reply was sent."""


class StartupError(Exception):
    """The daemon cannot start; the message is the one-line reason."""


def _make_socket_folder(folder: str) -> None:
    """Create a missing socket folder (and its missing parents) with mode 0755."""
    missing = []
    while folder and not os.path.lexists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for d in reversed(missing):
        try:
            os.mkdir(d)
            os.chmod(d, 0o755)  # whatever the umask: QEMU's user must reach the socket
        except FileExistsError:
            continue  # made by someone else meanwhile
        except OSError as e:
            raise StartupError(f"cannot create the socket folder {d}: {e.strerror}") from e
        log.info("created the socket folder %s (mode 0755)", d)


def bind_unix(path: str, mode: int = 0o600, group: int | None = None) -> socket.socket:
    """A listening socket at ``path``, replacing a stale socket file only.

    The socket file gets ``mode`` and, if given, the group ``group`` (so a front end
    running as another user in that group may connect); a missing folder is created.
    """
    _make_socket_folder(os.path.dirname(os.path.abspath(path)))
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
    try:
        if group is not None:
            os.chown(path, -1, group)
        os.chmod(path, mode)
    except OSError as e:
        sock.close()
        os.unlink(path)
        raise StartupError(f"cannot set the owner group or mode of {path}: {e.strerror}"
                           ) from e
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
        self.handler = server.handler
        self.log = server.log
        self.protocol: BackendProtocol = self.handler.connect()
        self.backend_channel: socket.socket | None = None
        self.handler.send_backend_message = self.send_backend_message
        self.closed = False
        self.waiting: Pending[Reply] | None = None  # a reply not yet due; reading paused
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._readable)
        guard(self.loop).watch(id(self), self._recheck)

    def _recheck(self) -> None:
        """The loop may have dropped this socket (loopguard): read what is waiting, up
        to the hang-up of a front end that has gone, and watch the socket again. Not
        while a reply is due: nothing more is read from the front end until then."""
        if self.closed or self.waiting is not None or not self._readable():
            return
        while not self.closed and self.waiting is None and self._readable():
            pass
        if not self.closed and self.waiting is None:
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
        fds = take_fds(ancdata)
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError(f"more than {vu.VHOST_USER_MAX_FDS} fds in one message", fds)
        if not data:
            close_fds(fds)
            self.log.info("front end disconnected")
            self.close()
            return False
        # Reads stop at the end of a header or payload: at most one message here.
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
            out: Reply | Pending[Reply] = (reply, []) if reply is not None else None
        else:
            out = self.handler.handle(msg)
        if isinstance(out, Pending):
            # The front end gets this reply before anything else is read from it.
            self.waiting = out
            self.loop.remove_reader(self.sock.fileno())
            out.then(lambda p: self._reply_due(msg, p))
            return
        self._reply(out)

    def _reply_due(self, msg: Message, p: Pending[Reply]) -> None:
        self.waiting = None
        if self.closed:
            try:
                out = p.result()
            except Exception:
                return
            if out is not None:
                close_fds(out[1])
            return
        try:
            self._reply(p.result())
        except FrontEndGone as e:
            self.log.info("front end went away before its reply (%s); closing the connection",
                          e)
            self.close()
            return
        except ProtocolError as e:
            self.log.error("front end protocol error: %s; closing the connection", e)
            self.close()
            return
        except Exception:
            self.log.exception("internal error handling %s; closing the connection",
                               msg.request.name)
            self.close()
            return
        self.loop.add_reader(self.sock.fileno(), self._readable)

    def _reply(self, out: Reply) -> None:
        if out is not None:
            data, fds = out
            try:
                self._send(data, fds)
            finally:
                close_fds(fds)

    def _send(self, data: bytes, fds: list[int]) -> None:
        # Replies are small and the front end waits for them; a full socket buffer
        # means the front end is not reading, which is fatal for the connection.
        try:
            sent = self.sock.sendmsg([data], fds_ancillary(fds))
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
        """Close the connection. The device is free for the next front end once its
        outstanding requests have completed (the server waits for that)."""
        if self.closed:
            return
        self.closed = True
        guard(self.loop).forget(id(self))
        if self.waiting is None:
            self.loop.remove_reader(self.sock.fileno())
        close_fds(self.protocol.pending_fds())
        self.handler.send_backend_message = None
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None
        self.sock.close()
        self.server.connection_closed(self)


class DeviceServer:
    """A device's listening socket; serves one front end at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, handler: VhostUserHandler,
                 sock: socket.socket, path: str | None) -> None:
        self.loop = loop
        self.handler = handler
        self.sock = sock
        self.path = path  # unlinked on close only if we bound it
        self.log = logging.getLogger(f"vhostd.{handler.name}")
        self.connection: Connection | None = None
        # The last front end's disconnect, while requests it left are still at the
        # device: no new front end is accepted until it resolves.
        self.draining: Pending[None] | None = None
        self.listening = False
        sock.setblocking(False)
        self._listen(True)

    def _listen(self, on: bool) -> None:
        if on and not self.listening:
            self.loop.add_reader(self.sock.fileno(), self._accept)
        elif not on and self.listening:
            self.loop.remove_reader(self.sock.fileno())
        self.listening = on

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
        events.emit(events.FRONTEND_CONNECTED, device=self.handler.name)

    def connection_closed(self, conn: Connection) -> None:
        if self.connection is not conn:
            return
        self.connection = None
        events.emit(events.FRONTEND_DISCONNECTED, device=self.handler.name)
        pending = self.handler.disconnect()
        if pending is None:
            self._ready_for_next()
            return
        self.log.info("front end gone; waiting for requests still at the device")
        self.draining = pending
        self._listen(False)
        pending.then(lambda _: self._drained())

    def _drained(self) -> None:
        self.draining = None
        if self.sock.fileno() >= 0:
            self._listen(True)
            self._ready_for_next()

    def _ready_for_next(self) -> None:
        self.log.info("waiting for a front end on %s", self.path or "inherited socket")

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
        self._listen(False)
        self.sock.close()
        if self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
