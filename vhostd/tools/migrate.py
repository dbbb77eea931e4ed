"""vhostd-migrate: live-migrate a running QEMU guest from one vhostd member to another.

    vhostd-migrate --source-qmp=SRC.qmp --dest-qmp=DST.qmp --uri=unix:/tmp/mig.sock \\
                   [--owner=OWNER.sock --source-member=1 --dest-member=2]

The source QEMU runs the guest on member A; the destination QEMU was started with
``-incoming`` (or ``-incoming defer``) on member B. QEMU copies guest RAM while vhostd
logs every page it writes (dirty logging). With ``--owner``, the migration pauses at
QEMU's ``pre-switchover`` point, after the source has stopped its vhost device: the
owner stops A, reads its device parts, writes them into B and resumes B, so state
QEMU 7.2 does not carry (the guest's write-cache mode) arrives; then QEMU finishes.

What QEMU carries, QEMU sets: the destination QEMU's own start-up messages (features,
ring addresses and positions) come after the parts and take precedence; the parts
fill in the rest.

On any failure the source keeps running on A: a stopped A is resumed, the migration
is cancelled, and the error is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from qemu.qmp import QMPClient

from vhostd_proto.device_parts import decode_parts
from vhostd_proto.virtio_admin import DevPartVqCfg, PartType

from ..frontend.admin import AdminDriver
from .parts_stream import export_parts, import_parts

Progress = Callable[[str], None]
STATUS_DRIVER_OK = 0x4
PROGRESS_INTERVAL = 0.5


class MigrationError(Exception):
    pass


@dataclass
class Summary:
    total_ms: int = 0
    downtime_ms: int = 0
    setup_ms: int = 0
    ram_transferred: int = 0
    ram_total: int = 0
    dirty_pages_rate: int = 0
    iterations: int = 0
    parts_bytes: int = 0
    parts_ms: float = 0.0
    statuses: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [
            f"total time        {self.total_ms} ms",
            f"downtime          {self.downtime_ms} ms",
            f"RAM transferred   {self.ram_transferred / (1 << 20):.1f} MiB of "
            f"{self.ram_total / (1 << 20):.0f} MiB",
            f"precopy passes    {self.iterations}",
            f"device parts      {self.parts_bytes} bytes moved in {self.parts_ms:.1f} ms"
            if self.parts_bytes else "device parts      not moved (no owner given)",
        ]


@dataclass
class OwnerMove:
    """Where the device state goes: from a member of one owner to a member of the same
    owner, or of another owner (another vhostd) through a parts stream."""

    owner_socket: str
    source: int
    dest: int
    dest_owner_socket: str | None = None  # None: the same owner
    stream_path: str | None = None  # where the parts stream goes between two owners

    @property
    def dest_owner(self) -> str:
        return self.dest_owner_socket or self.owner_socket

    @property
    def same_owner(self) -> bool:
        return self.dest_owner == self.owner_socket


def _count(owner: str) -> int:
    with AdminDriver(owner) as admin:
        admin.activate()
        return admin.member_count()


def check_members(move: OwnerMove) -> None:
    """Before anything starts: both members exist and the destination is idle."""
    for m, owner in ((move.source, move.owner_socket), (move.dest, move.dest_owner)):
        n = _count(owner)
        if not 1 <= m <= n:
            raise MigrationError(f"member {m} does not exist (the owner at {owner} has {n})")
    if move.same_owner and move.source == move.dest:
        raise MigrationError("source and destination member are the same")
    with AdminDriver(move.dest_owner) as admin:
        admin.activate()
        # Busy: a driver has the member running with a ring enabled. A member whose
        # front end left, or that a previous migration stopped, is free.
        driver_ok = enabled = False
        for part in decode_parts(admin.parts_get(move.dest)):
            if part.part_type == PartType.VIRTIO_DEV_PART_DEVICE_STATUS:
                driver_ok = bool(part.value[0] & STATUS_DRIVER_OK)
            elif part.part_type == PartType.VIRTIO_DEV_PART_VQ_CFG:
                enabled |= bool(DevPartVqCfg.parse(part.value).enabled)
        if driver_ok and enabled:
            raise MigrationError(f"destination member {move.dest} is busy: a driver has it "
                                 f"running")


def move_parts(move: OwnerMove) -> int:
    """The switch-over step: A's parts into B, B resumed. Returns the parts size."""
    try:
        if move.same_owner:
            with AdminDriver(move.owner_socket) as admin:
                admin.activate()
                return len(admin.move(move.source, move.dest))
        stream = move.stream_path
        if stream is None:
            with tempfile.NamedTemporaryFile(prefix="vhostd-parts-", delete=False) as f:
                stream = f.name
        with AdminDriver(move.owner_socket) as admin:
            admin.activate()
            size = export_parts(admin, move.source, stream)
        with AdminDriver(move.dest_owner) as admin:
            admin.activate()
            import_parts(admin, move.dest, stream)
        if move.stream_path is None:
            os.unlink(stream)
        return size
    except BaseException:
        # Leave A able to run again; B goes back to running as it was.
        for m, owner in ((move.source, move.owner_socket), (move.dest, move.dest_owner)):
            try:
                resume_member(owner, m)
            except Exception:
                pass
        raise


