"""Options for operators: socket ownership for libvirt, the socket folder, QEMU's
back-end discovery (descriptor and capabilities)."""

from __future__ import annotations

import grp
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

from test_cli import get_features, run

from vhostd.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _some_group() -> grp.struct_group:
    """A group other than the caller's own: Debian's kvm where it exists."""
    for name in ("kvm", "disk", "daemon"):
        try:
            return grp.getgrnam(name)
        except KeyError:
            continue
    raise AssertionError("no kvm, disk or daemon group on this host")


def test_socket_group_and_mode(tmp_path: Path, sparse_image, vhostd) -> None:
    group = _some_group()
    sock = tmp_path / "s.sock"
    vhostd(f"--blk-file={sparse_image()}", f"--socket-group={group.gr_name}",
           "--socket-mode=0660", socket_path=sock)
    st = sock.stat()
    assert (st.st_gid, st.st_mode & 0o777) == (group.gr_gid, 0o660)
    get_features(sock)


def test_socket_group_by_number_for_members(tmp_path: Path, sparse_image, vhostd) -> None:
    group = _some_group()
    d = vhostd(f"--socket-group={group.gr_gid}",
               f"--member=socket-path={tmp_path}/m1.sock,blk-file={sparse_image()}",
               socket_path=tmp_path / "owner.sock")
    for name in ("owner.sock", "m1.sock"):
        assert (tmp_path / name).stat().st_gid == group.gr_gid, d.log


def test_unknown_socket_group(tmp_path: Path, sparse_image) -> None:
    r = run(f"--socket-path={tmp_path}/s.sock", f"--blk-file={sparse_image()}",
            "--socket-group=no-such-group-here")
    assert r.returncode == 2 and "no group named 'no-such-group-here'" in r.stderr
    assert not (tmp_path / "s.sock").exists()


def test_missing_socket_folder_is_created(tmp_path: Path, sparse_image, vhostd) -> None:
    sock = tmp_path / "run" / "vhostd" / "disk0.sock"
    old = os.umask(0o077)  # the folders get 0755 whatever the umask
    try:
        d = vhostd(f"--blk-file={sparse_image()}", socket_path=sock)
    finally:
        os.umask(old)
    for folder in (tmp_path / "run", tmp_path / "run" / "vhostd"):
        assert folder.stat().st_mode & 0o777 == 0o755
    assert f"created the socket folder {sock.parent}" in d.log
    get_features(sock)


def test_socket_folder_that_cannot_be_created(tmp_path: Path, sparse_image) -> None:
    (tmp_path / "file").write_text("x")
    r = run(f"--socket-path={tmp_path}/file/sub/s.sock", f"--blk-file={sparse_image()}")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"vhostd: cannot create the socket folder {tmp_path}/file/sub: Not a directory"]


def test_print_descriptor_names_this_program(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("vhostd")
    r = subprocess.run([str(script), "--print-descriptor"], capture_output=True, text=True,
                       timeout=20)
    assert r.returncode == 0, r.stderr
    desc = json.loads(r.stdout)
    assert desc["type"] == "block" and desc["binary"] == str(script)
    assert os.path.isabs(desc["binary"]) and os.access(desc["binary"], os.X_OK)
    # `python -m vhostd` finds the same program beside the interpreter.
    assert json.loads(run("--print-descriptor").stdout)["binary"] == str(script)
    # The repository's template is the same descriptor.
    template = json.loads((ROOT / "contrib/qemu/50-vhostd.json.in").read_text())
    assert template == {k: v for k, v in desc.items() if k != "tags"} | {"binary": "@BINARY@"}
    # What QEMU's discovery does with it: start the binary, ask for capabilities.
    caps = subprocess.run([desc["binary"], "--print-capabilities"], capture_output=True,
                          text=True, timeout=20)
    assert json.loads(caps.stdout)["type"] == desc["type"]


def test_capabilities_are_options_vhostd_takes(tmp_path: Path, sparse_image, vhostd) -> None:
    """Every feature listed is an option a management application may pass as is
    (vhost-user.json: block back ends know read-only and blk-file, and vhostd has both),
    and the mandatory options are there too."""
    caps = json.loads(run("--print-capabilities").stdout)
    assert caps == {"type": "block", "features": ["read-only", "blk-file"]}
    options = {o for a in build_parser()._actions for o in a.option_strings}
    for feature in caps["features"]:
        assert f"--{feature}" in options
    assert {"--socket-path", "--fd", "--print-capabilities"} <= options
    # And together they serve a disk.
    sock = tmp_path / "ro.sock"
    vhostd(f"--blk-file={sparse_image()}", "--read-only", socket_path=sock)
    assert get_features(sock) & (1 << 5)  # VIRTIO_BLK_F_RO


def _qmp_stand_in(path: Path, running: bool, event_first: bool) -> threading.Thread:
    """One QMP session as the protocol has it, until vhostd's own control socket is here."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn, srv, conn.makefile("rw") as f:
            f.write(json.dumps({"QMP": {"version": {}, "capabilities": []}}) + "\n")
            f.flush()
            for line in f:
                cmd = json.loads(line)["execute"]
                if event_first:
                    f.write(json.dumps({"event": "FRONTEND_CONNECTED", "data": {},
                                        "timestamp": {"seconds": 1, "microseconds": 0}})
                            + "\n")
                ret = {} if cmd == "qmp_capabilities" else {"running": running}
                f.write(json.dumps({"return": ret}) + "\n")
                f.flush()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_container_healthcheck(tmp_path: Path) -> None:
    script = ROOT / "contrib/container/healthcheck.py"
    for running, event_first, rc in ((True, False, 0), (True, True, 0), (False, False, 1)):
        sock = tmp_path / f"qmp-{running}-{event_first}.sock"
        t = _qmp_stand_in(sock, running, event_first)
        r = subprocess.run([sys.executable, str(script), str(sock)], capture_output=True,
                           text=True, timeout=20)
        assert r.returncode == rc, r.stderr
        t.join(5)
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "none.sock")],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and "vhostd health:" in r.stderr
