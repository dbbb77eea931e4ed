"""Build and cache a small Linux guest (kernel + initramfs) for end-to-end tests.

The guest boots straight into a shell script chosen on the kernel command line
(``vhostd.run=NAME``), runs ``/scripts/NAME.sh`` against the virtio-blk disks
and reports ``VHOSTD-RESULT: PASS`` or ``VHOSTD-RESULT: FAIL <rc>`` on ttyS0.

Everything comes from the host's Debian packages: the kernel from
``linux-image-cloud-amd64`` (small, boots fast under TCG) and the userland from
busybox-static, fio, e2fsprogs and util-linux as installed on the host.

Usage: ``python -m testbed.guest`` builds (or reuses) the image and
prints its paths.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"

# Bumped whenever the layout of the image changes in a way the other inputs
# of the cache key would not reveal.
BUILD_FORMAT = 1

SCRIPTS_DIR = Path(__file__).with_name("guest_scripts")

# Wanted in this order; each one's own dependencies are loaded first.
GUEST_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    # Only loaded if ext4 is not built in; crc32c is what ext4 checksums need.
    "ext4",
    "crc32c_generic",
)
# Modules that are only needed for ext4, so skipped when ext4 is built in.
EXT4_ONLY = frozenset({"crc32c_generic"})

# Real binaries (not busybox applets): busybox's versions lack options the
# scripts use (fio has no applet at all; busybox blkdiscard has no -z).
# Debian's busybox shell prefers its applets to PATH, so scripts must call
# a real tool that shares an applet's name (blkdiscard, mke2fs) by full path.
HOST_BINARIES = {
    "/usr/bin/fio": "/usr/bin/fio",
    "/usr/sbin/mke2fs": "/usr/sbin/mke2fs",
    "/usr/sbin/e2fsck": "/usr/sbin/e2fsck",
    "/usr/sbin/blkdiscard": "/usr/sbin/blkdiscard",
}
# Extra names for the binaries above: mke2fs picks the fs type from argv[0].
HOST_BINARY_LINKS = {
    "/usr/sbin/mkfs.ext4": "mke2fs",
    "/usr/sbin/fsck.ext4": "e2fsck",
}
# Debian packages whose versions go into the cache key.
HOST_PACKAGES = ("busybox-static", "fio", "e2fsprogs", "util-linux", "libc6")

INIT_TEMPLATE = r"""#!/bin/sh
# PID 1 of the test guest: set up the system, run one test script, report, power off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
# Copied libraries keep their host paths; some of those paths are normally
# found through ld.so.conf, which the guest does not have.
export LD_LIBRARY_PATH=@LIBDIRS@
export HOME=/root TMPDIR=/tmp

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t tmpfs tmpfs /dev/shm

# The kernel opened /dev/console from the initramfs; reopen it on devtmpfs
# so that output survives the mount above.
exec </dev/console >/dev/console 2>&1

for m in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$m.ko" || echo "VHOSTD-INIT: insmod $m failed"
done

