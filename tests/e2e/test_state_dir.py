"""What --state-dir keeps, with a real guest on the QEMU in use (7.2 or 10).

The state file holds the driver-set state (the write-cache mode) of the device as it
stands: it survives a pause of the VM and a back-end restart, and a device reset returns
it to the default like the rest of the device. QEMU 10 tells the back end about resets
(RESET_DEVICE, at boot and when it stops the device at guest shutdown); QEMU 7.2 does
not, so under 7.2 the guest's last setting stays in the file after a shutdown.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from testbed.guest import GuestImage
from testbed.qemu import GuestVM, VhostUserBlkDisk
from testbed.qemu_select import SYSTEM, program, version

pytestmark = pytest.mark.e2e
TIMEOUT = 300



async def _qmp(path: Path, *commands: str) -> None:
    qmp = QMPClient("state-dir-test")
    await qmp.connect(str(path))
    try:
        for command in commands:
            await qmp.execute(command)
            await asyncio.sleep(1.0)  # stopped (or running) for a moment
    finally:
        await qmp.disconnect()


def test_state_dir_across_pause_restart_and_shutdown(guest_image: GuestImage, workdir: Path,
                                                     vhostd, sparse_image) -> None:
    image = sparse_image(128 << 20)
    state = workdir / "state"
    state.mkdir()
    state_file = state / "blk0.json"
    sock = workdir / "blk.sock"
    # Debug logging shows each message the front end sends, RESET_DEVICE among them.
    args = (f"--blk-file={image}", f"--state-dir={state}", "--log-level=debug")
    daemon = vhostd(*args, socket_path=sock)
    qmp = workdir / "qmp.sock"
    with GuestVM(guest_image, [VhostUserBlkDisk(sock, reconnect=1)], qmp=qmp,
                 run="migrate_load", args=["40", "4M", "vda", "wt"]) as vm:
        # The driver sets writethrough: the device and its state file follow.
        vm.wait_for("CACHE-TYPE write through", TIMEOUT)
        vm.wait_for(r"LOAD-ROUND \d+ OK", TIMEOUT)
        assert json.loads(state_file.read_text()) == {"wce": 0}

        # A paused VM is not a reset: QEMU stops and restarts the rings, the mode stays.
        vm.wait_qmp()
        asyncio.run(_qmp(qmp, "stop", "cont"))
        vm.wait_for(r"LOAD-ROUND \d+ OK", TIMEOUT)
        assert json.loads(state_file.read_text()) == {"wce": 0}, daemon.log
        assert "write cache writeback" not in daemon.log

        # A back-end restart keeps it: the new daemon starts in writethrough.
        daemon.signal(signal.SIGKILL)
        daemon.proc.wait(10)
        daemon = vhostd(*args, socket_path=sock)
        assert "write cache writethrough (from" in daemon.log
        vm.wait_for(r"LOAD-ROUND \d+ OK", TIMEOUT)
        assert json.loads(state_file.read_text()) == {"wce": 0}
        assert "write cache writeback" not in daemon.log

        # The guest shuts down (the script ends with poweroff).
        assert vm.wait_result(TIMEOUT), vm.console
        assert "deprecated" not in vm.console.lower()

    daemon.stop()
    reset_sent = "<- RESET_DEVICE" in daemon.log
    # Which QEMU resets the device at shutdown: 10 does, 7.2 does not.
    qemu = version(program(SYSTEM))
    if qemu >= (10, 0, 0):
        assert reset_sent, daemon.log
    elif qemu < (8, 0, 0):
        assert not reset_sent, daemon.log
    if reset_sent:
        # A device reset returns the write cache to its default, in the file too.
        assert json.loads(state_file.read_text()) == {"wce": 1}
        assert "write cache writeback" in daemon.log
    else:
        assert json.loads(state_file.read_text()) == {"wce": 0}
