"""`vmkeep backup --max-rate`: the VM's disks are read no faster than the limit, the point
restores hash-equal, and a bad value is one line."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import Cli, disk_hashes, vm_disks

MIB = 1024 * 1024


def vm_with_data(make_vm: Callable[..., Path], name: str) -> Path:
    """A demo VM whose disk holds ~32 MiB of data (a backup reads data extents only): 28 MiB
    of random bytes past its demo files (the file system is clobbered there, which a backup
    does not care about)."""
    vm = make_vm(name, size=64 * MIB)
    disk = vm_disks(vm)["disk0"]
    with disk.open("r+b") as f:
        f.seek(36 * MIB)
        f.write(os.urandom(28 * MIB))
    return vm


def timed(cli: Cli, *args: str) -> tuple[float, dict[str, object]]:
    began = time.monotonic()
    out = cli(*args).json()
    return time.monotonic() - began, out


def test_max_rate_paces_the_backup_and_restores_hash_equal(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path
) -> None:
    # Wall-clock bounds are acceptable here: the rate is the feature. They are generous
    # (the machine is shared); the lower one is what a limiter that does nothing misses.
    vm = vm_with_data(make_vm, "paced")
    hashes = disk_hashes(vm)
    limited, out = timed(
        cli, "backup", str(vm), "--remote", str(repo_dir), "--max-rate", "8MiB/s", "--json"
    )
    read = int(str(out["bytes_read"]))
    assert 30 * MIB <= read <= 40 * MIB, read
    assert 3.5 <= limited <= 8.0, limited
    assert float(str(out["duration"])) >= 0.9 * read / (8 * MIB)  # the data path itself
    restored = cli(
        "restore", str(out["restore_point"]), "--remote", str(repo_dir),
        "--to", str(tmp_path / "r"), "--json",
    ).json()  # fmt: skip
    assert disk_hashes(Path(restored["location"])) == hashes

    # The same VM into a fresh repository without a limit (nothing deduplicated against
    # the first): the limit, not the machine, made the first run slow.
    other = tmp_path / "repo2"
    cli("init", str(other))
    unlimited, _ = timed(cli, "backup", str(vm), "--remote", str(other), "--json")
    assert limited >= 2 * unlimited, (limited, unlimited)


@pytest.mark.parametrize("value", ["0", "-1", "fast", "5 parsecs"])
def test_bad_max_rate_is_one_line(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, value: str
) -> None:
    vm = make_vm("bad", size=32 * MIB)
    run = cli("backup", str(vm), "--remote", str(repo_dir), f"--max-rate={value}", ok=False)
    lines = [line for line in run.err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "--max-rate" in lines[0], run.err
    assert run.code not in (0, 70)
    assert cli("list", "--remote", str(repo_dir), "--json").json()["restore_points"] == []
