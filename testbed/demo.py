"""The demo: a running guest's disk moves from one vhostd member to another, live.

    python -m testbed.demo [--workdir DIR] [--seconds N] [--keep]

1. builds (or reuses) the small test guest;
2. starts vhostd with an owner device and two members, both on one sparse image
   (shared storage);
3. boots the guest under QEMU on member 1 (qemu-configs/demo-member1.cfg); the guest
   switches its disk to writethrough and writes and verifies with fio in rounds;
4. live-migrates the guest to a second QEMU on member 2 (qemu-configs/demo-member2.cfg):
   QEMU copies RAM while vhostd logs every page it writes, and at switch-over the
   owner moves member 1's device parts (ring positions, the writethrough mode) into
   member 2;
5. lets the guest finish its rounds on member 2, verifies, and prints a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from vhostd.frontend.admin import AdminDriver
from vhostd.tools.admin_cli import describe_part
from vhostd.tools.migrate import MigrationError, OwnerMove, migrate
from vhostd_proto.device_parts import decode_parts

from .guest import build_guest
from .qemu import GuestVM
from .qemu_select import SYSTEM, configs_dir, find_program, version

MiB = 1 << 20
BASE = Path("/tmp/vhostd-demo")  # the paths qemu-configs/demo-member*.cfg name


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def start_vhostd(image: Path, workdir: Path) -> subprocess.Popen[bytes]:
    pidfile = workdir / "vhostd.pid"
    log = open(workdir / "vhostd.log", "wb")  # noqa: SIM115 - the child keeps it
    cmd = [sys.executable, "-m", "vhostd", f"--socket-path={BASE}/owner.sock",
           f"--member=socket-path={BASE}/m1.sock,blk-file={image}",
           f"--member=socket-path={BASE}/m2.sock,blk-file={image}",
           f"--pidfile={pidfile}"]
    say("starting: " + shlex.join(["vhostd", *cmd[3:]]))
    proc = subprocess.Popen(cmd, stderr=log)
    deadline = time.monotonic() + 10
    while not pidfile.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"vhostd did not start:\n{(workdir / 'vhostd.log').read_text()}")
        time.sleep(0.05)
    return proc


def member_parts(member: int) -> list[str]:
    with AdminDriver(BASE / "owner.sock") as admin:
        admin.activate()
        return [describe_part(p) for p in decode_parts(admin.parts_get(member))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vhostd-demo", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, help="where to keep the image and logs "
                   "(default: /tmp/vhostd-demo, emptied first)")
    p.add_argument("--seconds", type=int, default=30,
                   help="how long the guest's verified write load runs (default 30)")
    p.add_argument("--size", type=int, default=256, help="disk size in MiB (default 256)")
    p.add_argument("--keep", action="store_true", help="keep the image and logs")
    args = p.parse_args(argv)

    qemu = find_program(SYSTEM)
    if qemu is None:
        print(f"vhostd-demo: {SYSTEM} is missing (scripts/install-deps installs it)",
              file=sys.stderr)
        return 1
    # The configuration files in the chardev form this QEMU takes (reconnect-ms or,
    # before 9.2, reconnect).
    configs = configs_dir(version(qemu))
    shutil.rmtree(BASE, ignore_errors=True)
    BASE.mkdir(parents=True)
    workdir = args.workdir or BASE
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    say("building the test guest (cached after the first run)")
    guest = build_guest(progress=lambda line: say("  " + line))
    image = workdir / "disk.img"
    with open(image, "wb") as f:
        f.truncate(args.size * MiB)
    say(f"created a sparse {args.size} MiB image {image}, shared by both members")

    vhostd = start_vhostd(image, workdir)
    load = [str(args.seconds), "16M", "vda", "wt"]
    src = GuestVM(guest, readconfig=configs / "demo-member1.cfg", run="migrate_load",
                  args=load, qmp=BASE / "source.qmp")
    uri = f"unix:{BASE}/migrate.sock"
    dst = GuestVM(guest, readconfig=configs / "demo-member2.cfg", run="migrate_load",
                  args=load, qmp=BASE / "dest.qmp", extra_args=["-incoming", uri])
    ok = False
    summary = None
    error = ""
    rounds_before = 0
    try:
        say("booting the guest under QEMU (TCG) on member 1:")
        say("  " + shlex.join(src.cmdline()))
        src.start()
        m = src.wait_for(r"VHOSTD-INIT: disks: (.*)", 120)
        say(f"guest is up and sees disk(s): {m.group(1).strip()}")
        src.wait_for("CACHE-TYPE write through", 60)
        say("the guest set its disk to writethrough; fio writes and verifies in rounds")
        m = src.wait_for(r"LOAD-ROUND (\d+) OK", 120)
        rounds_before = int(m.group(1))
        say(f"round {rounds_before} verified on member 1")
        for line in member_parts(1):
            say(f"  member 1: {line}")
        say("starting the destination QEMU on member 2, waiting for the migration:")
        say("  " + shlex.join(dst.cmdline()))
        dst.start()
        dst.wait_qmp()
        move = OwnerMove(str(BASE / "owner.sock"), 1, 2)
        summary = asyncio.run(migrate(str(src.qmp), str(dst.qmp), uri, move,
                                      progress=lambda line: say(line)))
        src_rounds = [int(x) for x in re.findall(r"LOAD-ROUND (\d+) OK", src.console)]
        rounds_before = max(src_rounds, default=0)
        m = dst.wait_for(r"LOAD-ROUND (\d+) OK", 120)
        say(f"round {m.group(1)} verified on member 2, after the migration")
        for line in member_parts(2):
            say(f"  member 2: {line}")
        ok = dst.wait_result(args.seconds + 120)
        say(f"guest finished: {'PASS' if ok else 'FAIL'}")
        if not ok:
            say("guest console:\n" + dst.console)
    except (MigrationError, TimeoutError, RuntimeError) as e:
        error = str(e)
        say(f"FAILED: {e}")
    finally:
        src.kill()
        dst.kill()
        vhostd.send_signal(signal.SIGTERM)
        vhostd.wait(10)

    log = (workdir / "vhostd.log").read_text(errors="replace")
    served = dict(re.findall(r"vhostd\.(member\d): requests served per queue: (.*)", log))
    marks = re.findall(r"dirty log: (\d+) page marks", log)
    rounds = re.findall(r"migrate_load: (\d+) rounds OK", dst.console)
    st = os.stat(image)
    say("summary:")
    say(f"  result            {'PASS: every round verified' if ok else 'FAILED ' + error}")
    if summary is not None:
        for line in summary.lines():
            say(f"  {line}")
    say(f"  vhostd dirty log  {sum(map(int, marks))} page marks during the migration")
    say(f"  verified rounds   {rounds_before} on member 1, "
        f"{int(rounds[0]) - rounds_before if rounds else '?'} on member 2")
    for member, counts in sorted(served.items()):
        say(f"  {member} requests {counts}")
    say(f"  image             {st.st_size // MiB} MiB, {st.st_blocks * 512 // MiB} MiB "
        f"allocated")
    say(f"  wall time         {time.monotonic() - t0:.1f} s")
    if args.keep:
        say(f"  logs and image in {workdir}")
    elif args.workdir is None:
        image.unlink(missing_ok=True)
    return 0 if ok and vhostd.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
