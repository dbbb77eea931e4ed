"""Fixtures for the storage backend tests: a small event loop, NBD servers."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from storage_support import Loop, NbdServer


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.epoll.close()


@pytest.fixture
def nbd_server(tmp_path: Path) -> Iterator[Callable[..., NbdServer]]:
    """Factory: ``nbd_server("nbdkit", "memory", "16M")`` or ``nbd_server("qemu-nbd",
    IMG)``; the socket is added to the command."""
    servers: list[NbdServer] = []

    def make(program: str, *args: str) -> NbdServer:
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed (./scripts/install-deps installs it)")
        sock = tmp_path / f"nbd{len(servers)}.sock"
        if program == "nbdkit":
            argv = ["nbdkit", "-f", "-U", str(sock), *args]
        else:
            argv = [program, "-k", str(sock), "--persistent", "--shared=8", "-f", "raw", *args]
        server = NbdServer(argv, sock)
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.kill()
