"""vhostd against qemu-storage-daemon, side by side, with a real guest running fio.

    python benchmarks/guest_bench.py [--reps 3] [--runtime 10] [--backing file,tmpfs]
                                     [--json out.json]

Backings: ``file`` (a raw file in the page cache), ``tmpfs``, ``direct`` (a 4 GiB
image read with O_DIRECT from a cold page cache: vhostd --direct against qsd
cache.direct=on,aio=io_uring; the cache is dropped before each run) and ``nbd`` (the
image served by nbdkit with its delay filter, 1 ms per request: vhostd --blk-nbd
against qsd --blockdev driver=nbd). For each backing store and each
repetition, boots the project's test guest under QEMU (TCG, 2 vCPUs, one
vhost-user-blk disk with 2 queues) once against vhostd and once against
`qemu-storage-daemon --export type=vhost-user-blk`, alternating which goes first,
on identical copies of a pre-filled image. In the guest fio runs: 4k random read
QD32, 4k random write QD32, 4k random read QD1 (latency), 128k sequential read, and
4k random read with 2 jobs on 2 queues. The host samples each daemon's CPU time
(/proc/PID/stat) around every job and its peak RSS (VmHWM).

With QEMU 10 installed beside 7.2 (scripts/install-qemu10), QEMU 10's
qemu-storage-daemon with aio=io_uring runs as a second anchor in every repetition
("qsd10-io_uring", --qsd10 PATH or --no-qsd10); the guest's QEMU is the one
VHOSTD_QEMU names (unset: PATH's).

Prints medians and vhostd/qsd ratios as a table, and JSON (--json) a script can
compare. Timing on shared machines is noisy: only ratios from one run mean much.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's testbed/

from testbed.guest import GuestImage, build_guest
from testbed.qemu import GuestVM, StorageDaemon, VhostUserBlkDisk
from testbed.unixsock import accepts

JOBS = ["randread32", "randwrite32", "randread1", "seqread128k", "mq2"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
IMAGE_SIZE = 256 << 20


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of the whole line.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    try:
        return [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def peak_rss_mib(pid: int) -> float:
    """Peak RSS of a daemon plus that of its worker processes (VmHWM of each)."""
    total = 0.0
    for p in [pid, *children(pid)]:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def tree_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of a daemon's main process and of its worker processes."""
    workers = 0.0
    for kid in children(pid):
        try:
            workers += cpu_seconds(kid)
        except OSError:
            pass
    return cpu_seconds(pid), workers


@dataclass
class JobResult:
    iops: float
    bw_mib: float
    lat_us: float
    ios: int
    cpu_s: float
    worker_cpu_s: float = 0.0  # part of cpu_s spent in queue worker processes
    # Guest interrupts from the disk's request queues, and the disk's I/Os, over the
    # whole job (fio's ramp included on both sides).
    irqs: int = 0
    disk_ios: int = 0

    @property
    def cpu_us_per_io(self) -> float:
        return self.cpu_s * 1e6 / self.ios if self.ios else 0.0

    @property
    def irq_per_io(self) -> float:
        return self.irqs / self.disk_ios if self.disk_ios else 0.0


@dataclass
class Run:
    daemon: str
    backing: str
    jobs: dict[str, JobResult] = field(default_factory=dict)
    rss_mib: float = 0.0


def disk_ios(text: str) -> int:
    """I/Os the guest's block layer completed during the job, ramp time included."""
    util = json.loads(text).get("disk_util") or [{}]
    return int(util[0].get("read_ios", 0)) + int(util[0].get("write_ios", 0))


def parse_fio(text: str) -> tuple[float, float, float, int]:
    data = json.loads(text)
    job = data["jobs"][0]
    iops = bw = 0.0
    lat_ns = []
    ios = 0
    for direction in ("read", "write"):
        d = job[direction]
        iops += d["iops"]
        bw += d["bw_bytes"] / (1 << 20)
        ios += d["total_ios"]
        if d["total_ios"]:
            lat_ns.append(d["clat_ns"]["mean"])
    return iops, bw, (statistics.mean(lat_ns) / 1000 if lat_ns else 0.0), ios


