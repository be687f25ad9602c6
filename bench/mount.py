"""Mount and NBD export throughput next to a restore of the same disk (issue 16, deliverable 2).

    .venv/bin/python bench/mount.py [--size-mib 1024] [--json] [--workdir DIR] [--keep]

One restore point of a sparse raw disk (bench/image.py: half allocated, half of that real
binaries), in an encrypted local repository. Each way of getting the whole disk out is timed
once, from a fresh process (nothing cached by vmkeep) including its start-up (the mount
command, the server's start), to durable output where there is output (export fsyncs; the
qemu-img copies are fsynced too), and its bytes are checked against the source image:
- `export raw`: `vmkeep export --format raw` (the restore's data path, sparse output);
- `mount cat`: `cat` of the FUSE image to /dev/null (`vmkeep mount`; holes read as zeros);
- `nbd qemu-img`: `qemu-img convert` from `vmkeep serve-nbd` (Unix socket) to a raw file;
- `nbd nbdcopy`: `nbdcopy` from the same server to `null:`;
- `nbdkit qemu-img`: the same convert from nbdkit's Python plugin reading the same point
  through vmkeep's PointDisk (the alternative to an own server), when nbdkit is installed.
Throughput is the disk's size over the wall time; the ratios are each way / `export raw`
(target: mount and NBD at least 0.5). The machine is shared: compare within one run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from image import build_image, sha256_file

MiB = 1 << 20
PASSPHRASE = "bench passphrase"
SRC = Path(__file__).resolve().parents[1] / "src"

NBDKIT_PLUGIN = '''
"""nbdkit Python plugin serving a vmkeep restore point's disk (bench only)."""
import os, sys
sys.path[:0] = os.environ["VMKEEP_BENCH_PATH"].split(os.pathsep)
import nbdkit
from vmkeep.operations.point_disk import open_point_disk
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.repository import Repository

API_VERSION = 2
disk = None

def config(key, value):
    pass

def get_ready():
    global disk
    repo = Repository.open(LocalRemote(os.environ["VMKEEP_BENCH_REPO"]),
                           lambda: os.environ["VMKEEP_PASSPHRASE"].encode())
    disk = open_point_disk(repo, os.environ["VMKEEP_BENCH_POINT"], "disk0")

def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL

def open(readonly):
    return 1

def get_size(h):
    return disk.size

def can_write(h):
    return False

def can_extents(h):
    return True

def pread(h, buf, offset, flags):
    buf[:] = disk.pread(offset, len(buf))

def extents(h, count, offset, flags):
    end, out = offset + count, []
    for e in disk.extents():
        if e.offset + e.length <= offset:
            continue
        if e.offset >= end:
            break
        start = max(e.offset, offset)
        kind = 0 if e.data else nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
        out.append((start, min(e.offset + e.length, end) - start, kind))
    return out
