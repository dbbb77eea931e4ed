"""vhostd-admin: drive an owner device's admin virtqueue from the command line.

    vhostd-admin --socket-path=OWNER.sock members
    vhostd-admin --socket-path=OWNER.sock caps
    vhostd-admin --socket-path=OWNER.sock stop 1 | resume 1 | freeze 1
    vhostd-admin --socket-path=OWNER.sock parts-get 1 -o state.bin
    vhostd-admin --socket-path=OWNER.sock parts-set 2 -i state.bin
    vhostd-admin parts-show state.bin
    vhostd-admin --socket-path=OWNER.sock move 1 2
    vhostd-admin --socket-path=OWNER1.sock export 1 -o stream.bin   # to another vhostd
    vhostd-admin --socket-path=OWNER2.sock import 1 -i stream.bin

A parts file holds exactly what DEV_PARTS_GET returned: the member's device parts,
back to back (docs/admin-over-vhost-user.md). Errors name the command, the status
and the qualifier, and exit with status 1.
"""

from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path

from vhostd_proto import virtio_admin as va
from vhostd_proto.device_parts import Part, PartsFormatError, decode_parts
from vhostd_proto.virtio_admin import PartType as P

from ..frontend.admin import AdminCommandError, AdminDriver
from .parts_stream import StreamError, export_parts, import_parts, read_records

_STATUS_BITS = [(1, "ACKNOWLEDGE"), (2, "DRIVER"), (4, "DRIVER_OK"), (8, "FEATURES_OK"),
                (0x40, "NEEDS_RESET"), (0x80, "FAILED")]


def describe_part(part: Part) -> str:
    """One line for a human."""
    try:
        name = P(part.part_type).name
    except ValueError:
        name = f"part {part.part_type:#06x}"
    flags = " optional" if part.flags & 1 << va.VIRTIO_DEV_PART_F_OPTIONAL else ""
    t = part.part_type
    v = part.value
    try:
        if t in (P.VIRTIO_DEV_PART_DEV_FEATURES, P.VIRTIO_DEV_PART_DRV_FEATURES):
            value = int.from_bytes(v, "little")
            bits = [i for i in range(8 * len(v)) if value >> i & 1]
            detail = f"{value:#x} (bits {', '.join(map(str, bits))})"
        elif t == P.VIRTIO_DEV_PART_PCI_COMMON_CFG:
            offset = struct.unpack_from("<I", part.selector)[0]
            detail = f"offset {offset}: {int.from_bytes(v, 'little')}"
        elif t == P.VIRTIO_DEV_PART_DEVICE_STATUS:
            names = [n for bit, n in _STATUS_BITS if v[0] & bit]
            detail = f"{v[0]:#04x} ({'|'.join(names) or 'reset'})"
        elif t == P.VIRTIO_DEV_PART_VQ_CFG:
            c = va.DevPartVqCfg.parse(v)
            detail = (f"vq {part.vq_index}: size {c.queue_size} enabled {c.enabled} "
                      f"vector {c.vector} desc {c.queue_desc:#x} driver {c.queue_driver:#x} "
                      f"device {c.queue_device:#x}")
        elif t == P.VIRTIO_DEV_PART_VQ_NOTIFY_CFG:
            n = va.DevPartVqNotifyData.parse(v)
            detail = (f"vq {part.vq_index}: notify_off {n.queue_notify_off} "
                      f"notif_config_data {n.queue_notif_config_data}")
        elif t == P.VHOSTD_DEV_PART_VQ_STATE:
            s = va.VhostdVqState.parse(v)
            detail = (f"vq {part.vq_index}: next avail {s.last_avail_idx} "
                      f"used {s.used_idx}")
        elif t == P.VHOSTD_BLK_PART_WCE:
            detail = "writeback" if v[0] else "writethrough"
        else:
            detail = v.hex()
    except Exception:  # a malformed value is shown raw
        detail = f"malformed: {v.hex()}"
    return f"{name}{flags} [{len(v)} bytes] {detail}"


