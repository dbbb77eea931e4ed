"""Over the socket: a member whose NBD server stopped (SIGSTOP) holds requests at its
storage. The owner's stop of that member and the member's GET_VRING_BASE answer only
once those requests completed (and account for them), while the other member serves
I/O and the owner's admin queue answers other commands at once.

The daemon, its owner and both members are real (``vhostd`` fixture); the front ends
are the project's own (``vhostd/frontend``)."""

from __future__ import annotations

import os
import signal
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from storage_support import NbdServer

from vhostd.frontend.admin import SELF, AdminDriver
from vhostd.frontend.blk import BlkFrontend
from vhostd_proto.virtio_admin import AdminCmd as C
from vhostd_proto.virtio_admin import AdminStatus as S

pytest.importorskip("nbd")

SRIOV = 1
STOPPED = 1  # VIRTIO_ADMIN_CMD_DEV_MODE_F_STOPPED
GET_VRING_BASE = 0xB
HELD = 1.5  # how long the slow member's requests are kept at the stopped server
# "At once" on a shared 2-CPU machine: typically a few ms each; the slowest of the
# rounds must stay well below HELD (it would be HELD if it waited for the member).
PROMPT_MEDIAN = 0.1
PROMPT_WORST = HELD / 2
STUCK = 4  # requests left at the stopped server
TAKE = 0.2  # time for the daemon to take them from the ring and send them
# DEV_PARTS_METADATA_GET of an object that cannot exist: a member answers ENXIO.
PROBE = struct.pack("<H2xIB7x", 0, 0xFFFFFFFF, 0)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """unix sockets need short paths; pytest's tmp_path can be too long."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="vhostd-slow-") as d:
        yield Path(d)


class Admin:
    """The owner's admin queue with one command left running (``start``) while others
    are sent through AdminDriver. Completions are tapped as the driver reaps them, so
    the running command's is seen whichever wait reaps it."""

    def __init__(self, driver: AdminDriver) -> None:
        self.driver = driver
        self.done: dict[int, int] = {}
        reap = driver.vq.reap

        def tap() -> Any:
            out = list(reap())
            for head, used in out:
                self.done[head] = used
            return out

        driver.vq.reap = tap  # type: ignore[method-assign]
        self.cmd = driver.mem.alloc(64)
        self.res = driver.mem.alloc(64)

    def start(self, opcode: int, member: int, data: bytes) -> int:
        """Submit a command without waiting for it; its head."""
        d = self.driver
        cmd = struct.pack("<HH12xQ", opcode, SRIOV, member) + data
        d.mem.write(self.cmd, cmd)
        d.mem.fill(self.res, 8, 0xFF)
        head = d.vq.add([(self.cmd, len(cmd))], [(self.res, 8)])
        self.done.pop(head, None)  # an earlier command's, on the same descriptor
        d.vq.publish()
        d.vq.kick(force=True)
        return head

    def finished(self, head: int) -> bool:
        list(self.driver.vq.reap())
        return head in self.done

    def status(self) -> int:
        return struct.unpack("<H", self.driver.mem.read(self.res, 2))[0]


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"{what} not within {timeout} s"
        time.sleep(0.002)
    return time.monotonic() - t0


def stop_server(server: NbdServer) -> None:
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    stat = Path(f"/proc/{server.proc.pid}/stat")
    wait_for(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "T", "server stopped")


