"""kill -9 vhostd while a real guest writes; restart it; QEMU reconnects; nothing lost."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest

from testbed.guest import GuestImage
from testbed.qemu import GuestVM, VhostUserBlkDisk

pytestmark = pytest.mark.e2e
TIMEOUT = 300
KILLS = 10



def test_kill_9_under_write_load_ten_times(guest_image: GuestImage, workdir: Path,
                                           vhostd, sparse_image) -> None:
    image = sparse_image(256 << 20)
    state = workdir / "state"
    state.mkdir()
    sock = workdir / "blk.sock"
    # Two queues, the second served by a queue worker: the worker dies with the daemon
    # and the restarted daemon serves both rings again.
    args = (f"--blk-file={image}", f"--state-dir={state}", "--num-queues=2",
            "--queue-workers=1")
    daemon = vhostd(*args, socket_path=sock)
    # The guest switches to writethrough, then writes and verifies in rounds.
    with GuestVM(guest_image, [VhostUserBlkDisk(sock, reconnect=1, num_queues=2)],
                 run="migrate_load",
                 args=["60", "8M", "vda", "wt"]) as vm:
        vm.wait_for("CACHE-TYPE write through", TIMEOUT)
        vm.wait_for("LOAD-ROUND 1 OK", TIMEOUT)
        assert json.loads((state / "blk0.json").read_text()) == {"wce": 0}
        for i in range(KILLS):
            # Somewhere inside a round: requests are in flight.
            time.sleep(0.3 + 0.17 * i)
            daemon.signal(signal.SIGKILL)
            daemon.proc.wait(10)
            daemon = vhostd(*args, socket_path=sock)
            # Each run: after the restart, a new round writes and verifies.
            m = vm.wait_for(r"LOAD-ROUND (\d+) OK", TIMEOUT)
            print(f"kill {i + 1}: round {m.group(1)} verified after the restart")
            assert "write cache writethrough (from" in daemon.log
        assert vm.wait_result(TIMEOUT), vm.console
        assert re.search(r"migrate_load: \d+ rounds OK", vm.console)


PACKED_KILLS = 3


def test_kill_9_under_write_load_packed_ring(guest_image: GuestImage, workdir: Path,
                                             vhostd, sparse_image) -> None:
    """The same with packed virtqueues: QEMU 7.2 cannot say where a packed ring stood
    (it sends the previous start's base again), so the inflight region must."""
    image = sparse_image(128 << 20)
    sock = workdir / "blk.sock"
    args = (f"--blk-file={image}",)
    daemon = vhostd(*args, socket_path=sock)
    disk = VhostUserBlkDisk(sock, reconnect=1, props={"packed": "on"})
    with GuestVM(guest_image, [disk], run="migrate_load", args=["30", "4M", "vda"]) as vm:
        vm.wait_for("LOAD-ROUND 1 OK", TIMEOUT)
        for i in range(PACKED_KILLS):
            time.sleep(0.3 + 0.17 * i)
            daemon.signal(signal.SIGKILL)
            daemon.proc.wait(10)
            daemon = vhostd(*args, socket_path=sock)
            # QEMU reconnects; the ring position comes from the region, not from
            # QEMU's stale base.
            deadline = time.monotonic() + TIMEOUT
            while "from the inflight region (the front end sent" not in daemon.log:
                assert time.monotonic() < deadline, daemon.log
                time.sleep(0.1)
            # A round may have finished before the kill; the one after it needed the
            # new daemon for all of its I/O.
            vm.wait_for(r"LOAD-ROUND (\d+) OK", TIMEOUT)
            m = vm.wait_for(r"LOAD-ROUND (\d+) OK", TIMEOUT)
            print(f"kill {i + 1}: round {m.group(1)} verified after the restart")
        assert vm.wait_result(TIMEOUT), vm.console
        assert re.search(r"migrate_load: \d+ rounds OK", vm.console)
