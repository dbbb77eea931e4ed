"""virtio-blk member device on a :class:`~vhostd.devices.backing.BlockBackend`.

The request handler is the hottest code in the daemon: it parses the 16-byte
request header with a precompiled struct, moves data with one vectored call
straight between guest memory and the backing file, and writes the status byte.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass

from vhostd_proto.virtio_admin import PartType
from vhostd_proto.virtio_blk import (
    BLK_CONFIG_WCE_OFFSET,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_SECTOR_SIZE,
    VIRTIO_BLK_T_BARRIER,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    BlkConfig,
    BlkFeature,
    BlkRequestType,
    BlkStatus,
)

from ..engine.virtqueue import Handler, SplitVirtqueue
from .backing import BlockBackend, FileBackend

log = logging.getLogger(__name__)

# Field layouts of vhostd_proto.virtio_blk.BlkOuthdr / DiscardWriteZeroes.
OUTHDR = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")

T_IN = BlkRequestType.VIRTIO_BLK_T_IN
T_OUT = BlkRequestType.VIRTIO_BLK_T_OUT
T_FLUSH = BlkRequestType.VIRTIO_BLK_T_FLUSH
T_GET_ID = BlkRequestType.VIRTIO_BLK_T_GET_ID
T_DISCARD = BlkRequestType.VIRTIO_BLK_T_DISCARD
T_WRITE_ZEROES = BlkRequestType.VIRTIO_BLK_T_WRITE_ZEROES
S_OK = BlkStatus.VIRTIO_BLK_S_OK
S_IOERR = BlkStatus.VIRTIO_BLK_S_IOERR
S_UNSUPP = BlkStatus.VIRTIO_BLK_S_UNSUPP
SECTOR = VIRTIO_BLK_SECTOR_SIZE

MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per segment
MAX_DISCARD_SEG = 32
MAX_WRITE_ZEROES_SECTORS = 1 << 22
MAX_WRITE_ZEROES_SEG = 32
SIZE_MAX = 1 << 20
SEG_MAX_QUEUE = 128


@dataclass
class BlkOptions:
    num_queues: int = 1
    queue_size: int = 1024  # largest queue the front end may configure (QEMU's maximum)
    logical_block_size: int = 512
    serial: str = ""
    writeback: bool = True  # initial write-cache mode (the driver can change it)
    # Where the device keeps the state a driver changed (wce), so a restarted daemon
    # serves the guest in the mode it chose: QEMU does not send it again.
    state_path: str | None = None


class BlkDevice:
    """A virtio-blk device: config space, features and the request handler."""

    def __init__(self, name: str, backend: BlockBackend, options: BlkOptions) -> None:
        if options.logical_block_size < SECTOR or options.logical_block_size & (
            options.logical_block_size - 1
        ):
            raise ValueError(f"logical block size {options.logical_block_size} is not a power "
                             f"of two of at least 512")
        if not 1 <= options.num_queues <= 256:
            raise ValueError(f"num-queues {options.num_queues} is not between 1 and 256")
        qs = options.queue_size
        if qs < 4 or qs > 32768 or qs & (qs - 1):
            raise ValueError(f"queue-size {qs} is not a power of two between 4 and 32768")
        self.name = name
        self.backend = backend
        self.options = options
        self.num_queues = options.num_queues
        self.max_queue_size = options.queue_size
        self.wce = 1 if options.writeback else 0
        self._load_state()
        self.capacity = backend.size() // SECTOR
        self.refused = 0  # requests failed for their shape (logged, rate-limited)
        serial = options.serial or os.path.basename(getattr(backend, "path", name))
        self.serial = serial.encode()[:VIRTIO_BLK_ID_BYTES]

    # ---- VirtioDevice ------------------------------------------------------
    def device_features(self) -> int:
        bits = [
            BlkFeature.VIRTIO_BLK_F_SIZE_MAX,
            BlkFeature.VIRTIO_BLK_F_SEG_MAX,
            BlkFeature.VIRTIO_BLK_F_BLK_SIZE,
            BlkFeature.VIRTIO_BLK_F_TOPOLOGY,
            BlkFeature.VIRTIO_BLK_F_FLUSH,
            BlkFeature.VIRTIO_BLK_F_CONFIG_WCE,
            BlkFeature.VIRTIO_BLK_F_MQ,
            BlkFeature.VIRTIO_BLK_F_DISCARD,
            BlkFeature.VIRTIO_BLK_F_WRITE_ZEROES,
        ]
        if self.backend.read_only:
            bits.append(BlkFeature.VIRTIO_BLK_F_RO)
        return sum(1 << b for b in bits)

    def config(self) -> bytes:
        lbs = self.options.logical_block_size
        per_block = lbs // SECTOR
        return BlkConfig.build({
            "capacity": self.capacity,
            "size_max": SIZE_MAX,
            # What a 128-entry ring can carry without indirect descriptors (QEMU's
            # default queue); with them, one indirect table holds the segments.
            "seg_max": min(self.max_queue_size, SEG_MAX_QUEUE) - 2,
            "cylinders": 0, "heads": 0, "sectors": 0,
            "blk_size": lbs,
            # One logical block per physical block of 4 KiB at least.
            "physical_block_exp": max(0, (4096 // lbs).bit_length() - 1),
            "alignment_offset": 0,
            "min_io_size": 1,
            "opt_io_size": 0,
            "wce": self.wce,
            "num_queues": self.num_queues,
            "max_discard_sectors": MAX_DISCARD_SECTORS,
            "max_discard_seg": MAX_DISCARD_SEG,
            "discard_sector_alignment": max(per_block, 4096 // SECTOR),
            "max_write_zeroes_sectors": MAX_WRITE_ZEROES_SECTORS,
            "max_write_zeroes_seg": MAX_WRITE_ZEROES_SEG,
            "write_zeroes_may_unmap": 1,
            "unused1": b"\0\0\0",
        })

    def get_config(self, offset: int, size: int) -> bytes:
        data = self.config()
        out = data[offset:offset + size]
        return out + bytes(size - len(out))

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        # The driver may write only the write-cache byte.
        if offset != BLK_CONFIG_WCE_OFFSET or len(data) != 1:
            raise ValueError(f"config write of {len(data)} bytes at {offset} is not the wce "
                             f"field")
        if data[0] not in (0, 1):
            raise ValueError(f"wce value {data[0]} is not 0 or 1")
        self._set_wce(data[0])

    def features_acked(self, features: int) -> None:
        pass

    def reset(self) -> None:
        try:
            self._set_wce(1 if self.options.writeback else 0)
        except ValueError as e:
            log.error("%s: reset: %s", self.name, e)
            self.wce = 1 if self.options.writeback else 0

    def _set_wce(self, wce: int) -> None:
        if self.wce == wce:
            return
        log.info("%s: write cache %s", self.name, "writeback" if wce else "writethrough")
        if not wce:
            # What was cached must be stable before writethrough.
            try:
                self.backend.flush()
            except OSError as e:
                raise ValueError(f"cannot flush before switching to writethrough: {e}") from e
        self.wce = wce
        self._save_state()

    def _load_state(self) -> None:
        path = self.options.state_path
        if not path or not os.path.exists(path):
            return
        try:
            with open(path) as f:
                state = json.load(f)
            wce = int(state["wce"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"unreadable state file {path}: {e}") from e
        if wce not in (0, 1):
            raise ValueError(f"state file {path}: wce {wce} is not 0 or 1")
        self.wce = wce
        log.info("%s: write cache %s (from %s)", self.name,
                 "writeback" if wce else "writethrough", path)

    def _save_state(self) -> None:
        path = self.options.state_path
        if not path:
            return
        tmp = f"{path}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"wce": self.wce}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # a crash leaves the old or the new state, never half
        except OSError as e:
            log.error("%s: cannot save state to %s: %s; a restart would lose it", self.name,
                      path, e)

    def disconnected(self) -> None:
        pass  # config (wce) belongs to the device and outlives a front end

    def close(self) -> None:
        self.backend.close()

    # ---- serving queues in a worker process ----------------------------------
    def offload_spec(self) -> tuple[dict[str, object], list[int]]:
        """What a queue worker needs to serve this device's requests: the current
        driver-visible state and the open backing file (the fd stays ours)."""
        backend = self.backend
        if not isinstance(backend, FileBackend):
            raise TypeError(f"{self.name}: its backing cannot be shared with a worker")
        o = self.options
        return ({"kind": "blk", "name": self.name, "path": backend.path,
                 "read_only": backend.read_only, "wce": self.wce, "capacity": self.capacity,
                 "options": {"num_queues": o.num_queues, "queue_size": o.queue_size,
                             "logical_block_size": o.logical_block_size,
                             "serial": o.serial}}, [backend.fd])

    @classmethod
    def from_offload_spec(cls, spec: dict[str, object], fds: list[int]) -> BlkDevice:
        """The worker side of :meth:`offload_spec`; adopts ``fds``."""
        options = BlkOptions(**spec["options"])  # type: ignore[arg-type]
        backend = FileBackend(str(spec["path"]), bool(spec["read_only"]), fd=fds[0])
        device = cls(str(spec["name"]), backend, options)
        device.wce = int(spec["wce"])  # type: ignore[call-overload]
        device.capacity = int(spec["capacity"])  # type: ignore[call-overload]
        return device

    # ---- device parts (vendor: the one config byte the driver writes) -------
    def get_parts(self) -> list[tuple[int, bytes]]:
        return [(PartType.VHOSTD_BLK_PART_WCE, bytes([self.wce]))]

    def part_lengths(self) -> list[tuple[int, int]]:
        return [(PartType.VHOSTD_BLK_PART_WCE, 1)]

    def check_part(self, part_type: int, value: bytes) -> None:
        if part_type == PartType.VHOSTD_BLK_PART_WCE and value[0] not in (0, 1):
            raise ValueError(f"wce value {value[0]} is not 0 or 1")

    def apply_part(self, part_type: int, value: bytes) -> None:
        if part_type == PartType.VHOSTD_BLK_PART_WCE:
            self._set_wce(value[0])

    def refresh_capacity(self) -> bool:
        """Re-read the backing size; True if the capacity changed."""
        capacity = self.backend.size() // SECTOR
        if capacity == self.capacity:
            return False
        log.info("%s: capacity %d -> %d sectors", self.name, self.capacity, capacity)
        self.capacity = capacity
        return True

    # ---- data path ---------------------------------------------------------
    def make_handler(self, queue: SplitVirtqueue) -> Handler:
        backend = self.backend
        unpack_hdr = OUTHDR.unpack_from
        readv = backend.readv
        writev = backend.writev
        read_only = backend.read_only
        qname = queue.name
        queue.status_tail = True  # the status byte ends every request's writable part

        def handle(head: int, readable: list[memoryview], writable: list[memoryview]) -> int:
            if not writable:
                log.warning("%s: request at head %d has no status byte; dropped", qname, head)
                return 0
            last = writable[-1]
            status = last[len(last) - 1:]
            if len(last) > 1:
                data_in = writable[:-1]
                data_in.append(last[:-1])
            else:
                data_in = writable[:-1]
            if readable and len(readable[0]) >= 16:
                first = readable[0]
                rtype, _prio, sector = unpack_hdr(first)
                data_out = readable[1:]
                if len(first) > 16:
                    data_out.insert(0, first[16:])
            else:
                # The header is split over descriptors: gather just its 16 bytes.
                hdr, data_out = _split_header(readable)
                if hdr is None:
                    self._refuse(qname, head, "a request header shorter than 16 bytes")
                    status[0] = S_IOERR
                    return 1
                rtype, _prio, sector = unpack_hdr(hdr)
            rtype &= ~VIRTIO_BLK_T_BARRIER
            try:
                if rtype == T_IN:
                    n = sum(map(len, data_in))
                    if sector + ((n + SECTOR - 1) >> 9) > self.capacity:
                        self._refuse(qname, head, f"a read of {n} bytes at sector {sector} "
                                     f"beyond the capacity of {self.capacity} sectors")
                        status[0] = S_IOERR
                        return 1
                    readv(data_in, sector << 9)
                    status[0] = S_OK
                    return n + 1
                if rtype == T_OUT:
                    n = sum(map(len, data_out))
                    if read_only or sector + ((n + SECTOR - 1) >> 9) > self.capacity:
                        if not read_only:
                            self._refuse(qname, head, f"a write of {n} bytes at sector "
                                         f"{sector} beyond the capacity of {self.capacity} "
                                         f"sectors")
                        status[0] = S_IOERR
                        return 1
                    writev(data_out, sector << 9)
                    if not self.wce:
                        backend.flush()
                    status[0] = S_OK
                    return 1
                return self._slow_request(rtype, data_out, data_in, status)
            except OSError as e:
                log.error("%s: request type %d at sector %d failed: %s", qname, rtype, sector, e)
                status[0] = S_IOERR
                return 1

        return handle

    def _refuse(self, qname: str, head: int, what: str) -> None:
        """Log a request refused for its shape, without flooding the log."""
        self.refused += 1
        if self.refused <= 10 or self.refused % 1000 == 0:
            log.warning("%s: head %d: %s (refused with IOERR; %d so far)", qname, head, what,
                        self.refused)

    def _slow_request(self, rtype: int, data_out: list[memoryview], data_in: list[memoryview],
                      status: memoryview) -> int:
        if rtype == T_FLUSH:
            self.backend.flush()
            status[0] = S_OK
            return 1
        if rtype == T_GET_ID:
            written = 0
            ident = self.serial + bytes(VIRTIO_BLK_ID_BYTES - len(self.serial))
            for buf in data_in:
                n = min(len(buf), len(ident) - written)
                buf[:n] = ident[written:written + n]
                written += n
                if written == len(ident):
                    break
            status[0] = S_OK
            return written + 1
        if rtype in (T_DISCARD, T_WRITE_ZEROES):
            # Bound the copy by what a valid request can carry before joining.
            if sum(map(len, data_out)) > SEGMENT.size * max(MAX_DISCARD_SEG,
                                                           MAX_WRITE_ZEROES_SEG):
                status[0] = S_UNSUPP
                return 1
            status[0] = self._discard_or_zero(rtype, b"".join(data_out))
            return 1
        status[0] = S_UNSUPP
        return 1

    def _discard_or_zero(self, rtype: int, payload: bytes) -> int:
        if self.backend.read_only:
            return S_IOERR
        discard = rtype == T_DISCARD
        max_seg = MAX_DISCARD_SEG if discard else MAX_WRITE_ZEROES_SEG
        max_sectors = MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS
        if not payload or len(payload) % SEGMENT.size or len(payload) // SEGMENT.size > max_seg:
            return S_UNSUPP
        segments = list(SEGMENT.iter_unpack(payload))
        for sector, num, flags in segments:
            if num > max_sectors or sector + num > self.capacity:
                return S_IOERR
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (
                discard and flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            ):
                return S_UNSUPP
        for sector, num, flags in segments:
            if discard:
                self.backend.discard(sector << 9, num << 9)
            else:
                self.backend.write_zeroes(sector << 9, num << 9,
                                          bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
        if not self.wce:
            self.backend.flush()
        return S_OK


def _split_header(readable: list[memoryview]) -> tuple[bytes | None, list[memoryview]]:
    """The first 16 readable bytes, and the views after them (no copy of the data)."""
    hdr = b""
    for i, buf in enumerate(readable):
        need = 16 - len(hdr)
        if len(buf) >= need:
            hdr += bytes(buf[:need])
            rest = readable[i + 1:]
            if len(buf) > need:
                rest.insert(0, buf[need:])
            return hdr, rest
        hdr += bytes(buf)
    return None, []
