"""The slow path of file storage: blocking calls in a pool of threads.

``os.preadv``/``os.pwritev``/``os.fdatasync`` release the GIL, so threads can keep
many requests at the disk at once while the event loop goes on. A finished job is
appended to a deque and the loop is woken through an eventfd it watches, written only
when the loop is not already due to wake (one wake-up and one system call for a burst
of completions, not one each); the loop drains the whole deque per wake-up, reports
each completion on its own thread, then calls ``batch_end`` once (the device publishes
its used entries there, once per burst).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from ..engine.loop import FdWatcher
from .base import ignore_batch_done

log = logging.getLogger(__name__)

# Threads the pool may grow to: enough to keep a deep guest queue at the disk (the
# guest's QD32 and the device's queue size bound what is outstanding).
MAX_THREADS = 64

Job = Callable[[], None]  # raises OSError to fail


class ThreadPool:
    """Runs jobs in threads; ``report(token, error)`` is called on the loop thread."""

    def __init__(self, name: str, max_threads: int = MAX_THREADS) -> None:
        self.name = name
        self.max_threads = max_threads
        self._jobs: queue.SimpleQueue[tuple[Job, Any] | None] = queue.SimpleQueue()
        self._done: deque[tuple[Any, int]] = deque()
        self._threads: list[threading.Thread] = []
        self.pending = 0  # submitted, not yet reported
        self.report: Callable[[Any, int], None] | None = None
        self.batch_end: Callable[[], None] = ignore_batch_done
        # Set by a thread that woke the loop, cleared by the loop before it drains: a
        # thread that finds it set leaves the wake-up to the one that set it.
        self._signalled = False
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._watcher: FdWatcher | None = None

    def start(self, watcher: FdWatcher, report: Callable[[Any, int], None]) -> None:
        self.report = report
        self._watcher = watcher
        watcher.add_reader(self._efd, self._drain)

    def submit(self, job: Job, token: Any) -> None:
        # Only the loop thread counts: a thread per outstanding job, up to the limit.
        self.pending += 1
        if self.pending > len(self._threads) and len(self._threads) < self.max_threads:
            self._grow()
        self._jobs.put((job, token))

    def _grow(self) -> None:
        t = threading.Thread(target=self._run, name=f"{self.name}-io{len(self._threads)}",
                             daemon=True)
        self._threads.append(t)
        t.start()

    def _run(self) -> None:
        jobs = self._jobs
        done = self._done
        efd = self._efd
        while True:
            item = jobs.get()
            if item is None:
                return
            job, token = item
            try:
                job()
                err = 0
            except OSError as e:
                err = e.errno or 5
            except Exception:
                log.exception("%s: storage job failed", self.name)
                err = 5  # EIO
            done.append((token, err))
            if not self._signalled:
                self._signalled = True
                try:
                    os.eventfd_write(efd, 1)
                except OSError:
                    pass  # closed at shutdown

    def _drain(self) -> None:
        # Consume the wake-up, then clear the flag: a job that ends after the flag is
        # cleared wakes the loop again, one that ended before is in the deque drained
        # below. (Clearing before the read could eat the wake-up of a job whose flag
        # stays set, and the next job would not signal.)
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        self._signalled = False
        done = self._done
        if not done:
            return
        report = self.report
        while done:
            token, err = done.popleft()
            self.pending -= 1
            report(token, err)  # type: ignore[misc]
        self.batch_end()

    def poll(self, timeout: float) -> None:
        """Block up to ``timeout`` seconds for completions and report them."""
        import select
        select.select([self._efd], [], [], timeout)
        self._drain()

    def close(self) -> None:
        """Stop the threads once their current jobs end (they are not waited for
        longer than a job takes)."""
        if self._watcher is not None:
            self._watcher.remove_reader(self._efd)
            self._watcher = None
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()
        self._threads = []
        os.close(self._efd)
