"""Firmware boots through vhostd, side by side with qemu-storage-daemon.

OVMF (UEFI) boots GRUB from an EFI system partition, SeaBIOS boots syslinux from an MBR
disk; either loads the test kernel and a small initramfs from the disk, and Linux then
reads a marker the host wrote and writes an answer the host checks. OVMF drives a plain
vhost-user-blk-pci on q35 in legacy virtio mode (the device is transitional there), which
qemu-storage-daemon refuses; with disable-legacy=on it uses virtio 1.0.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from testbed import bootdisk
from testbed.guest import GuestImage
from testbed.qemu import GuestVM, StorageDaemon, VhostUserBlkDisk

pytestmark = pytest.mark.e2e
TIMEOUT = 300

CASES = [
    # firmware, back end, virtio mode
    ("ovmf", "vhostd", "modern"),
    ("ovmf", "qsd", "modern"),
    ("ovmf", "vhostd", "legacy"),
    ("seabios", "vhostd", "modern"),
    ("seabios", "qsd", "modern"),
]


@pytest.mark.parametrize(("firmware", "backend", "mode"), CASES,
                         ids=["-".join(c) for c in CASES])
def test_firmware_boots_from_the_disk(guest_image: GuestImage, tmp_path: Path, vhostd,
                                      firmware: str, backend: str, mode: str) -> None:
    kind = "efi" if firmware == "ovmf" else "bios"
    missing = bootdisk.missing_tools(kind)
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (./scripts/install-deps installs them)")
    if backend == "qsd" and shutil.which("qemu-storage-daemon") is None:
        pytest.skip("qemu-storage-daemon is not installed")
    marker = f"vhostd-{firmware}-{backend}-{mode}-{os.getpid()}"
    disk = tmp_path / "boot.img"
    make = bootdisk.efi_disk if kind == "efi" else bootdisk.bios_disk
    make(guest_image, disk, marker)

    sock = tmp_path / "disk.sock"
    qsd = None
    if backend == "vhostd":
        daemon = vhostd(f"--blk-file={disk}", socket_path=sock)
    else:
        qsd = StorageDaemon(disk, sock).start()
    args: list[str] = []
    if firmware == "ovmf":
        vars_copy = tmp_path / "OVMF_VARS.fd"
        shutil.copy(bootdisk.OVMF_VARS, vars_copy)
        args = ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={bootdisk.OVMF_CODE}",
                "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]
    props: dict[str, str | int | bool] = {"bootindex": 1}
    if mode == "modern":
        props["disable-legacy"] = "on"
    try:
        with GuestVM(guest_image, [VhostUserBlkDisk(sock, props=props)],
                     direct_kernel=False, extra_args=args, smp=1) as vm:
            vm.wait_for("FIRMWARE-BOOT: booted from disk", TIMEOUT)
            assert vm.wait_result(TIMEOUT), vm.console
    finally:
        if qsd is not None:
            qsd.stop()
    assert f"marker {marker}" in vm.console
    assert bootdisk.guest_answer(disk, marker), vm.console
    if backend == "vhostd":
        daemon.assert_healthy()
