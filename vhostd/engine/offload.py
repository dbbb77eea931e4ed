"""Rings served by another process: queue workers.

One Python process runs one core, so a device with several queues can hand some of
its rings to worker processes. Guest memory, the dirty log and the inflight region
are shared memory (memfds), so a worker maps the same bytes; the kick, call and err
eventfds and the backing file travel as fds. The main process stays the only one
that speaks vhost-user and the admin protocol.

A ring moves only while it is at rest: before the back end handles any control
message (or owner command) it *recalls* its rings, the worker publishes what it
completed and returns the ring's position, and the back end handles the message on
its own copy exactly as if the ring had never left; afterwards every ready ring is
sent out again. So no control path has to know about workers, and a ring is only
ever served by one process at a time.

This module holds both halves: :class:`RingHost`, what the back end needs of a
worker (the shell implements it over a socket), and :class:`RingWork`, a ring being
served inside a worker.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Protocol

from .dirtylog import DirtyLog
from .dirtytrack import WriteTracker
from .inflight import InflightRegion
from .memory import GuestMemory, close_fds
from .packed import set_layout
from .timer import FdWatcher
from .virtqueue import SplitVirtqueue

log = logging.getLogger(__name__)

Spec = dict[str, Any]


class HostError(Exception):
    """A worker could not take or give back a ring (it died, or refused)."""


class RingHost(Protocol):
    """A process that can serve rings on the back end's behalf."""

    name: str

    def run(self, key: str, spec: Spec, fds: list[int]) -> None:
        """Serve the ring ``spec`` describes; ``fds`` stay the caller's."""

    def recall(self, keys: list[str]) -> dict[str, Spec]:
        """Stop serving these rings; their final states (see :meth:`RingWork.recall`)."""


def ring_spec(q: SplitVirtqueue, memory: GuestMemory, device: Any,
              inflight: InflightRegion | None, tracker: WriteTracker | None
              ) -> tuple[Spec, list[int]]:
    """Everything a worker needs to serve ``q``; the fds stay the caller's."""
    fds: list[int] = []

    def fd_slot(fd: int | None) -> int | None:
        if fd is None:
            return None
        fds.append(fd)
        return len(fds) - 1

    regions, region_fds = memory.table()
    device_spec, device_fds = device.offload_spec()
    spec: Spec = {
        "ring": q.export_state(),
        "kick": fd_slot(q.kick_fd),
        "call": fd_slot(q.call_fd),
        "err": fd_slot(q.err_fd),
        "memory": [[*r, fd_slot(fd)] for r, fd in zip(regions, region_fds, strict=True)],
        "device": device_spec,
        "device_fds": [fd_slot(fd) for fd in device_fds],
        "log": None,
        "inflight": None,
        "tracker": None,
    }
    if q.dirty_log is not None:
        dl = q.dirty_log
        spec["log"] = {"fd": fd_slot(dl.fd), "size": dl.size, "offset": dl.offset}
    if q.inflight is not None and inflight is not None:
        spec["inflight"] = {"fd": fd_slot(inflight.fd), "args": list(inflight.args)}
    if tracker is not None:
        page_size, ranges = tracker.params()
        spec["tracker"] = {"page_size": page_size, "ranges": ranges}
    return spec, fds


