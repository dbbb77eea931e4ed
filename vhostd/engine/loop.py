"""What the engine needs of an event loop, and of fds.

The main process runs asyncio (uvloop by default); a queue worker process runs a plain
epoll loop (``vhostd/shell/worker.py``). Both satisfy these protocols, so engine and
device code runs unchanged on either.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any, Protocol


class FdWatcher(Protocol):
    """Watch fds for reading (kick eventfds, timerfds, completion eventfds)."""

    def add_reader(self, fd: int, callback: Callable[..., Any], *args: Any) -> Any: ...
    def remove_reader(self, fd: int) -> Any: ...


class Loop(FdWatcher, Protocol):
    """An fd watcher that can also run a callback soon, outside the current one."""

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> Any: ...


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
