"""QEMU's vhost-user back-end discovery: the capabilities and the JSON descriptor.

QEMU's docs/interop/vhost-user.json describes both. A management application looks for
descriptors (``{"description", "type", "binary"}``) in /usr/share/qemu/vhost-user/,
/etc/qemu/vhost-user/ and $XDG_CONFIG_HOME/qemu/vhost-user/, starts ``binary`` with
``--socket-path`` or ``--fd``, and may pass the options that ``binary
--print-capabilities`` lists. For the "block" type the schema knows exactly two:
``--read-only`` and ``--blk-file``; vhostd's other options are its own and are not
listed there (a strict reader of the schema would reject unknown feature names).
"""

from __future__ import annotations

import os
import shutil
import sys
from importlib import metadata

# Every option the schema defines for a "block" back end; vhostd accepts them all.
CAPABILITIES = {"type": "block", "features": ["read-only", "blk-file"]}

DESCRIPTION = "vhostd: virtio-blk vhost-user back end with an owner device (admin virtqueue)"


def binary_path() -> str:
    """The absolute path of the ``vhostd`` program that is running (or installed)."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "vhostd" and os.path.isfile(argv0):
        return os.path.abspath(argv0)
    # ``python -m vhostd``: the entry point installed beside this interpreter.
    beside = os.path.join(os.path.dirname(sys.executable), "vhostd")
    if os.access(beside, os.X_OK):
        return os.path.abspath(beside)
    found = shutil.which("vhostd")
    if found:
        return os.path.abspath(found)
    raise FileNotFoundError("cannot find the vhostd program (is vhostd installed?)")


def _version() -> str:
    try:
        return metadata.version("vhostd")
    except metadata.PackageNotFoundError:
        return "unknown"


def descriptor(binary: str | None = None) -> dict[str, object]:
    """The descriptor to install as /usr/share/qemu/vhost-user/50-vhostd.json."""
    return {
        "description": DESCRIPTION,
        "type": CAPABILITIES["type"],
        "binary": binary or binary_path(),
        # For debugging only; management software ignores tags.
        "tags": [f"vhostd-{_version()}"],
    }
