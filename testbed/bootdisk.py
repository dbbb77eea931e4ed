"""Bootable disk images for firmware tests, made from files (no loop devices, no root).

Both images hold the test guest's kernel and a small initramfs (busybox and the virtio
modules of the test guest, with the init below) on a FAT partition:

* ``efi_disk``: GPT with an EFI system partition; ``\\EFI\\BOOT\\BOOTX64.EFI`` is a GRUB
  image (``grub-mkimage``, x86_64-efi) whose embedded configuration boots Linux. For OVMF.
* ``bios_disk``: a FAT file system from sector 0 (no partition table) on which
  ``syslinux --install`` put its boot sector and loader. For SeaBIOS.

The EFI partition is built as a file of its own, filled with mtools, and copied into the
disk image after the partition table (sfdisk on the image file).

The guest's init finds the marker the host wrote at ``MARKER_SECTOR`` (outside the
partition), checks it against the kernel command line, writes an answer in the next
sector, and reports ``VHOSTD-RESULT: PASS``: the firmware read the disk, and then Linux
read and wrote it, through the same back end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from testbed.guest import GuestImage

MiB = 1 << 20
DISK_SIZE = 64 * MiB
PART_START = 1 * MiB
PART_SIZE = 48 * MiB
MARKER_SECTOR = (56 * MiB) // 512

ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
GRUB_EFI_MODULES = Path("/usr/lib/grub/x86_64-efi")
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")

INIT = r"""#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
for m in $(cat /lib/modules/load-order); do
    [ -f "/lib/modules/$m.ko" ] && insmod "/lib/modules/$m.ko"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
marker=""
for word in $(cat /proc/cmdline); do
    case "$word" in vhostd.marker=*) marker="${word#vhostd.marker=}" ;; esac
