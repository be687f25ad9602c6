"""File restore benchmark (issue 16): get one 1 MiB file out of a big, mostly allocated disk
with `vmkeep files get`, next to the way without file restore (`vmkeep restore` of the whole
VM, then `debugfs` to pull the file out of the restored image). Prints the bytes file restore
fetched from the repository next to the disk size (target: under 1 %), and both times.

The disk is a whole-disk ext4 holding the 1 MiB file among a few others; every 4 MiB of it
is made allocated, quickly, by writing 4 KiB of random bytes into a free block of each 4 MiB
(free blocks from dumpe2fs, so the file system stays consistent): the backup holds a data
chunk for every chunk of the disk, as for a disk in use, without writing the disk in full.

    python bench/filerestore.py [--size-gib 16] [--workdir DIR] [--json] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

MiB, GiB = 1 << 20, 1 << 30
CHUNK = 4 * MiB
VMKEEP = str(Path(sys.executable).with_name("vmkeep"))
TARGET = "/data/wanted.bin"


def big_size(disk: int) -> int:
    """The big file: 256 MiB, or a quarter of a small disk."""
    return min(256 * MiB, disk // 4 // MiB * MiB)


def sh(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed: {done.stderr[-2000:]}")
    return done.stdout


def free_ranges(image: Path) -> list[tuple[int, int]]:
    """(first block, last block) of every free range, from dumpe2fs."""
    out = sh("dumpe2fs", str(image))
    ranges = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Free blocks:"):
            for item in re.findall(r"(\d+)(?:-(\d+))?", line.split(":", 1)[1]):
                first = int(item[0])
                ranges.append((first, int(item[1] or first)))
    return ranges


def make_disk(work: Path, size: int) -> tuple[Path, bytes]:
    tree = work / "tree"
    (tree / "data").mkdir(parents=True)
    wanted = os.urandom(MiB)
    (tree / "data" / "wanted.bin").write_bytes(wanted)
    for i in range(8):
        (tree / "data" / f"other{i}.bin").write_bytes(os.urandom(256 * 1024))
    with open(tree / "data" / "big.bin", "wb") as f:  # for get's streaming throughput
        for _ in range(big_size(size) // MiB):
            f.write(os.urandom(MiB))
    vm = work / "vm"
    vm.mkdir()
    image = vm / "disk0.img"
    with open(image, "wb") as f:
        f.truncate(size)
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(tree), str(image))
    block = 4096
    per_chunk: dict[int, int] = {}
    for first, last in free_ranges(image):
        b = first
        while b <= last:
            chunk = b * block // CHUNK
            per_chunk.setdefault(chunk, b)
            b = (chunk + 1) * CHUNK // block
    with open(image, "r+b") as f:
        for b in per_chunk.values():
            f.seek(b * block)
            f.write(os.urandom(block))
    doc = {
        "name": "bench-fr",
        "uuid": str(uuid.uuid4()),
        "vcpus": 1,
        "memory_mib": 64,
        "metadata": {},
        "disks": [{"name": "disk0", "file": "disk0.img", "format": "raw"}],
    }
    (vm / "vm.json").write_text(json.dumps(doc))
    return vm, wanted


def vmkeep(env: dict[str, str], *args: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(sh(VMKEEP, *args, "--json", env=env))
    return out


def run(size: int, work: Path) -> dict[str, Any]:
    env = dict(
        os.environ,
        VMKEEP_CONFIG_DIR=str(work / "config"),
        VMKEEP_DATA_DIR=str(work / "data"),
        VMKEEP_PASSPHRASE="bench",
    )
    start = time.monotonic()
    vm, wanted = make_disk(work, size)
    made = time.monotonic() - start
    repo = str(work / "repo")
    sh(VMKEEP, "init", repo, env=env)
    start = time.monotonic()
    point = vmkeep(env, "backup", str(vm), "--remote", repo)["restore_point"]
    backup_s = time.monotonic() - start
    expected = hashlib.sha256(wanted).hexdigest()

    start = time.monotonic()
    got = vmkeep(
        env, "files", "get", point, "disk0", TARGET, "--to", str(work / "got"), "--remote", repo
    )
    get_s = time.monotonic() - start
    get_ok = hashlib.sha256((work / "got" / "wanted.bin").read_bytes()).hexdigest() == expected

    start = time.monotonic()
    big = vmkeep(
        env,
        "files",
        "get",
        point,
        "disk0",
        "/data/big.bin",
        "--to",
        str(work / "big"),
        "--remote",
        repo,
    )
    big_s = time.monotonic() - start
    assert big["bytes"] == big_size(size)
    shutil.rmtree(work / "big")

    start = time.monotonic()
    (work / "restored").mkdir()
    vmkeep(env, "restore", point, "--to", str(work / "restored"), "--name", "r", "--remote", repo)
    restored = work / "restored" / "r" / "disk0.img"
    restore_s = time.monotonic() - start
    start = time.monotonic()
    sh("debugfs", "-R", f"dump {TARGET} {work / 'dumped.bin'}", str(restored))
    debugfs_s = time.monotonic() - start
    dump_ok = hashlib.sha256((work / "dumped.bin").read_bytes()).hexdigest() == expected
    return {
        "disk_size": size,
        "disk_chunks": -(-size // CHUNK),
        "make_disk_s": round(made, 2),
        "backup_s": round(backup_s, 2),
        "files_get": {
            "seconds": round(get_s, 2),
            "fetched_chunks": got["fetched_chunks"],
            "fetched_blocks": got.get("fetched_blocks", 0),  # format 3's small reads
            "fetched_bytes": got["fetched_bytes"],
            "fetched_percent_of_disk": round(100 * got["fetched_bytes"] / size, 4),
            "ok": get_ok,
        },
        "files_get_big": {
            "bytes": big_size(size),
            "seconds": round(big_s, 2),
            "mib_per_s": round(big_size(size) / MiB / big_s, 1),
        },
        "restore_then_debugfs": {
            "seconds": round(restore_s + debugfs_s, 2),
            "restore_s": round(restore_s, 2),
            "debugfs_s": round(debugfs_s, 2),
            "restore_mib_per_s": round(size / MiB / restore_s, 1),
            "ok": dump_ok,
        },
        "speedup": round((restore_s + debugfs_s) / get_s, 1) if get_s else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=float, default=16)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    for tool in ("mkfs.ext4", "dumpe2fs", "debugfs"):
        if shutil.which(tool) is None:
            raise SystemExit(f"needs {tool} (e2fsprogs)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vmkeep-bench-fr-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run(int(args.size_gib * GiB), work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    g, r = result["files_get"], result["restore_then_debugfs"]
    size = result["disk_size"] / GiB
    print(f"disk {size:.2f} GiB ({result['disk_chunks']} chunks, all allocated)")
    print(f"backup {result['backup_s']} s")
    fetched = f"{g['fetched_chunks']} chunks and {g['fetched_blocks']} blocks"
    print(f"files get of 1 MiB: {g['seconds']} s, fetched {fetched}")
    print(f"  = {g['fetched_bytes'] / MiB:.1f} MiB = {g['fetched_percent_of_disk']} % of the disk")
    print(f"restore + debugfs:  {r['seconds']} s (restore {r['restore_s']} s)")
    b = result["files_get_big"]
    print(f"files get of {b['bytes'] // MiB} MiB: {b['seconds']} s = {b['mib_per_s']} MiB/s")
    print(f"  (whole-disk restore: {r['restore_mib_per_s']} MiB/s of disk, holes included)")
    print(f"ratio: files get {result['speedup']}x faster; same bytes: {g['ok'] and r['ok']}")


if __name__ == "__main__":
    main()
