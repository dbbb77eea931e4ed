"""Real storage under a real guest: O_DIRECT members and NBD members (qemu-nbd, nbdkit).

Real QEMU boots the test guest on a vhostd member whose image is opened with O_DIRECT
or lives behind an NBD server; the guest writes and verifies with fio. The NBD server
and vhostd are killed under verified writes; two daemons share one NBD export and the
guest migrates between them.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testbed.guest import GuestImage
from testbed.nbd import NBD_PROGRAMS, NbdServer, serve_file
from testbed.qemu import GuestVM, VhostUserBlkDisk

pytestmark = pytest.mark.e2e
TIMEOUT = 300
MiB = 1 << 20
O_DIRECT = os.O_DIRECT


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short: unix socket paths are limited to 107 bytes.
    d = Path(tempfile.mkdtemp(prefix="vstor-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def nbd(workdir: Path) -> Iterator[Callable[[str, Path], NbdServer]]:
    """Factory: an NBD server (``qemu-nbd`` or ``nbdkit``) exporting one image file."""
    servers: list[NbdServer] = []

    def make(program: str, image: Path) -> NbdServer:
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed (./scripts/install-deps installs it)")
        n = len(servers)
        server = serve_file(program, image, workdir / f"nbd{n}.sock",
                            log=workdir / f"nbd{n}.log")
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.kill()


def make_image(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def run_guest(guest_image: GuestImage, sock: Path, script: str, args: list[str]) -> GuestVM:
    with GuestVM(guest_image, [VhostUserBlkDisk(sock)], run=script, args=args) as vm:
        passed = vm.wait_result(TIMEOUT)
        print(f"{script}: {vm.result} after {vm.elapsed:.1f} s")
        assert passed, f"{script} failed in the guest:\n{vm.console}"
    return vm


def assert_no_io_error(vm: GuestVM) -> None:
    # The guest kernel reports a failed request as "I/O error, dev vda, sector ...".
    assert "I/O error" not in vm.console, vm.console


def open_flags(pid: int, path: Path) -> list[int]:
    """The open flags of every descriptor of ``pid`` on ``path``."""
    flags = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != str(path):
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        m = re.search(r"^flags:\s+([0-7]+)", info, re.M)
        assert m, info
        flags.append(int(m.group(1), 8))
    return flags


# --- 1. O_DIRECT --------------------------------------------------------------------


def test_direct_fio_verify_and_filesystem(guest_image: GuestImage, workdir: Path,
                                          vhostd) -> None:
    image = make_image(workdir / "disk.img", 128 * MiB)
    sock = workdir / "blk.sock"
    d = vhostd(f"--blk-file={image}", "--direct", socket_path=sock)
    # The image really is open with O_DIRECT (a second, buffered descriptor serves only
    # transfers too small for it).
    assert any(f & O_DIRECT for f in open_flags(d.proc.pid, image)), d.log
    vm = run_guest(guest_image, sock, "fio_verify", ["16M", "16"])
    assert_no_io_error(vm)
    run_guest(guest_image, sock, "mkfs_check", ["/dev/vda", "4"])
    # The file system is in the image: the ext4 magic at 1024 + 0x38.
    with open(image, "rb") as f:
        f.seek(1024 + 0x38)
        assert f.read(2) == b"\x53\xef"


# --- 2. NBD members -----------------------------------------------------------------


@pytest.mark.parametrize("program", NBD_PROGRAMS)
def test_nbd_member_fio_verify(guest_image: GuestImage, workdir: Path, vhostd, nbd,
                               program: str) -> None:
    image = make_image(workdir / "disk.img", 64 * MiB)
    server = nbd(program, image)
    sock = workdir / "blk.sock"
    d = vhostd(f"--blk-nbd={server.uri}", socket_path=sock)
    vm = run_guest(guest_image, sock, "fio_verify", ["16M", "16"])
    assert_no_io_error(vm)
    assert "front end connected" in d.log
    # The guest's writes went through the server into its file.
    assert os.stat(image).st_blocks > 0
