"""Helpers of the storage backend tests: a small event loop, completions, NBD servers
(testbed.nbd, shared with the end-to-end tests and the demo)."""

from __future__ import annotations

import select
import time
from collections.abc import Callable
from typing import Any

from testbed.nbd import NbdServer

__all__ = ["Completions", "Loop", "NbdServer"]


class Loop:
    """A minimal FdWatcher with a bounded run (the storage backends' completions)."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.readers: dict[int, tuple[Callable[..., Any], tuple[Any, ...]]] = {}

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

    def run_until(self, done: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("storage did not complete in time")
            for fd, _ in self.epoll.poll(min(left, 0.05)):
                entry = self.readers.get(fd)
                if entry is not None:
                    entry[0](*entry[1])


class Completions:
    """Records ``on_complete`` calls."""

    def __init__(self) -> None:
        self.done: dict[Any, int] = {}

    def __call__(self, token: Any, error: int) -> None:
        assert token not in self.done, f"token {token} completed twice"
        self.done[token] = error
