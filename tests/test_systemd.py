"""systemd: socket activation (LISTEN_FDS), readiness (NOTIFY_SOCKET), the unit files.

Without systemd as PID 1: ``systemd-socket-activate`` passes listening sockets exactly as
a socket unit does, and a datagram socket of the test stands in for NOTIFY_SOCKET.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli import get_features

from vhostd.frontend.blk import BlkFrontend
from vhostd.shell.systemd import ActivationError, Notifier, listen_fds

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "contrib" / "systemd"
VHOSTD = [sys.executable, "-m", "vhostd"]

needs_activate = pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate is not installed (Debian: systemd; ./scripts/install-deps)")


# -- the module, on its own -----------------------------------------------------------------

def test_listen_fds_for_another_process_are_dropped() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "OTHER": "y"}
    assert listen_fds(env) is None
    assert env == {"OTHER": "y"}


def test_listen_fds_names_and_cloexec() -> None:
    a, b = socket.socketpair()
    # The child puts the two sockets at fds 3 and 4, inheritable, as systemd would.
    code = (
        "import os; from vhostd.shell.systemd import listen_fds\n"
        f"os.dup2({a.fileno()}, 3); os.dup2({b.fileno()}, 4)\n"
        "os.environ['LISTEN_PID'] = str(os.getpid())\n"
        "l = listen_fds()\n"
        "print(l.fds, l.names, [os.get_inheritable(f) for f in l.fds],\n"
        "      [k for k in os.environ if k.startswith('LISTEN_')])\n")
    with a, b:
        r = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "LISTEN_FDS": "2", "LISTEN_FDNAMES": "owner:member1"},
            pass_fds=(a.fileno(), b.fileno()), capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[3, 4] ['owner', 'member1'] [False, False] []"


def test_listen_fds_bad_values() -> None:
    with pytest.raises(ActivationError, match="not numbers"):
        listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "two"})
    with pytest.raises(ActivationError, match="LISTEN_PID is not"):
        listen_fds({"LISTEN_FDS": "1"})
    with pytest.raises(ActivationError, match="names 1 socket"):
        listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a"})


@pytest.mark.parametrize("abstract", [False, True])
def test_notifier_sends_one_datagram(tmp_path: Path, abstract: bool) -> None:
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"@vhostd-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    rx.bind("\0" + name[1:] if abstract else name)
    env = {"NOTIFY_SOCKET": name}
    n = Notifier.from_environment(env)
    assert env == {}
    with rx:
        assert n.ready("serving")
        assert n.stopping()
        rx.settimeout(1)
        assert rx.recv(100) == b"READY=1\nSTATUS=serving"
        assert rx.recv(100) == b"STOPPING=1\nSTATUS=shutting down"
    n.close()


def test_notifier_without_socket_and_with_a_dead_one(tmp_path: Path) -> None:
    assert not Notifier.from_environment({}).notify(READY=1)
    # Nobody listens there: a warning, never an exception or a wait.
    n = Notifier(str(tmp_path / "gone"))
    assert not n.ready("x")
    n.close()


# -- the daemon -----------------------------------------------------------------------------

class NotifySocket:
    """The service manager's end of NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def next(self, timeout: float = 15.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        text = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in text.splitlines())

    def wait_for(self, key: str, timeout: float = 15.0) -> dict[str, str]:
        """The next message carrying ``key`` (STATUS-only updates come in between)."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.next(max(0.01, deadline - time.monotonic()))
            if key in msg:
                return msg

    def nothing(self, wait: float) -> bool:
        self.sock.settimeout(wait)
        try:
            self.sock.recv(4096)
        except TimeoutError:
            return True
        return False


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    n = NotifySocket(tmp_path / "notify")
    yield n
    n.sock.close()


def _activate(*sockets: Path, args: list[str], notify: NotifySocket,
              names: str | None = None) -> subprocess.Popen[str]:
    cmd = ["systemd-socket-activate"]
    for s in sockets:
        cmd += ["-l", str(s)]
    if names:
        cmd.append(f"--fdname={names}")
    cmd += ["-E", f"NOTIFY_SOCKET={notify.path}", "-E", f"PYTHONPATH={ROOT}", "--",
            *VHOSTD, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not all(s.exists() for s in sockets):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
        time.sleep(0.02)
    return proc


def _stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert proc.stderr is not None
    return proc.stderr.read()


@needs_activate
def test_socket_activation_serves_a_front_end(tmp_path: Path, sparse_image,
                                              notify: NotifySocket) -> None:
    """systemd-socket-activate -l SOCK vhostd --blk-file=IMG: the front end's first
    connection starts vhostd, which serves it on the inherited socket and reports
    READY=1 once it does; SIGTERM brings STOPPING=1 and a clean exit."""
    image = sparse_image(16 << 20)
    sock = tmp_path / "blk.sock"
    proc = _activate(sock, args=[f"--blk-file={image}"], notify=notify)
    try:
        # Listening is systemd's job: nothing is started, nothing is ready yet.
        assert notify.nothing(0.5)
        data = os.urandom(8192)
        with BlkFrontend(sock, timeout=15) as fe:
            ready = notify.wait_for("READY")
            assert ready["READY"] == "1"
            assert ready["STATUS"] == "serving blk0 on fd 3"
            assert notify.wait_for("STATUS")["STATUS"] == "1 of 1 front end(s) connected"
            fe.write(8, data)
            fe.flush()
            assert fe.read(8, len(data)) == data
        with open(image, "rb") as f:
            f.seek(8 * 512)
            assert f.read(len(data)) == data
        assert notify.wait_for("STATUS")["STATUS"] == "0 of 1 front end(s) connected"
        proc.send_signal(signal.SIGTERM)
        assert notify.wait_for("STOPPING")["STOPPING"] == "1"
    finally:
        log = _stop(proc)
    assert proc.returncode == 0, log
    assert "listening on fd 3" in log and "Traceback" not in log


@needs_activate
def test_socket_activation_of_an_owner_and_members(tmp_path: Path, sparse_image,
                                                   notify: NotifySocket) -> None:
    """Sockets in order: the owner, then each --member without socket-path=; a member
    with socket-path= binds its own."""
    owner, m1, m3 = tmp_path / "owner.sock", tmp_path / "m1.sock", tmp_path / "m3.sock"
    m2 = tmp_path / "m2.sock"
    proc = _activate(owner, m1, m3, names="owner:m1:m3", notify=notify, args=[
        f"--member=blk-file={sparse_image(name='a.img')}",
        f"--member=socket-path={m2},blk-file={sparse_image(name='b.img')}",
        f"--member=blk-file={sparse_image(name='c.img')}"])
    try:
        get_features(owner)  # starts vhostd
        assert notify.wait_for("READY")["READY"] == "1"
        for s in (m1, m2, m3):
            assert get_features(s) & (1 << 32)
    finally:
        log = _stop(proc)
    assert proc.returncode == 0, log
    assert re.search(r"member1: listening on fd 4", log), log
    assert re.search(r"member2: listening on .*m2.sock", log), log
    assert re.search(r"member3: listening on fd 5", log), log


@needs_activate
def test_socket_activation_count_mismatch_says_what_it_expects(
        tmp_path: Path, sparse_image, notify: NotifySocket) -> None:
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    proc = _activate(a, b, args=[f"--blk-file={sparse_image()}"], notify=notify)
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(str(a))
        proc.wait(20)
    log = _stop(proc)
    assert proc.returncode == 1
    assert "systemd passed 2 socket(s)" in log and "vhostd expects 1" in log, log
    assert notify.nothing(0.2)


def test_ready_only_once_the_socket_accepts(tmp_path: Path, sparse_image,
                                           notify: NotifySocket) -> None:
    """Without activation: READY=1 comes after the socket is bound and watched, so a
    front end that connects the moment it arrives is served at once."""
    sock = tmp_path / "blk.sock"
    proc = subprocess.Popen([*VHOSTD, f"--socket-path={sock}", f"--blk-file={sparse_image()}"],
                            env={**os.environ, "NOTIFY_SOCKET": str(notify.path)},
                            stderr=subprocess.PIPE, text=True)
    try:
        ready = notify.wait_for("READY")
        assert ready["READY"] == "1" and str(sock) in ready["STATUS"]
        assert get_features(sock) & (1 << 32)
    finally:
        log = _stop(proc)
    assert proc.returncode == 0, log


def test_no_ready_when_start_fails(tmp_path: Path, notify: NotifySocket) -> None:
    r = subprocess.run([*VHOSTD, f"--socket-path={tmp_path}/s.sock",
                        f"--blk-file={tmp_path}/missing.img"],
                       env={**os.environ, "NOTIFY_SOCKET": str(notify.path)},
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and "missing.img" in r.stderr
    assert notify.nothing(0.2)


# -- unit files -----------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian: systemd)")
def test_unit_files_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """The shipped units, checked as an instance (vhostd@disk0): verify also wants
    ExecStart='s program to exist, so it points at this checkout's vhostd here."""
    vhostd = shutil.which("vhostd", path=os.path.dirname(sys.executable))
    assert vhostd, "vhostd is not installed beside this Python"
    for unit in ("vhostd@.socket", "vhostd@.service"):
        text = (UNITS / unit).read_text()
        (tmp_path / unit).write_text(text.replace("/usr/local/bin/vhostd", vhostd))
    service = (UNITS / "vhostd@.service").read_text()
    for line in ("Type=notify", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ProtectHome=yes", "PrivateNetwork=yes", "CapabilityBoundingSet=\n",
                 "SystemCallFilter=@system-service", "ReadWritePaths="):
        assert line in service, line
    r = subprocess.run(["systemd-analyze", "verify", "vhostd@disk0.socket",
                        "vhostd@disk0.service"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    # verify reports unknown keys and bad values as warnings with exit status 0.
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr + r.stdout


def _expand(group: str, seen: set[str]) -> set[str]:
    out = subprocess.run(["systemd-analyze", "syscall-filter", group], capture_output=True,
                         text=True, check=True).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        if word.startswith("@"):
            if word not in seen:
                seen.add(word)
                calls |= _expand(word, seen)
        else:
            calls.add(word)
    return calls


@pytest.mark.skipif(shutil.which("strace") is None or shutil.which("systemd-analyze") is None,
                    reason="strace or systemd-analyze is not installed (./scripts/install-deps)")
def test_system_calls_stay_inside_the_service_filter(tmp_path: Path, sparse_image) -> None:
    """SystemCallFilter=@system-service would kill vhostd at its first other system call:
    every call vhostd and its queue worker make over a front end's whole session (start,
    I/O on two queues, SIGHUP, SIGUSR1, SIGTERM) must be in the set."""
    allowed = _expand("@system-service", {"@system-service"})
    trace = tmp_path / "strace.txt"
    sock = tmp_path / "blk.sock"
    pidfile = tmp_path / "pid"
    proc = subprocess.Popen(
        ["strace", "-f", "-qq", "-o", str(trace), *VHOSTD, f"--socket-path={sock}",
         f"--blk-file={sparse_image()}", "--num-queues=2", "--queue-workers=1",
         f"--pidfile={pidfile}"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not pidfile.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        pid = int(pidfile.read_text())
        with BlkFrontend(sock, num_queues=2, timeout=15) as fe:
            for q in (0, 1):
                fe.write(q * 64, b"x" * 4096, q=q)
                fe.flush(q=q)
                assert fe.read(q * 64, 4096, q=q) == b"x" * 4096
            os.kill(pid, signal.SIGHUP)
            os.kill(pid, signal.SIGUSR1)
            time.sleep(0.3)
        os.kill(pid, signal.SIGTERM)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    used = set()
    for line in trace.read_text().splitlines():
        m = re.match(r"\d+\s+(?:<\.\.\. )?([a-z0-9_]+)[( ]", line)
        if m and m.group(1) not in ("exited", "killed", "resumed"):
            used.add(m.group(1))
    # strace itself starts the program: execve is the tracer's, not vhostd's, choice.
    assert {"mmap", "recvmsg", "preadv2", "pwritev2"} <= used, sorted(used)
    assert used - allowed == set(), f"outside @system-service: {sorted(used - allowed)}"
