"""Ring placement: which process serves each ring of a device, and moving rings.

With queue workers (``vhostd --queue-workers``), a device's request rings are dealt to
worker processes; the main process keeps vhost-user, the admin queue and every ring not
dealt out. A ring is served by one process at a time and moves only at rest
(``vhostd/engine/worker_ring.py``).

A control operation that reads or changes ring state (the ``rings`` column of the
protocol core's ``RULES``, an owner command) *holds* the rings it touches: held rings
are in the main process for the duration. :meth:`RingPlacement.hold` calls back the
rings a worker serves and returns a :class:`~vhostd.core.pending.Pending` that resolves
once they are home (or None if they already are); nothing blocks, and the worker keeps
serving every other ring meanwhile. :meth:`RingPlacement.release` ends the hold, and
every ready ring whose worker is waiting for it leaves again.

The worker side of the channel is the shell's (``vhostd/shell/worker.py``); here a
worker is the :class:`Worker` protocol, whose calls answer through callbacks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from ..core.pending import Pending, all_of
from ..engine.loop import Loop
from ..engine.virtqueue import SplitVirtqueue
from ..engine.worker_ring import Spec, ring_stats

log = logging.getLogger(__name__)


class WorkerError(Exception):
    """A worker could not take, give back or report a ring (it died, or refused)."""


class Worker(Protocol):
    """A process that serves rings on the main process's behalf. Every call returns at
    once and answers later, on the main process's loop, through its callback."""

    name: str

    def run(self, key: str, spec: Spec, fds: list[int],
            done: Callable[[str | None], None]) -> None:
        """Serve the ring ``spec`` describes (``fds`` stay the caller's); ``done(None)``
        once it does, ``done(error)`` if it refused."""

    def recall(self, keys: list[str],
               done: Callable[[dict[str, Spec] | None, str | None], None]) -> None:
        """Stop serving these rings; ``done(states, None)`` once they are at rest, with
        each ring's final state (:meth:`WorkerRing.recall`), or ``done(None, error)``."""

    def stats(self, keys: list[str],
              done: Callable[[dict[str, Spec] | None, str | None], None]) -> None:
        """The rings' counters, read while they run."""


class RingSource(Protocol):
    """What placement needs of the device whose rings it places (the message handler)."""

    name: str
    queues: list[SplitVirtqueue]
    paused: bool

    def ring_spec(self, q: SplitVirtqueue) -> tuple[Spec, list[int]]: ...
    def ring_returned(self, q: SplitVirtqueue, back: Spec) -> None: ...
    def ring_lost(self, q: SplitVirtqueue, why: str) -> None: ...
    def device_stats(self, q: SplitVirtqueue) -> Spec: ...


