"""NBD servers for tests and the demo: qemu-nbd or nbdkit on a unix socket.

A server can be killed and started again on the same socket, which is how the
reconnect tests take storage away from a running member and give it back.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from testbed.unixsock import accepts

NBD_PROGRAMS = ("qemu-nbd", "nbdkit")


class NbdServer:
    """nbdkit or qemu-nbd on a unix socket, restartable on the same socket."""

    def __init__(self, argv: list[str], sock: Path, log: Path | None = None) -> None:
        self.argv = argv
        self.sock = sock
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.start()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    @property
    def name(self) -> str:
        return Path(self.argv[0]).name

    def start(self) -> None:
        if self.sock.exists():
            self.sock.unlink()
        if self._log is not None:
            self._log.close()
        # Appended to across restarts, so one file tells the whole story.
        self._log = open(self.log, "ab") if self.log is not None else None  # noqa: SIM115
        out = self._log if self._log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.argv, stdout=out, stderr=out)
        deadline = time.monotonic() + 10
        while not accepts(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.argv[0]} did not start: {' '.join(self.argv)}")
            time.sleep(0.01)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> str:
        """How the server ended, for a person: "exit 1", "signal 11", or "running"."""
        rc = self.proc.poll() if self.proc is not None else None
        if rc is None:
            return "running"
        return f"signal {-rc}" if rc < 0 else f"exit {rc}"

    def log_tail(self, lines: int = 20) -> str:
        if self.log is None or not self.log.exists():
            return "(no log)"
        if self._log is not None:
            self._log.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL: the server vanishes without a word to its clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)


def nbd_argv(program: str, sock: Path, *args: str) -> list[str]:
    """The command line of an NBD server on ``sock``; ``args`` name what it serves
    (qemu-nbd: an image file; nbdkit: a plugin and its parameters)."""
    if program == "nbdkit":
        # -f: foreground, so the test owns the process.
        return ["nbdkit", "-f", "-U", str(sock), *args]
    if program == "qemu-nbd":
        # --persistent: clients may come and go (reconnects); --shared: several clients
        # at once (one connection per queue, two daemons on one export).
        return ["qemu-nbd", "-k", str(sock), "--persistent", "--shared=8", "-f", "raw", *args]
    raise ValueError(f"unknown NBD server {program!r}")


def serve_file(program: str, image: Path, sock: Path, log: Path | None = None,
               nbdkit_filters: Sequence[str] = ()) -> NbdServer:
    """An NBD export of one image file (a raw image, writable). ``nbdkit_filters``:
    filters with their parameters, e.g. ``["delay", "wdelay=5ms"]`` (nbdkit only)."""
    if shutil.which(program) is None:
        raise FileNotFoundError(f"{program} is not installed (./scripts/install-deps "
                                "installs it)")
    if nbdkit_filters and program != "nbdkit":
        raise ValueError("filters are nbdkit's")
    if program == "nbdkit":
        names = [f"--filter={f}" for f in nbdkit_filters if "=" not in f]
        params = [f for f in nbdkit_filters if "=" in f]
        args: tuple[str, ...] = (*names, "file", str(image), *params)
    else:
        args = (str(image),)
    return NbdServer(nbd_argv(program, sock, *args), sock, log)