'''


def vmkeep() -> list[str]:
    script = Path(sys.executable).with_name("vmkeep")
    return [str(script)] if script.exists() else [sys.executable, "-m", "vmkeep.interfaces.cli.app"]


def run(argv: list[str], env: dict[str, str], **kw: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, **kw)
    if done.returncode:
        sys.exit(f"error: {' '.join(argv)} failed: {done.stderr.strip()[-500:]}")
    return done


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def prepare(work: Path, size: int, env: dict[str, str]) -> tuple[Path, str, str]:
    """(repository, restore point, sha256 of the disk)."""
    vm = work / "vms" / "bench"
    vm.mkdir(parents=True)
    build_image(str(vm / "disk0.img"), size, seed=16)
    doc = {"name": "bench", "uuid": "5d0f1b7e-8a1c-4c3e-9f0a-16a5be7c0016", "vcpus": 1,
           "memory_mib": 64, "metadata": {},
           "disks": [{"name": "disk0", "file": "disk0.img", "format": "raw"}]}  # fmt: skip
    (vm / "vm.json").write_text(json.dumps(doc))
    repo = work / "repo"
    run([*vmkeep(), "init", str(repo)], env)
    out = run([*vmkeep(), "backup", str(vm), "--remote", str(repo), "--json"], env)
    return repo, json.loads(out.stdout)["restore_point"], sha256_file(str(vm / "disk0.img"))


def sha256_stream(argv: list[str], env: dict[str, str]) -> str:
    """Run argv, hash its stdout as it comes (the disk never lands on the file system)."""
    h = hashlib.sha256()
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        while block := proc.stdout.read(4 * MiB):
            h.update(block)
    if proc.returncode:
        sys.exit(f"error: {' '.join(argv)} failed")
    return h.hexdigest()


def wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"error: {proc.args} did not start: {proc.communicate()[1]}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.communicate(timeout=30)


def bench_export(work: Path, repo: Path, point: str, env: dict[str, str]) -> tuple[float, str]:
    out = work / "export.raw"
    cmd = [*vmkeep(), "export", point, "disk0", str(out), "--remote", str(repo)]
    seconds = timed(lambda: run(cmd, env) and None)
    digest = sha256_file(str(out))
    out.unlink()
    return seconds, digest


def bench_mount(work: Path, repo: Path, point: str, env: dict[str, str]) -> tuple[float, str]:
    """Seconds from `vmkeep mount` to the end of `cat` (the mount's start-up included)."""
    mp = work / "mnt"
    mp.mkdir()
    image = mp / "disk0.raw"
    mount = [*vmkeep(), "mount", point, "disk0", str(mp), "--remote", str(repo)]
    cat = ["sh", "-c", f"cat '{image}' > /dev/null"]
    try:
        seconds = timed(lambda: run(mount, env) and run(cat, env) and None)
        digest = sha256_stream(["cat", str(image)], env)  # after the timing: now cached
    finally:
        run([*vmkeep(), "umount", str(mp)], env)
    return seconds, digest


def convert_from(uri: str, work: Path, env: dict[str, str]) -> tuple[float, str]:
    """qemu-img convert to a raw file, made durable (fsync) as `vmkeep export` makes its own."""
    out = work / "nbd.raw"
    cmd = ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)]

    def convert() -> None:
        run(cmd, env)
        fd = os.open(out, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    seconds = timed(convert)
    digest = sha256_file(str(out))
    out.unlink()
    return seconds, digest


def bench_nbd(
    work: Path, repo: Path, point: str, env: dict[str, str]
) -> tuple[float, str, float | None]:
    """(qemu-img seconds, its output's sha256, nbdcopy seconds), each from a fresh server."""
    sock = work / "nbd.sock"
    serve = [*vmkeep(), "serve-nbd", point, "disk0", "--socket", str(sock), "--remote", str(repo)]
    uri = f"nbd+unix:///disk0?socket={sock}"

    def served(fn: Callable[[], Any]) -> tuple[float, Any]:
        """Seconds from starting the server to the end of fn (start-up included), fn's result."""
        start = time.perf_counter()
        proc = subprocess.Popen(serve, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
        wait_for(sock, proc)
        try:
            result = fn()
            return time.perf_counter() - start, result
        finally:
            stop(proc)

    seconds, (_, digest) = served(lambda: convert_from(uri, work, env))
    copy = None
    if shutil.which("nbdcopy"):
        copy, _ = served(lambda: run(["nbdcopy", uri, "null:"], env))
    return seconds, digest, copy


def bench_nbdkit(
    work: Path, repo: Path, point: str, env: dict[str, str]
) -> tuple[float, str] | None:
    if not shutil.which("nbdkit"):
        return None
    plugin = work / "vmkeep_plugin.py"
    plugin.write_text(NBDKIT_PLUGIN)
    site = next(Path(sys.prefix).glob("lib/python3*/site-packages"))
    kit_env = {**env, "VMKEEP_BENCH_PATH": os.pathsep.join([str(SRC), str(site)]),
               "VMKEEP_BENCH_REPO": str(repo), "VMKEEP_BENCH_POINT": point}  # fmt: skip
    sock = work / "nbdkit.sock"
    start = time.perf_counter()
    proc = subprocess.Popen(
        ["nbdkit", "-f", "-r", "-U", str(sock), "python", str(plugin)],
        env=kit_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for(sock, proc)
    try:
        _, digest = convert_from(f"nbd+unix:///?socket={sock}", work, env)
        return time.perf_counter() - start, digest
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vmkeep-mount-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VMKEEP_DATA_DIR": str(work / "state"),
           "VMKEEP_CONFIG_DIR": str(work / "config"), "VMKEEP_PASSPHRASE": PASSPHRASE}  # fmt: skip
    size = args.size_mib * MiB
    try:
        repo, point, digest = prepare(work, size, env)
        results: dict[str, dict[str, Any]] = {}
        seconds, got = bench_export(work, repo, point, env)
        results["export raw"] = {"seconds": seconds, "same": got == digest}
        if os.path.exists("/dev/fuse") and shutil.which("fusermount3") and os.geteuid() == 0:
            seconds, got = bench_mount(work, repo, point, env)
            results["mount cat"] = {"seconds": seconds, "same": got == digest}
        seconds, got, copy = bench_nbd(work, repo, point, env)
        results["nbd qemu-img"] = {"seconds": seconds, "same": got == digest}
        if copy is not None:
            results["nbd nbdcopy"] = {"seconds": copy}
        kit = bench_nbdkit(work, repo, point, env)
        if kit is not None:
            results["nbdkit qemu-img"] = {"seconds": kit[0], "same": kit[1] == digest}
    finally:
        if not args.keep:
            subprocess.run(["fusermount3", "-uz", str(work / "mnt")], capture_output=True)
            shutil.rmtree(work, ignore_errors=True)
    report(size, results, args.json)


def report(size: int, results: dict[str, dict[str, Any]], as_json: bool) -> None:
    base = results["export raw"]["seconds"]
    for row in results.values():
        row["mib_per_s"] = size / MiB / row["seconds"]
        row["ratio_to_export"] = base / row["seconds"]
    if as_json:
        print(json.dumps({"size": size, "results": results}, indent=2))
        return
    print(f"disk {size // MiB} MiB (half allocated); throughput = disk size / wall time")
    print(f"{'way':<16} {'seconds':>8} {'MiB/s':>8} {'vs export':>10}  bytes")
    for name, row in results.items():
        same = {True: "equal", False: "DIFFERENT", None: "-"}[row.get("same")]
        print(f"{name:<16} {row['seconds']:8.2f} {row['mib_per_s']:8.0f} "
              f"{row['ratio_to_export']:9.2f}x  {same}")  # fmt: skip


if __name__ == "__main__":
    main()
