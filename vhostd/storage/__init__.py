"""Storage backends: where a block device's data lives (an image file, an NBD export).

A storage backend ("backend" alone means the vhost-user back end) serves vectored
reads and writes between guest memory and its store. Every operation either finishes
inline, when that cannot block the event loop (a page-cache hit), or is handed to
machinery that completes it later (a thread pool, an NBD connection) and reports the
completion *on the loop thread of the process serving the queue* through one callback
the device installs once, ``on_complete(token, error)``, ``error`` being 0 or a
positive errno. The device picks the tokens; the backend only carries them.

Return values of the operations: :data:`DONE` (finished inline), :data:`PENDING`
(``on_complete`` follows), or an ``OSError`` raised (failed inline).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ..engine.timer import FdWatcher

DONE = 0
PENDING = 1

Completion = Callable[[Any, int], None]


class StorageBackend(Protocol):
    """What a block device needs of its storage."""

    read_only: bool
    on_complete: Completion

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

    def refresh_size(self, done: Callable[[int], None]) -> None:
        """Learn the size again (SIGHUP); ``done(error)`` follows, perhaps inline."""

    def offload_spec(self) -> tuple[dict[str, Any], list[int]]:
        """What a queue worker needs to build its own backend on the same store (the
        fds stay the caller's)."""

    def close(self) -> None:
        """Release the store. Operations still in flight are abandoned: their
        completions are never reported (the device drains its queues first)."""


def storage_from_spec(spec: dict[str, Any], fds: list[int]) -> StorageBackend:
    """The worker side of :meth:`StorageBackend.offload_spec`; adopts ``fds``."""
    kind = spec.get("kind")
    if kind == "file":
        from .file import FileStorage
        return FileStorage.from_spec(spec, fds)
    if kind == "nbd":
        from .nbd import NbdStorage
        return NbdStorage.from_spec(spec, fds)
    raise ValueError(f"unknown storage kind {kind!r}")


def ignore_completion(token: Any, error: int) -> None:
    """The completion callback before a device installs its own."""
