"""The device side of vhost-user: validated messages in, replies (now or later) out.

A :class:`VhostUserHandler` turns messages from the protocol core into changes of
guest memory and ring state, and asks its :class:`VirtioDevice` (blk, owner, ...) only
for what is device specific: feature bits, config space, device parts and the request
handler of each queue. It never touches a socket: kicks are watched through the loop
it is given, back-end messages leave through ``send_backend_message``.

A handler may have to wait: GET_VRING_BASE until the ring's outstanding requests have
completed, a reset until every ring's have, any message touching ring state until
rings served by queue workers are home (the ``rings`` column of the core's ``RULES``;
placement.py). It then returns a :class:`~vhostd.core.pending.Pending` reply; the
shell sends the reply when it resolves and reads nothing more from that front end
meanwhile, while the loop serves everyone else.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Protocol

from vhostd_proto import vhost_user as vu
from vhostd_proto.vhost_user import BackendRequest
from vhostd_proto.virtio import Feature

from ..core.pending import Pending, after, all_of
from ..core.protocol import RULES, BackendProtocol, DeviceInfo, Message, ProtocolError, RingScope
from ..engine.dirtylog import DirtyLog
from ..engine.dirtytrack import WriteTracker
from ..engine.fdcheck import fd_kind, is_eventfd
from ..engine.inflight import InflightRegion
from ..engine.loop import Loop, close_fds
from ..engine.memory import GuestMemory, GuestMemoryError
from ..engine.packed import PackedVirtqueue, set_layout
from ..engine.virtqueue import Handler, RingError, SplitVirtqueue
from ..engine.worker_ring import Spec, ring_spec
from .placement import RingPlacement

log = logging.getLogger(__name__)


class VirtioDevice(Protocol):
    """What a device type supplies to the vhost-user handler."""

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


# Device status bits (virtio), derived for a vhost-user device.
STATUS_ACKNOWLEDGE_DRIVER_FEATURES_OK = 0x1 | 0x2 | 0x8
STATUS_DRIVER_OK = 0x4


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

# What a message handler gives back: a reply body, a body and fds, nothing, or any of
# those later.
Result = bytes | tuple[bytes, list[int]] | None
Reply = tuple[bytes, list[int]] | None


class VhostUserHandler:
    """The vhost-user device side of one virtio device.

    The device and its config survive front-end reconnects; memory, rings and the
    protocol state belong to one connection and are dropped with it.
    """

    def __init__(self, device: VirtioDevice, loop: Loop) -> None:
        self.device = device
        self.name = device.name
        self.loop = loop
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
        self.tracker: WriteTracker | None = None  # the owner's write tracking (member.py)
        self.features = 0
        self.status = 0
        self.send_backend_message: Callable[[BackendRequest, bytes], bool] | None = None
        self.protocol: BackendProtocol | None = None
        # The owner stopped this device (it is a member): no ring is served, no kick
        # read, no CONFIG_CHANGE sent (it waits in _config_change_latched).
        self.paused = False
        self._config_change_latched = False
        # Called after a device reset by the front end (the member forgets its staging).
        self.reset_listeners: list[Callable[[], None]] = []
        self.placement = RingPlacement(self, loop)

    @property
    def offered_features(self) -> int:
        return self.info.features

    # ---- connection lifecycle ---------------------------------------------
    def connect(self) -> BackendProtocol:
        self.protocol = BackendProtocol(self.info)
        return self.protocol

    def disconnect(self) -> Pending[None] | None:
        """The front end went away: stop every ring once its outstanding requests have
        completed, then drop the connection's memory and fds. A Pending while requests
        are still at the device; the device takes no new front end until it resolves."""
        everything = range(len(self.queues))
        waiting = self.placement.hold(everything)
        done = after(waiting, lambda _: self._quiet(self.queues, self._disconnect))

        def release(_: Any) -> None:
            self.placement.release(everything)

        if isinstance(done, Pending):
            done.then(release)
            return done
        release(None)
        return None

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
            q.quiescing = False
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

    def _quiet(self, queues: list[SplitVirtqueue], then: Callable[[], Any]) -> Any:
        """``then()`` once every ring in ``queues`` has stopped taking chains and its
        outstanding requests have completed: now if none is outstanding, else a
        Pending of it."""
        waits: list[Pending[None]] = []
        for q in queues:
            p: Pending[None] = Pending()
            q.quiesce(lambda p=p: p.resolve(None))
            waits.append(p)
        ready = all_of(waits)
        if ready is None:
            return then()
        return ready.map(lambda _: then())

    # ---- dispatch ----------------------------------------------------------
    def handle(self, msg: Message) -> Reply | Pending[Reply]:
        """Carry out ``msg``; the reply due (bytes and fds to send) or None, now or as
        a Pending.

        fds in ``msg`` become this object's responsibility; fds in the reply are the
        caller's to close once sent.
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
        scope = RULES[msg.request].rings
        rings = (range(len(self.queues)) if scope is RingScope.ALL
                 else [msg.ring] if scope is RingScope.ONE and msg.ring is not None else [])
        home = self.placement.hold(rings)
        try:
            result = after(home, lambda _: self._run(handler, msg, protocol))
        except BaseException:
            self._release(rings)
            raise
        if isinstance(result, Pending):
            out: Pending[Reply] = Pending()

            def finish(p: Pending[Reply]) -> None:
                # The reply is due whatever happens when the rings leave again.
                self._release(rings)
                try:
                    out.resolve(p.result())
                except Exception as e:
                    out.fail(e)

            result.then(finish)
            return out
        self._release(rings)
        return result

    def _release(self, rings: range | list[int]) -> None:
        """End a hold; a failure to send a ring away again is logged, never lost in a
        callback (the ring is then served here)."""
        try:
            self.placement.release(rings)
        except Exception:
            self.log.exception("internal error sending rings back to their worker")

    def _run(self, handler: Callable[[Message], Result | Pending[Result]], msg: Message,
             protocol: BackendProtocol) -> Reply | Pending[Reply]:
        try:
            result = handler(msg)
        except RequestFailed as e:
            return self._nack(msg, protocol, e)
        if isinstance(result, Pending):
            return result.map(lambda r: self._reply(msg, protocol, r))
        return self._reply(msg, protocol, result)

    def _nack(self, msg: Message, protocol: BackendProtocol, e: RequestFailed) -> Reply:
        self.log.error("%s failed: %s", msg.request.name, e)
        nack = protocol.ack(msg, False)
        return (nack, []) if nack is not None else None

    @staticmethod
    def _reply(msg: Message, protocol: BackendProtocol, result: Result) -> Reply:
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
        self.apply_features(features)
        if not features & 1 << vu.VHOST_USER_F_PROTOCOL_FEATURES:
            # Without protocol features rings are enabled as soon as they start.
            for q in self.queues:
                q.enabled = True
        self.status |= STATUS_ACKNOWLEDGE_DRIVER_FEATURES_OK

    def apply_features(self, features: int) -> None:
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

    def _on_reset_owner(self, msg: Message) -> Any:
        return self._quiet(self.queues, self._reset)

    def _on_reset_device(self, msg: Message) -> Any:
        return self._quiet(self.queues, self._reset)

    def _reset(self) -> None:
        """Device reset: every driver-visible part returns to its default."""
        for q in self.queues:
            if q.started:
                q.stop()
            self._set_kick(q, None)
            q.enabled = False
            q.broken = False
            q.suspended = False
            q.quiescing = False
            q.unconfigure()
        self.apply_features(0)
        self.status = 0
        self.paused = False
        self._config_change_latched = False
        self.device.reset()
        for listener in self.reset_listeners:
            listener()

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
        logging costs nothing otherwise. Meanwhile every ring stays in this process:
        marking a page is a read-modify-write of a byte of the log, and two processes
        doing it at once on one byte could lose a mark (a page QEMU never sends again)."""
        active = self.dirty_log if self.features & 1 << vu.VHOST_F_LOG_ALL else None
        for q in self.queues:
            q.dirty_log = active
        self.placement.keep_home(active is not None, "dirty logging")

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
        # again once its memory is back. Requests still at the device keep the mappings
        # they use alive (memory.py).
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

    def _on_set_vring_kick(self, msg: Message) -> Any:
        _require_eventfd(msg)
        q = self.queues[msg.ring]  # type: ignore[index]
        if q.outstanding:
            # A restart of a running ring: its requests still at the device complete
            # first, or the inflight region would hand them to the device again.
            fd = msg.fd
            return self._quiet([q], lambda: self._start_ring(q, fd))
        self._start_ring(q, msg.fd)
        return None

    def _start_ring(self, q: SplitVirtqueue, fd: int | None) -> None:
        q.quiescing = False
        self._set_kick(q, fd)
        self._attach_inflight(q)
        if self.paused:
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
            self.placement.forget_watch(q)
            os.close(old)
        q.kick_fd = fd
        if fd is not None:
            os.set_blocking(fd, False)
        self.placement.update_watch(q)

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

    def _on_get_vring_base(self, msg: Message) -> bytes | Pending[bytes]:
        q = self.queues[msg.ring]  # type: ignore[index]

        def stopped() -> bytes:
            # Every chain this ring took is complete; stop() publishes the last used
            # entries before the base is reported.
            base = q.stop()
            self._set_kick(q, None)
            return vu.VringState.build({"index": q.index, "num": base})

        return self._quiet([q], stopped)  # type: ignore[no-any-return]

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

    def refresh_capacity(self) -> bool | Pending[bool]:
        """The storage may have grown (SIGHUP, device-resize): True if the device's
        capacity changed, after which the front end has been told. Rings in workers
        come home for it (their device copy learns the new size when they leave)."""
        everything = range(len(self.queues))

        def refresh(_: Any) -> bool:
            try:
                changed = self.device.refresh_capacity()
            finally:
                self.placement.release(everything)
            if changed and self.protocol is not None:
                self.config_changed()
            return changed

        return after(self.placement.hold(everything), refresh)

    def state_report(self) -> list[str] | Pending[list[str]]:
        """The device's rings as a person reads them (SIGUSR1), read where they run."""
        head = ["paused by its owner"] if self.paused else []

        def lines(stats: list[Spec]) -> list[str]:
            out = list(head)
            for q, st in zip(self.queues, stats, strict=True):
                where = st.get("where")
                line = st.get("line") or q.describe()
                out.append(line if where is None else f"{line}, in {where}")
            return out

        return after(self.placement.stats(), lines)

    def config_changed(self) -> bool:
        """Tell the front end the config space changed (e.g. capacity)."""
        if self.paused:
            self._config_change_latched = True  # a stopped member sends nothing
            return True
        send = self.send_backend_message
        if send is None:
            self.log.warning("config changed but the front end gave no back-end channel")
            return False
        return send(BackendRequest.CONFIG_CHANGE_MSG, b"")

    def unpause(self) -> None:
        """The owner resumed this device: serve its rings again, soon (not inside the
        owner's command), and send a config change held back meanwhile."""
        self.paused = False
        for q in self.queues:
            q.suspended = False
        self.placement.settle()
        for q in self.queues:
            # Kicks that came while paused wait in the eventfds, and chains may be
            # waiting without one: look at every ring (a worker does on arrival).
            self.loop.call_soon(self._look_at, q)
        if self._config_change_latched:
            self._config_change_latched = False
            self.config_changed()

    def pause(self) -> Pending[None] | None:
        """The owner stops this device: take no new chains, and resolve once every
        outstanding request has completed and been published. From then on nothing
        touches guest memory or signals the driver until :meth:`unpause`."""
        self.paused = True
        for q in self.queues:
            q.suspended = True
            self.placement.update_watch(q)

        def drained() -> None:
            for q in self.queues:
                q.quiescing = False  # suspended keeps it still

        result = self._quiet(self.queues, drained)
        return result if isinstance(result, Pending) else None

    # ---- queue workers (placement.py's RingSource) ----------------------------
    def ring_spec(self, q: SplitVirtqueue) -> tuple[Spec, list[int]]:
        return ring_spec(q, self.memory, self.device, self.inflight, self.tracker)

    def ring_returned(self, q: SplitVirtqueue, back: Spec) -> None:
        q.import_position(back["ring"])
        if self.dirty_log is not None:
            self.dirty_log.marked += back["log_marked"]
        t = back["tracker"]
        if t is not None and self.tracker is not None:
            self.tracker.merge([bytes.fromhex(b) for b in t["bitmaps"]], t["marked"])
        stats = getattr(self.device, "queue_stats", None)
        dev = (back.get("stats") or {}).get("device")
        if stats is not None and dev is not None and q.index < len(stats):
            stats[q.index].merge(dev)

    def ring_lost(self, q: SplitVirtqueue, why: str) -> None:
        """The worker serving ``q`` is gone: serve the ring here from now on, picking it
        up as after a back-end restart (the guest's used index, the inflight region)."""
        if q.started and q.configured:
            q.started = False
            q.start(self.memory)
            if q.inflight is None:
                q.last_avail_idx = q.used_idx
            # The worker may have read the last kick: look at the ring now.
            self.loop.call_soon(self._look_at, q)

    def _look_at(self, q: SplitVirtqueue) -> None:
        """Serve ``q`` if this process serves it (scheduled: by the time this runs the
        ring may have gone to its worker, which looks at it itself)."""
        if self.placement.served_here(q.index):
            q.process()

    def device_stats(self, q: SplitVirtqueue) -> Spec:
        stats = getattr(self.device, "queue_stats", None)
        if stats is None or q.index >= len(stats):
            return {}
        return stats[q.index].snapshot()  # type: ignore[no-any-return]

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


def _require_eventfd(msg: Message) -> None:
    fd = msg.fd
    if fd is not None and not is_eventfd(fd):
        raise ProtocolError(f"{msg.request.name}: the fd is not an eventfd ({fd_kind(fd)})",
                            msg.fds)


def _unset_handler(head: int, readable: list[memoryview], writable: list[memoryview]) -> int:
    raise RuntimeError("queue has no handler")
