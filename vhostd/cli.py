"""Command line of the vhostd daemon, following QEMU's back-end program conventions.

Foreground only; logs go to stderr; SIGTERM ends the daemon quickly; any start-up
failure exits non-zero with a one-line reason.
"""

from __future__ import annotations

import argparse
import asyncio
import grp
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

from .core import events
from .devices.blk import BlkDevice, BlkOptions
from .devices.owner import OwnerDevice
from .engine.inflight import CHECK_ENV
from .engine.memory import MAX_MAPPED_ENV
from .engine.seals import ALLOW_UNSEALED_ENV
from .engine.virtqueue import KICK_WAIT_DEFAULT_US, KICK_WAIT_ENV
from .shell.control import ControlServer
from .shell.daemon import Daemon, Endpoint
from .shell.discovery import CAPABILITIES, descriptor
from .shell.server import StartupError, adopt_listening_fd, bind_unix
from .shell.systemd import ActivationError, ListenFds, Notifier, listen_fds
from .shell.worker import WorkerProcess
from .storage.base import StorageBackend
from .storage.file import AIO_KINDS, AioUnavailable, FileStorage
from .storage.nbd import NbdError, NbdStorage
from .vhost_user.handler import VhostUserHandler
from .vhost_user.member import Member

TRACE_RATE_DEFAULT = 100


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


def _group(text: str) -> int:
    """A group name or number -> gid."""
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        pass
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"no group named {text!r}")


def _address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _mode(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 86400")
    return value


def _on_off(key: str, value: str) -> bool:
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"{key}={value}: expected on or off")
    return value == "on"


@dataclass
class MemberSpec:
    socket_path: str
    blk_file: str | None = None
    read_only: bool = False
    num_queues: int = 1
    queue_size: int = 1024
    serial: str = ""
    blk_nbd: str | None = None
    direct: bool = False
    reconnect_delay: float | None = None
    aio: str | None = None


