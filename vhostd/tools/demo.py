"""The demo: a real Linux guest under QEMU does verified I/O on a disk served by vhostd.

    python -m vhostd.tools.demo [--workdir DIR] [--size MiB] [--keep]

Builds (or reuses) the small test guest, creates a sparse image, starts vhostd on
it, boots the guest under QEMU with that disk, runs fio random writes with crc32c
verification followed by a separate verify pass, and prints what happened.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .guest import build_guest
from .qemu import GuestVM, VhostUserBlkDisk

MiB = 1 << 20


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def start_vhostd(image: Path, sock: Path, workdir: Path) -> subprocess.Popen[bytes]:
    pidfile = workdir / "vhostd.pid"
    log = open(workdir / "vhostd.log", "wb")  # noqa: SIM115 - the child keeps it
    cmd = [sys.executable, "-m", "vhostd", f"--socket-path={sock}", f"--blk-file={image}",
           f"--pidfile={pidfile}"]
    say("starting: " + shlex.join(["vhostd", *cmd[3:]]))
    proc = subprocess.Popen(cmd, stderr=log)
    deadline = time.monotonic() + 10
    while not pidfile.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"vhostd did not start:\n{(workdir / 'vhostd.log').read_text()}")
        time.sleep(0.05)
    return proc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vhostd-demo", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, help="where to put the image and logs "
                   "(default: a temporary directory, removed afterwards)")
    p.add_argument("--size", type=int, default=256, help="disk size in MiB (default 256)")
    p.add_argument("--io-size", default="64M", help="how much fio writes (default 64M)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)

    if shutil.which("qemu-system-x86_64") is None:
        print("vhostd-demo: qemu-system-x86_64 is missing (scripts/install-deps installs it)",
              file=sys.stderr)
        return 1
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vhostd-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    sock = Path("/tmp") / f"vhostd-demo-{os.getpid()}.sock"
    t0 = time.monotonic()

    say("building the test guest (cached after the first run)")
    image_files = build_guest(progress=lambda line: say("  " + line))
    say(f"guest kernel {image_files.kernel}")

    image = workdir / "disk.img"
    with open(image, "wb") as f:
        f.truncate(args.size * MiB)
    say(f"created a sparse {args.size} MiB image {image}")

    vhostd = start_vhostd(image, sock, workdir)
    ok = False
    try:
        vm = GuestVM(image_files, [VhostUserBlkDisk(sock)], run="fio_verify",
                     args=[args.io_size])
        say("booting the guest under QEMU (TCG):")
        say("  " + shlex.join(vm.cmdline()))
        with vm:
            m = vm.wait_for(r"VHOSTD-INIT: disks: (.*)", 120)
            say(f"guest is up and sees disk(s): {m.group(1).strip()}")
            say("running fio random writes with crc32c verification, then a verify pass")
            ok = vm.wait_result(600)
            guest_time = vm.elapsed
            fio_lines = [ln for ln in vm.lines if re.search(r"IOPS=|err=|verify", ln)]
        say(f"guest finished in {guest_time:.1f} s: {'PASS' if ok else 'FAIL'}")
        for line in fio_lines[-8:]:
            say("  guest: " + line.strip())
        if not ok:
            say("guest console:\n" + vm.console)
    finally:
        vhostd.send_signal(signal.SIGTERM)
        vhostd.wait(10)
        sock.unlink(missing_ok=True)

    log = (workdir / "vhostd.log").read_text(errors="replace")
    served = re.findall(r"requests served per queue: (.*)", log)
    st = os.stat(image)
    say("summary:")
    say(f"  result            {'verified write/read PASSED' if ok else 'FAILED'}")
    say(f"  total time        {time.monotonic() - t0:.1f} s")
    say(f"  vhostd requests   {served[-1] if served else 'none logged'}")
    say(f"  image             {st.st_size // MiB} MiB, {st.st_blocks * 512 // MiB} MiB "
        f"allocated")
    say(f"  vhostd exit code  {vhostd.returncode}")
    if args.keep or args.workdir:
        say(f"  logs and image in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok and vhostd.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
