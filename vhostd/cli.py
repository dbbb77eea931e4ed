"""Command line of the vhostd daemon, following QEMU's back-end program conventions.

Foreground only; logs go to stderr; SIGTERM ends the daemon quickly; any start-up
failure exits non-zero with a one-line reason.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass

from .devices.backing import FileBackend
from .devices.blk import BlkDevice, BlkOptions
from .devices.owner import OwnerDevice
from .engine.backend import VhostUserBackend
from .engine.inflight import CHECK_ENV
from .engine.memory import MAX_MAPPED_ENV
from .engine.seals import ALLOW_UNSEALED_ENV
from .engine.virtqueue import KICK_WAIT_DEFAULT_US, KICK_WAIT_ENV
from .shell.daemon import Daemon, Endpoint
from .shell.server import StartupError, adopt_listening_fd, bind_unix
from .shell.worker import WorkerProcess

CAPABILITIES = {"type": "block", "features": ["read-only", "blk-file"]}


def _number(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _wait_us(text: str) -> int:
    value = _number(text)
    if not 0 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1000000")
    return value


def _positive(text: str) -> int:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not positive")
    return value


def _workers(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or auto") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _mode(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode") from None


@dataclass
class MemberSpec:
    socket_path: str
    blk_file: str
    read_only: bool = False
    num_queues: int = 1
    queue_size: int = 1024
    serial: str = ""


_MEMBER_KEYS = {"socket-path", "blk-file", "read-only", "num-queues", "queue-size", "serial"}


def parse_member(text: str) -> MemberSpec:
    """``socket-path=PATH,blk-file=FILE[,read-only=on][,num-queues=N]...``"""
    opts: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in _MEMBER_KEYS:
            raise argparse.ArgumentTypeError(
                f"{item!r}: expected one of {', '.join(sorted(_MEMBER_KEYS))} as key=value")
        if key in opts:
            raise argparse.ArgumentTypeError(f"{key} given twice")
        opts[key] = value
    for key in ("socket-path", "blk-file"):
        if not opts.get(key):
            raise argparse.ArgumentTypeError(f"{key}= is required")
    ro = opts.get("read-only", "off")
    if ro not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"read-only={ro}: expected on or off")
    return MemberSpec(
        socket_path=opts["socket-path"], blk_file=opts["blk-file"], read_only=ro == "on",
        num_queues=_positive(opts.get("num-queues", "1")),
        queue_size=_positive(opts.get("queue-size", "1024")),
        serial=opts.get("serial", ""),
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vhostd",
        description="vhost-user back end serving virtio-blk devices to QEMU, optionally "
                    "as members of an owner device with a virtio admin virtqueue.",
    )
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the back-end capabilities as JSON and exit")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH",
                       help="listen for the front end on this unix socket")
    where.add_argument("--fd", type=int, metavar="N",
                       help="use the inherited listening unix socket N")
    p.add_argument("--socket-mode", type=_mode, default=0o600, metavar="MODE",
                   help="permissions of the socket file (octal, default 0600)")
    p.add_argument("--blk-file", metavar="FILE",
                   help="raw image file to serve (with --member: the owner's own disk)")
    p.add_argument("--member", action="append", default=[], metavar="OPTS",
                   type=parse_member,
                   help="add a member device managed by an owner device on --socket-path: "
                        "socket-path=PATH,blk-file=FILE[,read-only=on][,num-queues=N]"
                        "[,queue-size=N][,serial=ID] (repeat; members are 1..N in order)")
    p.add_argument("--read-only", action="store_true", help="serve the image read-only")
    p.add_argument("--num-queues", type=_positive, default=1, metavar="N",
                   help="number of request queues (default 1)")
    p.add_argument("--queue-size", type=_positive, default=1024, metavar="N",
                   help="largest queue size the front end may use (default 1024, QEMU's "
                        "maximum)")
    p.add_argument("--logical-block-size", type=_positive, default=512, metavar="N",
                   help="logical block size in bytes (default 512)")
    p.add_argument("--serial", default="", metavar="ID",
                   help="device serial returned by GET_ID (default: the file name)")
    p.add_argument("--writethrough", action="store_true",
                   help="start with the write cache off (the driver may change it)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="keep each device's driver-set state (write-cache mode) in DIR, so a "
                        "restarted vhostd resumes it")
    p.add_argument("--queue-workers", type=_workers, default=None, metavar="N|auto",
                   help="worker processes that serve request queues beside the main "
                        "process, so several queues (or devices) use several cores; queues "
                        "are dealt round-robin to the main process and the workers "
                        "(default auto: one less than the smaller of half the CPUs and the queues)")
    p.add_argument("--pidfile", metavar="PATH",
                   help="write the process id here once the socket listens (readiness)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"],
                   help="stderr log level (default info)")
    p.add_argument("--event-loop", default="uvloop", choices=["uvloop", "asyncio"],
                   help="event loop implementation (default uvloop)")
    p.add_argument("--kick-batch-wait", type=_wait_us, default=None, metavar="US",
                   help="kick batching (EVENT_IDX): the driver may add up to half the "
                        "last batch before it kicks, and the device looks at the ring "
                        "after this many microseconds anyway (default "
                        f"{KICK_WAIT_DEFAULT_US}; 0: a kick for every request)")
    p.add_argument("--max-mapped-memory", type=_size, default=None, metavar="SIZE",
                   help="address space one front end may have vhostd map (guest RAM, dirty "
                        "log, inflight region), e.g. 512G or 4T (default 1T); more is refused")
    p.add_argument("--allow-unsealed-memory", action="store_true",
                   help="map guest memory fds not sealed against shrinking (e.g. QEMU "
                        "memory-backend-file); a front end that shrinks one then crashes "
                        "vhostd with every device it serves")
    p.add_argument("--check-rings", action="store_true",
                   help="debugging: check every split-ring take and completion against "
                        "the inflight flags and the rings, and log impossible ones (slower)")
    return p


def _size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in units else ""
    try:
        value = int(t[:len(t) - len(unit)]) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 512G, 1T)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the size must be positive")
    return value


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _blk_device(name: str, path: str, read_only: bool, options: BlkOptions,
                state_dir: str | None = None) -> BlkDevice:
    if state_dir:
        options.state_path = os.path.join(state_dir, f"{name}.json")
    try:
        backend = FileBackend(path, read_only=read_only)
    except OSError as e:
        raise StartupError(f"cannot open {path}: {e.strerror}") from e
    try:
        return BlkDevice(name, backend, options)
    except ValueError as e:
        backend.close()
        raise StartupError(f"{name}: {e}") from e


def _listen(socket_path: str | None, fd: int | None, mode: int) -> tuple[socket.socket,
                                                                          str | None]:
    if socket_path is not None:
        return bind_unix(socket_path, mode), socket_path
    assert fd is not None
    return adopt_listening_fd(fd), None


def _make_endpoints(args: argparse.Namespace, loop: asyncio.AbstractEventLoop
                    ) -> list[Endpoint]:
    if args.socket_path is None and args.fd is None:
        raise StartupError("one of --socket-path or --fd is required")
    if not args.blk_file and not args.member:
        raise StartupError("--blk-file is required (or --member for an owner device)")
    if args.state_dir and not os.path.isdir(args.state_dir):
        raise StartupError(f"--state-dir {args.state_dir} is not a directory")
    disk = None
    if args.blk_file:
        disk = _blk_device("blk0" if not args.member else "owner-disk", args.blk_file,
                           args.read_only, BlkOptions(
                               num_queues=args.num_queues,
                               queue_size=args.queue_size,
                               logical_block_size=args.logical_block_size,
                               serial=args.serial,
                               writeback=not args.writethrough,
                           ), args.state_dir)
    endpoints: list[Endpoint] = []
    if not args.member:
        assert disk is not None
        sock, path = _listen(args.socket_path, args.fd, args.socket_mode)
        return [Endpoint(VhostUserBackend(disk, loop), sock, path)]
    members = []
    for i, spec in enumerate(args.member, start=1):
        device = _blk_device(f"member{i}", spec.blk_file, spec.read_only, BlkOptions(
            num_queues=spec.num_queues, queue_size=spec.queue_size,
            logical_block_size=args.logical_block_size, serial=spec.serial,
            writeback=not args.writethrough,
        ), args.state_dir)
        members.append(VhostUserBackend(device, loop))
    owner = VhostUserBackend(OwnerDevice(members, disk), loop)
    try:
        sock, path = _listen(args.socket_path, args.fd, args.socket_mode)
        endpoints.append(Endpoint(owner, sock, path))
        for spec, backend in zip(args.member, members, strict=True):
            endpoints.append(Endpoint(backend, bind_unix(spec.socket_path, args.socket_mode),
                                      spec.socket_path))
    except StartupError:
        for ep in endpoints:
            ep.sock.close()
            if ep.path:
                os.unlink(ep.path)
        raise
    return endpoints


def _start_workers(args: argparse.Namespace, endpoints: list[Endpoint]
                   ) -> list[WorkerProcess]:
    """Start the queue workers and deal every request queue to a process."""
    backends = [ep.backend for ep in endpoints if hasattr(ep.backend.device, "offload_spec")]
    total = sum(b.device.num_queues for b in backends)
    n = args.queue_workers
    if n is None:
        # Half the CPUs are left to the guests' vCPUs and QEMU: on a 2-CPU host a TCG
        # guest with 2 vCPUs ran 2 queues faster with vhostd in one process
        # (docs/performance.md).
        n = max(0, min(len(os.sched_getaffinity(0)) // 2, total) - 1)
    if n == 0:
        return []
    workers: list[WorkerProcess] = []
    try:
        for i in range(n):
            workers.append(WorkerProcess(f"worker{i + 1}", args.log_level))
    except OSError as e:
        for w in workers:
            w.close()
        raise StartupError(f"cannot start a queue worker: {e.strerror}") from e
    slots: list[WorkerProcess | None] = [None, *workers]
    k = 0
    for backend in backends:
        hosts = []
        for _ in range(backend.device.num_queues):
            hosts.append(slots[k % len(slots)])
            k += 1
        backend.set_hosts(hosts)  # type: ignore[arg-type]
    logging.getLogger("vhostd").info(
        "%d queue worker(s) (pids %s) serve %d of %d request queues", n,
        " ".join(str(w.pid) for w in workers), total - (total + n) // (n + 1), total)
    return workers


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError as e:
            raise StartupError("uvloop is not installed (use --event-loop=asyncio)") from e
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.print_capabilities:
        print(json.dumps(CAPABILITIES))
        return 0
    _setup_logging(args.log_level)
    if args.check_rings:
        os.environ[CHECK_ENV] = "1"  # queue workers inherit it
    if args.kick_batch_wait is not None:
        os.environ[KICK_WAIT_ENV] = str(args.kick_batch_wait)
    # Through the environment, so queue worker processes apply the same policy.
    if args.max_mapped_memory is not None:
        os.environ[MAX_MAPPED_ENV] = str(args.max_mapped_memory)
    if args.allow_unsealed_memory:
        os.environ[ALLOW_UNSEALED_ENV] = "1"
    try:
        loop = _new_loop(args.event_loop)
        endpoints = _make_endpoints(args, loop)
    except StartupError as e:
        print(f"vhostd: {e}", file=sys.stderr)
        return 1
    try:
        workers = _start_workers(args, endpoints)
        daemon = Daemon(loop, endpoints, workers)
        if args.pidfile:
            _write_pidfile(args.pidfile)
        loop.run_until_complete(daemon.run())
    except StartupError as e:
        print(f"vhostd: {e}", file=sys.stderr)
        return 1
    finally:
        loop.close()
        if args.pidfile:
            try:
                os.unlink(args.pidfile)
            except FileNotFoundError:
                pass
    return 0


def _write_pidfile(path: str) -> None:
    tmp = f"{path}.tmp"
    try:
        # Whatever sits at the temporary name (a leftover, or a symlink someone planted
        # to make a root daemon overwrite its target) goes; the file is then created
        # anew, never opened through a link.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)  # appears whole, so readers never see a partial pid
    except OSError as e:
        raise StartupError(f"cannot write pid file {path}: {e.strerror}") from e

if __name__ == "__main__":
    sys.exit(main())