done
echo "FIRMWARE-BOOT: booted from disk, marker $marker"
seen=$(dd if=/dev/vda bs=512 skip=@SECTOR@ count=1 2>/dev/null | head -c ${#marker})
rc=1
if [ -n "$marker" ] && [ "$seen" = "$marker" ]; then
    printf 'guest-read-%s' "$marker" | dd of=/dev/vda bs=512 seek=@NEXT@ conv=fsync 2>/dev/null
    echo "FIRMWARE-BOOT: marker read, answer written"
    rc=0
else
    echo "FIRMWARE-BOOT: marker mismatch: '$seen'"
fi
sync
echo
if [ $rc -eq 0 ]; then echo "VHOSTD-RESULT: PASS"; else echo "VHOSTD-RESULT: FAIL $rc"; fi
poweroff -f
"""


class BootDiskError(RuntimeError):
    pass


def _run(*cmd: str | Path, stdin: str | None = None) -> None:
    r = subprocess.run([str(c) for c in cmd], input=stdin, capture_output=True, text=True)
    if r.returncode != 0:
        raise BootDiskError(f"{cmd[0]} failed ({r.returncode}): {r.stderr.strip()}")


def missing_tools(kind: str) -> list[str]:
    """What ``efi_disk``/``bios_disk`` (kind "efi" or "bios") needs and this host lacks."""
    tools = ["mkfs.fat", "mcopy", "mmd", "cpio"]
    tools += ["grub-mkimage", "sfdisk"] if kind == "efi" else ["syslinux"]
    missing = [t for t in tools if shutil.which(t) is None]
    files = [GRUB_EFI_MODULES, OVMF_CODE, OVMF_VARS] if kind == "efi" else []
    missing += [str(f) for f in files if not f.exists()]
    return missing


def small_initrd(image: GuestImage, out: Path) -> Path:
    """The test guest's busybox and virtio modules with the firmware-test init."""
    with tempfile.TemporaryDirectory(prefix="initrd-") as tmp:
        root = Path(tmp)
        with open(image.initrd, "rb") as src:
            gz = subprocess.run(["gzip", "-dc"], stdin=src, capture_output=True, check=True)
        subprocess.run(["cpio", "-idm", "--quiet"], input=gz.stdout, cwd=root, check=True)
        keep = {"bin", "sbin", "lib", "dev", "proc", "sys"}
        for entry in root.iterdir():
            if entry.name not in keep:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() \
                    else entry.unlink()
        for entry in (root / "lib").iterdir():
            if entry.name != "modules":
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() \
                    else entry.unlink()
        for d in ("dev", "proc", "sys"):
            (root / d).mkdir(exist_ok=True)
        init = root / "init"
        init.write_text(INIT.replace("@SECTOR@", str(MARKER_SECTOR))
                        .replace("@NEXT@", str(MARKER_SECTOR + 1)))
        init.chmod(0o755)
        names = subprocess.run(["find", "."], cwd=root, capture_output=True, text=True,
                               check=True).stdout
        archive = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=names.encode(),
                                 cwd=root, capture_output=True, check=True).stdout
        with open(out, "wb") as f:
            subprocess.run(["gzip", "-9c"], input=archive, stdout=f, check=True)
    return out


def _fat_partition(path: Path, files: dict[str, Path], label: str) -> None:
    path.unlink(missing_ok=True)
    # -h: the sectors before the partition, which boot code may rely on.
    _run("mkfs.fat", "-C", "-n", label, "-h", str(PART_START // 512), path,
         str(PART_SIZE // 1024))
    made: set[str] = set()
    for dest, src in files.items():
        parts = dest.strip("/").split("/")[:-1]
        for i in range(len(parts)):
            folder = "/".join(parts[: i + 1])
            if folder not in made:
                _run("mmd", "-i", path, f"::/{folder}")
                made.add(folder)
        _run("mcopy", "-i", path, src, f"::/{dest.strip('/')}")


def _assemble(disk: Path, table: str, part: Path, marker: str) -> None:
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
    _run("sfdisk", "--no-reread", "--no-tell-kernel", "-q", disk, stdin=table)
    with open(disk, "r+b") as f, open(part, "rb") as p:
        f.seek(PART_START)
        shutil.copyfileobj(p, f)
        f.seek(MARKER_SECTOR * 512)
        f.write(marker.encode().ljust(512, b"\0"))
        f.flush()
        os.fsync(f.fileno())


def _cmdline(marker: str) -> str:
    return f"console=ttyS0 panic=-1 quiet vhostd.marker={marker}"


def efi_disk(image: GuestImage, disk: Path, marker: str) -> Path:
    """GPT + EFI system partition booting Linux through GRUB (for OVMF)."""
    work = disk.parent
    initrd = small_initrd(image, work / "fw-initrd.gz")
    cfg = work / "grub-embed.cfg"
    cfg.write_text(
        "search --no-floppy --file --set=root /vmlinuz\n"
        f"linux /vmlinuz {_cmdline(marker)}\n"
        "initrd /initrd.gz\n"
        "boot\n")
    efi = work / "BOOTX64.EFI"
    _run("grub-mkimage", "-O", "x86_64-efi", "-o", efi, "-p", "/EFI/BOOT", "-c", cfg,
         "part_gpt", "fat", "search", "search_fs_file", "linux", "normal", "echo",
         "boot", "configfile")
    part = work / "fw-esp-part.img"
    _fat_partition(part, {"EFI/BOOT/BOOTX64.EFI": efi, "vmlinuz": image.kernel,
                          "initrd.gz": initrd}, "VHOSTD-ESP")
    _assemble(disk, f"label: gpt\nstart={PART_START // 512}, size={PART_SIZE // 512}, "
                    f"type={ESP_TYPE}, name=esp\n", part, marker)
    part.unlink()
    return disk


def bios_disk(image: GuestImage, disk: Path, marker: str) -> Path:
    """A FAT file system over the start of the disk, no partition table, booting Linux
    through syslinux (for SeaBIOS).

    No MBR on purpose: an MBR's boot code runs at 0x7c00 and loads the partition's boot
    sector to 0x7c00 again. Under TCG, QEMU does not notice that a vhost-user back end
    wrote guest memory (it is not QEMU's own DMA), so it keeps running its translation
    of the MBR code there and the boot hangs, with vhostd and qemu-storage-daemon alike
    (QEMU's built-in virtio-blk, whose writes QEMU sees, boots the same image). SeaBIOS
    loads this disk's boot sector to 0x7c00 once, and everything after it lands at
    addresses where nothing ran before. Under KVM the MBR chain works too.
    """
    work = disk.parent
    initrd = small_initrd(image, work / "fw-initrd.gz")
    cfg = work / "syslinux.cfg"
    cfg.write_text(
        "SERIAL 0 115200\n"
        "DEFAULT linux\n"
        "PROMPT 0\n"
        "TIMEOUT 0\n"
        "LABEL linux\n"
        "  KERNEL /vmlinuz\n"
        "  INITRD /initrd.gz\n"
        f"  APPEND {_cmdline(marker)}\n")
    disk.unlink(missing_ok=True)
    _run("mkfs.fat", "-C", "-n", "VHOSTD-BOOT", disk, str(PART_SIZE // 1024))
    _run("mcopy", "-i", disk, cfg, "::/syslinux.cfg")
    _run("mcopy", "-i", disk, image.kernel, "::/vmlinuz")
    _run("mcopy", "-i", disk, initrd, "::/initrd.gz")
    _run("syslinux", "--install", disk)
    with open(disk, "r+b") as f:
        f.truncate(DISK_SIZE)
        f.seek(MARKER_SECTOR * 512)
        f.write(marker.encode().ljust(512, b"\0"))
        f.flush()
        os.fsync(f.fileno())
    return disk


def guest_answer(disk: Path, marker: str) -> bool:
    """Did the guest write its answer next to the marker?"""
    with open(disk, "rb") as f:
        f.seek((MARKER_SECTOR + 1) * 512)
        want = f"guest-read-{marker}".encode()
        return f.read(len(want)) == want
