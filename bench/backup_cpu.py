"""CPU of a full backup, in process, by stage: the write side of the data path without the
CLI's start-up, libvirt or NBD (docs/DATA-PATH.md, "CPU per block of a format 3 backup").

    .venv/bin/python bench/backup_cpu.py [--size-gib 4] [--rounds 3] [--variants v3,v1]
                                         [--src A=DIR,B=DIR] [--stages] [--workdir DIR]

The image is bench/image.py's (half of it allocated, half of that OS binaries, half random),
built once in the workdir and kept in the page cache. Each round is its own process: a fresh
encrypted repository on a local directory (key derived before the clock starts), then one
`backup_vm` through the files connector, measured as the process's CPU (user + sys,
getrusage) and wall time between the call and its return; the repository is deleted after.
Rounds alternate between the variants (formats) and the source trees of `--src` (another
checkout's `src`, e.g. main's, for an A/B of a change), so load drifts hit both sides.

`--stages` wraps the write path's functions with thread-CPU counters (time.thread_time
around each call; ~1 us each, so the total grows a little): hashing (block IDs), the
chunk's probe, dedup lookups, encoding (zstd + AES-GCM), the packer's add, the pack upload,
the index adds and the reads. A stage missing from a source tree is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
GiB = 1 << 30
PASSPHRASE = b"bench"
VARIANTS = {"v3": {"format_version": 3}, "v1": {"format_version": 1}}


def build(workdir: Path, size: int, seed: int) -> Path:
    """The VM directory with its image (reused when its size and seed match)."""
    sys.path.insert(0, str(HERE))
    from image import build_image

    vm = workdir / "vm"
    stamp = vm / "built"
    if stamp.exists() and stamp.read_text() == f"{size} {seed}":
        return vm
    shutil.rmtree(vm, ignore_errors=True)
    vm.mkdir(parents=True)
    doc = {
        "name": "bench",
        "uuid": "5e1c0a4e-0000-4000-8000-000000000015",
        "vcpus": 2,
        "memory_mib": 2048,
        "disks": [{"name": "disk0", "file": "disk0.img", "format": "raw"}],
        "metadata": {},
    }
    (vm / "vm.json").write_text(json.dumps(doc))
    build_image(str(vm / "disk0.img"), size, seed)
    stamp.write_text(f"{size} {seed}")
    return vm


class Stages:
    """Thread CPU-seconds and calls per wrapped function, summed over threads."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._local = threading.local()

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        if not hasattr(owner, attr):
            return
        inner: Callable[..., Any] = getattr(owner, attr)
        local = self._local

        def timed(*args: Any, **kwargs: Any) -> Any:
            # Exclusive time: a nested stage's CPU is its own, not its caller's too.
            stack: list[float] = local.__dict__.setdefault("stack", [])
            stack.append(0.0)
            start = time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                spent = time.thread_time() - start
                children = stack.pop()
                if stack:
                    stack[-1] += spent
                with self._lock:
                    self.cpu[name] += spent - children
                    self.calls[name] += 1

        setattr(owner, attr, timed)


def install_stages() -> Stages:
    from vmkeep.operations import backup, chunk_uploader
    from vmkeep.repository import blobs, chunks, crypto, pack_writer, packed_store, repository
    from vmkeep.repository.crypto import Sealer

    stages = Stages()
    stages.wrap(blobs.BlobCodec, "block_ids", "hash blocks")
    stages.wrap(blobs.BlobCodec, "recipe_id", "recipe id")
    stages.wrap(packed_store, "looks_incompressible", "chunk probe")
    stages.wrap(packed_store.PackedStore, "encode", "encode other")
    stages.wrap(pack_writer.PackWriter, "has", "lookup")
    stages.wrap(pack_writer.PackWriter, "missing", "lookup")
    stages.wrap(blobs, "compress_if_smaller", "zstd + probes")
    stages.wrap(blobs.BlobCodec, "encode_many", "encode loop")
    stages.wrap(Sealer, "seal_parts", "aes-gcm")
    stages.wrap(getattr(crypto, "DeferredSealed", None), "write_into", "aes-gcm")  # into a pack
    stages.wrap(pack_writer.PackWriter, "add", "packer add")
    stages.wrap(pack_writer.PackWriter, "_upload", "pack upload")
    stages.wrap(backup, "read_spans", "read")
    stages.wrap(chunk_uploader.ChunkUploader, "store", "uploader other")
    # Formats 1 and 2: one object per chunk.
    stages.wrap(Sealer, "chunk_id", "hash chunk (v1)")
    stages.wrap(chunks, "compress_if_smaller", "zstd + probes")
    stages.wrap(repository, "put_parts", "object put (v1)")
    return stages


