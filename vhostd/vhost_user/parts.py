"""Device parts of a vhost-user member (virtio 1.4 admin commands, docs/admin-over-vhost-user.md).

A member's state as the owner reads and writes it: the common parts that have a
vhost-user meaning, plus vhostd's vendor parts for what the spec leaves out (ring
positions, device-type config the driver changed). :func:`collect` builds the parts of
a device from its vhost-user state, :func:`check` validates a part list from the owner
completely before anything is changed; the member applies the result when it resumes
(``member.py``). The list codec itself is wire format (``vhostd_proto.device_parts``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Protocol

from vhostd_proto import virtio_admin as va
from vhostd_proto.device_parts import NO_SELECTOR as _NO_SELECTOR
from vhostd_proto.device_parts import Part, part_name, vq_selector
from vhostd_proto.vhost_user import VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES
from vhostd_proto.virtio import VIRTQ_MAX_SIZE, Feature
from vhostd_proto.virtio_admin import PartType as P

from ..engine.virtqueue import SplitVirtqueue

# Feature bits that belong to vhost-user, not to the virtio device.
VHOST_ONLY_FEATURES = 1 << VHOST_USER_F_PROTOCOL_FEATURES | 1 << VHOST_F_LOG_ALL
FEATURE_WORDS = 1  # DEV/DRV_FEATURES carry one le64 word: vhostd has no bit above 63

_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")

# Sizes of the virtio_pci_common_cfg fields a PCI_COMMON_CFG part may select.
PCI_COMMON_CFG_FIELDS = {0: 4, 4: 4, 8: 4, 12: 4, 16: 2, 18: 2, 20: 1, 21: 1, 22: 2, 24: 2,
                         26: 2, 28: 2, 30: 2, 32: 8, 40: 8, 48: 8, 56: 2, 58: 2, 60: 2, 62: 2}

# The order parts must come in; vendor and device-type parts follow the common ones.
_RANK = {
    P.VIRTIO_DEV_PART_DEV_FEATURES: 0,
    P.VIRTIO_DEV_PART_DRV_FEATURES: 1,
    P.VIRTIO_DEV_PART_PCI_COMMON_CFG: 2,
    P.VIRTIO_DEV_PART_DEVICE_STATUS: 3,
    P.VIRTIO_DEV_PART_VQ_CFG: 4,
    P.VIRTIO_DEV_PART_VQ_NOTIFY_CFG: 5,
}
_DEVICE_TYPE_RANK = 6

# Expected value length per part type (None: depends on the part).
_LENGTHS: dict[int, int | None] = {
    P.VIRTIO_DEV_PART_DEV_FEATURES: 8 * FEATURE_WORDS,
    P.VIRTIO_DEV_PART_DRV_FEATURES: 8 * FEATURE_WORDS,
    P.VIRTIO_DEV_PART_PCI_COMMON_CFG: None,
    P.VIRTIO_DEV_PART_DEVICE_STATUS: 1,
    P.VIRTIO_DEV_PART_VQ_CFG: va.DevPartVqCfg.sizeof(),
    P.VIRTIO_DEV_PART_VQ_NOTIFY_CFG: va.DevPartVqNotifyData.sizeof(),
    P.VHOSTD_DEV_PART_VQ_STATE: va.VhostdVqState.sizeof(),
}


class PartsError(Exception):
    """A part list the member cannot take; nothing was changed."""

    def __init__(self, message: str,
                 status: int = va.AdminStatus.VIRTIO_ADMIN_STATUS_EINVAL,
                 qualifier: int = va.AdminQualifier.VIRTIO_ADMIN_STATUS_Q_INVALID_FIELD) -> None:
        super().__init__(message)
        self.status = status
        self.qualifier = qualifier


class PartsDevice(Protocol):
    """What the parts of a device are made from (its device-type half)."""

    num_queues: int
    max_queue_size: int

    def get_parts(self) -> list[tuple[int, bytes]]: ...
    def part_lengths(self) -> list[tuple[int, int]]: ...
    def check_part(self, part_type: int, value: bytes) -> None: ...


class PartsSource(Protocol):
    """What the parts of a member are made from: its vhost-user state."""

    device: PartsDevice
    queues: list[SplitVirtqueue]
    offered_features: int
    features: int
    status: int


@dataclass
class StagedParts:
    """Checked values waiting for the member to resume."""

    drv_features: int | None = None
    status: int | None = None
    vq_cfg: dict[int, Any] = field(default_factory=dict)
    vq_state: dict[int, Any] = field(default_factory=dict)
    device: dict[int, bytes] = field(default_factory=dict)  # part type -> value

    def merge(self, newer: StagedParts) -> None:
        if newer.drv_features is not None:
            self.drv_features = newer.drv_features
        if newer.status is not None:
            self.status = newer.status
        self.vq_cfg.update(newer.vq_cfg)
        self.vq_state.update(newer.vq_state)
        self.device.update(newer.device)


def virtio_features(features: int) -> int:
    return features & ~VHOST_ONLY_FEATURES


def collect(source: PartsSource) -> list[Part]:
    """The member's parts now, in the order the spec requires."""
    dev = source.device
    parts = [
        Part(P.VIRTIO_DEV_PART_DEV_FEATURES, 1 << va.VIRTIO_DEV_PART_F_OPTIONAL, _NO_SELECTOR,
             _U64.pack(virtio_features(source.offered_features))),
        Part(P.VIRTIO_DEV_PART_DRV_FEATURES, 0, _NO_SELECTOR,
             _U64.pack(virtio_features(source.features))),
        Part(P.VIRTIO_DEV_PART_PCI_COMMON_CFG, 0,
             struct.pack("<I4x", va.VIRTIO_PCI_COMMON_NUMQ), _U16.pack(dev.num_queues)),
        Part(P.VIRTIO_DEV_PART_DEVICE_STATUS, 0, _NO_SELECTOR, bytes([source.status])),
    ]
    for q in source.queues:
        gpas = q.ring_gpas()  # an untranslatable ring reads as unconfigured
        desc, driver, device = gpas if gpas is not None else (0, 0, 0)
        parts.append(Part(P.VIRTIO_DEV_PART_VQ_CFG, 0, vq_selector(q.index), va.DevPartVqCfg.build({
            "queue_size": q.size if gpas is not None else 0,
            "vector": q.vector,
            "enabled": int(q.enabled),
            "reserved": 0,
            "queue_desc": desc,
            "queue_driver": driver,
            "queue_device": device,
        })))
    for q in source.queues:
        parts.append(Part(P.VIRTIO_DEV_PART_VQ_NOTIFY_CFG, 0, vq_selector(q.index),
                          va.DevPartVqNotifyData.build({
                              "queue_notify_off": q.index, "queue_notif_config_data": 0,
                              "reserved": bytes(4)})))
    for q in source.queues:
        parts.append(Part(P.VHOSTD_DEV_PART_VQ_STATE, 0, vq_selector(q.index),
                          va.VhostdVqState.build({
                              "last_avail_idx": q.last_avail_idx, "used_idx": q.used_idx,
                              "avail_wrap_counter": getattr(q, "avail_wrap", 0),
                              "used_wrap_counter": getattr(q, "used_wrap", 0),
                              "reserved": bytes(2)})))
    for ptype, value in dev.get_parts():
        parts.append(Part(ptype, 0, _NO_SELECTOR, value))
    return parts


