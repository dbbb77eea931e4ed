"""The storage contract: what a device may ask of a storage backend, and the return
values (see the package docstring)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ..engine.loop import FdWatcher

DONE = 0
PENDING = 1

Completion = Callable[[Any, int], None]


class StorageBackend(Protocol):
    """What a block device needs of its storage."""

    read_only: bool
    on_complete: Completion
    # A backend that reports several completions in one loop turn (NBD: every reply
    # one read of the socket brought; files: one drain of the thread pool or of the
    # io_uring completion queue) may say so with ``batches_completions = True``:
    # after each run of ``on_complete`` calls it then calls ``on_batch_done()`` once,
    # before it returns to the loop, and the device publishes the run's used entries
    # and signals the driver once. Without it, every completion is published alone.
    # batches_completions: bool  (optional, False when absent)
    # on_batch_done: Callable[[], None]
    #
    # A backend that queues submissions may also offer ``walk_begin()`` and
    # ``walk_end()``: the device has each virtqueue walk call them around the requests
    # it takes, and the backend submits the walk's requests together at its end.

    def size(self) -> int:
        """The store's size in bytes, as last learnt (never a network round trip)."""

    def start(self, watcher: FdWatcher) -> None:
        """Run the completion machinery on this process's loop. Before it, every
        operation completes inline, blocking if it must (tools and tests)."""

    def readv(self, iov: list[memoryview], offset: int, token: Any) -> int: ...
    def writev(self, iov: list[memoryview], offset: int, token: Any) -> int: ...
    def flush(self, token: Any) -> int: ...
    def discard(self, offset: int, length: int, token: Any) -> int: ...
    def write_zeroes(self, offset: int, length: int, unmap: bool, token: Any) -> int: ...

    def poll(self, timeout: float) -> None:
        """Block up to ``timeout`` seconds for completions and report them (for a
        ring that must come to rest at once, while the loop waits anyway)."""

    def in_flight(self) -> int:
        """Operations submitted and not yet completed."""

    def state(self) -> str:
        """One line on where operations are now (the log names it beside a request the
        storage has held for long)."""

    def refresh_size(self, done: Callable[[int], None]) -> None:
        """Learn the size again (SIGHUP); ``done(error)`` follows, perhaps inline."""

    def worker_spec(self) -> tuple[dict[str, Any], list[int]]:
        """What a queue worker needs to build its own backend on the same store (the
        fds stay the caller's)."""

    def close(self) -> None:
        """Release the store. Operations still in flight are abandoned: their
        completions are never reported (the device drains its queues first)."""


def ignore_completion(token: Any, error: int) -> None:
    """The completion callback before a device installs its own."""


def ignore_batch_done() -> None:
    """The end-of-batch callback before a device installs its own."""
