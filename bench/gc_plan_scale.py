"""gc planning memory: tests/repository/pack_plan_reference.plan_from (a set of every live
blob, every live entry per pack and every pack's size in memory, as gc did before) against
pack_plan.stream_plan (live keys, the pack listing and per-pack tallies external-sorted by
live_set.LiveKeys, merge-joined with the index's sorted entries) over synthetic entries.

    .venv/bin/python bench/gc_plan_scale.py [--blobs 1000000,4000000] [--live 0.7] [--per-pack 256]

No repository: the index entries and live keys are generated (IDs in key order, live keys
added in a scattered order, as recipes name blocks); each mode runs as its own process and
reports wall time, CPU time and peak RSS (os.wait4). `--per-pack 4` makes a pack per 4 blobs:
the per-pack state shows at 100,000s of packs.

    .venv/bin/python bench/gc_plan_scale.py --real 1000000,4000000 [--src OTHER/src]

`--real` measures the real `vmkeep gc` instead (this checkout's sources, and with `--src`
another checkout's, e.g. main's from `git archive main src`; `--dry-run` runs `gc
--dry-run`). The repository is synthetic but real: an encrypted format 3 repository on a
local directory (`--disk-chunks N`: a copy of it whose points are re-saved as points of at
most N chunks) whose chunks each have `--blocks` (default 64; 1 for many chunks and
recipes, the mark's load) distinct blocks of `--block-bytes` (default 16; random past a
16-byte counter: real blobs in real 16 MiB packs, each sealed, recipes naming them, so gc
marks, repacks and authenticates as it would at scale without storing terabytes). Chunks
are spread over restore points so that once the first point is gone (never saved) the first
half of the packs keeps 3/4 of its blobs (kept, its index rewritten) and the second half 1/4
(repacked): about half of the blobs live. The index cache is built once; each gc runs on
fresh copies of the repository and cache (wall, CPU, peak RSS). `--verify` runs `vmkeep
verify --json` instead (every chunk read and checked: its memory, docs/SCALE.md §4).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the reference plan in tests/

from tests.repository.pack_plan_reference import plan_from

from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.blobs import KIND_BLOCK
from vmkeep.repository.live_set import LiveKeys, live_key
from vmkeep.repository.manifest import DiskIndex, Manifest, new_point_id
from vmkeep.repository.pack_gc import LISTED_BUFFER, LIVE_BUFFER
from vmkeep.repository.pack_plan import DELETE, KEEP, LISTED, REPACK, listing, stream_plan
from vmkeep.repository.pack_tally import TALLY, TALLY_BUFFER
from vmkeep.repository.packs import BlobEntry
from vmkeep.repository.repository import Repository

PER_PACK = 256  # 64 KiB blocks in a 16 MiB pack
LENGTH = 65_000


def blob_id(i: int) -> bytes:
    return (i * 7919).to_bytes(32, "big")  # ascending with i: the index's key order


def pack_of(i: int, per_pack: int) -> bytes:
    """Pack IDs scattered (as hashes are), so that the index's key order visits them at random."""
    return ((i // per_pack) * 0x9E3779B97F4A7C15 % (1 << 64)).to_bytes(32, "big")


def entries(n: int, per_pack: int = PER_PACK) -> Iterator[BlobEntry]:
    for i in range(n):
        pack = pack_of(i, per_pack)
        yield BlobEntry(KIND_BLOCK, blob_id(i), pack, (i % per_pack) * LENGTH, LENGTH)


def is_live(i: int, share: float, per_pack: int = PER_PACK) -> bool:
    fate = (i // per_pack) % 10  # packs past the live share: dead; odd: 2/3 live; even: 1/4
    return fate < share * 10 and (i % 3 != 0 if fate % 2 else i % 4 == 0)


def run_one(mode: str, n: int, share: float, per_pack: int = PER_PACK) -> None:
    packs = (pack_of(p * per_pack, per_pack) for p in range((n + per_pack - 1) // per_pack))
    order = (i * 1_000_003 % n for i in range(n))  # every i once, scattered
    if mode == "memory":  # what gc did before: a dict of every pack's size, a set of live keys
        sizes = dict.fromkeys(packs, per_pack * LENGTH)
        live = {(KIND_BLOCK, blob_id(i)) for i in order if is_live(i, share, per_pack)}
        plan = plan_from(sizes, entries(n, per_pack), live, per_pack * LENGTH)
        counts = len(plan.keep), len(plan.repack), len(plan.delete)
    else:  # gc's: the listing, live keys and per-pack tallies external-sorted
        parent = Path(tempfile.gettempdir())
        with (
            LiveKeys(parent, LIVE_BUFFER) as keys,
            LiveKeys(parent, LISTED_BUFFER, LISTED.size) as listed,
            LiveKeys(parent, TALLY_BUFFER, TALLY.size) as tallies,
        ):
            listed.add_many(listing(p, per_pack * LENGTH) for p in packs)
            live = (i for i in order if is_live(i, share, per_pack))
            keys.add_many(live_key(KIND_BLOCK, blob_id(i)) for i in live)
            ids = keys.sorted_unique()
            rows = listed.dir / "plan"
            got = stream_plan(rows, listed, tallies, entries(n, per_pack), ids, per_pack * LENGTH)
            got.apply_locks(lambda: lambda _: False)
            fates = Counter(f.fate for f in got.fates())
        counts = fates[KEEP], fates[REPACK], fates[DELETE]
    print(f"keep/repack/delete {counts}", file=sys.stderr)


PASSPHRASE = "bench-passphrase-not-secret"
BLOCKS = 64  # per chunk: a 4 MiB chunk of 64 KiB blocks


def point_of(i: int, chunks: int) -> int:
    """Which of 4 points references chunk i (point 0 is never saved: garbage)."""
    if i < chunks // 2:
        return i % 4  # 3/4 live: kept packs
    return 0 if i % 4 else 1 + (i // 4) % 3  # 1/4 live: repacked packs


def build(root: Path, blobs: int, block_bytes: int = 16, blocks: int = BLOCKS) -> None:
    """The synthetic repository at root/repo, its index cache at root/cache."""
    os.environ["VMKEEP_CACHE_DIR"] = str(root / "cache")
    repo = Repository.init(
        LocalRemote(root / "repo"), "aes-256-gcm", lambda: PASSPHRASE.encode(), format_version=3
    )
    store = repo.packed
    assert store is not None
    codec = store.codec
    chunks = blobs // (blocks + 1)
    points: list[list[bytes]] = [[], [], [], []]
    for i in range(chunks):
        pad = os.urandom(max(0, block_bytes - 16) * blocks)  # random: as large encoded
        step = max(0, block_bytes - 16)
        plains = [struct.pack("<QQ", i, k) + pad[k * step : (k + 1) * step] for k in range(blocks)]
        ids = [store.sealer.chunk_id(p) for p in plains]
        # one block: its true length, so that the chunk also verifies (gc reads no data)
        length = block_bytes if blocks == 1 else blocks * codec.block_size
        recipe = codec.recipe(length, ids)
        chunk_id = codec.recipe_id(recipe)
        store.store(chunk_id, store.pack_chunk(chunk_id, recipe, zip(ids, plains, strict=True), 0))
        points[point_of(i, chunks)].append(chunk_id)
    store.flush()
    when = datetime(2026, 1, 1, tzinfo=UTC)
    for n, ids in enumerate(points[1:]):
        at = when + timedelta(hours=n)
        size = len(ids) * repo.chunk_size
        repo.save_manifest(
            Manifest(
                id=new_point_id(at),
                vm={"name": f"vm{n}", "uuid": f"uuid-{n}", "metadata": {}},
                disks=[DiskIndex("disk0", size, "raw", b"".join(ids), chunk_size=repo.chunk_size)],
                mode="full",
                created=at,
                finished=at + timedelta(seconds=1),
                stats={"bytes_read": size, "bytes_new": 1, "bytes_written": 1},
            )
        )
    store.reload()  # the index cache built: each gc starts warm


def resplit(base: Path, root: Path, disk_chunks: int) -> None:
    """A copy of base's repository whose points are re-saved as points of at most
    `disk_chunks` chunks each (a 100 GiB disk is 25,600 chunks of 4 MiB): the same blobs
    and garbage, manifests of a realistic size, so that the manifests gc reads in flight
    do not hide what grows with the number of chunks."""
    shutil.copytree(base / "repo", root / "repo")
    shutil.copytree(base / "cache", root / "cache")
    os.environ["VMKEEP_CACHE_DIR"] = str(root / "cache")
    repo = Repository.open(LocalRemote(root / "repo"), lambda: PASSPHRASE.encode())
    for n, point_id in enumerate(sorted(repo.point_ids())):
        ids = b"".join(c for _, c in repo.load_manifest(point_id).disks[0].entries())
        repo.delete_manifest(point_id)
        per = disk_chunks * 32
        for k in range(0, len(ids), per):
            at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=n, seconds=k // per)
            part = ids[k : k + per]
            size = len(part) // 32 * repo.chunk_size
            repo.save_manifest(
                Manifest(
                    id=new_point_id(at),
                    vm={"name": f"vm{n}-{k // per}", "uuid": f"uuid-{n}-{k}", "metadata": {}},
                    disks=[DiskIndex("disk0", size, "raw", part, chunk_size=repo.chunk_size)],
                    mode="full",
                    created=at,
                    finished=at + timedelta(seconds=1),
                    stats={"bytes_read": size, "bytes_new": 1, "bytes_written": 1},
                )
            )


def real_gc(root: Path, src: Path, label: str, dry_run: bool = False, verify: bool = False) -> str:
    """One `vmkeep gc` (or `verify`) from `src` on copies of root's repository and cache."""
    run = root / f"run-{label}"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(root / "repo", run / "repo")
    shutil.copytree(root / "cache", run / "cache")
    env = dict(
        os.environ,
        PYTHONPATH=str(src),
        VMKEEP_CACHE_DIR=str(run / "cache"),
        VMKEEP_CONFIG_DIR=str(run / "config"),
        VMKEEP_DATA_DIR=str(run / "data"),
        VMKEEP_PASSPHRASE=PASSPHRASE,
    )
    code = "from vmkeep.interfaces.cli.app import main; import sys; sys.argv[0] = 'vmkeep'; main()"
    command = "verify" if verify else "gc"
    argv = [sys.executable, "-c", code, command, "--remote", str(run / "repo"), "--json"]
    argv += ["--dry-run"] if dry_run else []
    start = time.monotonic()
    with open(run / "out.json", "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    cpu = usage.ru_utime + usage.ru_stime
    err = proc.stderr.read().decode()[-300:] if proc.stderr else ""
    if status != 0:
        return f"exit {status}: {err}"
    got = json.loads((run / "out.json").read_text())
    shutil.rmtree(run, ignore_errors=True)
    if verify:
        return (
            f"{wall:7.1f} {cpu:7.1f} {usage.ru_maxrss / 1024:9.0f}  points {got['points_checked']}"
            f" chunks {got['chunks_checked']} bytes {got['bytes_checked']} ok {got['ok']}"
        )
    return (
        f"{wall:7.1f} {cpu:7.1f} {usage.ru_maxrss / 1024:9.0f}  chunks {got['chunks_kept']}"
        f" dead {got['chunks_deleted']} repacked {got['packs_repacked']}"
        f" written {got['packs_written']} index objects replaced {got['index_objects_replaced']}"
    )


def forked(fn: Any, *args: Any) -> None:
    """fn(*args) in a child process (its memory is not the measured process's)."""
    pid = os.fork()
    if pid == 0:
        try:
            fn(*args)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def built(root: Path, n: int, block_bytes: int, blocks: int) -> None:
    """The synthetic repository of `n` blobs at root, built unless it is there."""
    if (root / "repo" / "config").exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    began = time.monotonic()
    forked(build, root, n, block_bytes, blocks)
    print(f"# built {n} blobs in {time.monotonic() - began:.0f} s", flush=True)


def main_real(
    counts: list[int],
    src: Path | None,
    work: Path,
    skip_mine: bool,
    shape: tuple[int, int, bool, int],
    verify: bool = False,
) -> None:
    block_bytes, blocks, dry_run, disk_chunks = shape
    here = Path(__file__).resolve().parent.parent / "src"
    print(f"{'blobs':>10} {'src':>6} {'wall s':>7} {'cpu s':>7} {'peak MiB':>9}")
    for n in counts:
        root = work / (f"gc-{n}" if block_bytes == 16 else f"gc-{n}-{block_bytes}")
        root = root if blocks == BLOCKS else root.with_name(f"{root.name}-x{blocks}")
        if disk_chunks:  # the base repository first, then its re-saved copy
            base, root = root, root.with_name(f"{root.name}-d{disk_chunks}")
            built(base, n, block_bytes, blocks)
            if not (root / "repo" / "config").exists():
                shutil.rmtree(root, ignore_errors=True)
                forked(resplit, base, root, disk_chunks)
        else:
            built(root, n, block_bytes, blocks)
        mine = [] if skip_mine else [("branch", here)]
        for label, path in [*mine, *([("other", src)] if src else [])]:
            print(f"{n:>10} {label:>6} {real_gc(root, path, label, dry_run, verify)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blobs", default="1000000,4000000")
    ap.add_argument("--live", type=float, default=0.7)
    ap.add_argument("--per-pack", type=int, default=PER_PACK, help="blobs a synthetic pack")
    ap.add_argument("--modes", default="memory,stream", help="which plans to run")
    ap.add_argument("--real", help="blob counts: run the real gc on synthetic repositories")
    ap.add_argument("--src", type=Path, help="with --real: also run gc from this src/")
    ap.add_argument("--block-bytes", type=int, default=16, help="with --real: block size")
    ap.add_argument("--blocks", type=int, default=BLOCKS, help="with --real: blocks a chunk")
    ap.add_argument("--dry-run", action="store_true", help="with --real: gc --dry-run")
    ap.add_argument(
        "--disk-chunks", type=int, default=0, help="with --real: re-save points this small"
    )
    ap.add_argument("--verify", action="store_true", help="with --real: vmkeep verify")
    ap.add_argument("--only-src", action="store_true", help="with --real: not this checkout")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gc-scale")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        run_one(args.one[0], int(args.one[1]), args.live, args.per_pack)
        return
    if args.real:
        counts = [int(b) for b in args.real.split(",")]
        shape = (args.block_bytes, args.blocks, args.dry_run, args.disk_chunks)
        main_real(counts, args.src, args.workdir, args.only_src, shape, args.verify)
        return
    print(f"{'blobs':>10} {'mode':>7} {'wall s':>7} {'cpu s':>7} {'peak MiB':>9}")
    for n in (int(b) for b in args.blobs.split(",")):
        for mode in args.modes.split(","):
            start = time.monotonic()
            pid = os.fork()
            if pid == 0:
                cmd = [sys.executable, __file__, "--one", mode, str(n), "--live", str(args.live)]
                cmd += ["--per-pack", str(args.per_pack)]
                os.execv(sys.executable, cmd)
            _, status, usage = os.wait4(pid, 0)
            wall = time.monotonic() - start
            cpu = usage.ru_utime + usage.ru_stime
            ok = "" if status == 0 else f" (exit {status})"
            print(f"{n:>10} {mode:>7} {wall:7.1f} {cpu:7.1f} {usage.ru_maxrss / 1024:9.0f}{ok}")


if __name__ == "__main__":
    main()
