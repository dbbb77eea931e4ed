"""Generic vhost-user device side: memory table, rings, inflight region, features.

A :class:`VhostUserBackend` turns validated messages from the protocol core into
changes of guest memory and virtqueue state, and asks its :class:`VirtioDevice`
(blk, owner, ...) only for what is device specific: feature bits, config space and
the request handler of each queue. It never touches a socket: kick fds are watched
through the :class:`FdWatcher` it is given (the event loop satisfies it), and
back-end-initiated messages leave through the ``send_backend_message`` callback.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from vhostd_proto import vhost_user as vu
from vhostd_proto.vhost_user import BackendRequest
from vhostd_proto.virtio import Feature

from ..core.protocol import BackendProtocol, DeviceInfo, Message, ProtocolError
from .dirtylog import DirtyLog
from .dirtytrack import WriteTracker
from .fdcheck import fd_kind, is_eventfd
from .inflight import InflightRegion
from .memory import GuestMemory, GuestMemoryError, close_fds
from .offload import HostError, RingHost, ring_spec
from .packed import PackedVirtqueue, set_layout
from .parts import VHOST_ONLY_FEATURES, Part, PartsError, StagedParts
from .parts import check as check_parts
from .parts import collect as collect_parts
from .timer import FdWatcher
from .virtqueue import Handler, RingError, SplitVirtqueue

log = logging.getLogger(__name__)


class VirtioDevice(Protocol):
    """What a device type supplies to the generic back end."""

    name: str
    num_queues: int
    max_queue_size: int

    def device_features(self) -> int: ...
    def make_handler(self, queue: SplitVirtqueue) -> Handler: ...
    def get_config(self, offset: int, size: int) -> bytes: ...
    def set_config(self, offset: int, data: bytes, flags: int) -> None: ...
    def features_acked(self, features: int) -> None: ...
    def reset(self) -> None: ...
    def disconnected(self) -> None: ...
    def refresh_capacity(self) -> bool: ...
    def close(self) -> None: ...
    def get_parts(self) -> list[tuple[int, bytes]]: ...
    def part_lengths(self) -> list[tuple[int, int]]: ...
    def check_part(self, part_type: int, value: bytes) -> None: ...
    def apply_part(self, part_type: int, value: bytes) -> None: ...


class MemberMode(enum.Enum):
    """DEV_MODE_SET state of a member, as its owner sets it."""

    RUNNING = "running"
    STOPPED = "stopped"
    FROZEN = "frozen"  # vhostd extension: stopped, and the parts are final


# Device status bits (virtio), derived for a vhost-user device.
STATUS_ACKNOWLEDGE_DRIVER_FEATURES_OK = 0x1 | 0x2 | 0x8
STATUS_DRIVER_OK = 0x4


class TrackerBusy(Exception):
    """Write tracking is already on for this member."""


class RequestFailed(Exception):
    """A well-formed request that could not be carried out (answered with a nack)."""


# Ring-level feature bits the engine implements for every device.
ENGINE_FEATURES = (
    1 << Feature.VIRTIO_F_VERSION_1
    | 1 << Feature.VIRTIO_RING_F_INDIRECT_DESC
    | 1 << Feature.VIRTIO_RING_F_EVENT_IDX
    | 1 << vu.VHOST_USER_F_PROTOCOL_FEATURES
    | 1 << vu.VHOST_F_LOG_ALL
    | 1 << Feature.VIRTIO_F_RING_PACKED
)

PROTOCOL_FEATURES = (
    1 << vu.ProtocolFeature.MQ
    | 1 << vu.ProtocolFeature.LOG_SHMFD
    | 1 << vu.ProtocolFeature.REPLY_ACK
    | 1 << vu.ProtocolFeature.BACKEND_REQ
    | 1 << vu.ProtocolFeature.CONFIG
    | 1 << vu.ProtocolFeature.INFLIGHT_SHMFD
    | 1 << vu.ProtocolFeature.RESET_DEVICE
    | 1 << vu.ProtocolFeature.CONFIGURE_MEM_SLOTS
)


class VhostUserBackend:
    """The vhost-user device side of one virtio device.

    The device and its config survive front-end reconnects; memory, rings and the
    protocol state belong to one connection and are dropped with it.
    """

    def __init__(self, device: VirtioDevice, watcher: FdWatcher) -> None:
        self.device = device
        self.watcher = watcher
        self.log = logging.getLogger(f"vhostd.{device.name}")
        self.info = DeviceInfo(
            features=device.device_features() | ENGINE_FEATURES,
            protocol_features=PROTOCOL_FEATURES,
            num_queues=device.num_queues,
        )
        self.memory = GuestMemory()
        self.queues = [
            SplitVirtqueue(i, handler=_unset_handler, max_size=device.max_queue_size,
                           name=f"{device.name}/vq{i}")
            for i in range(device.num_queues)
        ]
        for q in self.queues:
            q.handler = device.make_handler(q)
        self.inflight: InflightRegion | None = None
        self.dirty_log: DirtyLog | None = None
        self.tracker: WriteTracker | None = None
        self.features = 0
        self.send_backend_message: Callable[[BackendRequest, bytes], bool] | None = None
        self.protocol: BackendProtocol | None = None
        # Member state the owner device reads and writes (engine/parts.py).
        self.mode = MemberMode.RUNNING
        self.status = 0
        self.staged: StagedParts | None = None
        self.frozen_parts: list[Part] | None = None
        self._config_change_latched = False
        # Queue workers (engine/offload.py): which process serves each ring.
        self.hosts: list[RingHost | None] = [None] * device.num_queues
        self._away: dict[int, RingHost] = {}
        self._home_depth = 0
        self._watching: dict[int, int] = {}  # queue index -> kick fd watched here

    # ---- queue workers -------------------------------------------------------
    def set_hosts(self, hosts: list[RingHost | None]) -> None:
        """Let ``hosts[i]`` serve ring i (None: this process). Before any front end."""
        if len(hosts) != len(self.queues):
            raise ValueError(f"{len(hosts)} hosts for {len(self.queues)} queues")
        if any(hosts) and not hasattr(self.device, "offload_spec"):
            raise ValueError(f"{self.device.name}: its queues cannot run in a worker")
        self.hosts = list(hosts)

    @contextlib.contextmanager
    def rings_home(self) -> Iterator[None]:
        """Every ring in this process for the duration: control paths then see and
        change ring state as if no worker existed; ready rings leave again after."""
        self._home_depth += 1
        try:
            if self._home_depth == 1 and self._away:
                self._recall()
            yield
        finally:
            self._home_depth -= 1
            if self._home_depth == 0 and any(self.hosts):
                self._send_away()

    def _ring_key(self, index: int) -> str:
        return f"{self.device.name}/{index}"

    def _recall(self) -> None:
        by_host: dict[int, tuple[RingHost, list[int]]] = {}
        for index, host in self._away.items():
            by_host.setdefault(id(host), (host, []))[1].append(index)
        self._away = {}
        for host, indices in by_host.values():
            try:
                states = host.recall([self._ring_key(i) for i in indices])
            except HostError as e:
                for i in indices:
                    self._lost(self.queues[i], host, str(e))
                continue
            for i in indices:
                back = states.get(self._ring_key(i))
                if back is None:
                    self._lost(self.queues[i], host, "it no longer had the ring")
                else:
                    self._came_home(self.queues[i], back)

    def _came_home(self, q: SplitVirtqueue, back: dict[str, Any]) -> None:
        q.import_position(back["ring"])
        if self.dirty_log is not None:
            self.dirty_log.marked += back["log_marked"]
        t = back["tracker"]
        if t is not None and self.tracker is not None:
            self.tracker.merge([bytes.fromhex(b) for b in t["bitmaps"]], t["marked"])

    def _lost(self, q: SplitVirtqueue, host: RingHost, why: str) -> None:
        """The worker serving ``q`` is gone: serve the ring here from now on, picking
        it up as after a back-end restart (the guest's used index, the inflight
        region)."""
        self.log.error("%s: worker %s failed (%s); this process serves the ring from now on",
                       q.name, host.name, why)
        self._forget_host(host)
        if q.started and q.configured:
            q.started = False
            q.start(self.memory)
            if q.inflight is None:
                q.last_avail_idx = q.used_idx
            # The worker may have read the last kick: look at the ring now.
            q.process()

    def host_died(self, host: RingHost) -> None:
        """A worker exited: its rings come back (and restart) here at once, even if no
        control message would have recalled them."""
        if not any(h is host for h in self.hosts):
            return
        with self.rings_home():
            self._forget_host(host)

    def _forget_host(self, host: RingHost) -> None:
        """This process serves every ring ``host`` was to serve."""
        self.hosts = [None if h is host else h for h in self.hosts]
        for q in self.queues:
            self._update_watch(q)

    def _send_away(self) -> None:
        for q in self.queues:
            host = self.hosts[q.index]
            if host is None or q.index in self._away or not q.ready or q.kick_fd is None:
                continue
            spec, fds = ring_spec(q, self.memory, self.device, self.inflight, self.tracker)
            try:
                host.run(self._ring_key(q.index), spec, fds)
            except HostError as e:
                self._lost(q, host, str(e))
                continue
            self._away[q.index] = host

    # ---- connection lifecycle ---------------------------------------------
    def connect(self) -> BackendProtocol:
        self.protocol = BackendProtocol(self.info)
        return self.protocol

    def disconnect(self) -> None:
        """The front end went away: stop every ring, drop its memory and fds."""
        with self.rings_home():
            self._disconnect()

    def _disconnect(self) -> None:
        served = [q.requests for q in self.queues]
        if any(served):
            # Totals since the daemon started (across front ends), per queue.
            self.log.info("requests served per queue: %s",
                          " ".join(f"vq{i}={n}" for i, n in enumerate(served)))
            # Guest notifications (kick eventfd writes) per queue; with EVENT_IDX the
            # driver kicks only when the device asked for it.
            self.log.info("kicks per queue: %s",
                          " ".join(f"vq{i}={q.kicks}" for i, q in enumerate(self.queues)))
        for q in self.queues:
            if q.started:
                q.stop()
            self._drop_ring_fds(q)
            q.detach_memory()
            q.inflight = None
            q.enabled = False
        self.memory.clear()
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        self._set_dirty_log(None)
        self.send_backend_message = None
        self.protocol = None
        self.device.disconnected()

    def _drop_ring_fds(self, q: SplitVirtqueue) -> None:
        self._set_kick(q, None)
        for attr in ("call_fd", "err_fd"):
            fd = getattr(q, attr)
            if fd is not None:
                os.close(fd)
                setattr(q, attr, None)

    # ---- dispatch ----------------------------------------------------------
    def handle(self, msg: Message) -> tuple[bytes, list[int]] | None:
        """Carry out ``msg``; return the reply due (bytes and fds to send) or None.

        fds in ``msg`` become this object's responsibility; fds in the reply are
        the caller's to close once sent.
        """
        protocol = self.protocol
        assert protocol is not None
        local = protocol.answer_local(msg)
        if local is not None:
            return local, []
        handler = getattr(self, "_on_" + msg.request.name.lower(), None)
        if handler is None:
            close_fds(msg.fds)
            raise ProtocolError(f"{msg.request.name} has no handler")
        try:
            with self.rings_home():
                result = handler(msg)
        except RequestFailed as e:
            self.log.error("%s failed: %s", msg.request.name, e)
            nack = protocol.ack(msg, False)
            return (nack, []) if nack is not None else None
        if isinstance(result, bytes):
            return protocol.reply(msg, result), []
        if isinstance(result, tuple):
            body, fds = result
            return protocol.reply(msg, body), fds
        ack = protocol.ack(msg, True)
        return (ack, []) if ack is not None else None

    # ---- features ----------------------------------------------------------
    def _on_set_features(self, msg: Message) -> None:
        assert self.protocol is not None
        features = self.protocol.acked_features
        self._apply_features(features)
        if not features & 1 << vu.VHOST_USER_F_PROTOCOL_FEATURES:
            # Without protocol features rings are enabled as soon as they start.
            for q in self.queues:
                q.enabled = True
        self.status |= STATUS_ACKNOWLEDGE_DRIVER_FEATURES_OK

    def _apply_features(self, features: int) -> None:
        packed = bool(features & 1 << Feature.VIRTIO_F_RING_PACKED)
        if features and features != self.features:
            self.log.info("features %#x acked: %s rings%s", features,
                          "packed" if packed else "split",
                          ", dirty logging" if features & 1 << vu.VHOST_F_LOG_ALL else "")
        self.features = features
        for q in self.queues:
            if q.started and q.configured and isinstance(q, PackedVirtqueue) != packed:
                self.log.warning("%s: ring layout cannot change while it runs", q.name)
                continue
            set_layout(q, packed)
        self._update_logging()
        event_idx = bool(features & 1 << Feature.VIRTIO_RING_F_EVENT_IDX)
        indirect = bool(features & 1 << Feature.VIRTIO_RING_F_INDIRECT_DESC)
        for q in self.queues:
            q.set_features(event_idx, indirect)
        self.device.features_acked(features)

    def _on_set_protocol_features(self, msg: Message) -> None:
        pass  # recorded by the protocol core

    def _on_set_owner(self, msg: Message) -> None:
        pass

    def _on_reset_owner(self, msg: Message) -> None:
        self._reset()

    def _on_reset_device(self, msg: Message) -> None:
        self._reset()

    def _reset(self) -> None:
        """Device reset: every driver-visible part returns to its default."""
        for q in self.queues:
            if q.started:
                q.stop()
            self._set_kick(q, None)
            q.enabled = False
            q.broken = False
            q.suspended = False
            q.unconfigure()
        self._apply_features(0)
        self.status = 0
        self.staged = None
        self.frozen_parts = None
        self._config_change_latched = False
        self.mode = MemberMode.RUNNING
        self.device.reset()

    # ---- dirty log (migration) ---------------------------------------------
    def _on_set_log_base(self, msg: Message) -> None:
        b = msg.body
        fd = msg.fds[0]
        try:
            new = DirtyLog(fd, b.mmap_size, b.mmap_offset, self.memory.budget)
        except (OSError, ValueError, OverflowError, GuestMemoryError) as e:
            raise RequestFailed(f"cannot map the dirty log: {e}") from e
        finally:
            os.close(fd)
        self.log.info("dirty log of %d bytes (%d pages) in place", b.mmap_size, new.pages)
        self._set_dirty_log(new)

    def _set_dirty_log(self, new: DirtyLog | None) -> None:
        # Switch to the new log first, then drop the old one (QEMU resizes it while
        # rings run).
        old, self.dirty_log = self.dirty_log, new
        self._update_logging()
        if old is not None:
            self.log.info("dirty log: %d page marks made", old.marked)
            old.close()

    def _update_logging(self) -> None:
        """Queues log only while LOG_ALL is negotiated and a log is mapped, so
        logging costs nothing otherwise."""
        active = self.dirty_log if self.features & 1 << vu.VHOST_F_LOG_ALL else None
        for q in self.queues:
            q.dirty_log = active

    # ---- memory ------------------------------------------------------------
    def _on_set_mem_table(self, msg: Message) -> None:
        table = [
            (fd, r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
            for fd, r in zip(msg.fds, msg.body.regions, strict=True)
        ]
        try:
            self.memory.replace(table)
        except GuestMemoryError as e:
            raise RequestFailed(str(e)) from e
        finally:
            close_fds(msg.fds)
        self._memory_changed()

    def _on_add_mem_reg(self, msg: Message) -> None:
        r = msg.body.region
        try:
            self.memory.add(msg.fds[0], r.guest_phys_addr, r.memory_size, r.userspace_addr,
                            r.mmap_offset)
        except GuestMemoryError as e:
            raise RequestFailed(str(e)) from e
        finally:
            close_fds(msg.fds)
        self._memory_changed()

    def _on_rem_mem_reg(self, msg: Message) -> None:
        close_fds(msg.fds)
        r = msg.body.region
        if not self.memory.remove(r.guest_phys_addr, r.memory_size, r.userspace_addr):
            raise RequestFailed(f"no region at GPA {r.guest_phys_addr:#x} to remove")
        self._memory_changed()

    def _memory_changed(self) -> None:
        # QEMU changes the table in steps (REM_MEM_REG, then ADD_MEM_REG): a ring may be
        # unreachable in between. It then waits (not ready) instead of failing, and runs
        # again once its memory is back.
        for q in self.queues:
            if q.started and not q.broken and q.configured:
                try:
                    q.resolve()
                except RingError as e:
                    q.drop_views()
                    self.log.info("%s waits for its memory: %s", q.name, e)
                    continue
                q.process()

    # ---- rings -------------------------------------------------------------
    def _on_set_vring_num(self, msg: Message) -> None:
        try:
            self.queues[msg.ring].set_num(msg.body.num)  # type: ignore[index]
        except ValueError as e:
            raise ProtocolError(f"SET_VRING_NUM: {e}") from e

    def _on_set_vring_base(self, msg: Message) -> None:
        q = self.queues[msg.ring]  # type: ignore[index]
        if isinstance(q, PackedVirtqueue):
            q.set_base(msg.body.num)
            return
        if msg.body.num > 0xFFFF:
            raise ProtocolError(f"SET_VRING_BASE: {msg.body.num:#x} is not a split-ring index")
        q.last_avail_idx = msg.body.num

    def _on_set_vring_addr(self, msg: Message) -> None:
        b = msg.body
        q = self.queues[msg.ring]  # type: ignore[index]
        q.set_addr(b.flags, b.desc_user_addr, b.used_user_addr, b.avail_user_addr,
                   b.log_guest_addr)
        if q.started and not q.broken:
            try:
                q.resolve()
            except RingError as e:
                q.fail(str(e))

    def _on_set_vring_kick(self, msg: Message) -> None:
        _require_eventfd(msg)
        q = self.queues[msg.ring]  # type: ignore[index]
        self._set_kick(q, msg.fd)
        self._attach_inflight(q)
        if q.suspended:
            self.log.warning("%s starts, but its owner has stopped this member: it is served "
                             "once the owner resumes it", q.name)
        q.start(self.memory)
        if q.configured:
            self.status |= STATUS_DRIVER_OK
        # Chains may already be waiting (or left by a previous back end), and their
        # kick may have come before this ring could see it.
        q.process()

    def _attach_inflight(self, q: SplitVirtqueue) -> None:
        """Track ``q`` in the inflight region if the region was made for its size and
        ring layout."""
        inflight = self.inflight
        q.inflight = None
        if inflight is None or not q.size:
            return
        if inflight.packed != isinstance(q, PackedVirtqueue):
            self.log.warning("%s: inflight region has the other ring layout; not tracking",
                             q.name)
            return
        if inflight.queue_size == q.size and q.index < inflight.num_queues:
            q.inflight = inflight.queues[q.index]  # type: ignore[assignment]
        else:
            self.log.warning("%s: inflight region was made for queue size %d, ring has %d; "
                             "not tracking", q.name, inflight.queue_size, q.size)

    def _set_kick(self, q: SplitVirtqueue, fd: int | None) -> None:
        if q.kick_fd is not None:
            # Stop watching before closing, so the number cannot be reused while
            # the loop still has it.
            old, q.kick_fd = q.kick_fd, None
            self._update_watch(q)
            os.close(old)
        q.kick_fd = fd
        if fd is not None:
            os.set_blocking(fd, False)
        self._update_watch(q)

    def _update_watch(self, q: SplitVirtqueue) -> None:
        """Watch ``q``'s kick eventfd in this process exactly when this process serves
        the ring and the member runs. A worker watches the rings it serves; kicks for a
        ring at home during a control message, or for a stopped member, wait in the
        eventfd (a stopped member must not read them: the same eventfd may drive the
        member the owner moves the ring to, perhaps in another process)."""
        want = (q.kick_fd if q.kick_fd is not None and self.hosts[q.index] is None
                and self.mode is MemberMode.RUNNING else None)
        watched = self._watching.get(q.index)
        if watched == want:
            return
        if watched is not None:
            self.watcher.remove_reader(watched)
            del self._watching[q.index]
            q.stop_batching()
        if want is not None:
            self.watcher.add_reader(want, self._kicked, q, want)
            self._watching[q.index] = want
            # Kick batching's fallback look at the ring: only the process that serves
            # the ring may take it.
            try:
                q.start_batching(self.watcher)
            except OSError as e:
                self.log.warning("%s: no timer (%s); a kick for every request", q.name, e)

    def _kicked(self, q: SplitVirtqueue, fd: int) -> None:
        try:
            q.kicks += os.eventfd_read(fd)
        except BlockingIOError:
            pass
        except OSError as e:
            # Not a readable eventfd (or a dead one): stop watching it, or the loop
            # would spin on it.
            self.watcher.remove_reader(fd)
            self._watching.pop(q.index, None)
            q.stop_batching()
            q.fail(f"cannot read the kick eventfd: {e.strerror}")
            return
        q.process()

    def _on_set_vring_call(self, msg: Message) -> None:
        _require_eventfd(msg)
        self._replace_eventfd(self.queues[msg.ring], "call_fd", msg.fd)  # type: ignore[index]

    def _on_set_vring_err(self, msg: Message) -> None:
        _require_eventfd(msg)
        self._replace_eventfd(self.queues[msg.ring], "err_fd", msg.fd)  # type: ignore[index]

    @staticmethod
    def _replace_eventfd(q: SplitVirtqueue, attr: str, fd: int | None) -> None:
        old = getattr(q, attr)
        if old is not None:
            os.close(old)
        setattr(q, attr, fd)
        if fd is not None:
            os.set_blocking(fd, False)

    def _on_get_vring_base(self, msg: Message) -> bytes:
        q = self.queues[msg.ring]  # type: ignore[index]
        # Requests are served inline, so every chain this ring took is complete;
        # stop() publishes the last used entries before the base is reported.
        base = q.stop()
        self._set_kick(q, None)
        return vu.VringState.build({"index": q.index, "num": base})

    def _on_set_vring_enable(self, msg: Message) -> None:
        q = self.queues[msg.ring]  # type: ignore[index]
        if msg.body.num not in (0, 1):
            raise ProtocolError(f"SET_VRING_ENABLE: value {msg.body.num} is not 0 or 1")
        q.enabled = bool(msg.body.num)
        if q.enabled:
            q.process()

    # ---- config ------------------------------------------------------------
    def _on_get_config(self, msg: Message) -> bytes:
        b = msg.body
        data = self.device.get_config(b.offset, b.size)
        return vu.Config.build({"offset": b.offset, "size": b.size, "flags": b.flags,
                                "region": data})

    def _on_set_config(self, msg: Message) -> None:
        b = msg.body
        try:
            self.device.set_config(b.offset, b.region, b.flags)
        except ValueError as e:
            raise RequestFailed(str(e)) from e

    def refresh_capacity(self) -> bool:
        """The backing may have grown (SIGHUP): True if the device's capacity changed,
        after which the front end is told."""
        with self.rings_home():
            return self.device.refresh_capacity()

    def state_report(self) -> list[str]:
        """The device's rings as a person reads them (SIGUSR1). Rings served by a
        worker come home for the moment, so their positions are exact."""
        lines = [] if self.mode is MemberMode.RUNNING else [f"member {self.mode.value}"]
        with self.rings_home():
            for q in self.queues:
                host = self.hosts[q.index]
                where = f", in {host.name}" if host is not None else ""
                lines.append(q.describe() + where)
        return lines

    def config_changed(self) -> bool:
        """Tell the front end the config space changed (e.g. capacity)."""
        if self.mode is not MemberMode.RUNNING:
            self._config_change_latched = True  # a stopped member sends nothing
            return True
        send = self.send_backend_message
        if send is None:
            self.log.warning("config changed but the front end gave no back-end channel")
            return False
        return send(BackendRequest.CONFIG_CHANGE_MSG, b"")

    # ---- inflight ----------------------------------------------------------
    def _on_set_inflight_fd(self, msg: Message) -> None:
        b = msg.body
        fd = msg.fds[0]
        try:
            if self.inflight is not None:
                for q in self.queues:
                    q.inflight = None  # nothing may write the region being dropped
                self.inflight.close()
                self.inflight = None
            if b.mmap_size == 0:
                return
            try:
                # SET_FEATURES came first: the acked features choose the layout.
                self.inflight = InflightRegion(
                    fd, b.mmap_size, b.mmap_offset, b.num_queues, b.queue_size,
                    packed=bool(self.features & 1 << Feature.VIRTIO_F_RING_PACKED),
                    budget=self.memory.budget)
            except (ValueError, OSError, OverflowError, GuestMemoryError) as e:
                raise RequestFailed(f"inflight region: {e}") from e
        finally:
            os.close(fd)
        for q in self.queues:
            if q.started:
                self._attach_inflight(q)

    def _on_get_inflight_fd(self, msg: Message) -> tuple[bytes, list[int]]:
        """A new zeroed region; the reply carries its fd."""
        b = msg.body
        if not 1 <= b.num_queues <= self.device.num_queues or not b.queue_size:
            raise ProtocolError(f"GET_INFLIGHT_FD for {b.num_queues} queues of "
                                f"{b.queue_size}")
        fd, size = InflightRegion.create(
            b.num_queues, b.queue_size,
            packed=bool(self.features & 1 << Feature.VIRTIO_F_RING_PACKED))
        payload = vu.Inflight.build({"mmap_size": size, "mmap_offset": 0,
                                     "num_queues": b.num_queues,
                                     "queue_size": b.queue_size})
        return payload, [fd]


    # ---- member mode and device parts (driven by the owner device) ---------
    def set_mode(self, mode: MemberMode) -> None:
        """DEV_MODE_SET. Stopping is immediate: requests are served inline, so every
        chain a queue took is complete; the last used entries are published here and
        then no queue touches guest memory or signals until resume."""
        with self.rings_home():
            self._set_mode(mode)

    def _set_mode(self, mode: MemberMode) -> None:
        if mode is self.mode:
            return
        if mode is MemberMode.RUNNING:
            self._resume()
            return
        if self.mode is MemberMode.RUNNING:
            for q in self.queues:
                q.suspend()
            self.log.info("stopped by the owner")
        if mode is MemberMode.FROZEN:
            self.frozen_parts = collect_parts(self)
            self.log.info("frozen by the owner")
        else:
            self.frozen_parts = None
        self.mode = mode
        for q in self.queues:
            self._update_watch(q)

    def _resume(self) -> None:
        staged = self.staged
        if staged is not None:
            try:
                self._apply_staged(staged)
            except ValueError as e:
                # The member stays stopped with its parts still staged; the owner's
                # command fails and may be retried.
                raise PartsError(f"cannot apply the parts: {e}") from e
            self.staged = None
        self.frozen_parts = None
        self.mode = MemberMode.RUNNING
        for q in self.queues:
            q.suspended = False
            self._update_watch(q)
        self.log.info("resumed by the owner%s", " with new parts" if staged else "")
        # Kicks that came while stopped wait in the eventfds; and chains may be
        # waiting without one: look at every ring.
        for q in self.queues:
            q.process()
        if self._config_change_latched:
            self._config_change_latched = False
            self.config_changed()

    # ---- device-side write tracking (owner vendor commands) ----------------
    def start_tracking(self, page_size: int, ranges: list[tuple[int, int]]) -> None:
        if self.tracker is not None:
            raise TrackerBusy("this member already tracks writes")
        tracker = WriteTracker(page_size, ranges)
        with self.rings_home():
            self.tracker = tracker
            for q in self.queues:
                q.tracker = tracker
        self.log.info("tracking writes to %d range(s) at %d-byte pages", len(ranges),
                      page_size)

    def stop_tracking(self) -> None:
        if self.tracker is None:
            return
        with self.rings_home():
            self.log.info("write tracking stopped (%d page marks)", self.tracker.marked)
            self.tracker = None
            for q in self.queues:
                q.tracker = None

    def tracking_report(self, clear: bool) -> bytes:
        """The tracker's report (with the marks workers made so far)."""
        assert self.tracker is not None
        with self.rings_home():
            return self.tracker.report(clear)

    def parts(self) -> list[Part]:
        if self.frozen_parts is not None:
            return list(self.frozen_parts)
        with self.rings_home():
            return collect_parts(self)

    def stage_parts(self, parts: list[Part]) -> None:
        """DEV_PARTS_SET: check everything, change nothing until resume."""
        with self.rings_home():
            staged = check_parts(self, parts)
        if self.staged is None:
            self.staged = staged
        else:
            self.staged.merge(staged)

    def _apply_staged(self, staged: StagedParts) -> None:
        if staged.drv_features is not None:
            keep = self.features & VHOST_ONLY_FEATURES
            self._apply_features(staged.drv_features | keep)
        if staged.status is not None:
            self.status = staged.status
        for index, cfg in staged.vq_cfg.items():
            q = self.queues[index]
            if q.started:
                q.stop()
            if cfg.queue_size:
                q.size = cfg.queue_size
                q.set_gpa(cfg.queue_desc, cfg.queue_driver, cfg.queue_device)
            else:
                q.unconfigure()
            q.vector = cfg.vector
            q.enabled = bool(cfg.enabled)
        for ptype, value in staged.device.items():
            self.device.apply_part(ptype, value)
        for q in self.queues:
            state = staged.vq_state.get(q.index)
            reconfigured = q.index in staged.vq_cfg
            if (reconfigured or state is not None) and q.kick_fd is not None and q.configured:
                q.start(self.memory)
            if state is not None:
                if isinstance(q, PackedVirtqueue):
                    q.set_base(state.last_avail_idx | state.avail_wrap_counter << 15
                               | (state.used_idx | state.used_wrap_counter << 15) << 16)
                else:
                    q.last_avail_idx = state.last_avail_idx
                    if q.used is None:
                        q.used_idx = state.used_idx


def _require_eventfd(msg: Message) -> None:
    fd = msg.fd
    if fd is not None and not is_eventfd(fd):
        raise ProtocolError(f"{msg.request.name}: the fd is not an eventfd ({fd_kind(fd)})",
                            msg.fds)


def _unset_handler(head: int, readable: list[memoryview], writable: list[memoryview]) -> int:
    raise RuntimeError("queue has no handler")
