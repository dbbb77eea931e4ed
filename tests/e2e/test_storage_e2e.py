"""Real storage under a real guest: O_DIRECT members and NBD members (qemu-nbd, nbdkit).

Real QEMU boots the test guest on a vhostd member whose image is opened with O_DIRECT
or lives behind an NBD server; the guest writes and verifies with fio. The NBD server
and vhostd are killed under verified writes; two daemons share one NBD export and the
guest migrates between them.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.guest import GuestImage
from testbed.nbd import NBD_PROGRAMS, NbdServer, serve_file
from testbed.qemu import MIGRATION_MEMORY, GuestVM, VhostUserBlkDisk
from vhostd.tools.migrate import OwnerMove, migrate

pytestmark = pytest.mark.e2e
TIMEOUT = 300
MiB = 1 << 20
O_DIRECT = os.O_DIRECT



@pytest.fixture
def nbd(workdir: Path) -> Iterator[Callable[..., NbdServer]]:
    """Factory: an NBD server (``qemu-nbd`` or ``nbdkit``) exporting one image file."""
    servers: list[NbdServer] = []

    def make(program: str, image: Path, *nbdkit_filters: str) -> NbdServer:
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed (./scripts/install-deps installs it)")
        n = len(servers)
        server = serve_file(program, image, workdir / f"nbd{n}.sock",
                            log=workdir / f"nbd{n}.log", nbdkit_filters=nbdkit_filters)
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


def wait_log(d: Any, text: str, timeout: float = 60.0, count: int = 1) -> None:
    """Wait until ``text`` is ``count`` times in the vhostd log."""
    deadline = time.monotonic() + timeout
    while d.log.count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not in the vhostd log:\n{d.log}"
        time.sleep(0.05)


# --- 3. the NBD server killed and restarted -----------------------------------------

RESTART_AFTER_S = 3.0


def test_nbd_server_killed_under_verified_writes(guest_image: GuestImage, workdir: Path,
                                                 vhostd, nbd) -> None:
    """kill -9 of nbdkit while the guest writes, restarted 3 s later on the same socket:
    the requests wait, vhostd reconnects and resends them; the guest sees no error."""
    image = make_image(workdir / "disk.img", 64 * MiB)
    # A few milliseconds per request, as over a network: at the kill, requests are at
    # the server (locally it answers faster than the guest under TCG can ask).
    server = nbd("nbdkit", image, "delay", "rdelay=1ms", "wdelay=4ms")
    sock = workdir / "blk.sock"
    d = vhostd(f"--blk-nbd={server.uri}", "--reconnect-delay=10", socket_path=sock)
    # Writethrough: every write is followed by a FLUSH the server must also have seen.
    lost = re.compile(r"connection lost; (\d+) request\(s\) wait")
    with GuestVM(guest_image, [VhostUserBlkDisk(sock)], run="migrate_load",
                 args=["20", "8M", "vda", "wt"]) as vm:
        outstanding = 0
        for attempt in range(1, 4):
            vm.wait_for(r"LOAD-ROUND \d+ OK", TIMEOUT)
            # Inside the next round (fio takes a moment to start in the guest), with
            # writes at the server.
            time.sleep(1.5)
            server.kill()
            wait_log(d, "connection lost", count=attempt)
            time.sleep(RESTART_AFTER_S)
            server.start()
            wait_log(d, "connected again", count=attempt)
            outstanding = int(lost.findall(d.log)[-1])
            print(f"kill {attempt}: {outstanding} request(s) were at the server")
            if outstanding:
                break
        assert outstanding, f"no request was at the server at any kill:\n{d.log}"
        # A whole round after the restart, written and verified through the new server.
        vm.wait_for(r"LOAD-ROUND \d+ OK", TIMEOUT)
        m = vm.wait_for(r"LOAD-ROUND (\d+) OK", TIMEOUT)
        print(f"round {m.group(1)} verified after the server came back")
        assert vm.wait_result(TIMEOUT), vm.console
    assert_no_io_error(vm)
    for m in re.finditer(r"connected again after ([\d.]+) s", d.log):
        assert float(m.group(1)) >= RESTART_AFTER_S, d.log
    assert "failing requests with EIO" not in d.log


# --- 4. vhostd killed with an NBD member ---------------------------------------------

VHOSTD_KILLS = 3


def test_vhostd_killed_with_an_nbd_member_under_load(guest_image: GuestImage, workdir: Path,
                                                     vhostd, nbd) -> None:
    """kill -9 of vhostd under verified writes to an NBD member; QEMU reconnects to the
    restarted daemon, which resubmits the requests the inflight region names."""
    image = make_image(workdir / "disk.img", 64 * MiB)
    # With a few milliseconds per write, the kill finds writes still at the server,
    # which drops them with the connection: only a resubmission stores them.
    server = nbd("nbdkit", image, "delay", "wdelay=4ms")
    state = workdir / "state"
    state.mkdir()
    sock = workdir / "blk.sock"
    args = (f"--blk-nbd={server.uri}", f"--state-dir={state}")
    daemon = vhostd(*args, socket_path=sock)
    resubmitted = 0
    server_restarts = 0
    with GuestVM(guest_image, [VhostUserBlkDisk(sock, reconnect=1)], run="migrate_load",
                 args=["20", "8M", "vda", "wt"]) as vm:
        vm.wait_for("LOAD-ROUND 1 OK", TIMEOUT)
        for i in range(VHOSTD_KILLS):
            # Inside the next round's writes (fio takes a moment to start in the guest).
            time.sleep(1.2 + 0.3 * i)
            daemon.signal(signal.SIGKILL)
            daemon.proc.wait(10)
            if not server.alive():
                # Seen once in CI: the new daemon found nobody listening on the socket.
                # The server is not under test, vhostd is: say what became of the server
                # and give vhostd one to come back to.
                print(f"kill {i + 1}: {server.name} had exited ({server.returncode()}); "
                      f"its log ends:\n{server.log_tail()}")
                server.start()
                server_restarts += 1
            daemon = vhostd(*args, socket_path=sock)
            m = vm.wait_for(r"LOAD-ROUND (\d+) OK", TIMEOUT)
            r = re.search(r"resubmitting (\d+) request", daemon.log)
            resubmitted += int(r.group(1)) if r else 0
            print(f"kill {i + 1}: {r.group(1) if r else 0} request(s) resubmitted, "
                  f"round {m.group(1)} verified after the restart")
        assert vm.wait_result(TIMEOUT), vm.console
    # The kills found requests in flight (or the test would prove nothing).
    assert resubmitted > 0
    assert_no_io_error(vm)
    assert re.search(r"migrate_load: \d+ rounds OK", vm.console)
    # The export outlived every daemon (the server went away at most once, on its own).
    assert server.alive()
    assert server_restarts <= 1


# --- 5. two daemons, one NBD export, live migration ---------------------------------


def test_migrate_between_two_daemons_on_one_nbd_export(guest_image: GuestImage,
                                                       workdir: Path, vhostd, nbd) -> None:
    """Two hosts' worth of vhostd, each with a member on the same export (nbdkit serves
    both): the guest migrates under fio verify and stays clean."""
    image = make_image(workdir / "shared.img", 64 * MiB)
    # Network-like latency makes a round of the load outlast the migration, so the
    # switch-over lands inside one: its first writes went to host a, the rest and the
    # verification to host b, which only passes if both reach the same data.
    server = nbd("nbdkit", image, "delay", "rdelay=2ms", "wdelay=8ms")
    owners = []
    daemons = []
    for host in ("a", "b"):
        daemons.append(vhostd(f"--member=socket-path={workdir}/{host}1.sock,"
                              f"blk-nbd={server.uri}",
                              socket_path=workdir / f"{host}-owner.sock"))
        owners.append(str(workdir / f"{host}-owner.sock"))
    args = ["20", "8M", "vda", "wt"]
    src = GuestVM(guest_image, [VhostUserBlkDisk(workdir / "a1.sock")], run="migrate_load",
                  memory=MIGRATION_MEMORY, args=args, qmp=workdir / "src.qmp")
    uri = f"unix:{workdir}/mig.sock"
    dst = GuestVM(guest_image, [VhostUserBlkDisk(workdir / "b1.sock")], run="migrate_load",
                  memory=MIGRATION_MEMORY, args=args, qmp=workdir / "dst.qmp",
                  extra_args=["-incoming", uri])
    try:
        src.start()
        src.wait_for("LOAD-ROUND 1 OK", TIMEOUT)
        dst.start()
        dst.wait_qmp()
        # Into the next round's writes (fio takes a moment to start in the guest).
        src.wait_for(r"LOAD-ROUND \d+ OK", TIMEOUT)
        time.sleep(1.0)
        move = OwnerMove(owners[0], 1, 1, dest_owner_socket=owners[1],
                         stream_path=str(workdir / "parts.stream"))
        lines: list[str] = []
        summary = asyncio.run(migrate(str(src.qmp), str(dst.qmp), uri, move,
                                      progress=lines.append))
        print("\n".join(lines))
        assert summary.parts_bytes > 0
        # Rounds written and verified on host b, through its own NBD connection.
        dst.wait_for(r"LOAD-ROUND \d+ OK", TIMEOUT)
        assert dst.wait_result(TIMEOUT), dst.console
    finally:
        src.kill()
        dst.kill()
    assert_no_io_error(dst)
    assert "rounds OK" in dst.console
    for d in daemons:
        d.stop()
        assert "queue stopped" not in d.log
    # Both daemons served the guest: each one's member counted requests.
    for d in daemons:
        m = re.search(r"requests served per queue: vq0=(\d+)", d.log)
        assert m and int(m.group(1)) > 0, d.log


# --- 6. the demo on network storage -------------------------------------------------


def test_readme_demo_on_nbd_runs() -> None:
    """``./scripts/demo --nbd`` (README): nbdkit exports the image, two daemons use it,
    the guest migrates from one to the other under verified load."""
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit is not installed (./scripts/install-deps installs it)")
    r = subprocess.run([sys.executable, "-m", "testbed.demo", "--nbd", "--seconds", "8"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "PASS: every round verified" in r.stdout
    assert "parts moved" in r.stdout
    # QEMU's times are in the summary (a guest switch-over takes a few milliseconds).
    m = re.search(r"downtime\s+(\d+) ms", r.stdout)
    assert m and int(m.group(1)) > 0, r.stdout[-4000:]
    assert "no connection lost" in r.stdout
    # Both daemons served the guest through the export.
    for daemon in "AB":
        m = re.search(rf"{daemon}:member1 requests vq0=(\d+)", r.stdout)
        assert m and int(m.group(1)) > 0, r.stdout[-4000:]