def resume_member(owner_socket: str, member: int) -> None:
    with AdminDriver(owner_socket) as admin:
        admin.activate()
        admin.resume(member)


async def _status(qmp: QMPClient) -> dict[str, Any]:
    return await qmp.execute("query-migrate")  # type: ignore[return-value]


async def migrate(source_qmp: str, dest_qmp: str, uri: str, move: OwnerMove | None = None,
                  progress: Progress = print, incoming_defer: bool = False,
                  timeout: float = 300.0,
                  fail_at_switchover: bool = False) -> Summary:
    """Run one migration; raise MigrationError with the source left running on A."""
    summary = Summary()
    moved = False
    if move is not None:
        await asyncio.to_thread(check_members, move)
    src, dst = QMPClient("source"), QMPClient("destination")
    await src.connect(source_qmp)
    await dst.connect(dest_qmp)
    try:
        caps = [{"capability": "events", "state": True}]
        if move is not None:
            caps.append({"capability": "pause-before-switchover", "state": True})
        await src.execute("migrate-set-capabilities", {"capabilities": caps})
        # TCG guests dirty memory slowly; let QEMU use the bandwidth it can.
        await src.execute("migrate-set-parameters",
                          {"max-bandwidth": 8 << 30, "downtime-limit": 300})
        if incoming_defer:
            await dst.execute("migrate-incoming", {"uri": uri})
        t0 = time.monotonic()
        await src.execute("migrate", {"uri": uri})
        progress(f"migration started to {uri}")
        last = ""
        shown = 0.0
        while True:
            if time.monotonic() - t0 > timeout:
                raise MigrationError(f"migration did not finish in {timeout:.0f} s")
            info = await _status(src)
            status = info.get("status", "?")
            if status != last:
                summary.statuses.append(status)
                last = status
            ram = info.get("ram", {})
            if status == "active" and time.monotonic() - shown >= PROGRESS_INTERVAL:
                shown = time.monotonic()
                progress(f"  {status}: {ram.get('transferred', 0) >> 20} MiB sent, "
                         f"{ram.get('remaining', 0) >> 20} MiB left, pass "
                         f"{ram.get('dirty-sync-count', 0)}")
            if status == "pre-switchover" and not moved:
                moved = True
                assert move is not None
                progress(f"  pre-switchover: source device stopped; moving device parts "
                         f"member {move.source} -> member {move.dest}")
                p0 = time.monotonic()
                try:
                    if fail_at_switchover:
                        raise MigrationError("failure injected at switch-over (test)")
                    summary.parts_bytes = await asyncio.to_thread(move_parts, move)
                except Exception as e:
                    moved = False  # move_parts resumed both members itself
                    raise MigrationError(f"moving device parts failed: {e}; migration "
                                         f"cancelled, the guest keeps running on member "
                                         f"{move.source}") from e
                summary.parts_ms = (time.monotonic() - p0) * 1000
                progress(f"  parts moved ({summary.parts_bytes} bytes, "
                         f"{summary.parts_ms:.1f} ms); continuing")
                await src.execute("migrate-continue", {"state": "pre-switchover"})
            elif status == "completed":
                # QEMU reports "completed" a moment before it has computed the
                # times (they read 0 meanwhile): ask again briefly.
                for _ in range(20):
                    if info.get("total-time"):
                        break
                    await asyncio.sleep(0.05)
                    info = await _status(src)
                ram = info.get("ram", {})
                summary.total_ms = info.get("total-time", 0)
                summary.downtime_ms = info.get("downtime", 0)
                summary.setup_ms = info.get("setup-time", 0)
                summary.ram_transferred = ram.get("transferred", 0)
                summary.ram_total = ram.get("total", 0)
                summary.dirty_pages_rate = ram.get("dirty-pages-rate", 0)
                summary.iterations = ram.get("dirty-sync-count", 0)
                break
            elif status in ("failed", "cancelled"):
                raise MigrationError(f"QEMU migration {status}: "
                                     f"{info.get('error-desc', 'no reason given')}")
            await asyncio.sleep(0.05)
        # The destination runs once it has loaded the state.
        for _ in range(200):
            st = await dst.execute("query-status")
            if st.get("status") == "running":  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.05)
        else:
            raise MigrationError("the destination did not start running")
        progress(f"migration completed: total {summary.total_ms} ms, downtime "
                 f"{summary.downtime_ms} ms")
        return summary
    except BaseException as e:
        # Whatever went wrong, the guest must keep running on the source: cancel QEMU's
        # migration (a paused pre-switchover source resumes) and, if the owner already
        # stopped A, resume A.
        completed = "completed" in summary.statuses
        if not completed:
            try:
                await src.execute("migrate_cancel")
            except Exception:
                pass
            if moved and move is not None:
                try:
                    await asyncio.to_thread(resume_member, move.owner_socket, move.source)
                except Exception:
                    pass
        if isinstance(e, MigrationError):
            raise
        raise MigrationError(f"{type(e).__name__}: {e}") from e
    finally:
        for qmp in (src, dst):
            try:
                await qmp.disconnect()
            except Exception:  # a QEMU that died closes its QMP socket abruptly
                pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vhostd-migrate", description=__doc__.split("\n")[0])
    p.add_argument("--source-qmp", required=True, help="QMP socket of the source QEMU")
    p.add_argument("--dest-qmp", required=True, help="QMP socket of the destination QEMU")
    p.add_argument("--uri", required=True, help="migration URI, e.g. unix:/tmp/mig.sock")
    p.add_argument("--incoming-defer", action="store_true",
                   help="the destination was started with -incoming defer")
    p.add_argument("--owner", help="owner device socket: move device parts at switch-over")
    p.add_argument("--source-member", type=int, help="member the guest runs on now")
    p.add_argument("--dest-member", type=int, help="member the destination QEMU uses")
    p.add_argument("--dest-owner", help="owner socket of the destination member when it "
                   "lives in another vhostd (default: --owner)")
    p.add_argument("--parts-stream", help="file the parts stream goes through between two "
                   "owners (default: a temporary file)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    move = None
    if args.owner:
        if not args.source_member or not args.dest_member:
            p.error("--owner needs --source-member and --dest-member")
        move = OwnerMove(args.owner, args.source_member, args.dest_member, args.dest_owner,
                         args.parts_stream)
    try:
        summary = asyncio.run(migrate(args.source_qmp, args.dest_qmp, args.uri, move,
                                      incoming_defer=args.incoming_defer))
    except MigrationError as e:
        print(f"vhostd-migrate: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(summary)))
    else:
        for line in summary.lines():
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
