"""Fixtures for the fast unit tests: protocol core, guest RAM, eventfds, disk images."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from unit_support import IMAGE_SIZE, GuestRam, make_info, negotiate

from vhostd.core.protocol import BackendProtocol, DeviceInfo
from vhostd.devices.blk import BlkDevice, BlkOptions
from vhostd.storage.file import FileStorage
from vhostd.vhost_user.handler import PROTOCOL_FEATURES
from vhostd_proto.vhost_user import ProtocolFeature as PF


@pytest.fixture
def info() -> DeviceInfo:
    return make_info()


@pytest.fixture
def proto(info: DeviceInfo) -> BackendProtocol:
    """A fresh connection: nothing negotiated, no owner."""
    return BackendProtocol(info)


@pytest.fixture
def ready(proto: BackendProtocol) -> BackendProtocol:
    """Every offered protocol feature negotiated and SET_OWNER done."""
    negotiate(proto)
    return proto


@pytest.fixture
def log_ready() -> BackendProtocol:
    """Like ``ready``, for a back end that also offers LOG_SHMFD."""
    proto = BackendProtocol(make_info(PROTOCOL_FEATURES | 1 << PF.LOG_SHMFD))
    negotiate(proto)
    return proto


@pytest.fixture
def eventfd() -> Iterator[Callable[[], int]]:
    """Factory of non-blocking eventfds, closed at teardown."""
    fds: list[int] = []

    def make() -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fds.append(fd)
        return fd

    yield make
    for fd in fds:
        os.close(fd)


# Guest RAM used by the virtqueue tests: two GPA-contiguous regions whose QVAs are
# not contiguous, the second mapped at a non-zero offset in its memfd.
RAM_A = (0x0, 0x10000, 0x7F00_0000_0000, 0)
RAM_B = (0x10000, 0x10000, 0x7F10_0000_0000, 0x1000)


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    g = GuestRam()
    g.add(*RAM_A)
    g.add(*RAM_B)
    yield g
    g.close()


# ---- virtio-blk -----------------------------------------------------------------

@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A fully allocated 1 MiB image whose every 512-byte sector has a distinct pattern."""
    path = tmp_path / "disk.img"
    path.write_bytes(b"".join(bytes([s & 0xFF]) * 512 for s in range(IMAGE_SIZE // 512)))
    return path


@pytest.fixture
def make_blk(image: Path) -> Iterator[Callable[..., BlkDevice]]:
    devices: list[BlkDevice] = []

    def make(read_only: bool = False, **options: object) -> BlkDevice:
        dev = BlkDevice("blk0", FileStorage(str(image), read_only=read_only),
                        BlkOptions(**options))  # type: ignore[arg-type]
        devices.append(dev)
        return dev

    yield make
    for dev in devices:
        dev.storage.close()
