"""Backups and restores over the tiered blob index (repository/index_tiers.py): each
backup's index object becomes a delta file, deltas fold into the base, and every restore
point still restores bit for bit."""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable
from pathlib import Path

from .conftest import Cli, disk_hashes, vm_disks

MiB = 1 << 20


def test_every_point_restores_across_deltas_and_a_fold(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    cli("init", str(repo))
    vm = make_vm(size=32 * MiB)
    disk = next(iter(vm_disks(vm).values()))
    rng = random.Random(4)
    with open(disk, "r+b") as f:  # a base of ~256 blocks: each backup's delta is small
        f.seek(8 * MiB)
        f.write(rng.randbytes(16 * MiB))
    points: list[tuple[str, dict[str, str]]] = []
    delta_counts = []
    for _ in range(8):
        out = cli("backup", str(vm), "--remote", str(repo), "--json").json()
        points.append((out["restore_point"], disk_hashes(vm)))
        cli("list", "--remote", str(repo), "--json")  # an open: merges the new index object
        cache = next((tmp_path / "cache").glob("*/blobindex")).parent
        delta_counts.append(len(list(cache.glob("blobindex.d-*"))))
        with open(disk, "r+b") as f:
            f.seek(rng.randrange(32 * MiB // 65536) * 65536)  # one new block per backup
            f.write(os.urandom(65536))
    assert max(delta_counts) >= 2  # deltas were made ...
    assert any(b < a for a, b in itertools.pairwise(delta_counts))  # ... folded
    for n, (point, hashes) in enumerate(points):
        to = str(tmp_path / f"r{n}")
        out = cli("restore", point, "--remote", str(repo), "--to", to, "--json").json()
        assert disk_hashes(Path(out["location"])) == hashes
