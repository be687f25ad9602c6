"""Blob index benchmark: a format 3 repository whose index lists millions of blobs.

    .venv/bin/python bench/index_scale.py [--blobs 4000000] [--lookups 200000]
                                          [--successive 5] [--src DIR] [--workdir DIR]
                                          [--keep] [--json]

An encrypted format 3 repository on a local directory gets `--blobs` synthetic index entries
(random IDs, 65,536 per index object, as backups write them; the packs they name do not
exist, which no step here reads). Then each step runs as its own process, measured with
os.wait4 (wall time, CPU time, peak RSS):

  open (cold)      load the index with an empty cache directory
  open (warm)      the same again (the cache as the cold open left it)
  open (+1 object) after one more index object of 65,536 blobs (a backup's)
  open (successive) `--successive` times: one more index object, then an open (the cost of
                   a run of backups: what a tiered index should keep proportional to them)
  lookups          the warm open, then `--lookups` membership tests, half of them present
  adds             the warm open, then `--adds` blobs added as a backup's packer adds them
  backup           `vmkeep backup` of a 256 MiB VM (random data) into the repository

`--src DIR` runs the steps from another checkout's sources (e.g. main's, whose index is a
dict in memory) to print before/after numbers; the repository is the same.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from core import PASSPHRASE, prepare_workdir, run, write_vm
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.blob_index import MAX_INDEX_ENTRIES, encode_index, index_object_name
from vmkeep.repository.blobs import KIND_BLOCK, KIND_RECIPE
from vmkeep.repository.packs import BlobEntry
from vmkeep.repository.repository import Repository

MiB = 1 << 20
HERE = Path(__file__).resolve().parent


def write_index(repo: Repository, count: int, sample: list[bytes], rng: random.Random) -> None:
    """`count` entries in index objects of MAX_INDEX_ENTRIES; every 40th ID kept in `sample`
    (the present half of the lookups)."""
    packs = [os.urandom(32) for _ in range(max(1, count // 600))]
    for start in range(0, count, MAX_INDEX_ENTRIES):
        n = min(MAX_INDEX_ENTRIES, count - start)
        ids = os.urandom(32 * n)
        entries = []
        for k in range(n):
            blob_id = ids[32 * k : 32 * k + 32]
            kind = KIND_RECIPE if k % 32 == 0 else KIND_BLOCK
            pack = packs[(start + k) // 600 % len(packs)]
            entries.append(BlobEntry(kind, blob_id, pack, 96 * (k % 600), 90000))
            if k % 40 == 0:
                sample.append(bytes([kind]) + blob_id)
        data, index_id = encode_index(repo.sealer, repo.config["id"], entries)
        repo.remote.put(index_object_name(index_id), data)


def child(args: argparse.Namespace) -> int:
    """One step in this process: open the index, then maybe look blobs up."""
    from vmkeep.repository.blob_index import load_index

    repo = Repository.open(LocalRemote(args.repo), lambda: PASSPHRASE.encode())
    began = time.perf_counter()
    loaded = load_index(repo.remote, repo.sealer, repo.config["id"])
    opened = time.perf_counter() - began
    out: dict[str, Any] = {"open_seconds": round(opened, 3)}
    if args.lookups:
        raw = Path(args.sample).read_bytes()
        present = [raw[i : i + 33] for i in range(0, len(raw), 33)]
        rng = random.Random(1)
        keys = [rng.choice(present) for _ in range(args.lookups // 2)]
        keys += [bytes([KIND_BLOCK]) + rng.randbytes(32) for _ in range(args.lookups // 2)]
        rng.shuffle(keys)
        began, cpu = time.perf_counter(), time.process_time()
        hits = sum((k[0], k[1:]) in loaded.index for k in keys)
        seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
        assert hits == args.lookups // 2, hits
        out["lookups_per_second"] = round(args.lookups / seconds)
        out["lookups_per_cpu_second"] = round(args.lookups / cpu)
    if args.adds:
        began, cpu = time.perf_counter(), time.process_time()
        pack = os.urandom(32)
        for k in range(args.adds):
            loaded.index.add(BlobEntry(KIND_BLOCK, os.urandom(32), pack, k, 70000))
        out["adds_per_cpu_second"] = round(args.adds / (time.process_time() - cpu))
        out["adds_seconds"] = round(time.perf_counter() - began, 2)
    print(json.dumps(out))
    return 0


def step(name: str, argv: list[str], env: dict[str, str], say: Any) -> dict[str, Any]:
    say(f"{name} ...")
    r = run(argv, env)
    if r.returncode:
        raise SystemExit(f"{name} failed: {r.stderr.strip()[-500:]}")
    result: dict[str, Any] = {
        "seconds": round(r.seconds, 2),
        "cpu_seconds": round(r.cpu_seconds, 2),
        "peak_rss_mib": round(r.rss_mib, 1),
    }
    with contextlib.suppress(ValueError, IndexError):
        result.update(json.loads(r.stdout.strip().splitlines()[-1]))
    say(f"  {result}")
    return result


def successive(
    repo: Repository, n: int, rng: random.Random, me: list[str], env: dict[str, str], say: Any
) -> dict[str, Any]:
    """`n` rounds of one new index object and an open: total and worst open time."""
    opens = []
    for k in range(n):
        write_index(repo, MAX_INDEX_ENTRIES, [], rng)
        opens.append(step(f"open after backup {k + 1} of {n}", [*me, "--lookups", "0"], env, say))
    return {
        "rounds": n,
        "cpu_seconds": round(sum(o["cpu_seconds"] for o in opens), 2),
        "open_seconds": round(sum(o.get("open_seconds", 0.0) for o in opens), 3),
        "worst_open_seconds": max(o.get("open_seconds", 0.0) for o in opens),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blobs", type=int, default=4_000_000)
    p.add_argument("--lookups", type=int, default=200_000)
    p.add_argument("--adds", type=int, default=1_500_000)
    p.add_argument("--successive", type=int, default=5)
    p.add_argument("--src", type=Path, default=HERE.parent / "src")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/vmkeep-bench-index"))
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--repo", help=argparse.SUPPRESS)
    p.add_argument("--sample", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else print
    work = args.workdir
    prepare_workdir(work)
    try:
        result = measure(args, work, say)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def measure(args: argparse.Namespace, work: Path, say: Any) -> dict[str, Any]:
    repo = Repository.init(
        LocalRemote(str(work / "repo")),
        "aes-256-gcm",
        lambda: PASSPHRASE.encode(),
        format_version=3,
    )
    say(f"writing {args.blobs:,} index entries (block size {repo.config['block_size']})")
    sample: list[bytes] = []
    rng = random.Random(15)
    write_index(repo, args.blobs, sample, rng)
    (work / "sample").write_bytes(b"".join(sample))
    del sample
    env = dict(
        os.environ,
        VMKEEP_PASSPHRASE=PASSPHRASE,
        VMKEEP_CONFIG_DIR=str(work / "config"),
        VMKEEP_DATA_DIR=str(work / "data"),
        VMKEEP_CACHE_DIR=str(work / "cache"),
        PYTHONPATH=f"{args.src}{os.pathsep}{HERE}",
    )
    me = [sys.executable, str(Path(__file__).resolve()), "--child", "--repo", str(work / "repo")]
    me += ["--sample", str(work / "sample"), "--adds", "0"]
    steps = {
        "open_cold": step("open (cold)", [*me, "--lookups", "0"], env, say),
        "open_warm": step("open (warm)", [*me, "--lookups", "0"], env, say),
    }
    write_index(repo, MAX_INDEX_ENTRIES, [], rng)
    steps["open_plus_one"] = step("open (+1 index object)", [*me, "--lookups", "0"], env, say)
    if args.successive:
        steps["open_successive"] = successive(repo, args.successive, rng, me, env, say)
    lookups = [*me, "--lookups", str(args.lookups)]
    steps["lookups"] = step(f"open + {args.lookups:,} lookups", lookups, env, say)
    adds = [*me, "--lookups", "0", "--adds", str(args.adds)]
    steps["adds"] = step(f"open + {args.adds:,} blobs added (a backup's)", adds, env, say)
    vm_dir = work / "vms" / "bench"
    image = write_vm(vm_dir)
    with open(image, "wb") as f:
        for _ in range(256):
            f.write(os.urandom(MiB))
    exe = Path(sys.executable).with_name("vmkeep")
    backup = [str(exe), "backup", str(vm_dir), "--remote", str(work / "repo"), "--json"]
    steps["backup"] = step("backup (256 MiB)", backup, env, say)
    cache = work / "cache"
    cache_bytes = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    say(f"cache directory: {cache_bytes / MiB:.1f} MiB")
    return {
        "blobs": args.blobs,
        "src": str(args.src),
        "steps": steps,
        "cache_mib": cache_bytes / MiB,
    }


if __name__ == "__main__":
    sys.exit(main())