def run_guest(image: GuestImage, sock: Path, pid: int, runtime: int, jobs: list[str],
              run: Run) -> None:
    vm = GuestVM(image, [VhostUserBlkDisk(sock, num_queues=2)], run="bench",
                 args=[str(runtime), *jobs])
    with vm:
        for job in jobs:
            vm.wait_for(f"BENCH-START {job}", 300)
            m0, w0 = tree_cpu(pid)
            m = vm.wait_for(rf"BENCH-RESULT {job} (.*)", runtime * 4 + 120)
            m1, w1 = tree_cpu(pid)
            iops, bw, lat, ios = parse_fio(m.group(1))
            cpu, wcpu = (m1 - m0) + (w1 - w0), w1 - w0
            irq = vm.wait_for(rf"BENCH-IRQS {job} (\d+) (\d+)", 30)
            result = JobResult(iops, bw, lat, ios, cpu, wcpu,
                               int(irq.group(2)) - int(irq.group(1)), disk_ios(m.group(1)))
            run.jobs[job] = result
            split = f"  (main {m1 - m0:.1f} s, workers {wcpu:.1f} s)" if wcpu else ""
            print(f"    {run.daemon:6} {job:12} {iops:9.0f} IOPS {bw:8.1f} MiB/s "
                  f"{lat:8.1f} us  {result.cpu_us_per_io:6.1f} us CPU/IO "
                  f"{result.irq_per_io:5.2f} irq/IO{split}", flush=True)
        if not vm.wait_result(120):
            raise RuntimeError(f"bench failed in the guest:\n{vm.tail()}")
    run.rss_mib = peak_rss_mib(pid)


VHOSTD_ARGS: list[str] = []  # from --vhostd-args
DIRECT_IMAGE_SIZE = 4 << 30
NBD_DELAY = "1ms"


def drop_caches(path: Path, everyone: bool = False) -> None:
    """Cold page cache for ``path``: its pages out, and with ``everyone`` all the
    machine's where allowed (not needed with O_DIRECT, which bypasses the cache, and
    unkind to others' measurements on a shared machine)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if everyone:
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        except OSError:
            pass


class NbdKit:
    """nbdkit serving ``image`` with the delay filter on a unix socket."""

    def __init__(self, image: Path, sock: Path) -> None:
        sock.unlink(missing_ok=True)
        self.sock = sock
        self.proc = subprocess.Popen(
            ["nbdkit", "-f", "-U", str(sock), "--filter=delay", "file", str(image),
             f"rdelay={NBD_DELAY}", f"wdelay={NBD_DELAY}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not accepts(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nbdkit did not start")
            time.sleep(0.02)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def disk_args(backing: str, disk: Path, work: Path) -> tuple[list[str], str | None]:
    """vhostd's disk arguments and qsd's file node for a backing."""
    if backing.startswith("direct"):
        # direct-threads, direct-io_uring: vhostd's --aio; plain direct: its default.
        aio = backing.partition("-")[2]
        return [f"--blk-file={disk}", "--direct", *([f"--aio={aio}"] if aio else [])], (
            f"driver=file,node-name=file0,filename={disk},cache.direct=on,aio=io_uring")
    if backing == "nbd":
        sock = work / "nbd.sock"
        return ([f"--blk-nbd=nbd+unix:///?socket={sock}"],
                f"driver=nbd,node-name=file0,server.type=unix,server.path={sock}")
    return [f"--blk-file={disk}"], None


def run_vhostd(image: GuestImage, disk: Path, work: Path, runtime: int, jobs: list[str],
               backing: str) -> Run:
    sock = work / "vhostd.sock"
    pidfile = work / "vhostd.pid"
    pidfile.unlink(missing_ok=True)
    log_path = work / "vhostd.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "vhostd", f"--socket-path={sock}",
                                 *disk_args(backing, disk, work)[0], "--num-queues=2",
                                 f"--pidfile={pidfile}", *VHOSTD_ARGS], stderr=log_file)
    try:
        while not pidfile.exists():
            if proc.poll() is not None:
                raise RuntimeError("vhostd did not start")
            time.sleep(0.02)
        run = Run("vhostd", backing)
        run_guest(image, sock, proc.pid, runtime, jobs, run)
        return run
    except Exception:
        print("vhostd's log:\n" + log_path.read_text()[-4000:], file=sys.stderr)
        raise
    finally:
        proc.terminate()
        proc.wait(10)


def run_qsd(image: GuestImage, disk: Path, work: Path, runtime: int, jobs: list[str],
            backing: str) -> Run:
    sock = work / "qsd.sock"
    with StorageDaemon(disk, sock, num_queues=2,
                       file_node=disk_args(backing, disk, work)[1]) as qsd:
        assert qsd.proc is not None
        run = Run("qsd", backing)
        run_guest(image, sock, qsd.proc.pid, runtime, jobs, run)
        return run


QSD10 = "qsd10-io_uring"
QSD10_DEFAULT = Path("/opt/vhostd-qemu10/bin/qemu-storage-daemon")
QSD10_BINARY: list[str] = []  # from --qsd10


def run_qsd10(image: GuestImage, disk: Path, work: Path, runtime: int, jobs: list[str],
              backing: str) -> Run:
    """QEMU 10's qemu-storage-daemon with io_uring: the strongest anchor at QD1."""
    sock = work / "qsd10.sock"
    # The same node as qsd's for direct and nbd (an NBD export, not the image file).
    file_node = disk_args(backing, disk, work)[1]
    with StorageDaemon(disk, sock, num_queues=2, binary=QSD10_BINARY[0],
                       aio="io_uring" if file_node is None else None,
                       file_node=file_node) as qsd:
        assert qsd.proc is not None
        run = Run(QSD10, backing)
        run_guest(image, sock, qsd.proc.pid, runtime, jobs, run)
        return run


