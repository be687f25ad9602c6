"""gc of a format 3 repository through the real command: the blocks of a forgotten point
really leave the remote (raw bytes of the packs), mostly-dead packs are repacked and what
remains restores exactly, `--dry-run` changes nothing, and a second gc has nothing to do."""

from __future__ import annotations

import random
from pathlib import Path

from .conftest import Cli, sha256, vm_disks
from .test_faults import random_vm
from .test_format3 import init3, objects

KiB, MiB = 1 << 10, 1 << 20


def pack_bytes(repo: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted((repo / "packs").rglob("*")) if p.is_file())


def test_gc_removes_dead_blocks_and_repacks(cli: Cli, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init3(cli, str(repo), "--encryption", "none", "--pack-size", "1M")  # random data: as is
    vm = random_vm(tmp_path, "gcvm", 16 * MiB, 11)
    disk = vm / "disk0.img"
    first = cli("backup", str(vm), "--remote", str(repo), "--json").json()["restore_point"]
    rng = random.Random(12)
    old_samples = []
    with open(disk, "r+b") as f:  # rewrite 3 of every 4 blocks: old packs become mostly dead
        for offset in range(0, 16 * MiB, 128 * KiB):
            f.seek(offset)
            old = f.read(4096)
            if offset % (512 * KiB) and any(old):
                old_samples.append(old)
                f.seek(offset)
                f.write(rng.randbytes(128 * KiB))
    assert len(old_samples) > 50
    second = cli("backup", str(vm), "--remote", str(repo), "--json").json()["restore_point"]
    expected = sha256(disk)
    raw = pack_bytes(repo)
    assert all(s in raw for s in old_samples)  # the check sees old blocks while they exist
    cli("forget", first, "--remote", str(repo))
    listed = objects(repo)
    dry = cli("gc", "--remote", str(repo), "--dry-run", "--json").json()
    assert dry["packs_repacked"] > 0 and dry["bytes_freed"] > 0
    assert objects(repo) == listed  # a dry run deletes and writes nothing
    gc = cli("gc", "--remote", str(repo), "--json").json()
    assert gc["packs_repacked"] == dry["packs_repacked"] and gc["packs_written"] > 0
    assert gc["index_objects_replaced"] == 2  # one per backup, now one consolidated
    raw = pack_bytes(repo)
    assert not any(s in raw for s in old_samples)  # really gone from the remote
    assert len(list((repo / "index").iterdir())) == 1  # kept and repacked blobs: one index
    assert cli("verify", "--remote", str(repo), "--json").json()["ok"]
    where = tmp_path / "restored"
    out = cli("restore", second, "--remote", str(repo), "--to", str(where), "--json").json()
    (restored,) = vm_disks(Path(out["location"])).values()
    assert sha256(restored) == expected
    index = sorted((repo / "index").iterdir())
    again = cli("gc", "--remote", str(repo), "--json").json()
    assert again["packs_deleted"] == again["packs_written"] == again["packs_repacked"] == 0
    assert again["index_objects_replaced"] == 0 and sorted((repo / "index").iterdir()) == index


def small_packs(repo: Path) -> list[Path]:
    return [p for p in (repo / "packs").rglob("*") if p.is_file() and p.stat().st_size < 256 * KiB]


def test_small_packs_are_merged_once_then_left_alone(cli: Cli, tmp_path: Path) -> None:
    """Each backup closes its last packs partly filled; a delta that stores one block and one
    recipe leaves two packs of a few hundred bytes. gc merges the small packs of each kind
    (objects follow the data, not the number of backups), the points restore exactly, and a
    second gc rewrites nothing: a pack's header and trailer are not garbage (every gc used to
    repack such packs into copies of themselves)."""
    repo = tmp_path / "repo"
    init3(cli, str(repo), "--pack-size", "1M")
    vm = random_vm(tmp_path, "smallpacks", 16 * MiB, 5)
    disk = vm / "disk0.img"
    expected = {}
    for value in (0, 1, 2, 3):
        if value:
            with open(disk, "r+b") as f:
                f.seek(value * 3 * MiB)
                f.write(bytes([value]) * MiB)  # a block that compresses to a few bytes
        point = cli("backup", str(vm), "--remote", str(repo), "--json").json()["restore_point"]
        expected[point] = sha256(disk)
    assert len(small_packs(repo)) >= 5

    out = cli("gc", "--remote", str(repo), "--json").json()
    assert out["packs_repacked"] >= 5 and out["packs_deleted"] == out["packs_repacked"]
    assert out["packs_written"] <= 2 and len(small_packs(repo)) <= 2  # one per kind
    for point, digest in expected.items():
        where = tmp_path / "r" / point
        done = cli("restore", point, "--remote", str(repo), "--to", str(where), "--json").json()
        (restored,) = vm_disks(Path(done["location"])).values()
        assert sha256(restored) == digest
    before = pack_bytes(repo)
    again = cli("gc", "--remote", str(repo), "--json").json()
    assert again["packs_repacked"] == 0 and again["packs_deleted"] == 0
    assert pack_bytes(repo) == before
