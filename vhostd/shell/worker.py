"""Queue worker processes: both ends of the channel that moves rings between processes.

The main process starts workers with :class:`WorkerProcess`; ring placement
(``vhostd/vhost_user/placement.py``) decides which rings they serve. Each worker is
``python -m vhostd.shell.worker``: a plain epoll loop (no asyncio or uvloop, which would
cost memory and time for nothing here) that watches its control socket, the kick
eventfds of the rings it serves, and whatever its devices' storage needs.

On the control socket (a socketpair) every message is ``le32 length`` plus a JSON
object, with fds attached to its first byte. The main process sends ``run`` (a ring and
its fds), ``recall`` (rings to give back once their outstanding requests completed),
``stats`` (the rings' counters, read while they run) and ``exit``; each carries an
``id`` its answer repeats. Nothing on the main process's loop waits for an answer: it
arrives as a readable channel and resolves a callback. Daemon events a worker's rings
emit (``core/events.py``: a ring needing reset, I/O errors) travel on a second
socketpair, one datagram each, and are emitted again in the main process; a full socket
drops an event rather than make a ring wait. A worker dies with its parent
(PR_SET_PDEATHSIG), so a killed daemon never leaves a process serving a ring that a
restarted daemon serves again.
"""

from __future__ import annotations

import collections
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

from ..core import events
from ..engine.loop import close_fds
from ..engine.worker_ring import Spec, WorkerRing
from .fdpass import anc_space, fds_ancillary, take_fds

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger(__name__)

_LEN = struct.Struct("<I")
MAX_FDS = 250  # below the kernel's SCM_MAX_FD (253)
MAX_MESSAGE = 16 << 20
_ANC_SPACE = anc_space(MAX_FDS)
PR_SET_PDEATHSIG = 1
# How long the main process waits for an answer before it takes the worker for dead
# (killed; the main process serves its rings from then on, as after a back-end
# restart). A recall waits for requests still at the storage, which may be retrying a
# network server for a while; the other calls answer at once.
ANSWER_TIMEOUT = 10.0
RECALL_TIMEOUT = 60.0

Answer = Callable[[dict[str, Any]], None]