def fresh_repository(workdir: Path, variant: str) -> Any:
    """A new encrypted repository in workdir/repo, with an empty cache (the child's)."""
    from vmkeep.remotes.local import LocalRemote
    from vmkeep.repository.repository import Repository

    shutil.rmtree(workdir / "repo", ignore_errors=True)
    shutil.rmtree(workdir / "cache", ignore_errors=True)
    return Repository.init(
        LocalRemote(str(workdir / "repo")), "aes-256-gcm", lambda: PASSPHRASE, **VARIANTS[variant]
    )


def one_round(variant: str, workdir: Path, stages_on: bool) -> dict[str, Any]:
    """One backup in this process (the child of `main`)."""
    os.environ["VMKEEP_CACHE_DIR"] = str(workdir / "cache")
    from vmkeep.connectors.files.connector import FilesConnector
    from vmkeep.operations.backup import BackupOptions, backup_vm
    from vmkeep.progress import SilentProgress

    stages = install_stages() if stages_on else None
    repo_dir = workdir / "repo"
    repo = fresh_repository(workdir, variant)
    before = resource.getrusage(resource.RUSAGE_SELF)
    began = time.monotonic()
    report = backup_vm(
        repo, FilesConnector(), str(workdir / "vm"), BackupOptions(mode="full"), SilentProgress()
    )
    wall = time.monotonic() - began
    after = resource.getrusage(resource.RUSAGE_SELF)
    stored = sum(p.stat().st_size for p in repo_dir.rglob("*") if p.is_file())
    shutil.rmtree(repo_dir, ignore_errors=True)
    return {
        "wall": wall,
        "user": after.ru_utime - before.ru_utime,
        "sys": after.ru_stime - before.ru_stime,
        "maxrss_mib": after.ru_maxrss / 1024,
        "written": report.stats.bytes_written,
        "stored": stored,
        "stages": dict(stages.cpu) if stages else {},
        "calls": dict(stages.calls) if stages else {},
    }


def core_round(
    variant: str, workdir: Path, stages_on: bool, chunks: int, prefill: int
) -> dict[str, Any]:
    """The write path alone, on one thread: `chunks` data chunks of the image read into
    memory first, then hashed, encoded, packed and uploaded as a backup's worker does
    (ChunkUploader.store), then flushed. No reads, threads or gate waits: far less noise
    than a whole backup, for effects of a few per cent. `prefill`: that many other chunks
    of the image (after those) stored first and the repository opened again, so that the
    dedup lookups of the measured chunks miss in a populated on-disk index."""
    os.environ["VMKEEP_CACHE_DIR"] = str(workdir / "cache")
    from vmkeep.operations.chunk_uploader import ChunkUploader
    from vmkeep.remotes.local import LocalRemote
    from vmkeep.repository.repository import Repository

    stages = install_stages() if stages_on else None
    repo_dir = workdir / "repo"
    repo = fresh_repository(workdir, variant)
    size = repo.chunk_size
    data: list[bytes] = []
    with open(workdir / "vm" / "disk0.img", "rb") as f:
        offset = 0
        while len(data) < chunks + prefill:
            piece = os.pread(f.fileno(), size, offset)
            if not piece:
                break
            offset += size
            if piece.count(0) != len(piece):
                data.append(piece)
    if prefill:
        with repo.writing():
            first = ChunkUploader(repo, set(), 1)
            for piece in data[chunks:]:
                first.store(piece)
            repo.flush_chunks()
        repo = Repository.open(LocalRemote(str(repo_dir)), lambda: PASSPHRASE)
        repo.has_chunk(bytes(32))  # the index is read before the clock starts
        data = data[:chunks]
    uploader = ChunkUploader(repo, set(), 1)  # the default level (BackupOptions)
    before = resource.getrusage(resource.RUSAGE_SELF)
    began = time.monotonic()
    written = 0
    with repo.writing():
        for piece in data:
            written += uploader.store(piece)[1].bytes_written
        repo.flush_chunks()
    wall = time.monotonic() - began
    after = resource.getrusage(resource.RUSAGE_SELF)
    shutil.rmtree(repo_dir, ignore_errors=True)
    return {
        "wall": wall,
        "user": after.ru_utime - before.ru_utime,
        "sys": after.ru_stime - before.ru_stime,
        "written": written,
        "stored": 0,
        "stages": dict(stages.cpu) if stages else {},
        "calls": dict(stages.calls) if stages else {},
    }


