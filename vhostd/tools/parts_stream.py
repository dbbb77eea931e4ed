"""The parts stream: device parts travelling between two vhostd processes.

A stream is a sequence of records, each a 16-byte header followed by its data:

    le64 record_size;   /* bytes of data after this header */
    le32 flags;         /* bit 0: OPTIONAL (a reader may skip a record it does not know) */
    le32 tag;           /* 0: DEVICE_DATA, the result of one DEV_PARTS_GET */

the same framing Linux's vfio-virtio driver uses for its migration data, so a stream
can be inspected with the same expectations. Several DEVICE_DATA records may follow
each other (pre-copy); the destination applies them in order, the last one wins
where they overlap. A file, a pipe or a socket carries it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from ..frontend.admin import SET, AdminDriver

RECORD_HEADER = struct.Struct("<QII")
TAG_DEVICE_DATA = 0
FLAG_OPTIONAL = 1
MAX_RECORD = 0xFFFFFFFF


class StreamError(Exception):
    pass


@dataclass(frozen=True)
class Record:
    tag: int
    flags: int
    data: bytes


def write_record(out: BinaryIO, data: bytes, tag: int = TAG_DEVICE_DATA,
                 flags: int = 0) -> None:
    if len(data) > MAX_RECORD:
        raise StreamError(f"record of {len(data)} bytes is too large")
    out.write(RECORD_HEADER.pack(len(data), flags, tag))
    out.write(data)


def read_records(src: BinaryIO) -> Iterator[Record]:
    """Records in order; unknown optional records are skipped, unknown mandatory ones
    are an error."""
    while True:
        head = _read_exact(src, RECORD_HEADER.size, allow_eof=True)
        if not head:
            return
        size, flags, tag = RECORD_HEADER.unpack(head)
        if size > MAX_RECORD:
            raise StreamError(f"record of {size} bytes is too large")
        data = _read_exact(src, size)
        if tag != TAG_DEVICE_DATA:
            if flags & FLAG_OPTIONAL:
                continue
            raise StreamError(f"unknown mandatory record tag {tag}")
        yield Record(tag, flags, data)


def _read_exact(src: BinaryIO, n: int, allow_eof: bool = False) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = src.read(n - len(buf))
        if not chunk:
            if allow_eof and not buf:
                return b""
            raise StreamError(f"stream ends inside a record ({len(buf)} of {n} bytes)")
        buf += chunk
    return buf


def export_parts(admin: AdminDriver, member: int, path: str) -> int:
    """Stop ``member`` and write its parts to a parts stream; it stays stopped."""
    admin.stop(member)
    parts = admin.parts_get(member)
    with open(path, "wb") as f:
        write_record(f, parts)
    return len(parts)


def import_parts(admin: AdminDriver, member: int, path: str) -> int:
    """Stop ``member``, apply every record of a parts stream, resume it."""
    admin.stop(member)
    obj = admin.create_object(member, SET)
    n = 0
    try:
        with open(path, "rb") as f:
            for record in read_records(f):
                admin.parts_set_obj(member, obj, record.data)
                n += 1
    finally:
        admin.destroy_object(member, obj)
    if not n:
        raise StreamError(f"{path} holds no device-data record")
    admin.resume(member)
    return n