def check(source: PartsSource, parts: list[Part]) -> StagedParts:
    """Validate a whole part list against this member; raise PartsError on any fault."""
    dev = source.device
    staged = StagedParts()
    device_types = dict(dev.part_lengths())
    rank = -1
    seen: set[tuple[int, int]] = set()
    for part in parts:
        ptype = part.part_type
        name = part_name(ptype)
        optional = bool(part.flags & 1 << va.VIRTIO_DEV_PART_F_OPTIONAL)
        if ptype in _RANK:
            r = _RANK[P(ptype)]
        elif ptype in device_types or ptype == P.VHOSTD_DEV_PART_VQ_STATE:
            r = _DEVICE_TYPE_RANK
        elif optional:
            continue  # a device may ignore optional parts it does not know
        else:
            raise PartsError(f"{name} is not a part this member has")
        if r < rank:
            raise PartsError(f"{name} is out of order")
        rank = r
        key = (ptype, _selector_key(ptype, part.selector))
        if ptype in _SELECTED and part.selector != _canonical_selector(ptype, key[1]):
            raise PartsError(f"{name}: reserved selector bytes are not zero")
        if key in seen:
            raise PartsError(f"{name} appears twice")
        seen.add(key)
        want = _LENGTHS.get(ptype, device_types.get(ptype))
        if ptype == P.VIRTIO_DEV_PART_PCI_COMMON_CFG:
            offset = struct.unpack_from("<I", part.selector)[0]
            want = PCI_COMMON_CFG_FIELDS.get(offset)
            if want is None:
                raise PartsError(f"{name}: no common config field at offset {offset}")
        if len(part.value) != want:
            raise PartsError(f"{name}: value is {len(part.value)} bytes, expected {want}")
        _check_one(source, part, staged)
    return staged


_SELECTED = {P.VIRTIO_DEV_PART_PCI_COMMON_CFG, P.VIRTIO_DEV_PART_VQ_CFG,
             P.VIRTIO_DEV_PART_VQ_NOTIFY_CFG, P.VHOSTD_DEV_PART_VQ_STATE}