_MEMBER_KEYS = {"socket-path", "blk-file", "blk-nbd", "read-only", "num-queues", "queue-size",
                "serial", "direct", "reconnect-delay", "aio"}


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
    if "socket-path" in opts and not opts["socket-path"]:
        raise argparse.ArgumentTypeError("socket-path= is empty")
    if bool(opts.get("blk-file")) == bool(opts.get("blk-nbd")):
        raise argparse.ArgumentTypeError("exactly one of blk-file= or blk-nbd= is required")
    if "direct" in opts and opts.get("blk-nbd"):
        raise argparse.ArgumentTypeError("direct= applies to blk-file= only")
    if "reconnect-delay" in opts and not opts.get("blk-nbd"):
        raise argparse.ArgumentTypeError("reconnect-delay= applies to blk-nbd= only")
    if "aio" in opts:
        if opts.get("blk-nbd"):
            raise argparse.ArgumentTypeError("aio= applies to blk-file= only")
        if opts["aio"] not in AIO_KINDS:
            raise argparse.ArgumentTypeError(f"aio={opts['aio']}: expected one of "
                                             f"{', '.join(AIO_KINDS)}")
    return MemberSpec(
        socket_path=opts.get("socket-path", ""), blk_file=opts.get("blk-file") or None,
        blk_nbd=opts.get("blk-nbd") or None,
        read_only=_on_off("read-only", opts.get("read-only", "off")),
        direct=_on_off("direct", opts.get("direct", "off")),
        reconnect_delay=(_seconds(opts["reconnect-delay"]) if "reconnect-delay" in opts
                         else None),
        num_queues=_positive(opts.get("num-queues", "1")),
        queue_size=_positive(opts.get("queue-size", "1024")),
        serial=opts.get("serial", ""),
        aio=opts.get("aio"),
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vhostd",
        description="vhost-user back end serving virtio-blk devices to QEMU, optionally "
                    "as members of an owner device with a virtio admin virtqueue.",
    )
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the back-end capabilities as JSON and exit")
    p.add_argument("--print-descriptor", action="store_true",
                   help="print QEMU's vhost-user back-end descriptor for this vhostd program "
                        "(install as /usr/share/qemu/vhost-user/50-vhostd.json) and exit")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH",
                       help="listen for the front end on this unix socket")
    where.add_argument("--fd", type=int, metavar="N",
                       help="use the inherited listening unix socket N")
    p.add_argument("--socket-mode", type=_mode, default=0o600, metavar="MODE",
                   help="permissions of the socket file (octal, default 0600)")
    p.add_argument("--socket-group", type=_group, metavar="GROUP",
                   help="give the socket file to this group (name or number), so a front end "
                        "running as a member of it (libvirt's QEMU: kvm) may connect; use "
                        "with --socket-mode=0660")
    disk = p.add_mutually_exclusive_group()
    disk.add_argument("--blk-file", metavar="FILE",
                      help="raw image file to serve (with --member: the owner's own disk)")
    disk.add_argument("--blk-nbd", metavar="URI",
                      help="serve an NBD export instead of a file: nbd://HOST[:PORT]/EXPORT "
                           "or nbd+unix:///EXPORT?socket=PATH")
    p.add_argument("--direct", action="store_true",
                   help="open image files with O_DIRECT (no host page cache; like QEMU's "
                        "cache.direct=on)")
    p.add_argument("--aio", choices=AIO_KINDS, default=None,
                   help="how image files wait for the disk: io_uring (the default, when the "
                        "kernel allows it; else threads) or a pool of threads")
    p.add_argument("--reconnect-delay", type=_seconds, default=10.0, metavar="S",
                   help="NBD: how long requests wait for a lost server to come back before "
                        "they fail (default 10)")
    p.add_argument("--trace-requests", type=_positive, nargs="?", const=TRACE_RATE_DEFAULT,
                   default=0, metavar="RATE",
                   help="debugging: log every request (queue, head, type, sector, length, "
                        "status, latency) at up to RATE lines a second (default "
                        f"{TRACE_RATE_DEFAULT})")
    p.add_argument("--member", action="append", default=[], metavar="OPTS",
                   type=parse_member,
                   help="add a member device managed by an owner device on --socket-path: "
                        "socket-path=PATH,blk-file=FILE|blk-nbd=URI[,read-only=on]"
                        "[,direct=on][,aio=io_uring|threads][,reconnect-delay=S][,num-queues=N][,queue-size=N]"
                        "[,serial=ID] (repeat; members are 1..N in order; without "
                        "socket-path= the member's socket comes from systemd)")
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
    p.add_argument("--control-socket", metavar="PATH",
                   help="answer QMP (QEMU's machine protocol) on this unix socket: list "
                        "devices, read request counters, resize, events (docs/control.md); "
                        "same permissions as the device sockets")
    p.add_argument("--metrics", type=_address, metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (off by "
                        "default)")
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


def _open_storage(path: str | None, uri: str | None, read_only: bool, direct: bool,
                  reconnect_delay: float, connections: int,
                  aio: str | None = None) -> StorageBackend:
    if uri is not None:
        try:
            return NbdStorage(uri, read_only=read_only, reconnect_delay=reconnect_delay,
                              connections=connections)
        except NbdError as e:
            raise StartupError(str(e)) from e
    assert path is not None
    try:
        return FileStorage(path, read_only=read_only, direct=direct, aio=aio)
    except AioUnavailable as e:
        raise StartupError(str(e)) from e
    except OSError as e:
        raise StartupError(f"cannot open {path}{' with O_DIRECT' if direct else ''}: "
                           f"{e.strerror}") from e


def _blk_device(name: str, storage: StorageBackend, options: BlkOptions,
                state_dir: str | None = None) -> BlkDevice:
    if state_dir:
        options.state_path = os.path.join(state_dir, f"{name}.json")
    try:
        return BlkDevice(name, storage, options)
    except ValueError as e:
        storage.close()
        raise StartupError(f"{name}: {e}") from e


def _listen(args: argparse.Namespace) -> tuple[socket.socket, str | None]:
    """The device's (or owner's) listening socket: bound, inherited or activated."""
    if args.socket_path is not None:
        return bind_unix(args.socket_path, args.socket_mode, args.socket_group), args.socket_path
    if args.fd is not None:
        return adopt_listening_fd(args.fd), None
    return _adopt_activated(args.listen, 0), None


def _adopt_activated(listen: ListenFds, index: int) -> socket.socket:
    fd, name = listen.fds[index], listen.names[index]
    try:
        return adopt_listening_fd(fd)
    except StartupError as e:
        raise StartupError(f"socket {index + 1} from systemd (fd {fd}"
                           f"{', ' + name if name else ''}): {e}") from e


def _check_activation(args: argparse.Namespace) -> None:
    """With sockets from systemd: one for the device (or owner), then one for each
    member without socket-path=, in order."""
    listen: ListenFds | None = args.listen
    unbound = [i for i, m in enumerate(args.member, start=1) if not m.socket_path]
    if listen is None:
        if unbound:
            raise StartupError(f"--member {unbound[0]} has no socket-path= (only sockets "
                               "passed by systemd may be left out)")
        return
    want = 1 + len(unbound)
    if len(listen.fds) != want:
        members = f" and one for each --member without socket-path= ({len(unbound)})" \
            if args.member else ""
        raise StartupError(
            f"systemd passed {len(listen.fds)} socket(s) (LISTEN_FDS: {listen.describe()}) "
            f"but vhostd expects {want}: one for the {'owner' if args.member else 'device'}"
            f"{members}, in that order")


def _make_endpoints(args: argparse.Namespace, loop: asyncio.AbstractEventLoop
                    ) -> list[Endpoint]:
    if args.socket_path is None and args.fd is None and args.listen is None:
        raise StartupError("one of --socket-path or --fd is required (or sockets passed by "
                           "systemd socket activation)")
    _check_activation(args)
    if not args.blk_file and not args.blk_nbd and not args.member:
        raise StartupError("--blk-file or --blk-nbd is required (or --member for an owner "
                           "device)")
    if args.direct and args.blk_nbd:
        raise StartupError("--direct applies to --blk-file only")
    if args.aio and args.blk_nbd:
        raise StartupError("--aio applies to --blk-file only")
    if args.state_dir and not os.path.isdir(args.state_dir):
        raise StartupError(f"--state-dir {args.state_dir} is not a directory")
    disk = None
    if args.blk_file or args.blk_nbd:
        storage = _open_storage(args.blk_file, args.blk_nbd, args.read_only, args.direct,
                                args.reconnect_delay, args.num_queues, args.aio)
        disk = _blk_device("blk0" if not args.member else "owner-disk", storage, BlkOptions(
                               num_queues=args.num_queues,
                               queue_size=args.queue_size,
                               logical_block_size=args.logical_block_size,
                               serial=args.serial,
                               writeback=not args.writethrough,
                               trace_rate=args.trace_requests,
                           ), args.state_dir)
        disk.start(loop)
    endpoints: list[Endpoint] = []
    if not args.member:
        assert disk is not None
        sock, path = _listen(args)
        return [Endpoint(VhostUserHandler(disk, loop), sock, path)]
    members = []
    for i, spec in enumerate(args.member, start=1):
        storage = _open_storage(
            spec.blk_file, spec.blk_nbd, spec.read_only, spec.direct or args.direct,
            args.reconnect_delay if spec.reconnect_delay is None else spec.reconnect_delay,
            spec.num_queues, spec.aio or args.aio)
        device = _blk_device(f"member{i}", storage, BlkOptions(
            num_queues=spec.num_queues, queue_size=spec.queue_size,
            logical_block_size=args.logical_block_size, serial=spec.serial,
            writeback=not args.writethrough, trace_rate=args.trace_requests,
        ), args.state_dir)
        device.start(loop)
        members.append(VhostUserHandler(device, loop))
    owner = VhostUserHandler(OwnerDevice([Member(m) for m in members], disk), loop)
    try:
        sock, path = _listen(args)
        endpoints.append(Endpoint(owner, sock, path))
        activated = 1
        for spec, handler in zip(args.member, members, strict=True):
            if not spec.socket_path:
                endpoints.append(Endpoint(handler, _adopt_activated(args.listen, activated),
                                          None))
                activated += 1
                continue
            endpoints.append(Endpoint(handler, bind_unix(spec.socket_path, args.socket_mode,
                                                         args.socket_group),
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
    handlers = [ep.handler for ep in endpoints if hasattr(ep.handler.device, "worker_spec")]
    total = sum(h.device.num_queues for h in handlers)
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
    for handler in handlers:
        assigned = []
        for _ in range(handler.device.num_queues):
            assigned.append(slots[k % len(slots)])
            k += 1
        handler.placement.assign(assigned)  # type: ignore[arg-type]
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
    if args.print_descriptor:
        try:
            print(json.dumps(descriptor(), indent=2))
        except FileNotFoundError as e:
            print(f"vhostd: {e}", file=sys.stderr)
            return 1
        return 0
    _setup_logging(args.log_level)
    notifier = Notifier.from_environment()
    try:
        args.listen = _take_listen_fds(args)
    except ActivationError as e:
        print(f"vhostd: socket activation: {e}", file=sys.stderr)
        return 1
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
        control_sock, metrics_sock = _operations_sockets(args)
        try:
            endpoints = _make_endpoints(args, loop)
        except StartupError:
            _close_operations_sockets(args, control_sock, metrics_sock)
            raise
    except StartupError as e:
        print(f"vhostd: {e}", file=sys.stderr)
        return 1
    try:
        workers = _start_workers(args, endpoints)
        daemon = Daemon(loop, endpoints, workers)
        services: list[Any] = []
        if control_sock is not None:
            services.append(ControlServer(daemon, control_sock, args.control_socket))
        if metrics_sock is not None:
            from .shell.metrics import MetricsServer  # prometheus_client only when asked

            services.append(MetricsServer(daemon, metrics_sock))
        loop.run_until_complete(_serve(daemon, notifier, endpoints, services, args.pidfile))
    except StartupError as e:
        print(f"vhostd: {e}", file=sys.stderr)
        return 1
    finally:
        loop.close()
        notifier.close()
        if args.pidfile:
            try:
                os.unlink(args.pidfile)
            except FileNotFoundError:
                pass
    return 0


def _take_listen_fds(args: argparse.Namespace) -> ListenFds | None:
    """Sockets passed by systemd, used when neither --socket-path nor --fd is given."""
    listen = listen_fds()
    if listen is not None and (args.socket_path is not None or args.fd is not None):
        logging.getLogger("vhostd").warning(
            "ignoring the socket(s) passed by systemd (%s): %s was given", listen.describe(),
            "--socket-path" if args.socket_path is not None else "--fd")
        return None
    return listen


async def _serve(daemon: Daemon, notifier: Notifier, endpoints: list[Endpoint],
                 services: list[Any], pidfile: str | None) -> None:
    """Start the control and metrics services and run the daemon; once every socket
    accepts and SIGTERM is handled, write the pid file and tell systemd; tell it again
    when the daemon stops."""
    names = [ep.handler.device.name for ep in endpoints]
    where = ", ".join(f"{name} on {ep.path or f'fd {ep.sock.fileno()}'}"
                      for name, ep in zip(names, endpoints, strict=True))

    def ready() -> None:
        # Not earlier: a supervisor that sends SIGTERM right after must find it handled.
        if pidfile:
            _write_pidfile(pidfile)
        notifier.ready(f"serving {where}")

    daemon.on_ready = ready
    connected: set[str] = set()

    def follow(name: str, data: dict[str, object]) -> None:
        device = str(data.get("device", ""))
        if name == events.FRONTEND_CONNECTED:
            connected.add(device)
        elif name == events.FRONTEND_DISCONNECTED:
            connected.discard(device)
        else:
            return
        notifier.status(f"{len(connected)} of {len(names)} front end(s) connected")

    said_stopping = False

    def say_stopping() -> None:
        nonlocal said_stopping
        if not said_stopping:
            said_stopping = True
            notifier.stopping()

    async def stopping() -> None:
        await daemon.stopping.wait()
        say_stopping()

    if notifier.enabled:
        events.subscribe(follow)
    # Usually wakes while the daemon still closes its devices; if the daemon finishes
    # first, the finally clause says it.
    watch = asyncio.ensure_future(stopping())
    try:
        for service in services:
            await service.start()
        await daemon.run()
    finally:
        watch.cancel()
        say_stopping()
        events.unsubscribe(follow)
        for service in services:
            await service.close()


def _operations_sockets(args: argparse.Namespace
                        ) -> tuple[socket.socket | None, socket.socket | None]:
    """The control socket and the metrics socket, as asked for."""
    control = metrics = None
    if args.control_socket:
        # The same ownership options as the device sockets.
        control = bind_unix(args.control_socket, args.socket_mode, args.socket_group)
        control.listen(16)  # several clients may connect at once
    if args.metrics:
        host, port = args.metrics
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            metrics = socket.create_server((host, port), family=family, backlog=16)
        except OSError as e:
            _close_operations_sockets(args, control, None)
            raise StartupError(f"--metrics={host}:{port}: {e.strerror or e}") from e
    return control, metrics


def _close_operations_sockets(args: argparse.Namespace, control: socket.socket | None,
                              metrics: socket.socket | None) -> None:
    if control is not None:
        control.close()
        os.unlink(args.control_socket)
    if metrics is not None:
        metrics.close()




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
