"""Back-end program conventions: capabilities, --fd, exit codes, SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from vhostd_proto import vhost_user as vu


def run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vhostd", *args], capture_output=True,
                          text=True, timeout=timeout)


def get_features(path: Path) -> int:
    """One GET_FEATURES round trip: proof that a device is served on ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(vu.Header.build({"request": vu.Request.GET_FEATURES, "flags": 1, "size": 0}))
        reply = b""
        while len(reply) < 20:
            chunk = s.recv(20 - len(reply))
            assert chunk, "connection closed before the reply"
            reply += chunk
    hdr = vu.Header.parse(reply[:12])
    assert (hdr.request, hdr.flags, hdr.size) == (vu.Request.GET_FEATURES, 0x5, 8)
    return int.from_bytes(reply[12:], "little")


def test_print_capabilities_ignores_other_options() -> None:
    r = run("--print-capabilities", "--blk-file=/nonexistent")
    assert r.returncode == 0
    assert json.loads(r.stdout) == {"type": "block", "features": ["read-only", "blk-file"]}


def test_missing_file_exits_nonzero_with_one_line(tmp_path: Path) -> None:
    r = run(f"--socket-path={tmp_path}/s.sock", f"--blk-file={tmp_path}/none.img")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "none.img" in lines[0] and "No such file" in lines[0]
    assert not (tmp_path / "s.sock").exists()


def test_socket_and_fd_are_exclusive(tmp_path: Path, sparse_image) -> None:
    r = run(f"--socket-path={tmp_path}/s.sock", "--fd=3", f"--blk-file={sparse_image()}")
    assert r.returncode == 2
    assert "not allowed with" in r.stderr


def test_requires_a_socket(sparse_image) -> None:
    r = run(f"--blk-file={sparse_image()}")
    assert r.returncode == 1
    assert "--socket-path or --fd" in r.stderr


def test_requires_blk_file(tmp_path: Path) -> None:
    r = run(f"--socket-path={tmp_path}/s.sock")
    assert r.returncode == 1 and "--blk-file" in r.stderr


def test_bad_queue_size(tmp_path: Path, sparse_image) -> None:
    r = run(f"--socket-path={tmp_path}/s.sock", f"--blk-file={sparse_image()}",
            "--queue-size=100")
    assert r.returncode == 1 and "queue-size 100" in r.stderr


def test_path_that_is_not_a_socket(tmp_path: Path, sparse_image) -> None:
    (tmp_path / "s.sock").write_text("x")
    r = run(f"--socket-path={tmp_path}/s.sock", f"--blk-file={sparse_image()}")
    assert r.returncode == 1 and "not a socket" in r.stderr
    assert (tmp_path / "s.sock").read_text() == "x"


def test_socket_in_use(tmp_path: Path, sparse_image, vhostd) -> None:
    d = vhostd(f"--blk-file={sparse_image()}", socket_path=tmp_path / "s.sock")
    r = run(f"--socket-path={tmp_path}/s.sock", f"--blk-file={sparse_image(name='b.img')}")
    assert r.returncode == 1 and "in use" in r.stderr
    assert d.alive()
    get_features(tmp_path / "s.sock")


def test_stale_socket_is_replaced(tmp_path: Path, sparse_image, vhostd) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "s.sock"))
    stale.close()
    vhostd(f"--blk-file={sparse_image()}", socket_path=tmp_path / "s.sock")
    get_features(tmp_path / "s.sock")


def test_socket_mode_default_0600(tmp_path: Path, sparse_image, vhostd) -> None:
    vhostd(f"--blk-file={sparse_image()}", socket_path=tmp_path / "s.sock")
    assert (tmp_path / "s.sock").stat().st_mode & 0o777 == 0o600


def test_socket_mode_option(tmp_path: Path, sparse_image, vhostd) -> None:
    vhostd(f"--blk-file={sparse_image()}", "--socket-mode=660",
           socket_path=tmp_path / "s.sock")
    assert (tmp_path / "s.sock").stat().st_mode & 0o777 == 0o660