def prefill(path: Path, size: int = IMAGE_SIZE) -> None:
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)


def summarize(runs: list[Run], jobs: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    daemons = [d for d in ("vhostd", "qsd", QSD10) if any(r.daemon == d for r in runs)]
    for backing in sorted({r.backing for r in runs}):
        table = {}
        for job in jobs:
            row: dict[str, float] = {}
            for daemon in daemons:
                rs = [r.jobs[job] for r in runs if r.daemon == daemon and r.backing == backing]
                row[f"{daemon}_iops"] = statistics.median(x.iops for x in rs)
                row[f"{daemon}_bw_mib"] = statistics.median(x.bw_mib for x in rs)
                row[f"{daemon}_lat_us"] = statistics.median(x.lat_us for x in rs)
                row[f"{daemon}_cpu_us_per_io"] = statistics.median(x.cpu_us_per_io for x in rs)
                row[f"{daemon}_irq_per_io"] = statistics.median(x.irq_per_io for x in rs)
            row["iops_ratio"] = row["vhostd_iops"] / row["qsd_iops"]
            row["lat_ratio"] = row["vhostd_lat_us"] / row["qsd_lat_us"]
            row["cpu_per_io_ratio"] = (row["vhostd_cpu_us_per_io"] / row["qsd_cpu_us_per_io"]
                                       if row["qsd_cpu_us_per_io"] else 0.0)
            if QSD10 in daemons:
                row[f"iops_ratio_{QSD10}"] = row["vhostd_iops"] / row[f"{QSD10}_iops"]
                row[f"lat_ratio_{QSD10}"] = row["vhostd_lat_us"] / row[f"{QSD10}_lat_us"]
            table[job] = row
        rss = {d: max(r.rss_mib for r in runs if r.daemon == d and r.backing == backing)
               for d in daemons}
        out[backing] = {"jobs": table, "peak_rss_mib": rss}
    return out


def print_table(summary: dict[str, object]) -> None:
    for backing, data in summary.items():
        assert isinstance(data, dict)
        print(f"\nbacking: {backing} (medians; ratio = vhostd / qsd)")
        print(f"{'job':12} {'vhostd IOPS':>12} {'qsd IOPS':>10} {'ratio':>6} "
              f"{'vhostd lat':>11} {'qsd lat':>9} {'ratio':>6} "
              f"{'vhostd CPU/IO':>14} {'qsd CPU/IO':>11} {'ratio':>6} "
              f"{'irq/IO v':>8} {'irq/IO q':>8}")
        for job, r in data["jobs"].items():
            print(f"{job:12} {r['vhostd_iops']:12.0f} {r['qsd_iops']:10.0f} "
                  f"{r['iops_ratio']:6.2f} {r['vhostd_lat_us']:9.1f}us "
                  f"{r['qsd_lat_us']:7.1f}us {r['lat_ratio']:6.2f} "
                  f"{r['vhostd_cpu_us_per_io']:12.1f}us {r['qsd_cpu_us_per_io']:9.1f}us "
                  f"{r['cpu_per_io_ratio']:6.2f} {r['vhostd_irq_per_io']:8.2f} "
                  f"{r['qsd_irq_per_io']:8.2f}")
        rss = data["peak_rss_mib"]
        if QSD10 in rss:
            print(f"\nbacking: {backing} (medians; ratio = vhostd / {QSD10})")
            print(f"{'job':12} {'vhostd IOPS':>12} {'qsd10 IOPS':>11} {'ratio':>6} "
                  f"{'vhostd lat':>11} {'qsd10 lat':>10} {'ratio':>6} {'qsd10 CPU/IO':>13}")
            for job, r in data["jobs"].items():
                print(f"{job:12} {r['vhostd_iops']:12.0f} {r[f'{QSD10}_iops']:11.0f} "
                      f"{r[f'iops_ratio_{QSD10}']:6.2f} {r['vhostd_lat_us']:9.1f}us "
                      f"{r[f'{QSD10}_lat_us']:8.1f}us {r[f'lat_ratio_{QSD10}']:6.2f} "
                      f"{r[f'{QSD10}_cpu_us_per_io']:11.1f}us")
        print("peak RSS: " + ", ".join(f"{d} {v:.1f} MiB" for d, v in rss.items()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3, help="A/B repetitions (default 3)")
    p.add_argument("--runtime", type=int, default=10, help="seconds per fio job (default 10)")
    p.add_argument("--backing", default="file,tmpfs",
                   help="comma-separated: file (page cache), tmpfs, direct (cold, O_DIRECT, "
                        "4 GiB; direct-threads, direct-io_uring: with that --aio), nbd (nbdkit, "
                        "1 ms delay) (default file,tmpfs)")
    p.add_argument("--jobs", default=",".join(JOBS), help="comma-separated fio jobs")
    p.add_argument("--json", type=Path, help="write the summary and every run here")
    p.add_argument("--vhostd-args", default="",
                   help="extra vhostd arguments, space-separated (e.g. --queue-workers=0)")
    p.add_argument("--qsd10", type=Path, default=QSD10_DEFAULT,
                   help=f"QEMU 10's qemu-storage-daemon for the io_uring anchor, run when it "
                   f"exists (default {QSD10_DEFAULT}, from scripts/install-qemu10)")
    p.add_argument("--no-qsd10", action="store_true", help="leave out the QEMU 10 anchor")
    args = p.parse_args()
    VHOSTD_ARGS[:] = args.vhostd_args.split()
    anchors = [run_qsd]
    if not args.no_qsd10 and os.access(args.qsd10, os.X_OK):
        QSD10_BINARY[:] = [str(args.qsd10)]
        anchors.append(run_qsd10)
        print(f"anchors: qsd (PATH or VHOSTD_QEMU) and {QSD10} ({args.qsd10})", flush=True)
    jobs = args.jobs.split(",")
    image = build_guest(progress=lambda line: print(line, flush=True))
    runs: list[Run] = []
    tmp = Path(tempfile.gettempdir())
    bases = {"file": tmp, "tmpfs": Path("/dev/shm"), "direct": tmp, "nbd": tmp}
    # direct-threads and direct-io_uring in one run share one image.
    direct_image: list[Path] = []
    for backing in args.backing.split(","):
        big = backing.startswith("direct")
        work = Path(tempfile.mkdtemp(prefix="vhostd-bench-",
                                     dir=bases[backing.partition("-")[0]]))
        try:
            original = work / "fill.img"
            # 4 GiB is not copied per run: both daemons use the one image.
            if big and direct_image:
                os.link(direct_image[0], original)
            else:
                prefill(original, DIRECT_IMAGE_SIZE if big else IMAGE_SIZE)
                if big:
                    direct_image.append(work.parent / f"{work.name}-direct.img")
                    os.link(original, direct_image[0])
            for rep in range(args.reps):
                # Alternating: vhostd first in even repetitions, last in odd ones.
                order = [run_vhostd, *anchors] if rep % 2 == 0 else [*anchors, run_vhostd]
                print(f"{backing}, repetition {rep + 1}/{args.reps}", flush=True)
                for fn in order:
                    disk = original if big else work / "disk.img"
                    if not big:
                        shutil.copyfile(original, disk)  # identical bytes for both daemons
                    else:
                        drop_caches(disk)
                    server = NbdKit(disk, work / "nbd.sock") if backing == "nbd" else None
                    try:
                        runs.append(fn(image, disk, work, args.runtime, jobs, backing))
                    finally:
                        if server is not None:
                            server.close()
        finally:
            shutil.rmtree(work, ignore_errors=True)
    for path in direct_image:
        path.unlink(missing_ok=True)
    summary = summarize(runs, jobs)
    print_table(summary)
    doc = {"summary": summary, "runtime_s": args.runtime, "reps": args.reps,
           "runs": [{"daemon": r.daemon, "backing": r.backing, "rss_mib": r.rss_mib,
                     "jobs": {j: vars(x) for j, x in r.jobs.items()}} for r in runs]}
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