def _queue_index(source: PartsSource, part: Part) -> int:
    index = part.vq_index
    if index >= len(source.queues):
        raise PartsError(f"{part_name(part.part_type)}: queue {index} does not exist "
                         f"(member has {len(source.queues)})")
    return index


def _check_one(source: PartsSource, part: Part, staged: StagedParts) -> None:
    ptype = part.part_type
    dev = source.device
    if ptype == P.VIRTIO_DEV_PART_DEV_FEATURES:
        ours = virtio_features(source.offered_features)
        theirs = _U64.unpack(part.value)[0]
        if theirs != ours:
            raise PartsError(f"device features {theirs:#x} differ from this member's {ours:#x}")
    elif ptype == P.VIRTIO_DEV_PART_DRV_FEATURES:
        drv = _U64.unpack(part.value)[0]
        extra = drv & ~virtio_features(source.offered_features)
        if extra:
            raise PartsError(f"driver features {drv:#x} include {extra:#x}, which this member "
                             f"does not offer")
        staged.drv_features = drv
    elif ptype == P.VIRTIO_DEV_PART_PCI_COMMON_CFG:
        offset = struct.unpack_from("<I", part.selector)[0]
        if offset == va.VIRTIO_PCI_COMMON_NUMQ:
            n = _U16.unpack(part.value)[0]
            if n != dev.num_queues:
                raise PartsError(f"num_queues {n} differs from this member's {dev.num_queues}")
        # Other common-config fields have no vhost-user meaning: checked for size only.
    elif ptype == P.VIRTIO_DEV_PART_DEVICE_STATUS:
        staged.status = part.value[0]
    elif ptype == P.VIRTIO_DEV_PART_VQ_CFG:
        index = _queue_index(source, part)
        cfg = va.DevPartVqCfg.parse(part.value)
        size = cfg.queue_size
        if size and (size & (size - 1) or size > min(VIRTQ_MAX_SIZE, dev.max_queue_size)):
            raise PartsError(f"queue {index}: size {size} is not a power of two up to "
                             f"{dev.max_queue_size}")
        if cfg.enabled not in (0, 1):
            raise PartsError(f"queue {index}: enabled is {cfg.enabled}")
        staged.vq_cfg[index] = cfg
    elif ptype == P.VIRTIO_DEV_PART_VQ_NOTIFY_CFG:
        index = _queue_index(source, part)
        notify = va.DevPartVqNotifyData.parse(part.value)
        if notify.queue_notify_off != index or notify.queue_notif_config_data != 0:
            raise PartsError(f"queue {index}: notify config {notify.queue_notify_off}/"
                             f"{notify.queue_notif_config_data} differs from this member's")
    elif ptype == P.VHOSTD_DEV_PART_VQ_STATE:
        index = _queue_index(source, part)
        state = va.VhostdVqState.parse(part.value)
        packed = bool(source.features & 1 << Feature.VIRTIO_F_RING_PACKED)
        if staged.drv_features is not None:
            packed = bool(staged.drv_features & 1 << Feature.VIRTIO_F_RING_PACKED)
        if not packed and (state.avail_wrap_counter or state.used_wrap_counter):
            raise PartsError(f"queue {index}: wrap counters on a split ring")
        if state.avail_wrap_counter > 1 or state.used_wrap_counter > 1:
            raise PartsError(f"queue {index}: wrap counters must be 0 or 1")
        staged.vq_state[index] = state
    else:
        try:
            dev.check_part(ptype, part.value)
        except ValueError as e:
            raise PartsError(f"{part_name(ptype)}: {e}") from e
        staged.device[ptype] = part.value


def _selector_key(ptype: int, selector: bytes) -> int:
    """What a selector selects: a common-config offset, a queue index, or nothing."""
    if ptype == P.VIRTIO_DEV_PART_PCI_COMMON_CFG:
        return struct.unpack_from("<I", selector)[0]
    if ptype in _SELECTED:
        return _U16.unpack_from(selector)[0]
    return 0


def _canonical_selector(ptype: int, key: int) -> bytes:
    if ptype == P.VIRTIO_DEV_PART_PCI_COMMON_CFG:
        return struct.pack("<I4x", key)
    return vq_selector(key)


def select(parts: list[Part], wanted: list[Part]) -> list[Part]:
    """DEV_PARTS_GET SELECTED: the parts named by type (and selector, where it selects)."""
    keys = {(w.part_type, _selector_key(w.part_type, w.selector)) for w in wanted}
    return [p for p in parts if (p.part_type, _selector_key(p.part_type, p.selector)) in keys]
