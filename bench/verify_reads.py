"""What `verify` reads from a format 3 repository with many packs: requests and bytes by
object kind (a counting wrapper around the local remote), wall and CPU time.

    .venv/bin/python bench/verify_reads.py [--points 48] [--chunks 8] [--chunk-kib 512]
        [--pack-mib 1]

(a realistic layout: --points 4 --chunks 60 --chunk-kib 4096 --pack-mib 16, 64 KiB blocks
in 4 MiB chunks). `--remote URL` (e.g. an S3 URL, keys in the environment as for vmkeep)
builds into and verifies that remote instead of a local directory.

Each point is one flush of its own chunks (random data: a data pack and a recipe pack per
point at 1 MiB packs) plus one chunk shared by all, the way successive backups leave
their recipes in a recipe pack each. The repository is built once; verify runs on it with
the sources on PYTHONPATH (run it from two checkouts to compare).
"""

from __future__ import annotations

import argparse
import random
import resource
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from vmkeep.progress import SilentProgress
from vmkeep.remotes.base import Remote
from vmkeep.remotes.location import open_remote
from vmkeep.repository.manifest import DiskIndex, Manifest, new_point_id
from vmkeep.repository.repository import Repository
from vmkeep.repository.verify import verify

PASSPHRASE = b"bench verify reads"


class ByteCounter:
    """Every call goes to the real remote; GETs are counted by top directory, with bytes."""

    def __init__(self, inner: Remote) -> None:
        self.inner = inner
        self.url = inner.url
        self.pack_size = 1 << 20  # a longer read from offset 0 is get_bounded's (whole)
        self.gets: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self._lock = threading.Lock()

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        data = self.inner.get(name, offset, length)
        whole = offset == 0 and (length is None or length > self.pack_size)  # get_bounded's read
        kind = name.split("/", 1)[0] + (" whole" if whole else " ranged")
        with self._lock:
            self.gets[kind] += 1
            self.bytes[kind] += len(data)
        return data

    def get_direct(self, name: str, offset: int, into: memoryview) -> memoryview | None:
        """A local remote's O_DIRECT read (only tried where its URL is a local directory)."""
        got: memoryview | None = self.inner.get_direct(name, offset, into)  # type: ignore[attr-defined]
        with self._lock:
            self.gets[name.split("/", 1)[0] + " direct"] += 1
            self.bytes[name.split("/", 1)[0] + " direct"] += len(got) if got is not None else 0
        return got

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def build(remote: Remote, points: int, chunks: int, chunk_kib: int, pack_size: int) -> None:
    repo = Repository.init(
        remote,
        "aes-256-gcm",
        lambda: PASSPHRASE,
        format_version=3,
        pack_size=pack_size,
    )
    rng = random.Random(7)
    shared = rng.randbytes(chunk_kib << 10)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for p in range(points):
        ids = []
        for data in [shared] + [rng.randbytes(chunk_kib << 10) for _ in range(chunks)]:
            chunk_id = repo.chunk_id(data)
            repo.put_chunk(chunk_id, data, 1)
            ids.append(chunk_id)
        repo.flush_chunks()
        when = start + timedelta(hours=p)
        size = len(ids) * repo.chunk_size
        disk = DiskIndex("disk0", size, "raw", b"".join(ids), chunk_size=repo.chunk_size)
        repo.save_manifest(
            Manifest(
                id=new_point_id(when),
                vm={"name": "v", "uuid": "u"},
                disks=[disk],
                mode="full",
                created=when,
                finished=when,
                schedule="",
                stats={"bytes_read": size, "bytes_new": 1, "bytes_written": 1},
            )
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=48)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--chunk-kib", type=int, default=512)
    ap.add_argument("--pack-mib", type=int, default=1)
    ap.add_argument("--repo", type=Path, help="reuse (or build once into) this directory")
    ap.add_argument("--remote", help="reuse (or build once into) this remote URL")
    args = ap.parse_args()
    root = args.remote or str(args.repo or Path(tempfile.mkdtemp(prefix="verify-reads-")) / "repo")
    if open_remote(root).stat("config") is None:
        build(open_remote(root), args.points, args.chunks, args.chunk_kib, args.pack_mib << 20)
    packs = sum(1 for o in open_remote(root).list("packs/") if not o.name.endswith("/"))
    remote = ByteCounter(open_remote(root))
    repo = Repository.open(remote, lambda: PASSPHRASE)  # type: ignore[arg-type]
    if repo.packed is not None:
        remote.pack_size = repo.packed.pack_size
    cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    report = verify(repo, None, SilentProgress())
    cpu1, wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - wall0
    user, system = cpu1.ru_utime - cpu0.ru_utime, cpu1.ru_stime - cpu0.ru_stime
    assert report.ok, report.to_json()
    print(f"repository {root}: {packs} packs, {report.chunks_checked} chunks checked")
    for kind in sorted(remote.gets):
        mib = remote.bytes[kind] / 2**20
        print(f"  GET {kind:>16}: {remote.gets[kind]:6d} requests {mib:9.1f} MiB")
    total = sum(remote.gets.values())
    rss = cpu1.ru_maxrss / 1024
    print(
        f"  verify: {total} GETs, {wall:.2f} s wall, {user + system:.2f} CPU-s "
        f"({user:.2f} user, {system:.2f} system), peak RSS {rss:.0f} MiB"
    )


if __name__ == "__main__":
    main()