def encode(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return _LEN.pack(len(body)) + body


class _Reader:
    """Reassembles whole messages from a non-blocking channel. It reads no further than
    the end of the current length or body, so fds (sent with a message's first byte)
    stay with their message."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.need = _LEN.size
        self.body = False
        self.fds: list[int] = []

    def feed(self, sock: socket.socket) -> list[tuple[dict[str, Any], list[int]]] | None:
        """Messages completed by what is readable now; None at end of file."""
        out = []
        while True:
            try:
                data, ancdata, flags, _ = sock.recvmsg(self.need - len(self.buf), _ANC_SPACE)
            except (BlockingIOError, InterruptedError):
                return out
            self.fds.extend(take_fds(ancdata))
            if not data:
                return out or None
            if flags & socket.MSG_CTRUNC:
                raise EOFError("fds were truncated")
            self.buf += data
            if len(self.buf) < self.need:
                continue
            if not self.body:
                n = _LEN.unpack(self.buf)[0]
                if n > MAX_MESSAGE:
                    raise EOFError(f"message of {n} bytes")
                self.buf.clear()
                self.need, self.body = n, True
                if n:
                    continue
            msg = json.loads(bytes(self.buf))
            fds, self.fds = self.fds, []
            out.append((msg, fds))
            self.buf.clear()
            self.need, self.body = _LEN.size, False

    def close(self) -> None:
        close_fds(self.fds)
        self.fds = []


class WorkerProcess:
    """The main process's handle on one worker (placement.py's ``Worker``)."""

    def __init__(self, name: str, log_level: str = "info") -> None:
        self.name = name
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ev_parent, ev_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vhostd.shell.worker", str(child.fileno()), name,
                 log_level, str(os.getpid()), str(ev_child.fileno())],
                pass_fds=[child.fileno(), ev_child.fileno()],
            )
        except OSError:
            parent.close()
            ev_parent.close()
            raise
        finally:
            child.close()
            ev_child.close()
        self.sock = parent
        self.events = ev_parent
        self.events.setblocking(False)
        self.sock.setblocking(False)
        self.dead = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_exit: Callable[[WorkerProcess], None] | None = None
        self._reader = _Reader()
        self._answers: dict[int, tuple[Answer, asyncio.TimerHandle | None]] = {}
        self._next_id = 1
        self._out: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        self._writing = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def attach(self, loop: asyncio.AbstractEventLoop,
               on_exit: Callable[[WorkerProcess], None]) -> None:
        """Serve the channel on ``loop``; ``on_exit`` once the worker is gone."""
        self._loop = loop
        self._on_exit = on_exit
        loop.add_reader(self.sock.fileno(), self._readable)
        loop.add_reader(self.events.fileno(), self._events_readable)

    def _events_readable(self) -> None:
        """Emit here what the worker's rings emitted there."""
        while True:
            try:
                data = self.events.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                if self._loop is not None:
                    self._loop.remove_reader(self.events.fileno())
                return
            try:
                msg = json.loads(data)
                events.emit(str(msg["event"]), **msg["data"])
            except (ValueError, KeyError, TypeError):
                log.warning("queue worker %s sent an unreadable event", self.name)

    # ---- calls ------------------------------------------------------------------------
    def _call(self, msg: dict[str, Any], fds: list[int], answer: Answer,
              timeout: float | None = None) -> None:
        if self.dead:
            answer({"error": f"worker {self.name} is not running"})
            return
        if len(fds) > MAX_FDS:
            answer({"error": f"{len(fds)} fds in one message (at most {MAX_FDS})"})
            return
        # Our own copies: the caller may close its fds before the message leaves.
        copies: list[int] = []
        try:
            for fd in fds:
                copies.append(os.dup(fd))
        except OSError as e:
            close_fds(copies)
            answer({"error": f"cannot pass the fds: {e.strerror}"})
            return
        if timeout is None:
            timeout = ANSWER_TIMEOUT
        call_id = self._next_id
        self._next_id += 1
        msg["id"] = call_id
        timer = (self._loop.call_later(timeout, self._late, call_id, msg["op"], timeout)
                 if self._loop is not None else None)
        self._answers[call_id] = (answer, timer)
        self._out.append((encode(msg), copies))
        self._flush()

    def _late(self, call_id: int, op: str, timeout: float) -> None:
        if call_id in self._answers:
            self._died(f"no answer to {op} within {timeout:.0f} s")

    def run(self, key: str, spec: Spec, fds: list[int],
            done: Callable[[str | None], None]) -> None:
        self._call({"op": "run", "key": key, "spec": spec}, fds,
                   lambda reply: done(reply.get("error")))

    def recall(self, keys: list[str],
               done: Callable[[dict[str, Spec] | None, str | None], None]) -> None:
        self._call({"op": "recall", "keys": keys}, [],
                   lambda reply: done(reply.get("rings"), reply.get("error")), RECALL_TIMEOUT)

    def stats(self, keys: list[str],
              done: Callable[[dict[str, Spec] | None, str | None], None]) -> None:
        self._call({"op": "stats", "keys": keys}, [],
                   lambda reply: done(reply.get("rings"), reply.get("error")))

    # ---- the channel ---------------------------------------------------------------------
    def _flush(self) -> None:
        while self._out:
            data, fds = self._out[0]
            try:
                sent = self.sock.sendmsg([data], fds_ancillary(fds))
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                self._died(f"cannot write to it: {e.strerror}")
                return
            if sent:
                close_fds(fds)  # they went with the first byte
                if sent < len(data):
                    self._out[0] = (data[sent:], [])
                    sent = 0
                else:
                    self._out.popleft()
                    continue
            if not sent:
                if not self._writing and self._loop is not None:
                    self._writing = True
                    self._loop.add_writer(self.sock.fileno(), self._writable)
                return
        if self._writing and self._loop is not None:
            self._writing = False
            self._loop.remove_writer(self.sock.fileno())

    def _writable(self) -> None:
        self._flush()

    def _readable(self) -> None:
        try:
            messages = self._reader.feed(self.sock)
        except (OSError, EOFError, ValueError) as e:
            self._died(str(e))
            return
        if messages is None:
            self._died("it exited")
            return
        for reply, fds in messages:
            close_fds(fds)
            entry = self._answers.pop(reply.get("id", 0), None)
            if entry is None:
                log.warning("queue worker %s answered a call nobody made", self.name)
                continue
            answer, timer = entry
            if timer is not None:
                timer.cancel()
            try:
                answer(reply)
            except Exception:
                log.exception("internal error handling an answer of worker %s", self.name)

    def _died(self, why: str) -> None:
        if self.dead:
            return
        self.dead = True
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self._loop.remove_reader(self.events.fileno())
            if self._writing:
                self._loop.remove_writer(self.sock.fileno())
        self.proc.kill()
        log.error("queue worker %s (pid %d) is gone: %s", self.name, self.proc.pid, why)
        for _, fds in self._out:
            close_fds(fds)
        self._out.clear()
        self._reader.close()
        answers, self._answers = self._answers, {}
        for answer, timer in answers.values():
            if timer is not None:
                timer.cancel()
            answer({"error": f"worker {self.name} is gone ({why})"})
        if self._on_exit is not None:
            self._on_exit(self)

    def close(self) -> None:
        if self._loop is not None and not self.dead:
            self._loop.remove_reader(self.sock.fileno())
            self._loop.remove_reader(self.events.fileno())
            if self._writing:
                self._loop.remove_writer(self.sock.fileno())
        self._loop = None
        if not self.dead:
            self.dead = True
            try:
                self.sock.setblocking(True)
                self.sock.settimeout(1.0)
                self.sock.sendall(encode({"op": "exit"}))
            except OSError:
                pass
        for _, fds in self._out:
            close_fds(fds)
        self._out.clear()
        self._reader.close()
        self.sock.close()
        self.events.close()
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---- the worker process -----------------------------------------------------------
class EpollLoop:
    """Just what a worker needs of an event loop: level-triggered fd callbacks and
    callbacks to run soon (the engine's ``Loop``)."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.readers: dict[int, tuple[Callable[..., Any], tuple[Any, ...]]] = {}
        self.soon: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            collections.deque())
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

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        self.soon.append((callback, args))

    def stop(self) -> None:
        self.running = False

    def run_forever(self) -> None:
        self.running = True
        while self.running:
            self.run_once(0 if self.soon else -1)

    def run_once(self, timeout: float) -> None:
        """One turn: the fds ready within ``timeout`` seconds (-1: until one is), then
        the callbacks scheduled so far."""
        try:
            events = self.epoll.poll(timeout)
        except InterruptedError:
            return
        readers = self.readers
        for fd, _ in events:
            entry = readers.get(fd)  # an earlier callback may have removed it
            if entry is not None:
                entry[0](*entry[1])
        soon = self.soon
        for _ in range(len(soon)):
            callback, args = soon.popleft()
            try:
                callback(*args)
            except Exception:
                log.exception("internal error in a scheduled callback")


class WorkerMain:
    """The worker process's side of the channel: the rings it serves."""

    def __init__(self, loop: EpollLoop, sock: socket.socket) -> None:
        from ..devices.registry import device_from_spec

        self.loop = loop
        self.sock = sock
        self.rings: dict[str, WorkerRing] = {}
        # Each ring's device builds its own storage backend, completing on this loop.
        self.make_device = lambda spec, fds: device_from_spec(spec, fds, loop)
        self.reader = _Reader()
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._control)

    def _answer(self, msg: dict[str, Any], reply: dict[str, Any]) -> None:
        reply["id"] = msg.get("id", 0)
        data = encode(reply)
        self.sock.setblocking(True)
        try:
            self.sock.sendall(data)
        except OSError as e:
            # The daemon is gone (this process dies with it in a moment) or broke the
            # channel: either way nobody is left to serve.
            log.debug("cannot answer the daemon (%s); exiting", e.strerror)
            self.loop.stop()
        finally:
            self.sock.setblocking(False)

    def _control(self) -> None:
        try:
            messages = self.reader.feed(self.sock)
        except (OSError, EOFError, ValueError):
            messages = None
        if messages is None:
            log.debug("the daemon closed the channel; exiting")
            self.loop.stop()
            return
        for msg, fds in messages:
            self._handle(msg, fds)

    def _handle(self, msg: dict[str, Any], fds: list[int]) -> None:
        op = msg.get("op")
        if op == "run":
            key = msg["key"]
            if key in self.rings:
                close_fds(fds)
                self._answer(msg, {"error": f"already serving {key}"})
                return
            try:
                # WorkerRing owns the fds from here on, also when it fails.
                self.rings[key] = WorkerRing(msg["spec"], fds, self.loop, self.make_device)
            except Exception as e:  # refused: the daemon serves the ring itself
                log.exception("cannot serve %s", key)
                self._answer(msg, {"error": f"cannot serve {key}: {e}"})
                return
            self._answer(msg, {})
            return
        close_fds(fds)
        if op == "recall":
            self._recall(msg)
        elif op == "stats":
            self._answer(msg, {"rings": {key: work.stats() for key, work in self.rings.items()
                                         if key in msg["keys"]}})
        else:
            self.loop.stop()

    def _recall(self, msg: dict[str, Any]) -> None:
        """Give the rings back once each is at rest; the answer waits for the last."""
        works = [(key, self.rings.pop(key)) for key in msg["keys"] if key in self.rings]
        out: dict[str, Spec] = {}
        left = [len(works)]

        def one(key: str, state: Spec) -> None:
            out[key] = state
            left[0] -= 1
            if not left[0]:
                self._answer(msg, {"rings": out})

        if not works:
            self._answer(msg, {"rings": out})
        for key, work in works:
            work.recall(lambda state, key=key: one(key, state))


def _forward_events(sock: socket.socket) -> events.Listener:
    """A listener sending each event to the daemon. An event that does not fit (the
    daemon is not reading) is dropped rather than let the ring wait."""
    def forward(name: str, data: dict[str, Any]) -> None:
        try:
            sock.send(json.dumps({"event": name, "data": data}).encode(), socket.MSG_DONTWAIT)
        except OSError:
            pass
    return forward


def main(argv: list[str]) -> int:
    fd, name, level, parent = int(argv[0]), argv[1], argv[2], int(argv[3])
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        return 0  # the daemon died before we could ask to die with it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we stop
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper()),
                        format=f"%(asctime)s %(levelname)s [{name}] %(name)s: %(message)s")
    if len(argv) > 4:
        events.subscribe(_forward_events(socket.socket(fileno=int(argv[4]))))
    loop = EpollLoop()
    sock = socket.socket(fileno=fd)
    worker = WorkerMain(loop, sock)
    try:
        loop.run_forever()
    finally:
        for work in worker.rings.values():
            work.recall(lambda state: None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
