"""Fixtures for the front-end tests: a back end (qsd or vhostd) and front ends on it."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from frontend_support import DISK_SIZE, Backend, Qsd

from vhostd.frontend.blk import BlkFrontend

QSD = shutil.which("qemu-storage-daemon")

# qsd's vhost-user-blk export answers GET_ID with a fixed string; vhostd with --serial,
# which defaults to the image's file name.
QSD_DEVICE_ID = b"vhost_user_blk"


@pytest.fixture(params=["qsd", "vhostd"])
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
        p = start(f"--blk-file={image}", "--num-queues=2")
        assert p.socket_path is not None
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
