"""Format 3 through the real command: backups restore exactly (raw and qcow2, local and S3),
a delta after scattered 64 KiB writes stores about the changed blocks and a handful of
objects, the remote holds packs and index objects only, and a backup killed between its
packs and its manifest leaves no restore point."""

from __future__ import annotations

import json
import os
import random
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.hostile.lease_helpers import start_stopped_backup

from .conftest import Cli, disk_hashes, sha256, vm_disks
from .test_faults import random_vm
from .test_remotes_cli import _s3

KiB, MiB = 1 << 10, 1 << 20
WRITE = 64 * KiB


def init3(cli: Cli, location: str, *extra: str, env: dict[str, str] | None = None) -> None:
    out = cli("init", location, "--format", "3", *extra, "--json", env=env).json()
    assert out["format"] == 3


def objects(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def restore_hashes(
    cli: Cli, tmp_path: Path, repo: str, point: str, env: dict[str, str] | None = None
) -> dict[str, str]:
    where = tmp_path / "restores" / point
    out = cli("restore", point, "--remote", repo, "--to", str(where), "--json", env=env).json()
    return disk_hashes(Path(out["location"]))


def test_restore_reports_what_it_read_from_the_repository(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path
) -> None:
    """`bytes_fetched`: the stored bytes a restore read (what an object store bills as
    egress), about what the full stored and never more than the packs hold."""
    repo = tmp_path / "repo"
    init3(cli, str(repo))
    vm = make_vm("web01", 32 * MiB, "raw")
    full = cli("backup", str(vm), "--remote", str(repo), "--json").json()
    point = full["restore_point"]
    out = cli("restore", point, "--remote", str(repo), "--to", str(tmp_path / "a"), "--json")
    packs = sum(p.stat().st_size for p in (repo / "packs").rglob("*") if p.is_file())
    assert 0.9 * full["bytes_written"] <= out.json()["bytes_fetched"] <= packs
    said = cli("restore", point, "--remote", str(repo), "--to", str(tmp_path / "b"))
    assert "read from the repository" in said.out + said.err


def scatter(disk: Path, count: int, seed: int) -> None:
    """`count` writes of 64 KiB at random 4 KiB-aligned offsets (the benchmark's change)."""
    rng = random.Random(seed)
    size = disk.stat().st_size
    with open(disk, "r+b") as f:
        for _ in range(count):
            f.seek(rng.randrange(0, (size - WRITE) // 4096) * 4096)
            f.write(rng.randbytes(WRITE))


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_backup_and_restore_are_exact(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path, fmt: str
) -> None:
    repo = tmp_path / "repo"
    init3(cli, str(repo))
    vm = make_vm("web01", 32 * MiB, fmt)
    expected = {}
    full = cli("backup", str(vm), "--remote", str(repo), "--json").json()
    expected[full["restore_point"]] = disk_hashes(vm)
    cli("vm", "change-demo", str(vm), "--seed", "3")
    delta = cli("backup", str(vm), "--remote", str(repo), "--mode", "delta", "--json").json()
    expected[delta["restore_point"]] = disk_hashes(vm)
    assert expected[full["restore_point"]] != expected[delta["restore_point"]]
    for point, hashes in expected.items():
        assert restore_hashes(cli, tmp_path, str(repo), point) == hashes
    listed = objects(repo)
    assert not any(n.startswith("chunks") for n in listed)
    assert {n.split("/")[0] for n in listed} == {"config", "packs", "index", "manifests"}
    assert cli("verify", "--remote", str(repo), "--json").json()["ok"]


def test_scattered_delta_stores_changed_blocks(cli: Cli, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init3(cli, str(repo), "--encryption", "none", "--block-size", "128K")
    vm = random_vm(tmp_path, "scatter", 64 * MiB, 7)
    disk = vm / "disk0.img"
    cli("backup", str(vm), "--remote", str(repo), "--json")
    before = objects(repo)
    scatter(disk, 24, seed=8)
    delta = cli("backup", str(vm), "--remote", str(repo), "--mode", "delta", "--json").json()
    # Each 64 KiB write touches one or two 128 KiB blocks; each touched chunk a new recipe.
    assert delta["bytes_written"] <= 24 * 2 * (128 * KiB + 64) + 16 * 2 * KiB
    assert delta["bytes_written"] >= 24 * 128 * KiB * 0.9  # random data: nothing compresses
    after = objects(repo)
    new = set(after) - set(before)
    # One data pack, one recipe pack, one index object and the manifest: not one per block.
    assert len(new) <= 4 and all(n.split("/")[0] in {"packs", "index", "manifests"} for n in new)
    # Objects per GiB stay those of the packs: 64 MiB + 1.6 MiB in 16 MiB packs.
    assert len([n for n in after if n.startswith("packs/")]) <= 9
    point = delta["restore_point"]
    (restored,) = vm_disks(
        Path(
            cli(
                "restore", point, "--remote", str(repo), "--to", str(tmp_path / "r"), "--json"
            ).json()["location"]
        )
    ).values()
    assert sha256(restored) == sha256(disk)


def test_killed_between_packs_and_manifest_leaves_no_point(cli: Cli, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init3(cli, str(repo), "--pack-size", "1M")
    vm = random_vm(tmp_path, "killed", 16 * MiB, 9)
    backup = start_stopped_backup(cli, vm, str(repo), "stored", 60, tmp_path / "stop")
    # Complete packs; a stop that fell in an upload leaves its temporary file too.
    packs = [n for n in objects(repo) if n.startswith("packs/") and "/." not in n]
    assert packs  # full packs were uploaded before the stop
    os.kill(backup.proc.pid, signal.SIGKILL)
    backup.proc.communicate()
    assert cli("list", "--remote", str(repo), "--json").json()["restore_points"] == []
    assert not (repo / "manifests").exists() or not list((repo / "manifests").iterdir())
    assert not (repo / "index").exists() or not list((repo / "index").iterdir())
    gc = cli("gc", "--remote", str(repo), "--json").json()
    assert gc["packs_deleted"] == len(packs)
    assert not [n for n in objects(repo) if n.startswith("packs/")]


def test_format3_accepts_retention_locks(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path
) -> None:
    """`--format 3 --lock-days` makes a format 3 repository whose locked point's retention
    record names every pack and index object it needs (docs/IMMUTABILITY.md "Format 3")."""
    repo = tmp_path / "r"
    cli("remote", "add", "locked", str(repo), "--format", "3", "--lock-days", "7")
    assert json.loads((repo / "config").read_text())["version"] == 3
    vm = make_vm("lockvm", 32 * MiB)
    point = cli("backup", str(vm), "--remote", "locked", "--json").json()["restore_point"]
    record = json.loads((repo / "retention" / point).read_text())
    on_disk = {str(p.relative_to(repo)) for d in ("packs", "index") for p in (repo / d).rglob("*")}
    on_disk = {n for n in on_disk if (repo / n).is_file()}
    assert on_disk and on_disk <= set(record["objects"])
    assert {"config", f"manifests/{point}"} <= set(record["objects"])


def test_bad_format_option_is_one_line(cli: Cli, tmp_path: Path) -> None:
    run = cli("init", str(tmp_path / "r"), "--format", "4", ok=False)
    assert run.code == 2 and "unknown repository format 4" in run.err
    run = cli("init", str(tmp_path / "r"), "--format", "3", "--block-size", "8M", ok=False)
    assert run.code == 2 and "block size" in run.err
    assert not (tmp_path / "r" / "config").exists()


@pytest.fixture
def s3() -> Iterator[tuple[str, dict[str, str]]]:
    yield from _s3()


def test_format3_on_s3(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path, s3: tuple[str, dict[str, str]]
) -> None:
    url, creds = s3
    init3(cli, url, "--pack-size", "1M", env=creds)
    vm = make_vm("s3vm", 32 * MiB)
    point = cli("backup", str(vm), "--remote", url, "--json", env=creds).json()["restore_point"]
    assert restore_hashes(cli, tmp_path, url, point, env=creds) == disk_hashes(vm)
    assert json.loads(cli("verify", "-r", url, "--json", env=creds).out)["ok"]


def test_migrate_a_format_1_repository(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path
) -> None:
    source, target = tmp_path / "v1", tmp_path / "v3"
    cli("init", str(source), "--format", "1")
    vm = make_vm("mig", 32 * MiB)
    expected = {}
    for seed in (0, 4):
        if seed:
            cli("vm", "change-demo", str(vm), "--seed", str(seed))
        point = cli("backup", str(vm), "--remote", str(source), "--json").json()["restore_point"]
        expected[point] = disk_hashes(vm)
    wrong = tmp_path / "wrong"
    cli("init", str(wrong), "--format", "1")
    line = cli("migrate", str(source), str(wrong), ok=False).err.strip().splitlines()[-1]
    assert "format 3" in line and "--format 3 --chunk-size 4096K" in line
    cli("init", str(tmp_path / "small"), "--format", "3", "--chunk-size", "1M")
    bad = cli("migrate", str(source), str(tmp_path / "small"), ok=False)
    assert bad.code == 2 and "chunk size" in bad.err
    init3(cli, str(target))
    out = cli("migrate", str(source), str(target), "--json").json()
    assert out["ok"] and out["totals"]["copied"] == 2
    listed = cli("list", "--remote", str(target), "--json").json()["restore_points"]
    assert {r["restore_point"] for r in listed} == set(expected)
    for point, hashes in expected.items():
        assert restore_hashes(cli, tmp_path, str(target), point) == hashes
    assert cli("verify", "--remote", str(target), "--json").json()["ok"]
    assert not (target / "chunks").exists()
    again = cli("migrate", str(source), str(target), "--json").json()
    assert again["totals"]["chunks_uploaded"] == 0
