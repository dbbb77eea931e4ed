"""Device-part lists (virtio 1.4 DEV_PARTS_GET / DEV_PARTS_SET): the codec.

A part list is ``struct virtio_dev_part`` records back to back: the 16-byte header of
:data:`vhostd_proto.virtio_admin.DevPartHdr` and ``length`` bytes of value. Pure data and
pure functions, no I/O; what a member does with parts lives in ``vhostd/vhost_user/parts.py``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .virtio_admin import PART_HDR_SIZE, DevPartHdr, PartType

_U16 = struct.Struct("<H")
NO_SELECTOR = bytes(8)


class PartsFormatError(ValueError):
    """A part list that does not split into whole parts."""


@dataclass(frozen=True)
class Part:
    part_type: int
    flags: int
    selector: bytes
    value: bytes

    def header(self) -> bytes:
        return DevPartHdr.build({"part_type": self.part_type, "flags": self.flags,
                                 "reserved": 0, "selector": self.selector,
                                 "length": len(self.value)})

    def encode(self) -> bytes:
        return self.header() + self.value

    @property
    def vq_index(self) -> int:
        """The queue a per-queue part selects (le16 at the start of the selector)."""
        return _U16.unpack_from(self.selector)[0]


def vq_selector(index: int) -> bytes:
    return _U16.pack(index) + bytes(6)


def encode_parts(parts: list[Part]) -> bytes:
    return b"".join(p.encode() for p in parts)


def decode_parts(data: bytes) -> list[Part]:
    """Split a part list; a header or value running past the end is an error."""
    parts = []
    off = 0
    while off < len(data):
        if len(data) - off < PART_HDR_SIZE:
            raise PartsFormatError(f"{len(data) - off} stray bytes after the last part")
        hdr = DevPartHdr.parse(data[off:off + PART_HDR_SIZE])
        off += PART_HDR_SIZE
        if hdr.length > len(data) - off:
            raise PartsFormatError(f"part {hdr.part_type:#x} claims {hdr.length} bytes, "
                                   f"{len(data) - off} remain")
        parts.append(Part(hdr.part_type, hdr.flags, hdr.selector, data[off:off + hdr.length]))
        off += hdr.length
    return parts


def decode_headers(data: bytes) -> list[Part]:
    """Part headers alone (DEV_PARTS_GET SELECTED names parts this way): values empty,
    lengths ignored, a partial header at the end ignored."""
    return [Part(h.part_type, h.flags, h.selector, b"")
            for h in (DevPartHdr.parse(data[off:off + PART_HDR_SIZE])
                      for off in range(0, len(data) - len(data) % PART_HDR_SIZE,
                                       PART_HDR_SIZE))]


def part_name(part_type: int) -> str:
    try:
        return PartType(part_type).name
    except ValueError:
        return f"part {part_type:#x}"
