"""Real QEMU 7.2 boots a real Linux guest whose disk is served by vhostd."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.guest import GuestImage
from testbed.qemu import GuestVM, VhostUserBlkDisk

TIMEOUT = 300
MiB = 1 << 20

pytestmark = pytest.mark.e2e


@pytest.fixture
def sock() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes; tmp_path can be longer.
    path = Path("/tmp") / f"vhostd-e2e-{os.getpid()}.sock"
    yield path
    path.unlink(missing_ok=True)


def boot(guest_image: GuestImage, sock: Path, script: str, args: list[str] | None = None,
         num_queues: int = 1, packed: bool = False) -> GuestVM:
    props = {"packed": "on"} if packed else {}
    return GuestVM(guest_image, [VhostUserBlkDisk(sock, num_queues=num_queues, props=props)],
                   run=script, args=args or [])


def run_script(guest_image: GuestImage, sock: Path, script: str,
               args: list[str] | None = None, num_queues: int = 1,
               packed: bool = False) -> GuestVM:
    with boot(guest_image, sock, script, args, num_queues, packed) as vm:
        passed = vm.wait_result(TIMEOUT)
        print(f"{script}: {vm.result} after {vm.elapsed:.1f} s")
        assert passed, f"{script} failed in the guest:\n{vm.console}"
    return vm


def test_fio_random_writes_verify(guest_image, sock, sparse_image, vhostd) -> None:
    d = vhostd(f"--blk-file={sparse_image(256 * MiB)}", socket_path=sock)
    vm = run_script(guest_image, sock, "fio_verify")
    assert "err= 0" in vm.console or "err=0" in vm.console.replace(" ", "")
    assert "front end connected" in d.log


def test_mkfs_file_fsck_checksum(guest_image, sock, sparse_image, vhostd) -> None:
    image = sparse_image(256 * MiB)
    vhostd(f"--blk-file={image}", socket_path=sock)
    run_script(guest_image, sock, "mkfs_check")
    # The file system really is in the image: the ext4 magic at 1024 + 0x38.
    with open(image, "rb") as f:
        f.seek(1024 + 0x38)
        assert f.read(2) == b"\x53\xef"


@pytest.mark.parametrize("workers", [0, 1])
def test_two_queues(guest_image, sock, sparse_image, vhostd, workers: int) -> None:
    d = vhostd(f"--blk-file={sparse_image(256 * MiB)}", "--num-queues=2",
               f"--queue-workers={workers}", socket_path=sock)
    vm = run_script(guest_image, sock, "multiqueue", ["2"], num_queues=2)
    assert "NUM-QUEUES 2" in vm.console
    d.stop()
    assert "queue stopped" not in d.log
    m = re.search(r"requests served per queue: vq0=(\d+) vq1=(\d+)", d.log)
    assert m and int(m.group(1)) > 0 and int(m.group(2)) > 0, d.log


def test_packed_rings_fio_verify_and_filesystem(guest_image, sock, sparse_image,
                                               vhostd) -> None:
    """QEMU's packed=on: the guest drives packed virtqueues (VIRTIO_F_RING_PACKED)."""
    d = vhostd(f"--blk-file={sparse_image(256 * MiB)}", "--num-queues=2", socket_path=sock)
    run_script(guest_image, sock, "multiqueue", ["2"], num_queues=2, packed=True)
    run_script(guest_image, sock, "mkfs_check", packed=True)
    d.stop()
    assert "queue stopped" not in d.log
    # The packed engine served them.
    assert "acked: packed rings" in d.log


def test_discard_and_write_zeroes_reach_the_file(guest_image, sock, sparse_image,
                                                 vhostd) -> None:
    image = sparse_image(64 * MiB)
    vhostd(f"--blk-file={image}", socket_path=sock)
    run_script(guest_image, sock, "discard_zeroes")
    with open(image, "rb") as f:
        fd = f.fileno()
        # The discarded first 4 MiB became a hole in the file...
        assert os.lseek(fd, 0, os.SEEK_DATA) >= 4 * MiB
        # ...the next 2 MiB read as zeros (write-zeroes without unmap)...
        f.seek(4 * MiB)
        assert f.read(2 * MiB) == bytes(2 * MiB)
        # ...and the pattern after them is intact.
        assert f.read(2 * MiB) == b"\xaa" * (2 * MiB)


def test_read_only_device_refuses_writes(guest_image, sock, sparse_image, vhostd) -> None:
    image = sparse_image(64 * MiB)
    with open(image, "r+b") as f:
        f.write(b"keep" * 1024)
    vhostd(f"--blk-file={image}", "--read-only", socket_path=sock)
    vm = run_script(guest_image, sock, "readonly")
    assert "RO 1" in vm.console
    assert image.read_bytes()[:4096] == b"keep" * 1024


def test_resize_seen_by_guest(guest_image, sock, sparse_image, vhostd) -> None:
    image = sparse_image(64 * MiB)
    d = vhostd(f"--blk-file={image}", socket_path=sock)
    with boot(guest_image, sock, "resize") as vm:
        m = vm.wait_for(r"SIZE (\d+)", TIMEOUT)
        assert int(m.group(1)) == 64 * MiB // 512
        vm.wait_for("READY-FOR-RESIZE", TIMEOUT)
        os.truncate(image, 96 * MiB)
        d.signal(signal.SIGHUP)
        m = vm.wait_for(r"RESIZED (\d+)", 90)
        assert int(m.group(1)) == 96 * MiB // 512
        assert vm.wait_result(TIMEOUT), vm.console
    assert "capacity 131072 -> 196608 sectors" in d.log


def test_readme_demo_runs(tmp_path: Path) -> None:
    """The README's main command ends in the demo tool: it must pass end to end."""
    r = subprocess.run([sys.executable, "-m", "testbed.demo", "--seconds", "8"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-12000:] + r.stderr[-2000:]
    assert "PASS: every round verified" in r.stdout
    assert re.search(r"downtime\s+\d+ ms", r.stdout)
