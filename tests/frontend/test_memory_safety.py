"""A front end's memory fds cannot crash the daemon or starve other front ends.

A mapped fd that shrinks faults (SIGBUS) on the next access, which kills a Python
process with every device it serves. vhostd maps only fds sealed against shrinking
(docs/hardening.md), unless --allow-unsealed-memory; and each front
end may have it map at most --max-mapped-memory bytes (default 1 TiB).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import vhostd.frontend.memory as frontend_memory
from vhostd.frontend.blk import BlkFrontend
from vhostd.frontend.client import VhostUserClient, VhostUserNack
from vhostd.frontend.memory import RegionSpec
from vhostd_proto.vhost_user import ProtocolFeature

MiB = 1 << 20
GiB = 1 << 30


def shrink_all(fe: BlkFrontend) -> None:
    for r in fe.mem.regions:
        os.ftruncate(r.fd, 0)


@pytest.fixture
def two_members(vhostd: Callable[..., Any], sparse_image: Callable[..., Path],
                tmp_path: Path) -> Callable[..., tuple[Any, Path, Path]]:
    def start(*extra: str) -> tuple[Any, Path, Path]:
        a, b = sparse_image(16 * MiB, "a.img"), sparse_image(16 * MiB, "b.img")
        m1, m2 = tmp_path / "m1.sock", tmp_path / "m2.sock"
        d = vhostd(f"--member=socket-path={m1},blk-file={a}",
                   f"--member=socket-path={m2},blk-file={b}", "--queue-workers=0", *extra)
        return d, m1, m2
    return start


def test_unsealed_guest_memory_is_refused_and_a_shrink_cannot_kill_the_daemon(
        two_members, monkeypatch: pytest.MonkeyPatch) -> None:
    d, m1, m2 = two_members()
    with BlkFrontend(m2, queue_size=32) as other:
        other.write(0, b"x" * 4096)
        monkeypatch.setattr(frontend_memory, "SEALS", 0)  # memfds without any seal
        try:
            fe = BlkFrontend(m1, queue_size=32, timeout=2.0)
        except VhostUserNack:
            pass  # SET_MEM_TABLE refused
        else:
            # Mapped: the attack goes on. Shrink guest RAM under the mapping and kick.
            with fe:
                fe.submit_read(0, 0, 4096)
                shrink_all(fe)
                fe.kick(0, force=True)
                time.sleep(0.5)
        assert d.alive(), "a front end that shrank its memory killed the daemon"
        assert "not sealed against shrinking" in d.log
        assert other.read(0, 4096) == b"x" * 4096  # the other member is untouched


def test_sealed_memory_cannot_be_shrunk() -> None:
    """What the defence rests on: the kernel refuses to shrink a memfd with
    F_SEAL_SHRINK, whoever holds the fd (the front end included)."""
    mem = frontend_memory.GuestMemory([RegionSpec(0, MiB)])
    try:
        fd = mem.regions[0].fd
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
    finally:
        mem.close()


def test_allow_unsealed_memory_option_maps_it_with_a_warning(
        two_members, monkeypatch: pytest.MonkeyPatch) -> None:
    d, m1, _ = two_members("--allow-unsealed-memory")
    monkeypatch.setattr(frontend_memory, "SEALS", 0)
    with BlkFrontend(m1, queue_size=32) as fe:
        fe.write(0, b"y" * 512)
        assert fe.read(0, 512) == b"y" * 512
    assert "mapped anyway (--allow-unsealed-memory)" in d.log


def test_memfd_smaller_than_its_region_is_refused(two_members) -> None:
    """A region past the end of its fd would fault on first access."""
    d, m1, _ = two_members()
    fd = os.memfd_create("short", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, MiB)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, frontend_memory.SEALS)
    region = type("R", (), {"gpa": 0, "size": 2 * MiB, "qva": 1 << 40, "mmap_offset": 0,
                            "fd": fd})()
    with VhostUserClient(m1) as c:
        c.set_owner()
        c.protocol_features = c.get_protocol_features()
        c.set_protocol_features(c.protocol_features)
        with pytest.raises(VhostUserNack):
            c.set_mem_table([region])
    os.close(fd)
    assert "the mapping needs" in d.log
    assert d.alive()


def _sparse_sealed(size: int) -> int:
    fd = os.memfd_create("huge", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, frontend_memory.SEALS)
    return fd


def _client(path: Path) -> VhostUserClient:
    c = VhostUserClient(path)
    c.set_owner()
    c.get_features()
    c.protocol_features = c.get_protocol_features()
    c.set_protocol_features(c.protocol_features)
    assert c.protocol_features >> ProtocolFeature.CONFIGURE_MEM_SLOTS & 1
    return c


def test_one_front_end_cannot_exhaust_the_address_space(two_members) -> None:
    """Sparse 1 TiB memfds added one after another: the first front end is refused once it
    passes its budget, and the next member's front end still maps its memory."""
    d, m1, m2 = two_members("--max-mapped-memory=4T")
    attacker = _client(m1)
    fd = _sparse_sealed(1 << 40)
    mapped = refused = 0
    try:
        for i in range(40):  # 40 TiB asked for: the budget stops it at 4
            region = type("R", (), {"gpa": i << 40, "size": 1 << 40,
                                    "qva": (1 << 46) + (i << 40), "mmap_offset": 0,
                                    "fd": fd})()
            try:
                attacker.add_mem_reg(region)
                mapped += 1
            except VhostUserNack:
                refused += 1
        assert mapped == 4 and refused == 36
        assert "exceed this front end's budget" in d.log
        with BlkFrontend(m2, queue_size=32) as other:  # another member's front end
            other.write(0, b"z" * 512)
            assert other.read(0, 512) == b"z" * 512
    finally:
        attacker.close()
        os.close(fd)
    assert d.alive()


@pytest.mark.parametrize("what", ["dirty log", "inflight region"])
def test_unsealed_log_and_inflight_fds_are_refused(two_members, what: str) -> None:
    d, m1, _ = two_members()
    fd = os.memfd_create("unsealed")
    os.ftruncate(fd, 1 << 20)
    with _client(m1) as c:
        if what == "dirty log":
            with pytest.raises(VhostUserNack):
                c.set_log_base(fd, 4096)
        else:
            size, _, own = c.get_inflight_fd(1, 32)
            assert own is not None
            # vhostd's own region is sealed; an unsealed one of the same size is not.
            assert fcntl.fcntl(own, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
            os.close(own)
            c.set_inflight_fd(fd, size, 0, 1, 32)
            c.get_features()  # a round trip: SET_INFLIGHT_FD has been handled
    os.close(fd)
    assert f"{what}: the fd is not sealed against shrinking" in d.log
    assert d.alive()