class RingPlacement:
    """Where each ring of one device is served."""

    def __init__(self, source: RingSource, loop: Loop) -> None:
        self.source = source
        self.loop = loop
        n = len(source.queues)
        self.workers: list[Worker | None] = [None] * n  # who serves ring i when it can
        self._in_worker = [False] * n  # sent to its worker (or on the way)
        self._returning: list[Pending[None] | None] = [None] * n
        self._holds = [0] * n
        self._watching: dict[int, int] = {}  # ring index -> kick fd watched here
        self._idle_wait: set[int] = set()  # rings to send once their requests complete
        self._home = False  # every ring served here for now (keep_home)

    def assign(self, workers: list[Worker | None]) -> None:
        """Let ``workers[i]`` serve ring i (None: the main process). Before any front
        end connects."""
        if len(workers) != len(self.workers):
            raise ValueError(f"{len(workers)} workers for {len(self.workers)} queues")
        self.workers = list(workers)

    def where(self, index: int) -> str | None:
        """The name of the worker serving ring ``index`` now, or None (here)."""
        w = self.workers[index]
        return w.name if w is not None and self._in_worker[index] else None

    def served_here(self, index: int) -> bool:
        """Whether this process serves ring ``index`` (rather than its worker)."""
        return self.workers[index] is None or (self._home and not self._in_worker[index])

    def keep_home(self, on: bool, why: str) -> None:
        """While on, this process serves every ring: rings in workers are called back
        (they go on there until they arrive) and none leaves until it is turned off."""
        if on == self._home:
            return
        self._home = on
        if not any(self.workers):
            return
        if not on:
            log.info("%s: %s ended; rings go back to their queue workers", self.source.name,
                     why)
            self.settle()
            return
        log.info("%s: %s: this process serves every ring until it ends", self.source.name,
                 why)
        everything = range(len(self.workers))
        arrived = self.hold(everything)
        if arrived is None:
            self.release(everything)
        else:
            arrived.then(lambda _: self.release(everything))

    # ---- holding rings home ------------------------------------------------------
    def hold(self, indices: Iterable[int]) -> Pending[None] | None:
        """Keep these rings in this process until :meth:`release`; a Pending that
        resolves once they are all home, or None if they already are."""
        indices = list(indices)
        for i in indices:
            self._holds[i] += 1
        calls: dict[int, tuple[Worker, list[int]]] = {}
        for i in indices:
            worker = self.workers[i]
            if self._in_worker[i] and self._returning[i] is None and worker is not None:
                self._returning[i] = Pending()
                calls.setdefault(id(worker), (worker, []))[1].append(i)
        for worker, rings in calls.values():
            self._recall(worker, rings)
        return all_of(self._returning[i] for i in indices)

    def release(self, indices: Iterable[int]) -> None:
        for i in indices:
            self._holds[i] -= 1
        self.settle()

    def held(self, index: int) -> bool:
        return self._holds[index] > 0

    def _key(self, index: int) -> str:
        return f"{self.source.name}/{index}"

    def _recall(self, worker: Worker, indices: list[int]) -> None:
        keys = [self._key(i) for i in indices]

        def done(states: dict[str, Spec] | None, error: str | None) -> None:
            for i in indices:
                back = states.get(self._key(i)) if states is not None else None
                q = self.source.queues[i]
                self._in_worker[i] = False
                if back is not None:
                    self.source.ring_returned(q, back)
                elif self.workers[i] is worker:  # not already handled as a dead worker
                    self._lose(i, error or "it no longer had the ring")
                pending, self._returning[i] = self._returning[i], None
                if pending is not None:
                    pending.resolve(None)
            self.settle()

        worker.recall(keys, done)

    # ---- sending rings out ---------------------------------------------------------
    def settle(self) -> None:
        """Send every ready ring whose worker waits for it, unless held; and watch the
        kicks of the rings this process serves."""
        paused = self.source.paused
        for q in self.source.queues:
            i = q.index
            worker = self.workers[i]
            if (worker is not None and not paused and not self._home and not self._holds[i]
                    and not self._in_worker[i] and q.ready and q.kick_fd is not None):
                if q.outstanding:
                    # A ring moves at rest: requests it took here complete here first.
                    if i not in self._idle_wait:
                        self._idle_wait.add(i)
                        q.when_idle(lambda i=i: self._idle_then_settle(i))
                else:
                    self._send(worker, q)
            self.update_watch(q)

    def _idle_then_settle(self, index: int) -> None:
        self._idle_wait.discard(index)
        self.settle()

    def _send(self, worker: Worker, q: SplitVirtqueue) -> None:
        i = q.index
        refused: list[str] = []
        sent = False

        def done(error: str | None) -> None:
            if error is None:
                return
            if not sent:
                refused.append(error)  # answered before run() returned
            elif self._in_worker[i] and self._returning[i] is None:
                # Refused: this process serves the ring from now on.
                self._in_worker[i] = False
                self._lose(i, error)

        try:
            spec, fds = self.source.ring_spec(q)
            worker.run(self._key(i), spec, fds, done)
        except Exception as e:
            log.exception("%s: cannot hand the ring to worker %s", q.name, worker.name)
            refused.append(f"cannot send it the ring: {e}")
        sent = True
        if refused:
            self._lose(i, refused[0])
            return
        self._in_worker[i] = True
        self.update_watch(q)

    # ---- losing a worker ------------------------------------------------------------
    def worker_died(self, worker: Worker) -> None:
        """A worker exited: every ring it served (or was to serve) is served here from
        now on, picked up as after a back-end restart."""
        for i, w in enumerate(self.workers):
            if w is not worker:
                continue
            was_in_worker = self._in_worker[i]
            self._in_worker[i] = False
            self._lose(i, "it exited")
            pending, self._returning[i] = self._returning[i], None
            if pending is not None:
                pending.resolve(None)
            elif not was_in_worker:
                self.update_watch(self.source.queues[i])
        self.settle()

    def _lose(self, index: int, why: str) -> None:
        worker = self.workers[index]
        self.workers[index] = None
        q = self.source.queues[index]
        log.error("%s: worker %s failed (%s); this process serves the ring from now on",
                  q.name, worker.name if worker is not None else "?", why)
        self.source.ring_lost(q, why)
        self.update_watch(q)

    # ---- kicks ------------------------------------------------------------------------
    def update_watch(self, q: SplitVirtqueue) -> None:
        """Watch ``q``'s kick eventfd here exactly when this process serves the ring and
        the device is not paused by its owner. Kicks for a ring a worker serves (also
        while it is held home for a moment), or for a paused device, wait in the
        eventfd: a paused member must not read them, since the same eventfd may drive
        the member its owner moves the ring to."""
        i = q.index
        want = (q.kick_fd if q.kick_fd is not None and self.served_here(i)
                and not self.source.paused else None)
        watched = self._watching.get(i)
        if watched == want:
            return
        if watched is not None:
            self.loop.remove_reader(watched)
            del self._watching[i]
            q.stop_batching()
        if want is not None:
            self.loop.add_reader(want, self._kicked, q, want)
            self._watching[i] = want
            # Kick batching's fallback look at the ring: only the process that serves
            # the ring may take it.
            try:
                q.start_batching(self.loop)
            except OSError as e:
                log.warning("%s: no timer (%s); a kick for every request", q.name, e)

    def _kicked(self, q: SplitVirtqueue, fd: int) -> None:
        if not q.kicked(fd):
            self.loop.remove_reader(fd)
            self._watching.pop(q.index, None)

    def forget_watch(self, q: SplitVirtqueue) -> None:
        """Stop watching ``q``'s kick fd before it is closed."""
        fd = self._watching.pop(q.index, None)
        if fd is not None:
            self.loop.remove_reader(fd)
            q.stop_batching()

    # ---- statistics ------------------------------------------------------------------
    def stats(self) -> list[Spec] | Pending[list[Spec]]:
        """Every ring's counters, read where it runs, without stopping or moving it.

        Each ring: the ring's own counters (``requests``, ``kicks``, ``outstanding``, a
        ``line`` for a person), ``where`` (the worker serving it, or None), ``live``
        (False if its worker did not answer: the numbers are this process's last), and
        the device's request statistics in two halves: ``device_here`` (counted in this
        process, also for the ring's earlier stays) and ``device_there`` (counted by the
        worker since the ring went there; None for a ring served here)."""
        out: list[Spec] = []
        asks: dict[int, tuple[Worker, list[int]]] = {}
        waits: list[Pending[None]] = []
        for q in self.source.queues:
            i = q.index
            worker = self.workers[i]
            out.append(self._home_stats(q))
            returning = self._returning[i]
            if returning is not None:
                # Coming home: read it here once it arrived with its worker's counts.
                p: Pending[None] = Pending()
                returning.then(lambda _, q=q, p=p: (out.__setitem__(q.index,
                                                                  self._home_stats(q)),
                                                  p.resolve(None)))
                waits.append(p)
            elif worker is not None and self._in_worker[i]:
                asks.setdefault(id(worker), (worker, []))[1].append(i)
        for worker, indices in asks.values():
            p = Pending()
            waits.append(p)
            worker.stats([self._key(i) for i in indices],
                         _stats_done(self, worker, indices, out, p))
        combined = all_of(waits)
        return out if combined is None else combined.map(lambda _: out)

    def _home_stats(self, q: SplitVirtqueue) -> Spec:
        here = ring_stats(q, None)
        here.update(where=None, live=True, device_here=self.source.device_stats(q),
                    device_there=None)
        return here


def _stats_done(placement: RingPlacement, worker: Worker, indices: list[int],
                out: list[Spec], p: Pending[None]
                ) -> Callable[[dict[str, Spec] | None, str | None], None]:
    def done(states: dict[str, Spec] | None, error: str | None) -> None:
        for i in indices:
            out[i]["where"] = worker.name
            live = states.get(placement._key(i)) if states is not None else None
            if live is None:
                out[i]["live"] = False  # the worker did not answer: last known numbers
                continue
            device = live.pop("device", None)
            out[i].update(live)  # the ring's own counters travel with it: totals
            out[i]["device_there"] = device
        p.resolve(None)

    return done
