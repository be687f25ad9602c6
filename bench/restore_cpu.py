"""CPU of a restore by stage, in process (docs/DATA-PATH.md, "CPU of a format 3 restore").

Restores the latest point of a repository into a new VM directory with the files connector,
as `vmkeep restore --to DIR` does, and prints CPU-seconds by stage (fetch, decode, zero-run
scan, writes) and by thread, beside the process's CPU and wall time. `--breakdown` also
times each block's AES-GCM, zstd and BLAKE3 (per-call timers: the total grows by their
cost, so compare stages of one mode only). Caches are dropped before each round (root).

    python bench/restore_cpu.py REPO --to DIR [--breakdown]

REPO may be an object store's location (credentials from the environment, as for vmkeep).

The repository's passphrase comes from VMKEEP_PASSPHRASE. The point of docs/DATA-PATH.md was
made with: `bench/image.py`'s `build_image(path, 4 << 30, 7)`, `qemu-img convert -O qcow2`
into a files-connector VM directory (vm.json naming the qcow2 disk), `vmkeep init REPO` and
`vmkeep backup VMDIR --remote REPO --mode full`. For an A/B, run it alternately with
PYTHONPATH pointing at each tree's src.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmkeep.connectors.files import FilesConnector
from vmkeep.malloc_tuning import reuse_chunk_buffers
from vmkeep.operations import restore as restore_mod
from vmkeep.operations import restore_parts
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.remotes.location import open_remote
from vmkeep.repository import blobs, compression
from vmkeep.repository.crypto import Sealer
from vmkeep.repository.repository import Repository


class Clock:
    """Thread CPU time per (stage, thread kind), summed over calls."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.thread_time() - start
                with self.lock:
                    self.cpu[name] += spent
                    self.calls[name] += 1

        return timed


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        print("warning: caches not dropped", file=sys.stderr)


def patch(clock: Clock, breakdown: bool) -> None:
    """Timers around each stage's function (and, with `breakdown`, each block's primitives)."""
    repo_cls = Repository
    repo_cls.fetch_chunks = clock.wrap("fetch", repo_cls.fetch_chunks)  # type: ignore[method-assign]
    # object stores, format 3: a pack group's GET, made by its first part (restore_parts.py)
    shared = restore_parts.SharedFetch
    shared.get = clock.wrap("fetch packs", shared.get)  # type: ignore[method-assign]
    repo_cls.decode_chunk_parts = clock.wrap("decode", repo_cls.decode_chunk_parts)  # type: ignore[method-assign]
    restore_mod.sparse_pieces = clock.wrap("zero scan", restore_mod.sparse_pieces)
    restore_mod.write_pieces = clock.wrap("write", restore_mod.write_pieces)
    if breakdown:
        Sealer.open = clock.wrap("  aes-gcm", Sealer.open)  # type: ignore[method-assign]
        Sealer.chunk_id = clock.wrap("  blake3", Sealer.chunk_id)  # type: ignore[method-assign]
        blobs.decompress = clock.wrap("  zstd", compression.decompress)
        LocalRemote.get = clock.wrap("  get", LocalRemote.get)  # type: ignore[method-assign]


def one_round(repo_path: str, target: Path, breakdown: bool) -> dict[str, Any]:
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    drop_caches()
    clock = Clock()
    patch(clock, breakdown)
    times0, wall0 = os.times(), time.monotonic()
    passphrase = os.environ["VMKEEP_PASSPHRASE"].encode()
    repo = Repository.open(open_remote(repo_path), lambda: passphrase)
    opened = time.monotonic()
    latest = max(repo.point_ids())
    report = restore_mod.restore_vm(repo, FilesConnector(), latest, str(target), SilentProgress())
    times1, wall1 = os.times(), time.monotonic()
    return {
        "wall": wall1 - wall0,
        "open": opened - wall0,
        "cpu": (times1.user - times0.user) + (times1.system - times0.system),
        "user": times1.user - times0.user,
        "sys": times1.system - times0.system,
        "stages": dict(clock.cpu),
        "written": report.bytes_written,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo")
    parser.add_argument("--to", required=True, type=Path)
    parser.add_argument("--breakdown", action="store_true")
    args = parser.parse_args(argv)
    reuse_chunk_buffers()  # as the CLI does first
    print(f"load: {os.getloadavg()[0]:.1f}")
    got = one_round(args.repo, args.to, args.breakdown)
    print(
        f"wall {got['wall']:.2f} s (open {got['open']:.2f}), CPU {got['cpu']:.2f} s "
        f"(user {got['user']:.2f}, sys {got['sys']:.2f}), written {got['written'] / 2**30:.2f} GiB"
    )
    for name, cpu in got["stages"].items():
        print(f"  {name:<12} {cpu:6.3f} CPU-s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
