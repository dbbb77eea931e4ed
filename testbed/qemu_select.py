"""Which QEMU the harness, the tests and the benchmarks run, and what that QEMU accepts.

``VHOSTD_QEMU`` names a folder holding ``qemu-system-x86_64`` and
``qemu-storage-daemon`` (for example the wrappers ``scripts/install-qemu10`` writes);
unset, both come from PATH (Debian 12's QEMU 7.2). Command-line forms that changed
between QEMU versions are chosen here from the version the binary reports.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

QEMU_ENV = "VHOSTD_QEMU"
SYSTEM = "qemu-system-x86_64"
STORAGE_DAEMON = "qemu-storage-daemon"
# The chardev socket's reconnect delay: `reconnect=SECONDS` until 9.2 deprecated it
# for `reconnect-ms=MILLISECONDS` (7.2 has only the former, 10.0 warns about it).
RECONNECT_MS_SINCE = (9, 2)
# qemu-configs/ holds the configurations in the current form; this folder the same
# files with the older chardev option, for QEMU before 9.2.
CONFIGS = Path(__file__).resolve().parents[1] / "qemu-configs"
CONFIGS_BEFORE_RECONNECT_MS = CONFIGS / "before-9.2"

Version = tuple[int, int, int]


class QemuNotFound(FileNotFoundError):
    """The QEMU program asked for is not where VHOSTD_QEMU or PATH say."""


def qemu_folder() -> Path | None:
    """The folder VHOSTD_QEMU names, or None when QEMU comes from PATH."""
    folder = os.environ.get(QEMU_ENV, "")
    return Path(folder) if folder else None


def find_program(name: str) -> str | None:
    """Path of a QEMU program (``qemu-system-x86_64``, ``qemu-storage-daemon``, ...),
    or None if it is not installed where the selection points."""
    folder = qemu_folder()
    if folder is None:
        return shutil.which(name)
    path = folder / name
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def program(name: str) -> str:
    """Like find_program, but missing is an error naming where it was looked for."""
    path = find_program(name)
    if path is None:
        folder = qemu_folder()
        where = f"{QEMU_ENV}={folder}" if folder is not None else "PATH"
        raise QemuNotFound(f"{name} not found in {where}")
    return path


@functools.cache
def version_line(binary: str) -> str:
    """The first line of ``binary --version``."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    return out.splitlines()[0].strip() if out else ""


def version(binary: str) -> Version:
    """(major, minor, micro) of a QEMU program, from its --version."""
    match = re.search(r"version (\d+)\.(\d+)\.(\d+)", version_line(binary))
    if match is None:
        raise ValueError(f"{binary} --version says {version_line(binary)!r}")
    major, minor, micro = (int(g) for g in match.groups())
    return major, minor, micro


def reconnect_option(seconds: int, qemu_version: Version) -> str:
    """The chardev socket option for a reconnect delay of ``seconds``, in the form this
    QEMU accepts without a deprecation warning."""
    if qemu_version >= RECONNECT_MS_SINCE:
        return f"reconnect-ms={seconds * 1000}"
    return f"reconnect={seconds}"


def configs_dir(qemu_version: Version) -> Path:
    """The folder of qemu-configs/ files this QEMU reads without a warning."""
    return CONFIGS if qemu_version >= RECONNECT_MS_SINCE else CONFIGS_BEFORE_RECONNECT_MS


def describe() -> list[str]:
    """One line per program in use: where it comes from and its version."""
    folder = qemu_folder()
    origin = f"{QEMU_ENV}={folder}" if folder is not None else "PATH"
    lines = []
    for name in (SYSTEM, STORAGE_DAEMON):
        path = find_program(name)
        if path is None:
            lines.append(f"{name}: not found ({origin})")
            continue
        try:
            line = version_line(path)
        except (OSError, subprocess.SubprocessError) as exc:
            line = f"does not run: {exc}"
        lines.append(f"{name}: {path} ({origin}): {line}")
    return lines
