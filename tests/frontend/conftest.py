"""Fixtures for the front-end tests: a back end (qsd or vhostd) and front ends on it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from frontend_support import DISK_SIZE, Backend, Qsd

from testbed.qemu_select import STORAGE_DAEMON, find_program
from vhostd.frontend.blk import BlkFrontend

# The reference back end: VHOSTD_QEMU's qemu-storage-daemon, or PATH's.
QSD = find_program(STORAGE_DAEMON)

# qsd's vhost-user-blk export answers GET_ID with a fixed string; vhostd with --serial,
# which defaults to the image's file name.
QSD_DEVICE_ID = b"vhost_user_blk"


# vhostd runs every front-end test twice: all queues in the main process, and with one
# queue worker process, which serves queue 1 (docs: queues are dealt round-robin to the
# main process and the workers). Both explicit, so the default (auto: one less than the
# smaller of CPUs and queues) does not make the suite depend on the machine.
VHOSTD_WORKERS = {"vhostd": "--queue-workers=0", "vhostd-workers": "--queue-workers=1"}


@pytest.fixture(params=["qsd", *VHOSTD_WORKERS])
def backend(request: pytest.FixtureRequest, tmp_path: Path,
            sparse_image: Callable[..., Path]) -> Iterator[Backend]:
    """The back end under test, two queues, on a sparse image of DISK_SIZE bytes."""
    image = sparse_image(DISK_SIZE)
    if request.param == "qsd":
        if QSD is None:
            pytest.skip("qemu-storage-daemon is not installed")
        d = Qsd(QSD, tmp_path, image)
        yield Backend("qsd", d.sock, image, lambda: d.log, QSD_DEVICE_ID)
        d.stop()
    else:
        # The conftest fixture stops vhostd and checks its log and exit code at teardown.
        start = request.getfixturevalue("vhostd")
        p = start(f"--blk-file={image}", "--num-queues=2", VHOSTD_WORKERS[request.param])
        assert p.socket_path is not None
        if request.param == "vhostd-workers":
            assert "1 queue worker(s) (pids " in p.log and "serve 1 of 2 request queues" in p.log
        else:
            assert "queue worker" not in p.log
        yield Backend("vhostd", p.socket_path, image, lambda: p.log, image.name.encode())


@pytest.fixture
def frontend(backend: Backend) -> Iterator[Callable[..., BlkFrontend]]:
    opened: list[BlkFrontend] = []

    def make(**kw: object) -> BlkFrontend:
        kw.setdefault("num_queues", 2)
        fe = BlkFrontend(backend.sock, **kw)  # type: ignore[arg-type]
        opened.append(fe)
        return fe

    yield make
    for fe in opened:
        fe.close()
