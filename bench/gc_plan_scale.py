"""gc planning memory: pack_gc.plan_from (a set of every live blob, every live entry per
pack in memory, as gc does on main) against pack_plan.stream_plan (live keys external-sorted
by live_set.LiveKeys, merge-joined with the index's sorted entries) over synthetic entries.

    .venv/bin/python bench/gc_plan_scale.py [--blobs 1000000,4000000] [--live 0.7]

No repository: the index entries and live keys are generated (IDs in key order, live keys
added in a scattered order, as recipes name blocks); each mode runs as its own process and
reports wall time, CPU time and peak RSS (os.wait4). It measures the planner only: the
repack and index passes are not streamed yet.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from vmkeep.repository.blobs import KIND_BLOCK
from vmkeep.repository.live_set import LiveKeys, live_key
from vmkeep.repository.pack_gc import plan_from
from vmkeep.repository.pack_plan import stream_plan
from vmkeep.repository.packs import BlobEntry

PER_PACK = 256  # 64 KiB blocks in a 16 MiB pack
LENGTH = 65_000


def blob_id(i: int) -> bytes:
    return (i * 7919).to_bytes(32, "big")  # ascending with i: the index's key order


def entries(n: int) -> Iterator[BlobEntry]:
    for i in range(n):
        pack = (i // PER_PACK).to_bytes(32, "big")
        yield BlobEntry(KIND_BLOCK, blob_id(i), pack, (i % PER_PACK) * LENGTH, LENGTH)


def is_live(i: int, share: float) -> bool:
    return (i // PER_PACK) % 10 < share * 10 and i % 3 != 0


def run_one(mode: str, n: int, share: float) -> None:
    sizes = {
        p.to_bytes(32, "big"): PER_PACK * LENGTH for p in range((n + PER_PACK - 1) // PER_PACK)
    }
    order = (i * 1_000_003 % n for i in range(n))  # every i once, scattered
    if mode == "memory":
        live = {(KIND_BLOCK, blob_id(i)) for i in order if is_live(i, share)}
        plan = plan_from(sizes, entries(n), live, 16 << 20)
        counts = len(plan.keep), len(plan.repack), len(plan.delete)
    else:
        with LiveKeys(Path(tempfile.gettempdir())) as keys:
            for i in order:
                if is_live(i, share):
                    keys.add(live_key(KIND_BLOCK, blob_id(i)))
            got = stream_plan(sizes, entries(n), keys.sorted_unique(), 16 << 20)
        counts = len(got.keep), len(got.repack), len(got.delete)
    print(f"keep/repack/delete {counts}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blobs", default="1000000,4000000")
    ap.add_argument("--live", type=float, default=0.7)
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        run_one(args.one[0], int(args.one[1]), args.live)
        return
    print(f"{'blobs':>10} {'mode':>7} {'wall s':>7} {'cpu s':>7} {'peak MiB':>9}")
    for n in (int(b) for b in args.blobs.split(",")):
        for mode in ("memory", "stream"):
            start = time.monotonic()
            pid = os.fork()
            if pid == 0:
                cmd = [sys.executable, __file__, "--one", mode, str(n), "--live", str(args.live)]
                os.execv(sys.executable, cmd)
            _, status, usage = os.wait4(pid, 0)
            wall = time.monotonic() - start
            cpu = usage.ru_utime + usage.ru_stime
            ok = "" if status == 0 else f" (exit {status})"
            print(f"{n:>10} {mode:>7} {wall:7.1f} {cpu:7.1f} {usage.ru_maxrss / 1024:9.0f}{ok}")


if __name__ == "__main__":
    main()
