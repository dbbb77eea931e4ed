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

    python -m testbed.demo --nbd [nbdkit|qemu-nbd]

The same on network storage, as between two hosts: the demo starts its own NBD server
(nbdkit by default, or qemu-nbd) exporting the image, and two vhostd daemons, one per
"host", each with an owner and one member on that export; the guest moves from daemon
A's member to daemon B's, and the device parts travel between the two owners as a
parts stream.
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
from .nbd import NBD_PROGRAMS, NbdServer, serve_file
from .qemu import GuestVM
from .qemu_select import SYSTEM, configs_dir, find_program, version

MiB = 1 << 20
BASE = Path("/tmp/vhostd-demo")  # the paths qemu-configs/demo-member*.cfg name


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def start_vhostd(workdir: Path, name: str, owner: Path,
                 members: list[str]) -> subprocess.Popen[bytes]:
    """One vhostd with an owner on ``owner`` and ``members``; logs in workdir/name.log."""
    pidfile = workdir / f"{name}.pid"
    logpath = workdir / f"{name}.log"
    log = open(logpath, "wb")  # noqa: SIM115 - the child keeps it
    cmd = [sys.executable, "-m", "vhostd", f"--socket-path={owner}",
           *[f"--member={m}" for m in members], f"--pidfile={pidfile}"]
    say("starting: " + shlex.join(["vhostd", *cmd[3:]]))
    proc = subprocess.Popen(cmd, stderr=log)
    deadline = time.monotonic() + 10
    while not pidfile.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"vhostd did not start:\n{logpath.read_text()}")
        time.sleep(0.05)
    return proc


def member_parts(owner: Path, member: int) -> list[str]:
    with AdminDriver(owner) as admin:
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
    p.add_argument("--nbd", nargs="?", const="nbdkit", choices=NBD_PROGRAMS,
                   help="network storage: export the image with this NBD server (default "
                   "nbdkit) and migrate between two vhostd daemons using it")
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

    server: NbdServer | None = None
    if args.nbd:
        # Two daemons, as on two hosts, reach the image only through the NBD server.
        server = serve_file(args.nbd, image, BASE / "nbd.sock", log=workdir / "nbd.log")
        say(f"started {args.nbd} exporting the image: {shlex.join(server.argv)}")
        say(f"  the export: {server.uri}")
        owners = (BASE / "owner-a.sock", BASE / "owner-b.sock")
        daemons = [start_vhostd(workdir, "vhostd-a", owners[0],
                                [f"socket-path={BASE}/m1.sock,blk-nbd={server.uri}"]),
                   start_vhostd(workdir, "vhostd-b", owners[1],
                                [f"socket-path={BASE}/m2.sock,blk-nbd={server.uri}"])]
        # Member 1 of daemon A serves m1.sock, member 1 of daemon B m2.sock.
        src_member, dst_member = (owners[0], 1), (owners[1], 1)
        labels = ("daemon A's member 1", "daemon B's member 1")
        move = OwnerMove(str(owners[0]), 1, 1, dest_owner_socket=str(owners[1]),
                         stream_path=str(BASE / "parts.stream"))
    else:
        owner = BASE / "owner.sock"
        daemons = [start_vhostd(workdir, "vhostd", owner, [
            f"socket-path={BASE}/m1.sock,blk-file={image}",
            f"socket-path={BASE}/m2.sock,blk-file={image}"])]
        src_member, dst_member = (owner, 1), (owner, 2)
        labels = ("member 1", "member 2")
        move = OwnerMove(str(owner), 1, 2)
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
        say(f"booting the guest under QEMU (TCG) on {labels[0]}:")
        say("  " + shlex.join(src.cmdline()))
        src.start()
        m = src.wait_for(r"VHOSTD-INIT: disks: (.*)", 120)
        say(f"guest is up and sees disk(s): {m.group(1).strip()}")
        src.wait_for("CACHE-TYPE write through", 60)
        say("the guest set its disk to writethrough; fio writes and verifies in rounds")
        m = src.wait_for(r"LOAD-ROUND (\d+) OK", 120)
        rounds_before = int(m.group(1))
        say(f"round {rounds_before} verified on {labels[0]}")
        for line in member_parts(*src_member):
            say(f"  {labels[0]}: {line}")
        say(f"starting the destination QEMU on {labels[1]}, waiting for the migration:")
        say("  " + shlex.join(dst.cmdline()))
        dst.start()
        dst.wait_qmp()
        summary = asyncio.run(migrate(str(src.qmp), str(dst.qmp), uri, move,
                                      progress=lambda line: say(line)))
        src_rounds = [int(x) for x in re.findall(r"LOAD-ROUND (\d+) OK", src.console)]
        rounds_before = max(src_rounds, default=0)
        m = dst.wait_for(r"LOAD-ROUND (\d+) OK", 120)
        say(f"round {m.group(1)} verified on {labels[1]}, after the migration")
        for line in member_parts(*dst_member):
            say(f"  {labels[1]}: {line}")
        ok = dst.wait_result(args.seconds + 120)
        say(f"guest finished: {'PASS' if ok else 'FAIL'}")
        if not ok:
            say("guest console:\n" + dst.console)
    except (MigrationError, TimeoutError, RuntimeError) as e:
        error = str(e)
        say(f"FAILED: {e}")
    finally:
        if not ok:
            # Before anything stops: every ring's state into the logs (printed below).
            for d in daemons:
                if d.poll() is None:
                    d.send_signal(signal.SIGUSR1)
            time.sleep(0.5)
        src.kill()
        dst.kill()
        for d in daemons:
            d.send_signal(signal.SIGTERM)
        for d in daemons:
            d.wait(10)
        if server is not None:
            server.kill()

    names = ["vhostd-a", "vhostd-b"] if args.nbd else ["vhostd"]
    logs = [(workdir / f"{n}.log").read_text(errors="replace") for n in names]
    log = "\n".join(logs)
    if args.nbd:
        # The same member number on both daemons: name them by daemon.
        served = {f"{n[-1].upper()}:member1": c for n, text in zip(names, logs, strict=True)
                  for c in re.findall(r"vhostd\.member1: requests served per queue: (.*)",
                                      text)}
    else:
        served = dict(re.findall(r"vhostd\.(member\d): requests served per queue: (.*)",
                                 log))
    lost = re.findall(r"connection lost|failing requests with EIO", log)
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
    if server is not None:
        say(f"  storage           {args.nbd} {server.uri}, "
            f"{'no connection lost' if not lost else f'{len(lost)} connection problem(s)'}")
    say(f"  image             {st.st_size // MiB} MiB, {st.st_blocks * 512 // MiB} MiB "
        f"allocated")
    say(f"  wall time         {time.monotonic() - t0:.1f} s")
    if not ok:
        notable = [line for line in log.splitlines()
                   if " INFO " not in line or "state:" in line or "overdue" in line]
        say("vhostd's warnings, errors and ring state at the failure:")
        for line in notable[-60:]:
            say(f"  {line}")
    if args.keep:
        say(f"  logs and image in {workdir}")
    elif args.workdir is None:
        image.unlink(missing_ok=True)
    return 0 if ok and all(d.returncode == 0 for d in daemons) else 1


if __name__ == "__main__":
    sys.exit(main())
