"""Queue worker processes: both ends of the channel that moves rings between processes.

The main process starts workers with :class:`WorkerProcess` and gives each back end
the ones that serve its rings (engine/offload.py explains when rings move). Each
worker is ``python -m vhostd.shell.worker``: a plain epoll loop (no asyncio or uvloop,
which would cost memory and time for nothing here) that watches its control socket
and the kick eventfds of the rings it serves.

On the control socket (a socketpair) every message is ``le32 length`` plus a JSON
object, with fds attached to its first byte. The main process sends ``run`` (a ring
and its fds; reply ``{}`` or ``{"error"}``), ``recall`` (reply: the rings' states)
and ``exit``. A worker dies with its parent (PR_SET_PDEATHSIG), so a killed daemon
never leaves a process serving a ring that a restarted daemon serves again.
"""

from __future__ import annotations

import array
import ctypes
import ctypes.util
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..engine.memory import close_fds
from ..engine.offload import HostError, RingWork, Spec

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger(__name__)

_LEN = struct.Struct("<I")
MAX_FDS = 250  # below the kernel's SCM_MAX_FD (253)
_ANC_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)
CALL_TIMEOUT = 10.0
PR_SET_PDEATHSIG = 1


def send_msg(sock: socket.socket, obj: dict[str, Any], fds: list[int] = ()) -> None:
    if len(fds) > MAX_FDS:
        raise ValueError(f"{len(fds)} fds in one message (at most {MAX_FDS})")
    body = json.dumps(obj, separators=(",", ":")).encode()
    data = _LEN.pack(len(body)) + body
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])


def recv_msg(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One whole message; EOFError if the peer is gone."""
    data, ancdata, flags, _ = sock.recvmsg(_LEN.size, _ANC_SPACE)
    fds: list[int] = []
    for level, kind, raw in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(raw[: len(raw) - len(raw) % arr.itemsize])
            fds.extend(arr)
    try:
        if not data:
            raise EOFError("peer closed the channel")
        if flags & socket.MSG_CTRUNC:
            raise EOFError("fds were truncated")
        data += _recv_exactly(sock, _LEN.size - len(data))
        body = _recv_exactly(sock, _LEN.unpack(data)[0])
        return json.loads(body), fds
    except BaseException:
        close_fds(fds)
        raise


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise EOFError("peer closed the channel")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


class WorkerProcess:
    """The main process's handle on one worker: a :class:`~vhostd.engine.offload.RingHost`."""

    def __init__(self, name: str, log_level: str = "info") -> None:
        self.name = name
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vhostd.shell.worker", str(child.fileno()), name,
                 log_level, str(os.getpid())],
                pass_fds=[child.fileno()],
            )
        except OSError:
            parent.close()
            raise
        finally:
            child.close()
        self.sock = parent
        self.sock.settimeout(CALL_TIMEOUT)
        self.dead = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def _call(self, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        if self.dead:
            raise HostError(f"worker {self.name} is not running")
        try:
            send_msg(self.sock, msg, fds)
            reply, extra = recv_msg(self.sock)
        except ValueError as e:
            raise HostError(str(e)) from e
        except (OSError, EOFError) as e:
            self.dead = True
            self.proc.kill()
            raise HostError(f"worker {self.name} does not answer: {e}") from e
        close_fds(extra)
        if "error" in reply:
            raise HostError(reply["error"])
        return reply

    def watch(self, loop: asyncio.AbstractEventLoop,
              on_exit: Callable[[WorkerProcess], None]) -> None:
        """Call ``on_exit`` as soon as the worker is gone. The channel is only read
        inside calls, so it becomes readable between calls only by closing."""
        self._loop = loop

        def readable() -> None:
            try:
                data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data:
                return
            loop.remove_reader(self.sock.fileno())
            self._loop = None
            if not self.dead:
                self.dead = True
                self.proc.kill()
                log.error("queue worker %s (pid %d) exited", self.name, self.proc.pid)
            on_exit(self)

        loop.add_reader(self.sock.fileno(), readable)

    def run(self, key: str, spec: Spec, fds: list[int]) -> None:
        self._call({"op": "run", "key": key, "spec": spec}, fds)

    def recall(self, keys: list[str]) -> dict[str, Spec]:
        return self._call({"op": "recall", "keys": keys}, [])["rings"]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self._loop = None
        if not self.dead:
            try:
                send_msg(self.sock, {"op": "exit"})
            except OSError:
                pass
        self.sock.close()
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---- the worker process -----------------------------------------------------------
class EpollLoop:
    """Just what a worker needs of an event loop: level-triggered fd callbacks."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.readers: dict[int, tuple[Callable[..., Any], tuple[Any, ...]]] = {}
        self.running = False

    def add_reader(self, fd: int, callback: Callable[..., Any], *args: Any) -> None:
        if fd in self.readers:
            self.epoll.modify(fd, select.EPOLLIN)
        else:
            self.epoll.register(fd, select.EPOLLIN)
        self.readers[fd] = (callback, args)

    def remove_reader(self, fd: int) -> bool:
        if self.readers.pop(fd, None) is None:
            return False
        self.epoll.unregister(fd)
        return True

    def stop(self) -> None:
        self.running = False

    def run_forever(self) -> None:
        self.running = True
        poll = self.epoll.poll
        readers = self.readers
        while self.running:
            try:
                events = poll()
            except InterruptedError:
                continue
            for fd, _ in events:
                entry = readers.get(fd)  # an earlier callback may have removed it
                if entry is not None:
                    entry[0](*entry[1])


class Worker:
    def __init__(self, loop: EpollLoop, sock: socket.socket) -> None:
        from ..devices.offload import device_from_spec

        self.loop = loop
        self.sock = sock
        self.rings: dict[str, RingWork] = {}
        self.make_device = device_from_spec
        loop.add_reader(sock.fileno(), self._control)

    def _control(self) -> None:
        try:
            msg, fds = recv_msg(self.sock)
        except (EOFError, OSError):
            log.debug("the daemon closed the channel; exiting")
            self.loop.stop()
            return
        op = msg.get("op")
        if op == "run":
            key = msg["key"]
            if key in self.rings:
                close_fds(fds)
                send_msg(self.sock, {"error": f"already serving {key}"})
                return
            try:
                # RingWork owns the fds from here on, also when it fails.
                self.rings[key] = RingWork(msg["spec"], fds, self.loop, self.make_device)
            except Exception as e:  # refused: the daemon serves the ring itself
                log.exception("cannot serve %s", key)
                send_msg(self.sock, {"error": f"cannot serve {key}: {e}"})
                return
            send_msg(self.sock, {})
        elif op == "recall":
            close_fds(fds)
            out = {}
            for key in msg["keys"]:
                work = self.rings.pop(key, None)
                if work is not None:
                    out[key] = work.recall()
            send_msg(self.sock, {"rings": out})
        else:
            close_fds(fds)
            self.loop.stop()


def main(argv: list[str]) -> int:
    fd, name, level, parent = int(argv[0]), argv[1], argv[2], int(argv[3])
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        return 0  # the daemon died before we could ask to die with it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we stop
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper()),
                        format=f"%(asctime)s %(levelname)s [{name}] %(name)s: %(message)s")
    loop = EpollLoop()
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    worker = Worker(loop, sock)
    try:
        loop.run_forever()
    finally:
        for work in worker.rings.values():
            work.recall()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
