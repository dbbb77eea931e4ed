"""Shared pieces of the fuzz targets: input counters, guest RAM, blk back ends."""

from __future__ import annotations

import gc
import logging
import mmap
import os
import tempfile
from collections import defaultdict

from vhostd.devices.blk import BlkDevice, BlkOptions
from vhostd.engine.loop import Loop
from vhostd.engine.memory import GuestMemory
from vhostd.engine.seals import sealed_memfd
from vhostd.storage.file import FileStorage
from vhostd.vhost_user.handler import VhostUserHandler

# target -> [examples, inputs]; an input is one message, ring walk or admin command.
INPUTS: dict[str, list[int]] = defaultdict(lambda: [0, 0])

RAM_SIZE = 1 << 20  # one region, GPA 0
QVA_BASE = 0x7F00_0000_0000


def count(target: str, inputs: int = 1) -> None:
    entry = INPUTS[target]
    entry[0] += 1
    entry[1] += inputs


def open_fds(collect: bool = False) -> dict[int, str]:
    """The process's open fds and what they are; with ``collect``, after a garbage
    collection (a mapping pinned only by a reference cycle, such as an exception's
    traceback holding a frame that held a view of guest memory, keeps its fd until
    the collector runs; a full collection per example would cost more than the
    example)."""
    if collect:
        gc.collect()
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the listing's own fd
    return out


class Ram:
    """Guest RAM as a front end shares it: one sealed memfd, mapped here for writing and
    in an engine :class:`GuestMemory` for the back end's side."""

    def __init__(self, size: int = RAM_SIZE) -> None:
        self.size = size
        self.fd = sealed_memfd("vhostd-fuzz-ram", size)
        self.mm = mmap.mmap(self.fd, size)
        self.memory = GuestMemory()
        self.memory.add(self.fd, 0, size, QVA_BASE, 0)

    def write(self, gpa: int, data: bytes) -> None:
        gpa %= self.size
        n = min(len(data), self.size - gpa)
        self.mm[gpa:gpa + n] = data[:n]

    def clear(self) -> None:
        self.mm[:] = bytes(self.size)

    def close(self) -> None:
        self.memory.clear()
        self.mm.close()
        os.close(self.fd)


def blk_backend(watcher: Loop, name: str = "fuzz0", num_queues: int = 2,
                queue_size: int = 64, image_size: int = 1 << 20) -> VhostUserHandler:
    fd, path = tempfile.mkstemp(prefix="vhostd-fuzz-", suffix=".img")
    os.ftruncate(fd, image_size)
    os.close(fd)
    try:
        dev = BlkDevice(name, FileStorage(path),
                        BlkOptions(num_queues=num_queues, queue_size=queue_size))
    finally:
        os.unlink(path)  # the open file keeps it
    return VhostUserHandler(dev, watcher)


class TracebackCatcher(logging.Handler):
    """Keeps the log records that carry a traceback (an internal error the code caught
    and logged: a finding even though nothing was raised); drops every other line."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.found.append(f"{record.name}: {record.getMessage()}\n"
                              f"{logging.Formatter().formatException(record.exc_info)}")

    def check(self) -> None:
        found, self.found = self.found, []
        assert not found, "a traceback was logged:\n" + found[0]


CATCHER = TracebackCatcher()
