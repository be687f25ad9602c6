"""Peak RSS and time of a backup (and a restore) of a very large disk, without its disk space
(issue 15: "peak RSS < 300 MiB for any disk size"; docs/DATA-PATH.md, "Memory of a backup").

    .venv/bin/python bench/huge_disk.py --size-gib 1024 [--restore] [--workdir DIR] [--json]

A FUSE file system (mfusepy, in a child process) serves a raw image of the asked size whose
every 64 KiB block is different: its offset and a seed are written at its start, the rest is
zeros. So the blob index, the blobs the backup adds, the pack writer and the manifest's chunk
table see as many distinct blocks as a disk full of real data would give them, while zstd has
little to do and nothing of the image is on disk (its bytes are made on each read). The real
CLI backs it up into a new encrypted format 3 repository on a local directory; the peak RSS is
the process's, from wait4. The repository takes ~0.3% of the size (2.7 GiB for 1 TiB: a block
compresses to a few dozen bytes, and its index entries and the local index cache add as much),
and a 1 TiB backup ran ~15 minutes on 2 cores.

`--restore` restores the point into the workdir and compares 512 blocks at random offsets and
the file's size with the generator (a restore writes only the first 4 KiB page of each block:
the rest are holes, ~1/16 of the size on disk). Each step's line gives its wall time, CPU time
and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from core import MARKER, PASSPHRASE, Run, last_line, prepare_workdir, run  # noqa: E402

GiB = 1 << 30
BLOCK = 64 << 10
HEADER = struct.Struct(">QQ")  # the block's offset, the seed
SEED = 15
NAME = "disk0.img"
PEAK_MIB = 300  # the line


def content(offset: int, size: int, seed: int = SEED) -> bytes:
    """The image's bytes at [offset, offset + size)."""
    buf = bytearray(size)
    end = offset + size
    for block in range(-(-offset // BLOCK) * BLOCK, end, BLOCK):
        head = HEADER.pack(block, seed)[: end - block]
        buf[block - offset : block - offset + len(head)] = head
    return bytes(buf)


def serve(mountpoint: str, size: int) -> None:
    """The FUSE file system: `/disk0.img`, read-only, `size` bytes (until unmounted)."""
    import errno

    import mfusepy

    now = time.time_ns()

    class Generated(mfusepy.Operations):  # type: ignore[misc]
        use_ns = True

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            times = {"st_atime": now, "st_mtime": now, "st_ctime": now}
            if path == "/":
                return dict(st_mode=stat.S_IFDIR | 0o555, st_nlink=2, **times)
            if path == "/" + NAME:
                return dict(st_mode=stat.S_IFREG | 0o444, st_nlink=1, st_size=size, **times)
            raise mfusepy.FuseOSError(errno.ENOENT)

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", NAME]

        def read(self, path: str, length: int, offset: int, fh: int) -> bytes:
            return content(offset, max(0, min(length, size - offset)))

    mfusepy.FUSE(
        Generated(), mountpoint, foreground=True, ro=True, kernel_cache=True,
        max_threads=4, max_idle_threads=4,
    )  # fmt: skip


def start_fuse(mountpoint: Path, size: int) -> subprocess.Popen[bytes]:
    mountpoint.mkdir()
    argv = [sys.executable, __file__, "--serve", str(mountpoint), "--size", str(size)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not (mountpoint / NAME).exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the FUSE file system did not come up (is /dev/fuse there?)")
        time.sleep(0.1)
    return proc


def stop_fuse(mountpoint: Path, proc: subprocess.Popen[bytes]) -> None:
    subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def repo_dir(work: Path, size: int, say: Any) -> tuple[Path, Path | None]:
    """Where the repository goes. The CLI refuses a first backup when its remote has less
    free space than a tenth of the data (backup.check_capacity), though this one stores far
    less: on a machine without that room (and as root) the repository goes on a sparse
    file system on a loop device, which reports the room without taking it."""
    need = size // 10 + 8 * GiB
    if shutil.disk_usage(work).free >= need:
        return work / "repo", None
    if os.geteuid() != 0:
        raise SystemExit(f"the CLI wants {need // GiB} GiB free for the repository: run as root")
    image, mnt = work / "repo.ext4", work / "repo-fs"
    with open(image, "wb") as f:
        f.truncate(need)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    say(f"repository on a sparse {need // GiB} GiB ext4 on a loop device")
    return mnt / "repo", mnt


def write_vm(vm: Path, image: Path) -> None:
    vm.mkdir()
    (vm / NAME).symlink_to(image)
    doc = {
        "name": "huge",
        "uuid": "5e1c0a4e-0000-4000-8000-000000001024",
        "vcpus": 2,
        "memory_mib": 2048,
        "disks": [{"name": "disk0", "file": NAME, "format": "raw", "outside": True}],
        "metadata": {},
    }
    (vm / "vm.json").write_text(json.dumps(doc))


def step(name: str, argv: list[str], env: dict[str, str], say: Any) -> Run:
    r = run(argv, env)
    if r.returncode:
        raise SystemExit(f"{name} failed (exit {r.returncode}): {last_line(r.stderr)}")
    say(f"{name}: {r.seconds:.1f} s, {r.cpu_seconds:.1f} CPU-s, peak RSS {r.rss_mib:.0f} MiB")
    return r


def check_restore(path: Path, size: int) -> int:
    """Blocks compared at random offsets (a mismatch ends the benchmark)."""
    if path.stat().st_size != size:
        raise SystemExit(f"restored size {path.stat().st_size}, expected {size}")
    rng = random.Random(size)
    with open(path, "rb") as f:
        for _ in range(512):
            offset = rng.randrange(size // BLOCK) * BLOCK
            f.seek(offset)
            if f.read(BLOCK) != content(offset, BLOCK):
                raise SystemExit(f"restored block at {offset} differs from the generator's")
    return 512


def bench(work: Path, size: int, restore: bool, say: Any) -> dict[str, Any]:
    vmkeep = str(Path(sys.executable).with_name("vmkeep"))
    env = dict(os.environ, VMKEEP_PASSPHRASE=PASSPHRASE, VMKEEP_CONFIG_DIR=str(work / "config"))
    env.pop("VMKEEP_DEBUG", None)
    mountpoint = work / "fuse"
    fuse = start_fuse(mountpoint, size)
    out: dict[str, Any] = {"size_gib": size / GiB, "blocks": size // BLOCK, "steps": {}}
    loop = None
    try:
        write_vm(work / "vm", mountpoint / NAME)
        where, loop = repo_dir(work, size, say)
        repo = str(where)
        step("init", [vmkeep, "init", repo, "--format", "3"], env, say)
        argv = [vmkeep, "backup", str(work / "vm"), "--remote", repo, "--json"]
        r = step("backup", argv, env, say)
        report = json.loads(r.stdout)
        out["steps"]["backup"] = r.summary(size)
        out["bytes_read"] = report["bytes_read"]
        out["bytes_written"] = report["bytes_written"]
        read, stored = report["bytes_read"] / GiB, report["bytes_written"] / GiB
        say(f"read {read:.1f} GiB, stored {stored:.2f} GiB")
        if restore:
            target = work / "restored"
            target.mkdir()
            point = str(report["restore_point"])
            argv = [vmkeep, "restore", point, "--remote", repo, "--to", str(target), "--json"]
            r = step("restore", argv, env, say)
            out["steps"]["restore"] = r.summary(size)
            location = Path(json.loads(r.stdout)["location"])
            out["blocks_compared"] = check_restore(location / NAME, size)
            say(f"restore: {out['blocks_compared']} blocks at random offsets equal the generator's")
        out["repository_bytes"] = sum(f.stat().st_size for f in where.rglob("*") if f.is_file())
        say(f"repository: {out['repository_bytes'] / GiB:.2f} GiB")
    finally:
        stop_fuse(mountpoint, fuse)
        if loop is not None:
            subprocess.run(["umount", str(loop)], check=False)
    peaks = [s["peak_rss_mib"] for s in out["steps"].values()]
    out["under_line"] = max(peaks) < PEAK_MIB
    say(f"peak RSS {'under' if out['under_line'] else 'OVER'} {PEAK_MIB} MiB: {max(peaks):.0f}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=float, default=64)
    p.add_argument("--restore", action="store_true", help="restore too (needs ~1/16 of the size)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/vmkeep-bench-huge"))
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    p.add_argument("--json", action="store_true")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.size)
        return 0
    size = int(args.size_gib * GiB) // BLOCK * BLOCK
    prepare_workdir(args.workdir)
    say = (lambda _: None) if args.json else (lambda line: print(line, flush=True))
    try:
        result = bench(args.workdir, size, args.restore, say)
    finally:
        if not args.keep and (args.workdir / MARKER).exists():
            shutil.rmtree(args.workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    return 0 if result["under_line"] else 1


if __name__ == "__main__":
    sys.exit(main())
