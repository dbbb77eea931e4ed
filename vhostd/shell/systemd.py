"""systemd integration without libsystemd: socket activation and readiness notification.

Socket activation (sd_listen_fds(3)): a socket unit's listening sockets arrive as fds 3,
4, ... with ``LISTEN_FDS`` (how many), ``LISTEN_PID`` (which process they are meant for)
and optionally ``LISTEN_FDNAMES`` (colon-separated names). The variables are removed
once read, so queue workers and anything else vhostd starts do not take them for theirs.

Readiness (sd_notify(3)): ``READY=1``, ``STATUS=...`` and ``STOPPING=1`` go as single
datagrams to the unix socket named by ``NOTIFY_SOCKET`` (a leading ``@`` means the
abstract namespace). The socket is non-blocking: a notification that cannot be sent at
once is dropped with a warning, so the event loop never waits for the service manager.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

log = logging.getLogger("vhostd.systemd")

SD_LISTEN_FDS_START = 3
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(Exception):
    """The activation variables are set but make no sense; the message says why."""


@dataclass
class ListenFds:
    """The sockets a service manager passed: fd numbers and their names ('' if unnamed)."""

    fds: list[int]
    names: list[str]

    def describe(self) -> str:
        return ", ".join(f"fd {fd}" + (f" ({name})" if name else "")
                         for fd, name in zip(self.fds, self.names, strict=True))


def listen_fds(environ: dict[str, str] | None = None) -> ListenFds | None:
    """The sockets passed to this process, or None when there are none for it.

    Reads and removes ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` from
    ``environ`` (default: ``os.environ``) and marks the fds close-on-exec, as
    sd_listen_fds(3) does. Variables meant for another process (``LISTEN_PID`` is not
    ours) are removed too and count as none.
    """
    env = os.environ if environ is None else environ
    pid_text = env.get("LISTEN_PID")
    count_text = env.get("LISTEN_FDS")
    names_text = env.get("LISTEN_FDNAMES")
    for name in _LISTEN_VARS:
        env.pop(name, None)
    if count_text is None:
        return None
    if pid_text is None:
        raise ActivationError("LISTEN_FDS is set but LISTEN_PID is not")
    try:
        pid = int(pid_text)
        count = int(count_text)
    except ValueError:
        raise ActivationError(
            f"LISTEN_PID={pid_text!r} LISTEN_FDS={count_text!r} are not numbers") from None
    if pid != os.getpid():
        log.info("ignoring LISTEN_FDS meant for pid %d", pid)
        return None
    if count <= 0:
        return None
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    names = names_text.split(":") if names_text else []
    if names and len(names) != count:
        raise ActivationError(
            f"LISTEN_FDNAMES names {len(names)} socket(s) but LISTEN_FDS={count}")
    names = names or [""] * count
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError as e:
            raise ActivationError(f"LISTEN_FDS={count} but fd {fd} is not open "
                                  f"({e.strerror})") from e
    return ListenFds(fds, names)


def _address(value: str) -> str | bytes:
    # '@name' is Linux's abstract namespace: a leading NUL byte and no file.
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


class Notifier:
    """sd_notify: tells the service manager about readiness and state (no-op if unset)."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self.sock: socket.socket | None = None
        if address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.sock.setblocking(False)

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> Notifier:
        """Takes ``NOTIFY_SOCKET`` out of the environment: only this process notifies."""
        env = os.environ if environ is None else environ
        return cls(env.pop("NOTIFY_SOCKET", None) or None)

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines in one datagram; True if it was sent."""
        if self.sock is None or self.address is None:
            return False
        text = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self.sock.sendto(text.encode(), _address(self.address))
        except OSError as e:
            log.warning("cannot notify the service manager at %s: %s", self.address,
                        e.strerror or e)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.notify(STATUS=status)

    def stopping(self, status: str = "shutting down") -> bool:
        return self.notify(STOPPING=1, STATUS=status)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
