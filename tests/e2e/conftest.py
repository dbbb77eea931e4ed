"""Fixtures for end-to-end tests that boot a real Linux guest under QEMU."""

from __future__ import annotations

import time

import pytest

from testbed.guest import GuestImage, build_guest
from testbed.qemu_select import SYSTEM, find_program


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The test guest, built once per session (and cached across sessions)."""
    if find_program(SYSTEM) is None:
        pytest.skip(f"{SYSTEM} is not installed (apt-get install qemu-system-x86)")
    start = time.monotonic()
    image = build_guest(progress=lambda line: print(line, flush=True))
    print(f"guest image ready in {time.monotonic() - start:.1f} s: {image.kernel.parent}")
    return image