def _connect(args: argparse.Namespace) -> AdminDriver:
    if not args.socket_path:
        raise SystemExit("vhostd-admin: --socket-path is required for this command")
    driver = AdminDriver(args.socket_path)
    driver.activate()
    return driver


def run(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "parts-show":
        if args.stream:
            with open(args.file, "rb") as f:
                for i, record in enumerate(read_records(f), start=1):
                    print(f"record {i}: device data, {len(record.data)} bytes")
                    for part in decode_parts(record.data):
                        print("  " + describe_part(part))
            return 0
        for part in decode_parts(Path(args.file).read_bytes()):
            print(describe_part(part))
        return 0
    with _connect(args) as d:
        if cmd == "members":
            n = d.member_count()
            print(f"{n} member(s): {', '.join(str(i) for i in range(1, n + 1)) or 'none'}")
        elif cmd == "caps":
            print(f"admin queue index {d.admin_index}; device-parts objects limit {d.limit}")
        elif cmd in ("stop", "resume", "freeze"):
            getattr(d, cmd)(args.member)
            print(f"member {args.member}: {cmd} done")
        elif cmd == "parts-get":
            parts = d.parts_get(args.member)
            Path(args.output).write_bytes(parts)
            print(f"member {args.member}: {len(parts)} bytes of parts written to {args.output}")
        elif cmd == "parts-set":
            data = Path(args.input).read_bytes()
            d.parts_set(args.member, data)
            print(f"member {args.member}: {len(data)} bytes of parts set (applied at resume)")
        elif cmd == "export":
            size = export_parts(d, args.member, args.output)
            print(f"member {args.member}: stopped; {size} bytes of parts written as a parts "
                  f"stream to {args.output}")
        elif cmd == "import":
            n = import_parts(d, args.member, args.input)
            print(f"member {args.member}: {n} record(s) applied; member resumed")
        elif cmd == "move":
            parts = d.move(args.source, args.dest, freeze=args.freeze)
            print(f"moved {len(parts)} bytes of parts from member {args.source} to member "
                  f"{args.dest}; member {args.dest} is running, member {args.source} stopped")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhostd-admin",
                                description="Drive a vhostd owner device's admin queue.")
    p.add_argument("--socket-path", metavar="PATH", help="the owner device's socket")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("members", help="count the members of the group")
    sub.add_parser("caps", help="show the admin queue and device-parts capability")
    for name, text in (("stop", "stop a member"), ("resume", "resume a member"),
                       ("freeze", "stop a member and make its parts final (vhostd extension)")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("member", type=int)
    sp = sub.add_parser("parts-get", help="read a member's device parts into a file")
    sp.add_argument("member", type=int)
    sp.add_argument("-o", "--output", required=True)
    sp = sub.add_parser("parts-set", help="write device parts into a stopped member")
    sp.add_argument("member", type=int)
    sp.add_argument("-i", "--input", required=True)
    sp = sub.add_parser("parts-show", help="decode a parts file")
    sp.add_argument("file")
    sp.add_argument("--stream", action="store_true", help="the file is a parts stream "
                    "(from export)")
    sp = sub.add_parser("export", help="stop a member and write its parts as a parts stream "
                        "(for another vhostd)")
    sp.add_argument("member", type=int)
    sp.add_argument("-o", "--output", required=True)
    sp = sub.add_parser("import", help="apply a parts stream to a member and resume it")
    sp.add_argument("member", type=int)
    sp.add_argument("-i", "--input", required=True)
    sp = sub.add_parser("move", help="stop SOURCE, move its parts into DEST, resume DEST")
    sp.add_argument("source", type=int)
    sp.add_argument("dest", type=int)
    sp.add_argument("--freeze", action="store_true", help="freeze the source instead of "
                    "only stopping it")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except AdminCommandError as e:
        print(f"vhostd-admin: {e}", file=sys.stderr)
        return 1
    except (OSError, PartsFormatError, RuntimeError, TimeoutError, ValueError, StreamError) as e:
        print(f"vhostd-admin: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
