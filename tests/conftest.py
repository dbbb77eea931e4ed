"""Fixtures shared by every test layer: running a real vhostd process."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testbed import qemu_select


class VhostdProcess:
    """A vhostd daemon started for a test; stderr goes to a file for inspection."""

    def __init__(self, args: list[str], log_path: Path, socket_path: Path | None,
                 pass_fds: tuple[int, ...] = ()) -> None:
        self.args = args
        self.log_path = log_path
        self.socket_path = socket_path
        self.pidfile = log_path.with_suffix(".pid")
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vhostd", f"--pidfile={self.pidfile}", *args],
            stdout=subprocess.PIPE, stderr=self._log, pass_fds=pass_fds,
        )

    def wait_ready(self, timeout: float = 10.0) -> None:
        """The pid file appears once every socket listens."""
        deadline = time.monotonic() + timeout
        while not self.pidfile.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"vhostd exited with {self.proc.returncode}:\n{self.log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"vhostd did not become ready:\n{self.log}")
            time.sleep(0.02)

    @property
    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode

    def assert_healthy(self) -> None:
        """No crash and no internal error in the log."""
        text = self.log
        assert "Traceback" not in text, text
        assert "internal error" not in text, text


def _short_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A folder for unix sockets, whose paths must stay under 108 bytes (pytest's
    tmp_path may be longer); named after the test, removed afterwards."""
    name = re.sub(r"[^\w-]", "_", request.node.name)[:16]
    d = Path(tempfile.mkdtemp(prefix=f"v{name}-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


short_dir = pytest.fixture(_short_dir)
workdir = pytest.fixture(_short_dir, name="workdir")


@pytest.fixture
def sparse_image(tmp_path: Path) -> Callable[..., Path]:
    def make(size: int = 64 << 20, name: str = "disk.img") -> Path:
        path = tmp_path / name
        with open(path, "wb") as f:
            f.truncate(size)
        return path
    return make


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Iterator[None]:
    """Keep each phase's report on the item, so fixtures can tell a failed test."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def _explain(p: VhostdProcess) -> None:
    """A failed test: ask a running vhostd for its rings' state (SIGUSR1) and print
    what its log says beyond INFO, with that state (pytest shows it with the failure)."""
    if p.alive():
        p.signal(signal.SIGUSR1)
        time.sleep(0.5)
    lines = [line for line in p.log.splitlines()
             if " INFO " not in line or "state:" in line or "overdue" in line]
    print(f"--- {p.log_path.name}: warnings, errors and ring state ---")
    print("\n".join(lines[-80:]))


@pytest.fixture
def vhostd(tmp_path: Path, request: pytest.FixtureRequest
           ) -> Iterator[Callable[..., VhostdProcess]]:
    """Start vhostd with extra args; it is stopped (and checked) at teardown."""
    started: list[VhostdProcess] = []

    def start(*args: str, socket_path: Path | None = None, wait: bool = True,
              pass_fds: tuple[int, ...] = ()) -> VhostdProcess:
        argv = list(args)
        if not any(a.startswith("--fd") for a in argv):
            socket_path = socket_path or tmp_path / f"vhostd{len(started)}.sock"
            argv.insert(0, f"--socket-path={socket_path}")
        p = VhostdProcess(argv, tmp_path / f"vhostd{len(started)}.log", socket_path, pass_fds)
        if wait:
            p.wait_ready()
        started.append(p)
        return p

    yield start
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        for p in started:
            _explain(p)
    for p in started:
        rc = p.stop()
        p.assert_healthy()
        assert rc in (0, -signal.SIGKILL), f"vhostd exited with {rc}:\n{p.log}"


def pytest_configure(config: pytest.Config) -> None:
    folder = qemu_select.qemu_folder()
    if folder is not None and qemu_select.find_program(qemu_select.SYSTEM) is None:
        # A QEMU asked for by name must not turn into skipped tests.
        raise pytest.UsageError(
            f"{qemu_select.QEMU_ENV}={folder} holds no executable {qemu_select.SYSTEM} "
            "(scripts/install-qemu10 PREFIX writes one in PREFIX/bin)")


def pytest_report_header(config: pytest.Config) -> list[str]:
    """The QEMU the end-to-end and qsd tests run, so a report says which one passed."""
    return qemu_select.describe()


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")