def child(args: argparse.Namespace) -> int:
    from vmkeep.malloc_tuning import reuse_chunk_buffers

    reuse_chunk_buffers()  # as the CLI does (interfaces/cli/app.py)
    if args.core:
        result = core_round(args.child, Path(args.workdir), args.stages, args.core, args.prefill)
    else:
        result = one_round(args.child, Path(args.workdir), args.stages)
    print(json.dumps(result))
    return 0


def run_child(src: Path, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(src))
    argv = [sys.executable, __file__, "--child", variant, "--workdir", args.workdir]
    argv += ["--stages"] if args.stages else []
    argv += ["--core", str(args.core), "--prefill", str(args.prefill)] if args.core else []
    out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=4)
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default="v3")
    parser.add_argument("--src", default="", help="LABEL=DIR,... source trees to alternate")
    parser.add_argument("--stages", action="store_true")
    parser.add_argument("--workdir", default="/tmp/vmkeep-backup-cpu")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--core", type=int, default=0, help="N: only the write path, one thread, N chunks"
    )
    parser.add_argument("--prefill", type=int, default=0, help="with --core: N chunks first")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    build(work, int(args.size_gib * GiB), args.seed)
    srcs = dict(s.split("=", 1) for s in args.src.split(",") if s) or {"this": str(SRC)}
    sides = [(label, Path(d), v) for v in args.variants.split(",") for label, d in srcs.items()]
    results: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in range(args.rounds):
        for label, src, variant in sides:
            res = run_child(src, variant, args)
            key = f"{variant}/{label}"
            results[key].append(res)
            cpu = res["user"] + res["sys"]
            print(
                f"round {r + 1} {key}: {cpu:.2f} CPU-s (user {res['user']:.2f}, sys "
                f"{res['sys']:.2f}), wall {res['wall']:.2f} s, written {res['written']}, "
                f"peak RSS {res.get('maxrss_mib', 0):.0f} MiB, "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    report(results, args.json)
    return 0


def report(results: dict[str, list[dict[str, Any]]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(results))
        return
    for key, runs in results.items():
        cpus = sorted(r["user"] + r["sys"] for r in runs)
        print(
            f"{key}: CPU-s min {cpus[0]:.3f} median {statistics.median(cpus):.3f} "
            f"({', '.join(f'{c:.2f}' for c in cpus)}); written {runs[0]['written']}"
        )
        names = sorted({n for r in runs for n in r["stages"]})
        for name in names:
            vals = [r["stages"].get(name, 0.0) for r in runs]
            calls = runs[0]["calls"].get(name, 0)
            per = min(vals) / calls * 1e6 if calls else 0.0
            print(f"   {name:18s} min {min(vals):.3f} s  {calls} calls  {per:.1f} us/call")


if __name__ == "__main__":
    sys.exit(main())
