"""The guest image against qemu-storage-daemon, the reference vhost-user-blk back end.

These tests do not involve vhostd: they show that the guest, its scripts and
the QEMU runner work, so that a failure against vhostd points at vhostd.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from testbed.guest import GuestImage
from testbed.qemu import GuestVM, StorageDaemon, VhostUserBlkDisk

# Generous: a TCG guest on a busy CI machine can be several times slower
# than the ~5-20 s it takes on an idle one.
TIMEOUT = 300


def _run_baseline(
    guest_image: GuestImage, tmp_path: Path, script: str, args: list[str] | None = None
) -> None:
    disk = tmp_path / "disk.img"
    # Sparse: only what the guest writes takes space.
    with open(disk, "wb") as f:
        f.truncate(256 << 20)
    # Unix socket paths are limited to 107 bytes; tmp_path can be longer.
    sock = Path(os.environ.get("TMPDIR", "/tmp")) / f"vhostd-e2e-{os.getpid()}-{script}.sock"
    with (
        StorageDaemon(disk, sock),
        GuestVM(guest_image, [VhostUserBlkDisk(sock)], run=script, args=args or []) as vm,
    ):
        passed = vm.wait_result(TIMEOUT)
        print(f"{script}: {vm.result} after {vm.elapsed:.1f} s")
        assert passed, f"{script} failed in the guest:\n{vm.console}"


@pytest.mark.e2e
def test_fio_verify_baseline(guest_image: GuestImage, tmp_path: Path) -> None:
    _run_baseline(guest_image, tmp_path, "fio_verify")


@pytest.mark.e2e
def test_mkfs_check_baseline(guest_image: GuestImage, tmp_path: Path) -> None:
    _run_baseline(guest_image, tmp_path, "mkfs_check")