# virtio_blk probes synchronously, but give the block layer a moment to
# publish every disk before the script looks for them.
want=$(grep -l '^0x0002$' /sys/bus/virtio/devices/*/device 2>/dev/null | wc -l)
i=0
while [ "$(ls /sys/block | grep -c '^vd')" -lt "$want" ] && [ $i -lt 50 ]; do
    sleep 0.1
    i=$((i + 1))
done
echo "VHOSTD-INIT: disks: $(ls /sys/block | grep '^vd' | tr '\n' ' ')"

run=""
args=""
for word in $(cat /proc/cmdline); do
    case "$word" in
        vhostd.run=*) run="${word#vhostd.run=}" ;;
        vhostd.args=*) args="${word#vhostd.args=}" ;;
    esac
done

if [ -z "$run" ]; then
    echo "VHOSTD-INIT: no vhostd.run= on the kernel command line"
    rc=2
elif [ ! -f "/scripts/$run.sh" ]; then
    echo "VHOSTD-INIT: no such script: $run"
    rc=127
else
    IFS=,
    set -- $args
    unset IFS
    echo "VHOSTD-INIT: running $run $*"
    cd /tmp
    sh "/scripts/$run.sh" "$@"
    rc=$?
    cd /
fi

sync
# The leading newline keeps the marker on a line of its own even if the
# console was left mid-line.
if [ "$rc" -eq 0 ]; then
    echo; echo "VHOSTD-RESULT: PASS"
else
    echo; echo "VHOSTD-RESULT: FAIL $rc"
fi
poweroff -f
# Should poweroff fail, PID 1 exiting panics the kernel; panic=-1 and
# QEMU's -no-reboot then end the VM.
sleep 5
exit "$rc"
"""


@dataclass
class GuestImage:
    """A built guest: pass ``kernel`` to ``-kernel`` and ``initrd`` to ``-initrd``."""

    kernel: Path
    initrd: Path
    # What went into the build (kernel package, modules loaded, ...).
    info: dict[str, Any] = field(default_factory=dict)


class GuestBuildError(RuntimeError):
    pass


Progress = Callable[[str], None]


def default_cache_dir() -> Path:
    env = os.environ.get("VHOSTD_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "vhostd" / "guest"


def build_guest(cache_dir: Path | None = None, progress: Progress = print) -> GuestImage:
    """Return the cached guest image, building it first if needed."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)

    kernel_pkg, kernel_version = resolve_kernel_package(progress)
    key = _cache_key(kernel_pkg, kernel_version)
    target = cache_dir / key

    # Serialise builds: parallel test sessions would otherwise each spend a
    # minute building the same image.
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        image = _load_cached(target)
        if image is not None:
            return image
        progress(f"guest: building {key} in {cache_dir}")
        start = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir))
        try:
            info = _build(work, kernel_pkg, kernel_version, progress)
            info["key"] = key
            info["build_seconds"] = round(time.monotonic() - start, 1)
            (work / "manifest.json").write_text(json.dumps(info, indent=2) + "\n")
            # mkdtemp made it private; the image is meant to be shared.
            os.chmod(work, 0o755)
            # rename() is atomic: readers see either nothing or a whole image.
            os.rename(work, target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        progress(f"guest: built in {time.monotonic() - start:.1f} s")
    image = _load_cached(target)
    assert image is not None
    return image


def _load_cached(target: Path) -> GuestImage | None:
    manifest = target / "manifest.json"
    if not manifest.is_file():
        return None
    return GuestImage(
        kernel=target / "vmlinuz",
        initrd=target / "initrd.gz",
        info=json.loads(manifest.read_text()),
    )


# --- inputs of the cache key -------------------------------------------------


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def _apt_get_update(progress: Progress) -> None:
    progress("guest: apt-get update (package lists missing)")
    res = _run(["apt-get", "update"])
    if res.returncode != 0:
        raise GuestBuildError(f"apt-get update failed:\n{res.stdout}{res.stderr}")


def _apt_show(package: str) -> dict[str, str]:
    res = _run(["apt-cache", "show", "--no-all-versions", package])
    fields: dict[str, str] = {}
    if res.returncode != 0:
        return fields
    for line in res.stdout.splitlines():
        if not line.strip():
            break  # only the first (candidate) record
        if ":" in line and not line.startswith(" "):
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return fields


def resolve_kernel_package(progress: Progress = print) -> tuple[str, str]:
    """Return (real kernel package, its version) behind the cloud metapackage."""
    meta = _apt_show(KERNEL_METAPACKAGE)
    if not meta:
        _apt_get_update(progress)
        meta = _apt_show(KERNEL_METAPACKAGE)
    match = re.search(r"\b(linux-image-[0-9][^\s,|]*-cloud-amd64)\b", meta.get("Depends", ""))
    if not match:
        raise GuestBuildError(f"cannot resolve {KERNEL_METAPACKAGE}: {meta or 'not found'}")
    package = match.group(1)
    version = _apt_show(package).get("Version")
    if not version:
        raise GuestBuildError(f"apt-cache knows no version of {package}")
    return package, version


def _host_package_versions() -> dict[str, str]:
    res = _run(["dpkg-query", "-W", "-f", "${Package} ${Version}\n", *HOST_PACKAGES])
    versions = dict(line.split(" ", 1) for line in res.stdout.splitlines() if " " in line)
    # Off Debian (or with a hand-installed tool) fall back to the binaries' identity.
    for path in [*HOST_BINARIES, "/bin/busybox"]:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            versions[path] = f"{st.st_size}:{st.st_mtime_ns}"
    return versions


def _cache_key(kernel_pkg: str, kernel_version: str) -> str:
    h = hashlib.sha256()

    def feed(label: str, data: bytes) -> None:
        h.update(f"{label}\0{len(data)}\0".encode())
        h.update(data)

    feed("format", str(BUILD_FORMAT).encode())
    feed("kernel", f"{kernel_pkg}={kernel_version}".encode())
    feed("init", INIT_TEMPLATE.encode())
    feed("modules", ",".join(GUEST_MODULES).encode())
    for name, version in sorted(_host_package_versions().items()):
        feed("pkg:" + name, version.encode())
    for script in sorted(SCRIPTS_DIR.glob("*.sh")):
        feed("script:" + script.name, script.read_bytes())
    return f"{kernel_version}-{h.hexdigest()[:16]}"


# --- the build ---------------------------------------------------------------


def _build(work: Path, kernel_pkg: str, kernel_version: str, progress: Progress) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vhostd-guest-") as tmp:
        tmpdir = Path(tmp)
        deb = _download_deb(kernel_pkg, tmpdir, progress)
        progress(f"guest: unpacking {deb.name}")
        kroot = tmpdir / "kernel"
        res = _run(["dpkg-deb", "-x", str(deb), str(kroot)])
        if res.returncode != 0:
            raise GuestBuildError(f"dpkg-deb -x failed: {res.stderr}")

        vmlinuz = sorted((kroot / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise GuestBuildError(f"{deb.name} contains no /boot/vmlinuz-*")
        kver = vmlinuz[-1].name.removeprefix("vmlinuz-")
        shutil.copyfile(vmlinuz[-1], work / "vmlinuz")

        moddir = _find_module_dir(kroot, kver)
        modules = ModuleSet(moddir)
        ext4_builtin = "ext4" in modules.builtin
        wanted = [m for m in GUEST_MODULES if not (ext4_builtin and m in EXT4_ONLY)]
        order = modules.load_order(wanted)
        progress(f"guest: kernel {kver}, modules: {' '.join(order) or '(none)'}")

        files = CpioTree()
        _add_base(files)
        for name in order:
            files.add_file(f"lib/modules/{name}.ko", modules.read(name), 0o644)
        files.add_file("lib/modules/load-order", "".join(f"{m}\n" for m in order).encode())
        libdirs = _add_userland(files)
        init = INIT_TEMPLATE.replace("@LIBDIRS@", ":".join(sorted(libdirs)))
        files.add_file("init", init.encode(), 0o755)
        for script in sorted(SCRIPTS_DIR.glob("*.sh")):
            files.add_file(f"scripts/{script.name}", script.read_bytes(), 0o755)

        progress(f"guest: writing initramfs ({files.size // (1 << 20)} MiB uncompressed)")
        # Level 6: level 9 is several times slower for a percent or two.
        with (
            open(work / "initrd.gz", "wb") as raw,
            gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz,
        ):
            files.write(gz)

    return {
        "kernel_package": kernel_pkg,
        "kernel_package_version": kernel_version,
        "kernel_release": kver,
        "ext4_builtin": ext4_builtin,
        "modules_compressed": modules.compression,
        "modules": order,
        "initrd_bytes": (work / "initrd.gz").stat().st_size,
    }


def _download_deb(package: str, dest: Path, progress: Progress) -> Path:
    progress(f"guest: downloading {package}")
    # apt's download sandbox user must be able to write into the directory.
    os.chmod(dest, 0o777)
    res = _run(["apt-get", "download", package], cwd=dest)
    if res.returncode != 0:
        # The usual cause is missing or stale package lists; retry once after
        # refreshing them rather than always paying for an update.
        _apt_get_update(progress)
        res = _run(["apt-get", "download", package], cwd=dest)
        if res.returncode != 0:
            raise GuestBuildError(f"apt-get download {package} failed:\n{res.stderr}")
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        raise GuestBuildError(f"apt-get download {package} produced no .deb")
    return debs[0]


def _find_module_dir(kroot: Path, kver: str) -> Path:
    for base in ("lib/modules", "usr/lib/modules"):
        if (kroot / base / kver).is_dir():
            return kroot / base / kver
    raise GuestBuildError(f"no modules directory for {kver}")


class ModuleSet:
    """The modules of an unpacked kernel package, without needing depmod or kmod."""

    SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")

    def __init__(self, moddir: Path) -> None:
        self.moddir = moddir
        self.paths: dict[str, Path] = {}
        for path in moddir.rglob("*.ko*"):
            for suffix in self.SUFFIXES:
                if path.name.endswith(suffix):
                    self.paths[_modname(path.name[: -len(suffix)])] = path
        self.builtin: set[str] = set()
        builtin = moddir / "modules.builtin"
        if builtin.is_file():
            for line in builtin.read_text().split():
                self.builtin.add(_modname(Path(line).name.split(".ko")[0]))
        suffixes = {p.name[p.name.index(".ko") :] for p in self.paths.values()}
        self.compression = sorted(s.removeprefix(".ko").lstrip(".") or "none" for s in suffixes)
        self._deps = self._read_modules_dep()

    def _read_modules_dep(self) -> dict[str, list[str]] | None:
        # The Debian package ships no modules.dep (depmod runs at install
        # time); when it is there, it is authoritative.
        dep = self.moddir / "modules.dep"
        if not dep.is_file():
            return None
        deps: dict[str, list[str]] = {}
        for line in dep.read_text().splitlines():
            mod, _, rest = line.partition(":")
            deps[_modname(Path(mod).name.split(".ko")[0])] = [
                _modname(Path(d).name.split(".ko")[0]) for d in rest.split()
            ]
        return deps

    def deps(self, name: str) -> list[str]:
        if self._deps is not None:
            return self._deps.get(name, [])
        # Otherwise use what depmod itself reads: the module's depends= tag.
        for tag in _modinfo(self.read(name)):
            if tag.startswith("depends="):
                return [_modname(d) for d in tag.removeprefix("depends=").split(",") if d]
        return []

    def read(self, name: str) -> bytes:
        path = self.paths[name]
        data = path.read_bytes()
        if path.name.endswith(".xz"):
            return lzma.decompress(data)
        if path.name.endswith(".gz"):
            return gzip.decompress(data)
        if path.name.endswith(".zst"):
            res = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True)
            return res.stdout
        return data

    def load_order(self, wanted: Iterable[str]) -> list[str]:
        order: list[str] = []
        seen: set[str] = set()

        def visit(name: str, chain: tuple[str, ...]) -> None:
            name = _modname(name)
            if name in seen or name in self.builtin:
                return
            if name in chain:
                raise GuestBuildError(f"module dependency cycle: {' -> '.join((*chain, name))}")
            if name not in self.paths:
                raise GuestBuildError(f"module {name} is neither built in nor shipped")
            for dep in self.deps(name):
                visit(dep, (*chain, name))
            seen.add(name)
            order.append(name)

        for name in wanted:
            visit(name, ())
        return order


def _modname(name: str) -> str:
    # The kernel treats '-' and '_' in module names as the same character.
    return name.replace("-", "_")


def _modinfo(elf: bytes) -> list[str]:
    """The NUL-separated key=value tags of a module's .modinfo ELF section."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise GuestBuildError("not a little-endian ELF64 module")
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def header(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", elf, shoff + i * shentsize
        )
        return name, offset, size

    strtab = header(shstrndx)[1]
    for i in range(shnum):
        name, offset, size = header(i)
        end = elf.index(b"\0", strtab + name)
        if elf[strtab + name : end] == b".modinfo":
            return [t.decode() for t in elf[offset : offset + size].split(b"\0") if t]
    return []


# --- initramfs contents ------------------------------------------------------


def _add_base(files: CpioTree) -> None:
    for d in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "mnt",
        "root",
        "run",
        "var",
        "lib/modules",
    ):
        files.add_dir(d)
    # Needed before devtmpfs is mounted: the kernel opens it for init's stdio.
    files.add_node("dev/console", stat.S_IFCHR | 0o600, 5, 1)
    files.add_node("dev/null", stat.S_IFCHR | 0o666, 1, 3)
    # mke2fs and e2fsck consult the mount table before touching a device.
    files.add_symlink("etc/mtab", "/proc/mounts")
    files.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    files.add_file("etc/group", b"root:x:0:\n")
    if Path("/etc/mke2fs.conf").is_file():
        files.add_file("etc/mke2fs.conf", Path("/etc/mke2fs.conf").read_bytes())


def _add_userland(files: CpioTree) -> set[str]:
    """Add busybox, the real tools and their libraries; return the library dirs."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    files.add_file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    res = _run([busybox, "--list-full"])
    if res.returncode != 0:
        raise GuestBuildError(f"{busybox} --list-full failed: {res.stderr}")
    real = {p.lstrip("/") for p in [*HOST_BINARIES, *HOST_BINARY_LINKS]}
    real_names = {Path(p).name for p in real}
    for applet in res.stdout.split():
        # A real tool wins over the applet of the same name wherever it sits.
        if applet in real or Path(applet).name in real_names or files.has(applet):
            continue
        files.add_symlink(applet, "/bin/busybox")

    needed: dict[str, Path] = {}
    for guest_path, host_path in HOST_BINARIES.items():
        host = Path(host_path).resolve()
        if not host.is_file():
            raise GuestBuildError(f"{host_path} is missing on the host")
        files.add_file(guest_path.lstrip("/"), host.read_bytes(), 0o755)
        needed.update(_shared_libraries(host))
    for link, target in HOST_BINARY_LINKS.items():
        files.add_symlink(link.lstrip("/"), target)

    libdirs: set[str] = set()
    for guest_path, host in sorted(needed.items()):
        files.add_file(guest_path.lstrip("/"), host.read_bytes(), 0o755)
        libdirs.add(str(Path(guest_path).parent))
    return libdirs


_LDD_LINE = re.compile(r"^\s*(?:(\S+)\s+=>\s+)?(\S+)\s+\(0x[0-9a-f]+\)\s*$")


def _shared_libraries(binary: Path) -> dict[str, Path]:
    """Map guest path -> host file for every library (and the loader) of binary."""
    res = _run(["ldd", str(binary)])
    if res.returncode != 0:
        raise GuestBuildError(f"ldd {binary} failed: {res.stdout}{res.stderr}")
    libs: dict[str, Path] = {}
    for line in res.stdout.splitlines():
        if "not found" in line:
            raise GuestBuildError(f"ldd {binary}: {line.strip()}")
        match = _LDD_LINE.match(line)
        if not match:
            continue
        path = match.group(2)
        if not path.startswith("/"):
            continue  # the vDSO lives in the kernel
        # Keep the path ldd printed (the loader and DT_NEEDED lookups use it)
        # but copy the file the symlink points to.
        libs[path] = Path(path).resolve()
    return libs


class CpioTree:
    """An in-memory file tree written out as a newc cpio archive.

    Written here rather than by cpio(1) so that device nodes and root
    ownership need no privileges and the archive is reproducible.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[int, bytes, int, int]] = {}

    @property
    def size(self) -> int:
        return sum(len(data) for _, data, _, _ in self._entries.values())

    def has(self, path: str) -> bool:
        return path.strip("/") in self._entries

    def _parents(self, path: str) -> None:
        parent = str(Path(path).parent)
        if parent not in (".", "") and parent not in self._entries:
            self.add_dir(parent)

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        path = path.strip("/")
        self._parents(path)
        self._entries.setdefault(path, (stat.S_IFDIR | mode, b"", 0, 0))

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        self._parents(path)
        self._entries[path] = (stat.S_IFREG | mode, data, 0, 0)

    def add_symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self._parents(path)
        self._entries[path] = (stat.S_IFLNK | 0o777, target.encode(), 0, 0)

    def add_node(self, path: str, mode: int, major: int, minor: int) -> None:
        path = path.strip("/")
        self._parents(path)
        self._entries[path] = (mode, b"", major, minor)

    def write(self, out: io.BufferedIOBase | gzip.GzipFile) -> None:
        # Parents sort before their children, so directories exist first.
        for ino, path in enumerate(sorted(self._entries), start=1):
            mode, data, rmajor, rminor = self._entries[path]
            nlink = 2 if stat.S_ISDIR(mode) else 1
            self._record(out, path, ino, mode, nlink, data, rmajor, rminor)
        self._record(out, "TRAILER!!!", 0, 0, 1, b"", 0, 0)

    @staticmethod
    def _record(
        out: Any, name: str, ino: int, mode: int, nlink: int, data: bytes, rmajor: int, rminor: int
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rmajor, rminor, len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out.write(header + encoded)
        out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build (or reuse) the vhostd test guest.")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="default: $VHOSTD_CACHE or ~/.cache/vhostd/guest",
    )
    args = parser.parse_args(argv)
    image = build_guest(args.cache_dir, progress=lambda m: print(m, file=sys.stderr))
    print(f"kernel: {image.kernel}")
    print(f"initrd: {image.initrd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
