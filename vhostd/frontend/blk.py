"""``BlkFrontend``: plays QEMU 7.2's vhost-user-blk-pci against a back end.

``realize()`` and ``start()`` send the messages of reference section 6.1 (steps 1-10 and
11-19, plus the STATUS steps only if that protocol feature is negotiated) in QEMU's order
and with QEMU's NEED_REPLY usage; ``stop()`` sends steps 21-23. Requests are virtio-blk
requests built in guest memory: a 16-byte ``virtio_blk_outhdr``, data, and a status byte.

Every queue owns ``queue_size`` request slots laid out as::

    slot: [ page 0: ... outhdr (last 16 bytes) ][ data (max_io) ][ status ]

so the header, the data and the status byte are GPA-contiguous and can be described by one
descriptor each, per page, or merged (header+data / data+status), as the caller asks.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import time
from collections.abc import Sequence

from construct import Container

from vhostd_proto.vhost_user import VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature
from vhostd_proto.virtio import DeviceStatus, Feature
from vhostd_proto.virtio_blk import (
    BLK_CONFIG_SIZE,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    BlkConfig,
    BlkFeature,
    BlkRequestType,
    BlkStatus,
)

from .client import VhostUserClient
from .memory import PAGE_SIZE, GuestMemory, GuestRegion, RegionSpec, align_up
from .virtqueue import SplitVirtqueue

_OUTHDR = struct.Struct("<IIQ")  # type, ioprio, sector
_SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags
_OUTHDR_PACK = _OUTHDR.pack_into

T_IN = BlkRequestType.VIRTIO_BLK_T_IN.value
T_OUT = BlkRequestType.VIRTIO_BLK_T_OUT.value
T_FLUSH = BlkRequestType.VIRTIO_BLK_T_FLUSH.value
T_GET_ID = BlkRequestType.VIRTIO_BLK_T_GET_ID.value
T_DISCARD = BlkRequestType.VIRTIO_BLK_T_DISCARD.value
T_WRITE_ZEROES = BlkRequestType.VIRTIO_BLK_T_WRITE_ZEROES.value
S_OK = BlkStatus.VIRTIO_BLK_S_OK.value
# Written before submission so a request the device "completed" without a status is visible.
STATUS_UNSET = 0xFF

# QEMU 7.2 masks the back end's protocol offer with bits 0..16 and acks all of it.
QEMU_PROTOCOL_MASK = (1 << (ProtocolFeature.STATUS + 1)) - 1

# Virtio feature bits a Linux virtio-blk driver acks and this front end can drive (split ring
# only: no RING_PACKED, no ACCESS_PLATFORM).
DRIVER_FEATURES = (
    sum(1 << b for b in (
        BlkFeature.VIRTIO_BLK_F_SIZE_MAX, BlkFeature.VIRTIO_BLK_F_SEG_MAX,
        BlkFeature.VIRTIO_BLK_F_GEOMETRY, BlkFeature.VIRTIO_BLK_F_RO,
        BlkFeature.VIRTIO_BLK_F_BLK_SIZE, BlkFeature.VIRTIO_BLK_F_FLUSH,
        BlkFeature.VIRTIO_BLK_F_TOPOLOGY, BlkFeature.VIRTIO_BLK_F_CONFIG_WCE,
        BlkFeature.VIRTIO_BLK_F_MQ, BlkFeature.VIRTIO_BLK_F_DISCARD,
        BlkFeature.VIRTIO_BLK_F_WRITE_ZEROES,
        Feature.VIRTIO_RING_F_INDIRECT_DESC, Feature.VIRTIO_RING_F_EVENT_IDX,
        Feature.VIRTIO_F_VERSION_1,
    ))
)

# QEMU's config length with its default properties (DISCARD and WRITE_ZEROES on).
QEMU_CONFIG_SIZE = 57

Completion = tuple[int, int, bytes | None]
CompletionLen = tuple[int, int, bytes | None, int]


class BlkError(Exception):
    def __init__(self, what: str, status: int) -> None:
        try:
            name = BlkStatus(status).name
        except ValueError:
            name = f"status {status:#x}"
        super().__init__(f"{what}: {name}")
        self.status = status


class _Queue:
    """Per-virtqueue front-end state."""

    __slots__ = (
        "buf",
        "configured",
        "err_fd",
        "free_slots",
        "gpa",
        "inflight",
        "masked_call_fd",
        "slot_gpa",
        "stash",
        "vq",
    )

    def __init__(self, vq: SplitVirtqueue, slot_gpa: int, region: GuestRegion,
                 nslots: int) -> None:
        self.vq = vq
        self.slot_gpa = slot_gpa
        # All slots of a queue sit in one region: address them through its view directly.
        self.buf = region.buf
        self.gpa = region.gpa
        self.free_slots = list(range(nslots - 1, -1, -1))
        # head -> (token, slot, in_gpa, in_len, status_gpa, external_buffer)
        self.inflight: dict[int, tuple[int, int, int, int, int, bool]] = {}
        self.stash: list[CompletionLen] = []
        self.configured = True
        # QEMU gives the back end an internal "masked" call eventfd at realize (step 9) and
        # the guest irqfd at start (step 14).
        self.masked_call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.err_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class BlkFrontend:
    """A vhost-user-blk front end: connection, guest memory, virtqueues, request helpers.

    Options mirror what a QEMU command line and a Linux guest would decide:
    ``num_queues``/``queue_size`` (QEMU properties), ``active_queues`` (queues the driver
    configures; the rest only get CALL/ERR/ENABLE, as with Linux on fewer CPUs),
    ``event_idx``/``indirect`` (whether the driver acks those features), ``features``
    (explicit virtio feature mask to ack, intersected with the offer),
    ``protocol_features`` (mask of protocol bits to ack; default: like QEMU), ``memory``
    (a ``GuestMemory`` or region specs; default: one region at GPA 0 sized to fit),
    ``inflight`` (use GET/SET_INFLIGHT_FD if offered), ``max_io`` (largest data buffer per
    request). Request shape defaults: ``seg_size`` (split data into descriptors of at most
    this many bytes; None = one descriptor), ``merge`` (header+data resp. data+status in one
    descriptor), ``use_indirect`` (one indirect descriptor per request).
    """

    def __init__(self, path: str | os.PathLike[str], *, num_queues: int = 1,
                 queue_size: int = 128, active_queues: int | None = None,
                 event_idx: bool = True, indirect: bool = True, features: int | None = None,
                 protocol_features: int | None = None,
                 memory: GuestMemory | Sequence[RegionSpec | tuple[int, ...]] | None = None,
                 inflight: bool = True, config_size: int = QEMU_CONFIG_SIZE,
                 max_io: int = 64 * 1024, seg_size: int | None = None, merge: bool = False,
                 use_indirect: bool = False, timeout: float = 5.0, start: bool = True) -> None:
        if max_io <= 0 or max_io % 512:
            raise ValueError("max_io must be a positive multiple of 512")
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.active_queues = num_queues if active_queues is None else active_queues
        self.want_event_idx = event_idx
        self.want_indirect = indirect
        self.want_features = features
        self.protocol_mask = QEMU_PROTOCOL_MASK if protocol_features is None \
            else protocol_features
        self.want_inflight = inflight
        self.config_size = config_size
        self.max_io = max_io
        self.seg_size = seg_size
        self.merge = merge
        self.use_indirect = use_indirect
        self.timeout = timeout

        # Slot: one page holding the outhdr at its end, then data, then the status byte.
        self._slot_size = PAGE_SIZE + align_up(max_io + 1, PAGE_SIZE)
        # Worst case: header + one descriptor per 512-byte segment + status.
        self._indirect_max = max_io // 512 + 2
        if memory is None:
            memory = [RegionSpec(0, self.memory_needed())]
        self.mem = memory if isinstance(memory, GuestMemory) else GuestMemory(memory)
        self._owns_mem = not isinstance(memory, GuestMemory)

        self.queues: list[_Queue] = []
        for i in range(num_queues):
            vq = SplitVirtqueue(self.mem, i, queue_size, indirect_max=self._indirect_max)
            slot_gpa = self.mem.alloc(self._slot_size * queue_size, PAGE_SIZE)
            self.queues.append(_Queue(vq, slot_gpa, self.mem.region_at(slot_gpa), queue_size))
        for q in self.queues[self.active_queues:]:
            q.configured = False

        self._token = 0
        self._closed = False
        self.client = VhostUserClient(path, timeout=timeout)
        # Filled in by realize()/start().
        self.offered_features = 0
        self.offered_protocol_features = 0
        self.protocol_features = 0
        self.features = 0
        self.queue_num: int | None = None
        self.max_mem_slots: int | None = None
        self.backend_sock: socket.socket | None = None
        self.config = b""
        self.inflight_fd: int | None = None
        self.inflight_size = 0
        self.inflight_offset = 0
        self.inflight_map: mmap.mmap | None = None
        self.bases: list[int] = [0] * num_queues
        self.started = False
        self._sent_regions: list[GuestRegion] = []
        if start:
            try:
                self.realize()
                self.start()
            except BaseException:
                self.close()
                raise

    @property
    def vqs(self) -> list[SplitVirtqueue]:
        return [q.vq for q in self.queues]

    def memory_needed(self) -> int:
        """Bytes of guest memory the rings, indirect tables and slots take, plus 1 MiB."""
        per_queue = (
            align_up(16 * self.queue_size + 6 + 2 * self.queue_size + 3, PAGE_SIZE)
            + align_up(6 + 8 * self.queue_size, PAGE_SIZE)
            + align_up(16 * self._indirect_max * self.queue_size, PAGE_SIZE)
            + self._slot_size * self.queue_size
        )
        return align_up(per_queue * self.num_queues + (1 << 20), 2 << 20)

    def has_protocol(self, bit: int) -> bool:
        return bool(self.protocol_features >> bit & 1)

    def has_feature(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    # -- QEMU 7.2 sequences ---------------------------------------------------------------

    def realize(self) -> None:
        """Steps 1-10 of reference 6.1 (vhost_user_blk_realize_connect)."""
        c = self.client
        self.offered_features = c.get_features()  # 1
        if self.offered_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            self.offered_protocol_features = c.get_protocol_features()  # 2
            self.protocol_features = self.offered_protocol_features & self.protocol_mask
            c.set_protocol_features(self.protocol_features)  # 3
        if not self.has_protocol(ProtocolFeature.CONFIG):
            raise RuntimeError("back end lacks VHOST_USER_PROTOCOL_F_CONFIG (QEMU refuses it)")
        if self.has_protocol(ProtocolFeature.MQ):
            self.queue_num = c.get_queue_num()  # 4
            if self.queue_num < self.num_queues:
                raise RuntimeError(f"back end supports {self.queue_num} queues, "
                                   f"{self.num_queues} requested")
        elif self.num_queues > 1:
            raise RuntimeError("maximum number of queues supported by the backend is 1")
        if self.has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            self.max_mem_slots = c.get_max_mem_slots()  # 5
        if self.has_protocol(ProtocolFeature.BACKEND_REQ):
            self.backend_sock = c.set_backend_req_fd(need_reply=True)  # 6
        c.set_owner()  # 7
        c.get_features()  # 8
        for i, q in enumerate(self.queues):  # 9
            c.set_vring_call(i, q.masked_call_fd)
            c.set_vring_err(i, q.err_fd)
        self.config = c.get_config(0, self.config_size)  # 10

    def _ack_features(self) -> int:
        want = DRIVER_FEATURES if self.want_features is None else self.want_features
        if not self.want_event_idx:
            want &= ~(1 << Feature.VIRTIO_RING_F_EVENT_IDX)
        if not self.want_indirect:
            want &= ~(1 << Feature.VIRTIO_RING_F_INDIRECT_DESC)
        if self.num_queues == 1 and self.want_features is None:
            # QEMU only offers MQ to the guest when num-queues > 1.
            want &= ~(1 << BlkFeature.VIRTIO_BLK_F_MQ)
        return want & self.offered_features

    def _set_features(self) -> None:
        features = self.features
        if self.offered_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            # QEMU >= 7.2 ORs bit 30 into every SET_FEATURES.
            features |= 1 << VHOST_USER_F_PROTOCOL_FEATURES
        self.client.set_features(features)
        if self.has_protocol(ProtocolFeature.STATUS):
            self._add_status(DeviceStatus.FEATURES_OK)

    def _add_status(self, bits: int) -> None:
        status = self.client.get_status()
        if status & bits != bits:
            self.client.set_status(status | bits)

    def _memory_table(self) -> None:
        c = self.client
        regions = list(self.mem.regions)
        if self.has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            if self.max_mem_slots is not None and len(regions) > self.max_mem_slots:
                raise RuntimeError(f"{len(regions)} regions > {self.max_mem_slots} slots")
            # QEMU keeps a shadow table and sends only the difference.
            for r in self._sent_regions:
                if r not in regions:
                    c.rem_mem_reg(r, need_reply=True)
            for r in regions:
                if r not in self._sent_regions:
                    c.add_mem_reg(r, need_reply=True)
        else:
            c.set_mem_table(regions, need_reply=True)
        self._sent_regions = regions

    def start(self, bases: Sequence[int] | None = None) -> None:
        """Steps 11-19 (+20 with STATUS) of reference 6.1 (vhost_user_blk_start).

        ``bases`` are the SET_VRING_BASE values per queue (default: what ``stop`` returned,
        initially 0).
        """
        c = self.client
        if bases is not None:
            self.bases = list(bases)
        self.features = self._ack_features()
        event_idx = self.has_feature(Feature.VIRTIO_RING_F_EVENT_IDX)
        for q in self.queues:
            q.vq.event_idx = event_idx
        self._set_features()  # 11
        if self.want_inflight and self.has_protocol(ProtocolFeature.INFLIGHT_SHMFD):
            if self.inflight_fd is None:  # 12
                size, offset, fd = c.get_inflight_fd(self.num_queues, self.queue_size)
                self.inflight_size, self.inflight_offset, self.inflight_fd = size, offset, fd
                if fd is not None and size:
                    self.inflight_map = mmap.mmap(fd, offset + size, mmap.MAP_SHARED,
                                                  mmap.PROT_READ | mmap.PROT_WRITE)
            if self.inflight_fd is not None:  # 13
                c.set_inflight_fd(self.inflight_fd, self.inflight_size, self.inflight_offset,
                                  self.num_queues, self.queue_size)
        for i, q in enumerate(self.queues):  # 14
            c.set_vring_call(i, q.vq.call_fd)
        self._set_features()  # 15
        self._memory_table()  # 16
        for i, q in enumerate(self.queues):  # 17
            if not q.configured:
                continue
            vq = q.vq
            c.set_vring_num(i, vq.size)
            c.set_vring_base(i, self.bases[i])
            # Ring addresses are QVAs; log_guest_addr is the used ring's GPA.
            c.set_vring_addr(i, vq.desc_qva, vq.used_qva, vq.avail_qva, log=vq.used_gpa)
            c.set_vring_kick(i, vq.kick_fd)
        if self.offered_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:  # 19
            for i in range(self.num_queues):
                c.set_vring_enable(i, True)
        if self.has_protocol(ProtocolFeature.STATUS):  # 20
            self._add_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER
                             | DeviceStatus.DRIVER_OK)
        self.started = True

    def stop(self) -> list[int]:
        """Steps 21-23: (SET_STATUS 0,) ENABLE 0 for all queues, GET_VRING_BASE per
        configured queue. Returns the bases (index = queue number; unconfigured keep theirs).
        """
        c = self.client
        if self.has_protocol(ProtocolFeature.STATUS):
            c.set_status(0)
        if self.offered_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            for i in range(self.num_queues):
                c.set_vring_enable(i, False)
        for i, q in enumerate(self.queues):
            if q.configured:
                self.bases[i] = c.get_vring_base(i)
        self.started = False
        return list(self.bases)

    def rebind_memory(self, mem: GuestMemory) -> None:
        """Continue on ``mem``, a copy of the guest's memory at the same GPAs (made with
        ``GuestMemory.clone_layout`` and filled by a migration); the old memory stays
        the caller's."""
        self.mem = mem
        self._owns_mem = False
        for q in self.queues:
            q.vq.rebind(mem)
            region = mem.region_at(q.slot_gpa)
            q.buf = region.buf
            q.gpa = region.gpa
        self._sent_regions = []

    def attach(self, path: str | os.PathLike[str]) -> VhostUserClient:
        """Connect the same guest to another member, as a passthrough hypervisor would.

        The new member gets the transport only: memory table, call/err and kick
        eventfds (the very ones the guest already uses). The driver's state (features,
        ring addresses, ring positions) is not sent: it reaches the member as device
        parts through its owner. Returns the previous connection, still open, so the
        caller decides when the old member loses its front end.
        """
        old = self.client
        c = self.client = VhostUserClient(path, timeout=self.timeout)
        self.offered_features = c.get_features()
        if self.offered_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            self.offered_protocol_features = c.get_protocol_features()
            self.protocol_features = self.offered_protocol_features & self.protocol_mask
            c.set_protocol_features(self.protocol_features)
        if self.has_protocol(ProtocolFeature.MQ):
            c.get_queue_num()
        c.set_owner()
        for i, q in enumerate(self.queues):
            c.set_vring_call(i, q.vq.call_fd)
            c.set_vring_err(i, q.err_fd)
        self._sent_regions = []
        self._memory_table()
        for i, q in enumerate(self.queues):
            if q.configured:
                c.set_vring_kick(i, q.vq.kick_fd)
        c.get_features()  # round trip: everything above has been handled
        return old

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.client.close()
        if self.backend_sock is not None:
            self.backend_sock.close()
        if self.inflight_map is not None:
            self.inflight_map.close()
        if self.inflight_fd is not None:
            os.close(self.inflight_fd)
            self.inflight_fd = None
        for q in self.queues:
            q.vq.close()
            os.close(q.masked_call_fd)
            os.close(q.err_fd)
        self.queues = []
        if self._owns_mem:
            self.mem.close()

    def __enter__(self) -> BlkFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- config ---------------------------------------------------------------------------

    def parsed_config(self) -> Container:
        return BlkConfig.parse(self.config.ljust(BLK_CONFIG_SIZE, b"\0"))

    @property
    def capacity(self) -> int:
        """Disk size in 512-byte sectors (config offset 0)."""
        return struct.unpack_from("<Q", self.config)[0]

    def reread_config(self) -> bytes:
        """What QEMU does on CONFIG_CHANGE_MSG: GET_CONFIG again."""
        self.config = self.client.get_config(0, self.config_size)
        return self.config

    # -- requests -------------------------------------------------------------------------

    def submit(self, q: int, rtype: int, sector: int = 0, *, out_data: bytes | None = None,
               in_len: int = 0, buf: int | None = None, seg_size: int | None = -1,
               merge: bool | None = None, use_indirect: bool | None = None,
               ioprio: int = 0) -> int:
        """Queue one request (not yet published); return its token.

        Device-readable: outhdr, then ``out_data``; device-writable: ``in_len`` bytes, then
        the status byte. ``buf`` places the data at a caller-owned GPA instead of the slot
        (e.g. a buffer straddling two regions). ``seg_size``/``merge``/``use_indirect`` override
        the front end's defaults for this request (``seg_size=-1`` means "default").
        """
        qs = self.queues[q]
        if seg_size == -1:
            seg_size = self.seg_size
        if merge is None:
            merge = self.merge
        if use_indirect is None:
            use_indirect = self.use_indirect
        out_len = len(out_data) if out_data is not None else 0
        if out_len + in_len > self.max_io and buf is None:
            raise ValueError(f"{out_len + in_len} data bytes exceed max_io {self.max_io}")
        try:
            slot = qs.free_slots.pop()
        except IndexError:
            raise BlockingIOError(f"queue {q}: all {self.queue_size} slots in flight") from None
        base = qs.slot_gpa + slot * self._slot_size
        hdr = base + PAGE_SIZE - 16
        rbuf = qs.buf
        rgpa = qs.gpa
        data = base + PAGE_SIZE if buf is None else buf
        ext = buf is not None
        status = base + PAGE_SIZE + (0 if ext else out_len + in_len)
        _OUTHDR_PACK(rbuf, hdr - rgpa, rtype, ioprio, sector)
        rbuf[status - rgpa] = STATUS_UNSET

        out = [(hdr, 16)]
        inn = []
        if out_len:
            if ext:
                self.mem.write(data, out_data)
            else:
                rbuf[data - rgpa:data - rgpa + out_len] = out_data
            _chunks(out, data, out_len, seg_size)
        in_gpa = data + out_len
        if in_len:
            _chunks(inn, in_gpa, in_len, seg_size)
        inn.append((status, 1))
        if merge:
            # Merge only where the bytes really are contiguous (an external buffer is not
            # next to the slot's header/status).
            if len(out) > 1 and out[0][0] + out[0][1] == out[1][0]:
                out[0:2] = [(hdr, 16 + out[1][1])]
            if len(inn) > 1 and inn[-2][0] + inn[-2][1] == status:
                inn[-2:] = [(inn[-2][0], inn[-2][1] + 1)]
        try:
            head = qs.vq.add(out, inn, use_indirect)
        except BaseException:
            qs.free_slots.append(slot)
            raise
        self._token = token = self._token + 1
        qs.inflight[head] = (token, slot, in_gpa, in_len, status, ext)
        return token

    def submit_read(self, q: int, sector: int, nbytes: int, **kw: object) -> int:
        return self.submit(q, T_IN, sector, in_len=nbytes, **kw)  # type: ignore[arg-type]

    def submit_write(self, q: int, sector: int, data: bytes, **kw: object) -> int:
        return self.submit(q, T_OUT, sector, out_data=data, **kw)  # type: ignore[arg-type]

    def submit_flush(self, q: int, **kw: object) -> int:
        return self.submit(q, T_FLUSH, 0, **kw)  # type: ignore[arg-type]

    def submit_get_id(self, q: int, **kw: object) -> int:
        return self.submit(q, T_GET_ID, 0, in_len=VIRTIO_BLK_ID_BYTES, **kw)  # type: ignore[arg-type]

    def submit_discard(self, q: int, segments: Sequence[tuple[int, int]], **kw: object) -> int:
        """``segments``: (sector, num_sectors) pairs; flags are 0 for DISCARD."""
        return self.submit(q, T_DISCARD, 0, out_data=_segments(segments, 0),
                           **kw)  # type: ignore[arg-type]

    def submit_write_zeroes(self, q: int, segments: Sequence[tuple[int, int]],
                            unmap: bool = False, **kw: object) -> int:
        flags = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if unmap else 0
        return self.submit(q, T_WRITE_ZEROES, 0, out_data=_segments(segments, flags),
                           **kw)  # type: ignore[arg-type]

    def kick(self, q: int, force: bool = False) -> bool:
        """Publish queued requests and notify the device (if it wants a notification)."""
        vq = self.queues[q].vq
        vq.publish()
        return vq.kick(force)

    def _reap(self, qs: _Queue) -> list[CompletionLen]:
        out: list[CompletionLen] = []
        rbuf = qs.buf
        rgpa = qs.gpa
        inflight = qs.inflight
        free_slots = qs.free_slots
        for head, used_len in qs.vq.reap():
            token, slot, in_gpa, in_len, status, ext = inflight.pop(head)
            data = None
            if in_len:
                if ext:
                    data = self.mem.read(in_gpa, in_len)
                else:
                    off = in_gpa - rgpa
                    data = bytes(rbuf[off:off + in_len])
            out.append((token, rbuf[status - rgpa], data, used_len))
            free_slots.append(slot)
        return out

    def complete(self, q: int, timeout: float | None = None,
                 with_len: bool = False) -> list[Completion] | list[CompletionLen]:
        """Publish+kick anything queued, then return completions ``(token, status, data)``
        (``data`` for requests with device-writable data, else None; ``with_len`` appends the
        used length). Waits up to ``timeout`` (default: the front end's) for at least one.
        """
        qs = self.queues[q]
        vq = qs.vq
        if vq.avail_idx != vq.published_idx:
            self.kick(q)
        res = qs.stash + self._reap(qs)
        qs.stash = []
        if not res and qs.inflight:
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            while True:
                remaining = deadline - time.monotonic()
                # Reap even after a timeout: a device that (wrongly) did not signal may still
                # have completed the request.
                if remaining > 0:
                    vq.wait_call(remaining)
                res = self._reap(qs)
                if res or remaining <= 0:
                    break
        if with_len:
            return res
        return [(t, s, d) for t, s, d, _ in res]

    def wait(self, q: int, token: int, timeout: float | None = None) -> CompletionLen:
        """Wait for one token; other completions are kept for the next ``complete``."""
        qs = self.queues[q]
        for k, c in enumerate(qs.stash):
            if c[0] == token:
                return qs.stash.pop(k)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"queue {q}: request {token} did not complete")
            found = None
            for c in self.complete(q, remaining, with_len=True):
                if c[0] == token:
                    found = c
                else:
                    qs.stash.append(c)  # type: ignore[arg-type]
            if found is not None:
                return found  # type: ignore[return-value]

    def _sync(self, what: str, q: int, token: int) -> bytes | None:
        self.kick(q)
        _, status, data, _ = self.wait(q, token)
        if status != S_OK:
            raise BlkError(what, status)
        return data

    def read(self, sector: int, nbytes: int, q: int = 0, **kw: object) -> bytes:
        data = self._sync("read", q, self.submit_read(q, sector, nbytes, **kw))
        assert data is not None
        return data

    def write(self, sector: int, data: bytes, q: int = 0, **kw: object) -> None:
        self._sync("write", q, self.submit_write(q, sector, data, **kw))

    def flush(self, q: int = 0, **kw: object) -> None:
        self._sync("flush", q, self.submit_flush(q, **kw))

    def get_id(self, q: int = 0, **kw: object) -> bytes:
        """The device ID string: up to 20 bytes, cut at the first NUL (a device may write
        only the string and its terminator, leaving the rest of the buffer untouched)."""
        data = self._sync("get_id", q, self.submit_get_id(q, **kw))
        assert data is not None
        return data.split(b"\0", 1)[0]

    def discard(self, segments: Sequence[tuple[int, int]], q: int = 0, **kw: object) -> None:
        self._sync("discard", q, self.submit_discard(q, segments, **kw))

    def write_zeroes(self, segments: Sequence[tuple[int, int]], unmap: bool = False,
                     q: int = 0, **kw: object) -> None:
        self._sync("write_zeroes", q, self.submit_write_zeroes(q, segments, unmap, **kw))


def _chunks(bufs: list[tuple[int, int]], gpa: int, length: int, seg_size: int | None) -> None:
    if not seg_size or seg_size >= length:
        bufs.append((gpa, length))
        return
    end = gpa + length
    while gpa < end:
        n = min(seg_size, end - gpa)
        bufs.append((gpa, n))
        gpa += n


def _segments(segments: Sequence[tuple[int, int]], flags: int) -> bytes:
    out = bytearray(_SEGMENT.size * len(segments))
    for k, (sector, num) in enumerate(segments):
        _SEGMENT.pack_into(out, k * _SEGMENT.size, sector, num, flags)
    return bytes(out)
