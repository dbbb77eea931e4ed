"""Run the test guest under QEMU against vhost-user-blk back ends.

``GuestVM`` boots the image from ``testbed.guest`` with one
vhost-user-blk-pci device per disk and exposes the serial console line by
line.  ``StorageDaemon`` runs qemu-storage-daemon as a reference back end, so
the guest side can be checked independently of vhostd.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from testbed.guest import GuestImage
from testbed.qemu_select import (
    STORAGE_DAEMON,
    SYSTEM,
    QemuNotFound,
    find_program,
    program,
    reconnect_option,
)
from testbed.qemu_select import version as qemu_version
from testbed.unixsock import accepts

RESULT_RE = re.compile(r"VHOSTD-RESULT: (PASS|FAIL(?: (-?\d+))?)")


class GuestError(RuntimeError):
    """The guest or QEMU did something other than what the test waited for."""


@dataclass
class VhostUserBlkDisk:
    """One vhost-user-blk-pci device; the guest sees them as vda, vdb, ... in order."""

    socket: Path | str
    num_queues: int = 1
    queue_size: int = 128
    # Seconds between QEMU's reconnect attempts if the back end goes away (given to
    # QEMU as reconnect-ms or reconnect, whichever its version takes).
    reconnect: int | None = None
    # Further -device properties, e.g. {"config-wce": "off"}.
    props: Mapping[str, str | int | bool] = field(default_factory=dict)


def _prop(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


DEFAULT_MEMORY = "512M"
# Guest RAM for live migration: 512 MiB less 8 KiB. QEMU 7.2 under TCG loses guest
# writes during live migration when a RAM block is a multiple of 64 pages: its fast
# dirty-bitmap sync clears the migration bits without resetting the vCPUs' TLB dirty
# state, so a page written after a non-final sync is never sent again; the per-page
# path an unaligned size takes does reset it. (Seen without any vhost-user device too;
# fixed in later QEMU.) docs/architecture.md, "Migration and restart". Only migrating
# guests need it; the others keep the round size.
MIGRATION_MEMORY = "524280K"


def _memory_kib(size: int | str) -> int:
    """'512M', '1G', '524280K' or a number of MiB -> KiB."""
    if isinstance(size, int):
        return size * 1024
    match = re.fullmatch(r"(\d+)\s*([KMG]?)i?B?", size.strip(), re.IGNORECASE)
    if not match:
        raise ValueError(f"bad memory size {size!r}")
    return int(match.group(1)) * {"K": 1, "": 1024, "M": 1024, "G": 1 << 20}[
        match.group(2).upper()]


class GuestVM:
    """A QEMU guest with its serial console on a pipe.

    Use as a context manager; QEMU is killed on exit.  The console transcript
    (QEMU's own stderr included, so its errors show up in context) is kept in
    ``lines`` and, joined, in ``console``.
    """

    def __init__(
        self,
        image: GuestImage,
        disks: Sequence[VhostUserBlkDisk] = (),
        *,
        memory: int | str = DEFAULT_MEMORY,
        run: str | None = None,
        args: Sequence[str | int] = (),
        extra_args: Sequence[str] = (),
        qmp: Path | str | None = None,
        smp: int = 2,
        quiet: bool = True,
        qemu: str | None = None,
        readconfig: Path | str | None = None,
        direct_kernel: bool = True,
    ) -> None:
        self.image = image
        # False: no -kernel/-initrd/-append, the firmware boots from a disk.
        self.direct_kernel = direct_kernel
        self.disks = list(disks)
        # A QEMU configuration file (qemu-configs/) that describes machine, memory and
        # disks instead of the arguments built here.
        self.readconfig = Path(readconfig) if readconfig is not None else None
        self.memory_kib = _memory_kib(memory)
        self.run = run
        self.args = [str(a) for a in args]
        for arg in self.args:
            # They travel as one comma-separated word on the kernel command line.
            if not arg or re.search(r"[\s,\"]", arg):
                raise ValueError(f"guest argument {arg!r} must be non-empty without , or spaces")
        self.extra_args = list(extra_args)
        self.qmp = Path(qmp) if qmp is not None else None
        self.smp = smp
        self.quiet = quiet
        # Default: the QEMU VHOSTD_QEMU names, or PATH's (testbed.qemu_select).
        self.qemu = qemu if qemu is not None else program(SYSTEM)

        self.lines: list[str] = []
        self.result: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._cond = threading.Condition()
        self._cursor = 0
        self._eof = False
        self._reader: threading.Thread | None = None
        self._started_at = 0.0

    # --- command line ---------------------------------------------------

    def kernel_cmdline(self) -> str:
        parts = ["console=ttyS0", "panic=-1"]
        if self.quiet:
            parts.append("quiet")
        if self.run:
            parts.append(f"vhostd.run={self.run}")
        if self.args:
            parts.append(f"vhostd.args={','.join(self.args)}")
        return " ".join(parts)

    def cmdline(self) -> list[str]:
        if self.readconfig is not None:
            cmd = [self.qemu, "-readconfig", str(self.readconfig), "-smp", str(self.smp),
                   "-nodefaults", "-nographic", "-no-reboot", "-display", "none",
                   "-monitor", "none", "-serial", "stdio", "-kernel", str(self.image.kernel),
                   "-initrd", str(self.image.initrd), "-append", self.kernel_cmdline()]
            if self.qmp is not None:
                cmd += ["-qmp", f"unix:{self.qmp},server=on,wait=off"]
            return cmd + self.extra_args
        mem = f"{self.memory_kib}K"
        cmd = [
            self.qemu,
            # KVM is present on some hosts but guests hang there; TCG always works.
            "-accel",
            "tcg",
            # vhost-user back ends map guest RAM, so it must be a shared memfd.
            "-machine",
            "q35,memory-backend=mem",
            "-object",
            f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-m",
            mem,
            "-smp",
            str(self.smp),
            "-nodefaults",
            "-nographic",
            "-no-reboot",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
        ]
        if self.direct_kernel:
            cmd += ["-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
                    "-append", self.kernel_cmdline()]
        if self.qmp is not None:
            cmd += ["-qmp", f"unix:{self.qmp},server=on,wait=off"]
        for i, disk in enumerate(self.disks):
            chardev = f"socket,id=char{i},path={disk.socket}"
            if disk.reconnect is not None:
                chardev += "," + reconnect_option(disk.reconnect, qemu_version(self.qemu))
            device = (
                f"vhost-user-blk-pci,id=disk{i},chardev=char{i},"
                f"num-queues={disk.num_queues},queue-size={disk.queue_size}"
            )
            device += "".join(f",{k}={_prop(v)}" for k, v in disk.props.items())
            cmd += ["-chardev", chardev, "-device", device]
        return cmd + self.extra_args

    # --- lifecycle ------------------------------------------------------

    def start(self) -> Self:
        if self.proc is not None:
            raise GuestError("guest already started")
        self._started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.cmdline(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Its own process group: a test's Ctrl-C should reach pytest, and
            # kill() ends QEMU without touching anything else.
            start_new_session=True,
        )
        self._reader = threading.Thread(
            target=self._read_console, args=(self.proc.stdout,), name="guest-console", daemon=True
        )
        self._reader.start()
        return self

    def _read_console(self, stream: IO[bytes]) -> None:
        # A dedicated thread drains the pipe so QEMU never blocks on a full
        # pipe, whatever the test thread is doing.
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def console(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    @property
    def elapsed(self) -> float:
        """Seconds since start()."""
        return time.monotonic() - self._started_at

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def tail(self, n: int = 40) -> str:
        with self._cond:
            return "\n".join(self.lines[-n:])

    def wait_qmp(self, timeout: float = 30.0) -> None:
        """Wait until QEMU listens on its QMP socket."""
        if self.qmp is None:
            raise ValueError("this guest has no QMP socket")
        deadline = time.monotonic() + timeout
        while not accepts(self.qmp):
            if self.proc is not None and self.proc.poll() is not None:
                raise GuestError(f"QEMU exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no QMP socket {self.qmp} after {timeout} s")
            time.sleep(0.02)

    def wait_for(
        self, pattern: str | re.Pattern[str], timeout: float = 60.0, *, from_start: bool = False
    ) -> re.Match[str]:
        """Wait for a console line matching pattern and return the match.

        Lines are consumed in order: each call looks only after the line the
        previous call matched, so a sequence of waits follows the script.
        """
        if self.proc is None:
            raise GuestError("guest not started")
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            pos = 0 if from_start else self._cursor
            while True:
                while pos < len(self.lines):
                    match = regex.search(self.lines[pos])
                    pos += 1
                    if match:
                        self._cursor = pos
                        return match
                if self._eof:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{regex.pattern!r} not seen within {timeout} s; console tail:\n"
                        f"{self._tail_locked()}"
                    )
                self._cond.wait(remaining)
        # The pipe closes a moment before QEMU is reaped; wait so that the
        # exit status can be reported.
        try:
            rc: int | None = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            rc = None
        raise GuestError(
            f"QEMU exited (rc={rc}) before {regex.pattern!r} appeared; console tail:\n{self.tail()}"
        )

    def _tail_locked(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    def wait_result(self, timeout: float = 300.0) -> bool:
        """Wait for VHOSTD-RESULT and for QEMU to exit; True if the script passed."""
        deadline = time.monotonic() + timeout
        match = self.wait_for(RESULT_RE, timeout)
        self.result = match.group(1)
        assert self.proc is not None
        try:
            self.proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as exc:
            self.kill()
            raise TimeoutError(
                f"guest reported {self.result} but QEMU did not exit; console tail:\n{self.tail()}"
            ) from exc
        if self._reader is not None:
            self._reader.join(5)
        return self.result == "PASS"

    def kill(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        if self._reader is not None:
            self._reader.join(5)
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    def __repr__(self) -> str:
        return f"GuestVM({shlex.join(self.cmdline())})"


class StorageDaemon:
    """qemu-storage-daemon exporting a raw image as a vhost-user-blk socket.

    The reference back end: whatever the guest does against it is what
    vhostd has to match.
    """

    def __init__(
        self,
        image: Path | str,
        socket: Path | str,
        *,
        num_queues: int = 1,
        writable: bool = True,
        discard: bool = False,
        logical_block_size: int | None = None,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
        aio: str | None = None,
        timeout: float = 10.0,
        file_node: str | None = None,
    ) -> None:
        """``file_node``: the ``--blockdev`` of node ``file0`` instead of a buffered file
        (e.g. ``driver=file,...,cache.direct=on,aio=io_uring`` or ``driver=nbd,...``)."""
        self.file_node = file_node
        self.image = Path(image)
        self.socket = Path(socket)
        self.num_queues = num_queues
        self.writable = writable
        self.discard = discard
        self.logical_block_size = logical_block_size
        self.extra_args = list(extra_args)
        # The file driver's aio= (threads, native, io_uring); None: QEMU's default.
        self.aio = aio
        # Default: VHOSTD_QEMU's qemu-storage-daemon, or PATH's.
        self.binary = binary or find_program(STORAGE_DAEMON) or STORAGE_DAEMON
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def cmdline(self) -> list[str]:
        # Without discard=unmap the block layer accepts DISCARD but drops it.
        unmap = ",discard=unmap" if self.discard else ""
        export = (
            "type=vhost-user-blk,id=exp0,node-name=disk0,"
            f"addr.type=unix,addr.path={self.socket},"
            f"writable={'on' if self.writable else 'off'},num-queues={self.num_queues}"
        )
        if self.logical_block_size is not None:
            export += f",logical-block-size={self.logical_block_size}"
        return [
            self.binary,
            "--blockdev",
            self.file_node or
            (f"driver=file,node-name=file0,filename={self.image},cache.direct=off{unmap}"
             + (f",aio={self.aio}" if self.aio else "")),
            "--blockdev",
            f"driver=raw,node-name=disk0,file=file0{unmap}",
            "--export",
            export,
            *self.extra_args,
        ]

    def output(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def start(self) -> Self:
        if shutil.which(self.binary) is None:
            raise QemuNotFound(f"{self.binary} not found")
        # A stale socket file from an earlier run would look like readiness.
        self.socket.unlink(missing_ok=True)
        # A file rather than a pipe: nobody reads while it runs, and a full
        # pipe would stall the daemon.  It lives until __exit__, hence no with.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.cmdline(), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + self.timeout
        while not accepts(self.socket):
            if self.proc.poll() is not None:
                raise GuestError(
                    f"qemu-storage-daemon exited (rc={self.proc.returncode}):\n{self.output()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.socket} did not appear within {self.timeout} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.socket.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None