def test_inherited_listening_fd(tmp_path: Path, sparse_image, vhostd) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "inherited.sock"))
    listener.listen(1)
    fd = listener.fileno()
    d = vhostd(f"--fd={fd}", f"--blk-file={sparse_image()}", pass_fds=(fd,))
    listener.close()
    assert get_features(tmp_path / "inherited.sock") & (1 << 32)
    d.stop()
    # A socket the daemon did not bind is not its to remove.
    assert (tmp_path / "inherited.sock").exists()


def test_fd_that_is_not_listening(tmp_path: Path, sparse_image) -> None:
    a, b = socket.socketpair()
    r = subprocess.run([sys.executable, "-m", "vhostd", f"--fd={a.fileno()}",
                        f"--blk-file={sparse_image()}"], capture_output=True, text=True,
                       pass_fds=(a.fileno(),), timeout=20)
    a.close()
    b.close()
    assert r.returncode == 1 and "not a listening socket" in r.stderr


def test_fd_that_is_closed(sparse_image) -> None:
    r = run("--fd=77", f"--blk-file={sparse_image()}")
    assert r.returncode == 1 and "--fd=77" in r.stderr


def test_sigterm_exits_fast_and_clean(tmp_path: Path, sparse_image, vhostd) -> None:
    d = vhostd(f"--blk-file={sparse_image()}", socket_path=tmp_path / "s.sock")
    # With a front end connected, too.
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(str(tmp_path / "s.sock"))
    time.sleep(0.2)
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    rc = d.proc.wait(5)
    elapsed = time.monotonic() - t0
    conn.close()
    assert rc == 0
    assert elapsed < 2.0
    assert not (tmp_path / "s.sock").exists()
    assert "shutting down" in d.log


def test_repeated_sigterm_during_shutdown_still_exits_clean(tmp_path: Path, sparse_image,
                                                           vhostd) -> None:
    """A supervisor that repeats SIGTERM while vhostd shuts down gets exit status 0
    and a removed pid file, not a death by signal halfway through."""
    d = vhostd(f"--blk-file={sparse_image()}", socket_path=tmp_path / "s.sock")
    d.signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while d.proc.poll() is None and time.monotonic() < deadline:
        try:
            d.signal(signal.SIGTERM)
        except ProcessLookupError:
            break
        time.sleep(0.0005)
    assert d.proc.wait(5) == 0, d.log
    assert not d.pidfile.exists()


def test_asyncio_loop_option(tmp_path: Path, sparse_image, vhostd) -> None:
    vhostd(f"--blk-file={sparse_image()}", "--event-loop=asyncio",
           socket_path=tmp_path / "s.sock")
    assert get_features(tmp_path / "s.sock") & (1 << 30)


def test_read_only_offers_ro_bit(tmp_path: Path, sparse_image, vhostd) -> None:
    vhostd(f"--blk-file={sparse_image()}", "--read-only", socket_path=tmp_path / "s.sock")
    assert get_features(tmp_path / "s.sock") & (1 << 5)


def test_pidfile_never_writes_through_a_planted_symlink(tmp_path: Path, sparse_image,
                                                         vhostd) -> None:
    """A symlink at ``<pidfile>.tmp`` must not make vhostd overwrite its target."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    pidfile = tmp_path / "vhostd0.pid"  # the name the vhostd fixture passes
    (tmp_path / "vhostd0.pid.tmp").symlink_to(victim)
    d = vhostd(f"--blk-file={sparse_image()}")
    assert d.pidfile == pidfile
    assert victim.read_text() == "precious\n"
    assert pidfile.read_text() == f"{d.proc.pid}\n"
    assert not pidfile.is_symlink()
    assert not (tmp_path / "vhostd0.pid.tmp").exists()
