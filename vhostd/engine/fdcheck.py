"""What kind of file a front end's fd is, before the engine relies on it."""

from __future__ import annotations

import os


def fd_kind(fd: int) -> str:
    """What /proc says the fd is: ``anon_inode:[eventfd]``, ``/memfd:name``, a path..."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        return f"unknown ({e.strerror})"


def is_eventfd(fd: int) -> bool:
    """Kick, call and error fds must be eventfds: anything else either cannot be
    watched by the event loop (a regular file, a directory, a memfd) or does not
    behave like a counter when read and written."""
    return fd_kind(fd) == "anon_inode:[eventfd]"
