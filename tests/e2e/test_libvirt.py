"""A real libvirtd boots a domain whose disk is vhostd, from the documented XML.

The disk and memory elements come from qemu-configs/libvirt-disk.xml as shipped; vhostd
runs with the documented socket options (--socket-group=kvm --socket-mode=0660, in a
socket folder it creates). libvirt runs QEMU as libvirt-qemu:kvm, so this is the
permission set-up users need. The guest writes rounds of data the host checks in the
image; vhostd is killed (-9) and started again under it, and <reconnect> brings QEMU
back without losing a write.
"""

from __future__ import annotations

import grp
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.guest import GuestImage

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
DOC_XML = ROOT / "qemu-configs" / "libvirt-disk.xml"
URI = "qemu:///system"
TIMEOUT = 300
ROUNDS = 12
MiB = 1 << 20


def virsh(*args: str, check: bool = True, timeout: float = 300) -> str:
    r = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[None]:
    """A running libvirtd: the system's, or one started here (no systemd as PID 1)."""
    for tool in ("libvirtd", "virtlogd", "virsh"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian: libvirt-daemon-system, "
                        "libvirt-clients; ./scripts/install-deps)")
    try:
        grp.getgrnam("kvm")
    except KeyError:
        pytest.skip("no kvm group (libvirt-daemon-system creates it)")
    started: list[Path] = []
    ok = subprocess.run(["virsh", "-c", URI, "version"], capture_output=True,
                        timeout=30).returncode == 0
    if not ok:
        # The packages' own units need systemd; started by hand they daemonize and write
        # pid files, which is how they are stopped again below.
        for daemon, pidfile in (("virtlogd", Path("/run/virtlogd.pid")),
                                ("libvirtd", Path("/run/libvirtd.pid"))):
            if not pidfile.exists():
                subprocess.run([daemon, "-d"], check=True, timeout=30)
                started.append(pidfile)
        deadline = time.monotonic() + 30
        while subprocess.run(["virsh", "-c", URI, "version"], capture_output=True,
                             timeout=30).returncode != 0:
            if time.monotonic() > deadline:
                pytest.fail("libvirtd started but virsh cannot reach it")
            time.sleep(0.2)
    yield
    for pidfile in reversed(started):
        try:
            os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
        except (OSError, ValueError):
            pass


def documented_elements(socket_path: Path) -> tuple[ET.Element, ET.Element]:
    """<memoryBacking> and <disk> from the shipped XML, with this test's socket."""
    root = ET.fromstring(f"<snippets>{DOC_XML.read_text()}</snippets>")
    memory = root.find("memoryBacking")
    disk = root.find("disk")
    assert memory is not None and disk is not None
    source = disk.find("source")
    assert source is not None and source.find("reconnect") is not None
    source.set("path", str(socket_path))
    return memory, disk


def domain_xml(name: str, work: Path, socket_path: Path, cmdline: str) -> str:
    memory, disk = documented_elements(socket_path)
    dom = ET.fromstring(f"""
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{work}/vmlinuz</kernel>
    <initrd>{work}/initrd.gz</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{shutil.which('qemu-system-x86_64')}</emulator>
    <serial type='file'>
      <source path='{work}/console.log'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>""")
    dom.insert(3, memory)
    devices = dom.find("devices")
    assert devices is not None
    devices.insert(1, disk)
    return ET.tostring(dom, encoding="unicode")


class Console:
    """The guest's serial console, a file libvirt's QEMU writes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0

    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            m = regex.search(text, self.pos)
            if m:
                self.pos = m.end()
                return m
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pattern!r} not seen in {timeout} s:\n{text[-3000:]}")
            time.sleep(0.2)


def expected_round(i: int) -> bytes:
    line = f"vhostd-round-{i}\n".encode()
    return (line * (MiB // len(line) + 1))[:MiB]


def image_round(image: Path, i: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(i * MiB)
        return f.read(MiB)


@pytest.fixture
def work() -> Iterator[Path]:
    # libvirt's QEMU (libvirt-qemu:kvm) reads the kernel and writes the console here.
    d = Path(tempfile.mkdtemp(prefix="vhostd-libvirt-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_libvirt_domain_on_vhostd_survives_kill_9(libvirtd: None, guest_image: GuestImage,
                                                  work: Path, vhostd, sparse_image) -> None:
    for name in ("vmlinuz", "initrd.gz"):
        shutil.copy(getattr(guest_image, "kernel" if name == "vmlinuz" else "initrd"),
                    work / name)
        (work / name).chmod(0o644)
    image = sparse_image(64 << 20)
    run_dir = Path(f"/run/vhostd-e2e-{os.getpid()}")
    shutil.rmtree(run_dir, ignore_errors=True)
    sock = run_dir / "disk0.sock"
    # The documented command (README.md, "With libvirt").
    args = (f"--blk-file={image}", "--socket-group=kvm", "--socket-mode=0660")
    daemon = vhostd(*args, socket_path=sock)
    name = f"vhostd-e2e-{os.getpid()}"
    cmdline = (f"console=ttyS0 panic=-1 quiet vhostd.run=pattern_rounds "
               f"vhostd.args={ROUNDS},1,vda")
    xml = work / "domain.xml"
    xml.write_text(domain_xml(name, work, sock, cmdline))
    console = Console(work / "console.log")
    virsh("define", str(xml))
    try:
        assert run_dir.stat().st_mode & 0o777 == 0o755
        st = sock.stat()
        assert (st.st_gid, st.st_mode & 0o777) == (grp.getgrnam("kvm").gr_gid, 0o660)
        virsh("start", name)
        console.wait_for(r"PATTERN-ROUND 2 OK")
        # What the guest wrote and read back is in the image, as the host reads it.
        for i in (1, 2):
            assert image_round(image, i) == expected_round(i)
        # kill -9 under the running guest, then the same command again.
        daemon.signal(signal.SIGKILL)
        daemon.proc.wait(10)
        daemon = vhostd(*args, socket_path=sock)
        m = console.wait_for(r"PATTERN-ROUND (\d+) OK")
        after = int(m.group(1))
        console.wait_for(r"VHOSTD-RESULT: PASS")
        deadline = time.monotonic() + 60
        while virsh("domstate", name).strip() != "shut off":
            assert time.monotonic() < deadline, virsh("domstate", name)
            time.sleep(0.5)
    finally:
        virsh("destroy", name, check=False)
        virsh("undefine", name, check=False)
        daemon.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    text = console.text()
    assert f"pattern_rounds: {ROUNDS} rounds OK" in text, text[-3000:]
    assert after >= 3 and "front end connected" in daemon.log, daemon.log
    for i in range(1, ROUNDS + 1):
        assert image_round(image, i) == expected_round(i), f"round {i} lost"