def others_answer(fast: BlkFrontend, admin: AdminDriver) -> None:
    """The other member's I/O and the owner's commands answer at once."""
    took: list[float] = []
    for i in range(10):
        t0 = time.monotonic()
        blob = os.urandom(4096)
        fast.write(8 * i, blob)
        assert fast.read(8 * i, 4096) == blob
        # Commands for the group and for member 2 (member 1's wait their turn).
        assert admin.command(C.VIRTIO_ADMIN_CMD_CAP_ID_LIST_QUERY, SELF, result_size=8)
        r = admin.submit(C.VIRTIO_ADMIN_CMD_DEV_PARTS_METADATA_GET, SRIOV, 2, PROBE, 8)
        assert r.status == S.VIRTIO_ADMIN_STATUS_ENXIO
        took.append(time.monotonic() - t0)
    took.sort()
    assert took[len(took) // 2] < PROMPT_MEDIAN and took[-1] < PROMPT_WORST, (
        f"the others waited: median {took[len(took) // 2] * 1000:.0f} ms, "
        f"worst {took[-1] * 1000:.0f} ms")


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_slow_member_waits_for_its_storage_and_nobody_waits_for_it(
        short_dir: Path, vhostd: Callable[..., Any], nbd_server: Callable[..., NbdServer],
        workers: str) -> None:
    slow_server = nbd_server("nbdkit", "memory", "16M")
    fast_server = nbd_server("nbdkit", "memory", "16M")
    m1, m2 = short_dir / "m1.sock", short_dir / "m2.sock"
    # With one queue worker, member 2's ring is served by the worker process (with its
    # own NBD connection) and member 1's by the main process.
    vhostd(f"--member=socket-path={m1},blk-nbd={slow_server.uri}",
           f"--member=socket-path={m2},blk-nbd={fast_server.uri}",
           f"--queue-workers={workers}", socket_path=short_dir / "o.sock")
    slow = BlkFrontend(str(m1), num_queues=1)
    fast = BlkFrontend(str(m2), num_queues=1)
    driver = AdminDriver(short_dir / "o.sock")
    admin = Admin(driver)
    vq = slow.queues[0].vq
    try:
        driver.activate()
        slow.write(0, os.urandom(4096))
        base = vq.used_idx()

        # 1. The owner stops member 1 while its requests are at the stopped server.
        stop_server(slow_server)
        try:
            stuck = [slow.submit_read(0, 8 * i, 4096) for i in range(STUCK)]
            slow.kick(0)
            time.sleep(TAKE)
            stop = admin.start(C.VIRTIO_ADMIN_CMD_DEV_MODE_SET, 1, bytes([STOPPED]))
            t0 = time.monotonic()
            others_answer(fast, driver)
            time.sleep(max(0.0, HELD - (time.monotonic() - t0)))
            assert not admin.finished(stop), "the stop did not wait for the requests"
            assert vq.used_idx() == base
        finally:
            os.kill(slow_server.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        wait_for(lambda: admin.finished(stop), "the stop")
        assert admin.status() == 0
        # Published before the stop answered: none of them is left at the device.
        assert vq.used_idx() == (base + STUCK) & 0xFFFF
        for token in stuck:
            assert slow.wait(0, token, timeout=1.0)[1] == 0
        driver.resume(1)
        slow.read(0, 4096)
        base = vq.used_idx()

        # 2. Member 1's front end asks for the ring's base with requests at the server.
        stop_server(slow_server)
        try:
            stuck = [slow.submit_read(0, 8 * i, 4096) for i in range(STUCK)]
            slow.kick(0)
            time.sleep(TAKE)
            slow.client.request(GET_VRING_BASE, struct.pack("<II", 0, 0))
            t0 = time.monotonic()
            others_answer(fast, driver)
            time.sleep(max(0.0, HELD - (time.monotonic() - t0)))
            slow.client.sock.settimeout(0.05)
            with pytest.raises(TimeoutError):
                slow.client.recv_message()  # no answer while they are outstanding
        finally:
            os.kill(slow_server.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        slow.client.sock.settimeout(10.0)
        _req, _flags, payload, _fds = slow.client.recv_message()
        index, next_avail = struct.unpack("<II", payload)
        # The base accounts for every request taken, and each was completed first.
        assert (index, next_avail) == (0, (base + STUCK) & 0xFFFF)
        assert vq.used_idx() == next_avail
    finally:
        driver.close()
        slow.close()
        fast.close()