class RingWork:
    """A ring served in this (worker) process. Adopts every fd in ``fds``."""

    def __init__(self, spec: Spec, fds: list[int], watcher: FdWatcher,
                 make_device: Callable[[Spec, list[int]], Any]) -> None:
        self.watcher = watcher
        self.memory = GuestMemory()
        self.device: Any = None
        self.log: DirtyLog | None = None
        self.inflight: InflightRegion | None = None
        self.kick_fd: int | None = None
        state = spec["ring"]
        rings = [spec["kick"], spec["call"], spec["err"]]
        adopted = {s for s in rings if s is not None} | set(spec["device_fds"])
        q = SplitVirtqueue(state["index"], handler=_no_handler, name=state["name"])
        try:
            # Mappings keep duplicates of their fds; the copies sent are closed below.
            for gpa, size, qva, offset, slot in spec["memory"]:
                self.memory.add(fds[slot], gpa, size, qva, offset)
            if spec["log"] is not None:
                lg = spec["log"]
                self.log = DirtyLog(fds[lg["fd"]], lg["size"], lg["offset"])
            set_layout(q, bool(state["packed"]))
            if spec["inflight"] is not None:
                inf = spec["inflight"]
                self.inflight = InflightRegion(fds[inf["fd"]], *inf["args"])
                q.inflight = self.inflight.queues[state["index"]]
            q.set_features(bool(state["event_idx"]), bool(state["indirect"]))
            q.dirty_log = self.log
            if spec["tracker"] is not None:
                t = spec["tracker"]
                q.tracker = WriteTracker(t["page_size"], [tuple(r) for r in t["ranges"]])
            q.import_state(state, self.memory)
        except Exception:
            self._close_mappings()
            close_fds(fds)
            raise
        close_fds([fd for i, fd in enumerate(fds) if i not in adopted])
        q.kick_fd, q.call_fd, q.err_fd = (fds[s] if s is not None else None for s in rings)
        try:
            self.device = make_device(spec["device"], [fds[s] for s in spec["device_fds"]])
        except Exception:
            # The other fds were closed above or belong to the ring now.
            close_fds([fds[s] for s in spec["device_fds"]])
            self._close_ring(q)
            raise
        q.handler = self.device.make_handler(q)
        self.q = q
        self.kick_fd = q.kick_fd
        if self.kick_fd is not None:
            os.set_blocking(self.kick_fd, False)
            # Kicks that came while the ring was in transit are still counted in the
            # eventfd, so the loop sees them at once.
            watcher.add_reader(self.kick_fd, self._kicked)
            try:
                q.start_batching(watcher)
            except OSError:
                pass  # no kick batching: a kick for every request
            # With kick batching the driver may have added chains without a kick.
            q.process()

    def _kicked(self) -> None:
        fd = self.kick_fd
        assert fd is not None
        try:
            self.q.kicks += os.eventfd_read(fd)
        except BlockingIOError:
            pass
        except OSError as e:
            self.watcher.remove_reader(fd)
            self.q.fail(f"cannot read the kick eventfd: {e.strerror}")
            return
        self.q.process()

    def recall(self) -> Spec:
        """Stop serving: publish what is complete and describe the ring at rest."""
        q = self.q
        q.stop_batching()
        if self.kick_fd is not None:
            self.watcher.remove_reader(self.kick_fd)
        drain = getattr(self.device, "drain", None)
        if drain is not None:
            drain()  # requests its storage still runs complete before the ring leaves
        if q.started and not q.broken:
            q._publish()
        state = q.export_state()
        out: Spec = {"ring": state, "log_marked": self.log.marked if self.log else 0,
                     "tracker": None}
        if q.tracker is not None:
            out["tracker"] = {"bitmaps": [b.hex() for b in q.tracker.bitmaps()],
                              "marked": q.tracker.marked}
        self._close_ring(q)
        return out

    def _close_ring(self, q: SplitVirtqueue) -> None:
        close_fds([fd for fd in (q.kick_fd, q.call_fd, q.err_fd) if fd is not None])
        q.kick_fd = q.call_fd = q.err_fd = None
        q.started = False
        q.detach_memory()
        q.inflight = None
        self._close_mappings()

    def _close_mappings(self) -> None:
        self.memory.clear()
        if self.log is not None:
            self.log.close()
            self.log = None
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        if self.device is not None:
            self.device.close()
            self.device = None


def _no_handler(head: int, readable: list[memoryview], writable: list[memoryview]) -> int:
    raise RuntimeError("ring has no handler")
