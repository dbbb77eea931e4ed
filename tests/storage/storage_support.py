"""Helpers of the storage backend tests: a small event loop, completions, NBD servers."""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


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


class NbdServer:
    """nbdkit or qemu-nbd on a unix socket, restartable on the same socket."""

    def __init__(self, argv: list[str], sock: Path) -> None:
        self.argv = argv
        self.sock = sock
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def start(self) -> None:
        if self.sock.exists():
            self.sock.unlink()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.argv[0]} did not start")
            time.sleep(0.01)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)
