"""Checks on a front end's memory fds before they are mapped.

A mapping of a file that later shrinks faults (SIGBUS) on the first access past the
new end, and a SIGBUS in a Python process cannot be turned into an error: the
interpreter's handler returns to the faulting copy, which faults again. The process
dies, with every device it serves. So the defence is before the mapping:

- the fd must be a regular file (memfd, tmpfs, hugetlbfs) at least as large as the
  mapping (``fstat``), or the first access past its end would fault at once;
- it must carry ``F_SEAL_SHRINK`` (``F_GET_SEALS``), so nobody, the front end
  included, can shrink it later. QEMU's ``memory-backend-memfd`` (``seal=on`` by
  default) and its dirty log carry it; vhostd seals the inflight regions it creates.

Unsealed memory (``memory-backend-file``, a memfd made without sealing) is refused
unless the operator allows it (``--allow-unsealed-memory``, environment variable
:data:`ALLOW_UNSEALED_ENV` for worker processes): then a front end that shrinks its
own memory takes the whole daemon down, and that is the operator's choice.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat

log = logging.getLogger(__name__)

ALLOW_UNSEALED_ENV = "VHOSTD_ALLOW_UNSEALED_MEMORY"
# Seals vhostd puts on the memfds it creates (the inflight region).
OWN_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class UnsafeMemory(ValueError):
    """A memory fd that could fault (SIGBUS) once mapped."""


def unsealed_allowed() -> bool:
    return os.environ.get(ALLOW_UNSEALED_ENV, "") not in ("", "0")


def seals(fd: int) -> int | None:
    """The fd's seals, or None for a file that cannot carry any."""
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return None


def check_mappable(fd: int, end: int, what: str) -> None:
    """Raise :class:`UnsafeMemory` unless mapping bytes [0, ``end``) of ``fd`` is safe
    from SIGBUS for as long as the mapping lives."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise UnsafeMemory(f"{what}: cannot fstat the fd: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeMemory(f"{what}: the fd is not a regular file (mode {st.st_mode:#o})")
    if st.st_size < end:
        raise UnsafeMemory(f"{what}: the fd has {st.st_size} bytes, the mapping needs {end}")
    s = seals(fd)
    if s is not None and s & fcntl.F_SEAL_SHRINK:
        return
    if unsealed_allowed():
        log.warning("%s: the fd is not sealed against shrinking; mapped anyway "
                    "(--allow-unsealed-memory): shrinking it would crash vhostd", what)
        return
    raise UnsafeMemory(
        f"{what}: the fd is not sealed against shrinking (F_SEAL_SHRINK), so the front end "
        f"could truncate it and crash vhostd; use a sealed memfd (QEMU: "
        f"memory-backend-memfd, seal=on is its default) or start vhostd with "
        f"--allow-unsealed-memory")


def sealed_memfd(name: str, size: int) -> int:
    """A new memfd of ``size`` bytes that can neither shrink nor grow."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, OWN_SEALS)
    except OSError:
        os.close(fd)
        raise
    return fd
