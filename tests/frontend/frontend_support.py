"""Helpers shared by the front-end tests: the qsd daemon, the back-end handle, I/O helpers."""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from testbed.unixsock import accepts
from vhostd.frontend.blk import BlkFrontend
from vhostd.frontend.client import VhostUserClient
from vhostd_proto.vhost_user import VHOST_USER_F_PROTOCOL_FEATURES

SECTOR = 512
MiB = 1 << 20
DISK_SIZE = 16 * MiB


class Qsd:
    """qemu-storage-daemon exporting ``image`` as vhost-user-blk on a unix socket."""

    def __init__(self, qsd: str, tmp_path: Path, image: Path, num_queues: int = 2) -> None:
        self.sock = tmp_path / "qsd.sock"
        self.log_path = tmp_path / "qsd.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [qsd,
             "--blockdev", f"driver=file,node-name=file0,filename={image}",
             "--blockdev", "driver=raw,node-name=disk0,file=file0",
             "--export", "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                         f"addr.path={self.sock},writable=on,num-queues={num_queues}"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 5
        while not accepts(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"qemu-storage-daemon did not start:\n{self.log}")
            time.sleep(0.005)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@dataclass
class Backend:
    """A running back end as the front-end tests see it."""

    kind: str  # "qsd" or "vhostd"
    sock: Path
    image: Path
    _log: Callable[[], str]
    device_id: bytes  # what GET_ID returns

    @property
    def log(self) -> str:
        return self._log()

    def image_bytes(self, sector: int, nbytes: int) -> bytes:
        with open(self.image, "rb") as f:
            f.seek(sector * SECTOR)
            return f.read(nbytes)


def rand(n: int) -> bytes:
    return os.urandom(n)


def collect(fe: BlkFrontend, queues: Iterable[int],
            timeout: float = 2.0) -> dict[int, tuple[int, bytes | None, int]]:
    """Kick ``queues`` and wait for all their requests: token -> (status, data, used_len)."""
    queues = list(queues)
    got: dict[int, tuple[int, bytes | None, int]] = {}
    deadline = time.monotonic() + timeout
    for q in queues:
        fe.kick(q)
    for q in queues:
        while fe.queues[q].inflight and time.monotonic() < deadline:
            for token, status, data, used_len in fe.complete(q, 0.5, with_len=True):
                got[token] = (status, data, used_len)
        assert not fe.queues[q].inflight, f"queue {q}: requests did not complete"
    return got


def drain(fe: BlkFrontend, queues: Iterable[int],
          timeout: float = 2.0) -> dict[int, tuple[int, bytes | None]]:
    """Kick and collect every in-flight request of ``queues``: token -> (status, data)."""
    return {t: (st, d) for t, (st, d, _) in collect(fe, queues, timeout).items()}


def readable(fd: int, timeout: float) -> bool:
    r, _, _ = select.select([fd], [], [], timeout)
    return bool(r)


def reconnect(fe: BlkFrontend, path: Path, bases: list[int] | None = None,
              bit30_in_features: bool = True) -> None:
    """What QEMU does after the back end went away (reference 6.3): a new connection,
    realize steps 1-9 (+ GET_CONFIG, harmless), then start; the front end keeps its guest
    memory, its rings and its inflight region, so start() sends SET_INFLIGHT_FD, not GET.

    ``bit30_in_features=False`` acts like QEMU < 7.2, which left bit 30 out of SET_FEATURES
    (so the back end enables rings itself and no SET_VRING_ENABLE follows).
    """
    fe.client.close()
    if fe.backend_sock is not None:
        fe.backend_sock.close()
        fe.backend_sock = None
    fe.client = VhostUserClient(path, timeout=fe.timeout)
    # The new back end has no memory table: QEMU's shadow table starts empty again.
    fe._sent_regions = []
    config = fe.config
    fe.realize()
    fe.config = config
    if not bit30_in_features:
        fe.offered_features &= ~(1 << VHOST_USER_F_PROTOCOL_FEATURES)
    fe.start(bases)
