"""`vmkeep repair index` through the real command: a format 3 repository whose index objects
were deleted or damaged restores again byte for byte after the repair, gc runs again and
deletes no live pack, a pack with a damaged trailer is reported (exit 3) and left in place,
--dry-run writes nothing, and a format 1 repository is refused in one line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import Cli, disk_hashes
from .test_faults import random_vm

MiB = 1 << 20


def files(root: Path, under: str) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in (root / under).rglob("*") if p.is_file()
    }


def restored(cli: Cli, tmp_path: Path, repo: Path, point: str, into: str = "") -> dict[str, str]:
    where = tmp_path / "restores" / (point + into)
    out = cli("restore", point, "--remote", str(repo), "--to", str(where), "--json").json()
    return disk_hashes(Path(out["location"]))


@pytest.fixture
def backed_up(cli: Cli, tmp_path: Path) -> tuple[Path, dict[str, dict[str, str]]]:
    """A format 3 repository with 1 MiB packs (many of them) and two restore points of a
    16 MiB VM of random data, with the disk hashes each point must restore to."""
    repo = tmp_path / "repo"
    cli("init", str(repo), "--format", "3", "--pack-size", "1M", "--json")
    vm = random_vm(tmp_path, "web", 16 * MiB, 5)
    expected = {}
    for seed in (1, 2):
        out = cli("backup", str(vm), "--remote", str(repo), "--json").json()
        expected[out["restore_point"]] = disk_hashes(vm)
        with open(vm / "disk0.img", "r+b") as f:  # a change for the next point
            f.seek(seed * 3 * MiB)
            f.write(bytes([seed]) * MiB)
    return repo, expected


def test_lost_index_is_rebuilt_from_the_packs(
    cli: Cli, tmp_path: Path, backed_up: tuple[Path, dict[str, dict[str, str]]]
) -> None:
    repo, expected = backed_up
    packs = files(repo, "packs")
    assert len(packs) > 4
    for path in (repo / "index").iterdir():
        path.unlink()
    point = next(iter(expected))
    failed = cli("restore", point, "--remote", str(repo), "--to", str(tmp_path / "x"), ok=False)
    assert "missing" in failed.err

    out = cli("repair", "index", "--remote", str(repo), "--json").json()
    assert out["packs_read"] == len(packs) and out["bad_packs"] == []
    assert out["index_objects_written"] >= 1 and out["index_objects_removed"] == 0
    for point, hashes in expected.items():
        assert restored(cli, tmp_path, repo, point) == hashes
    assert cli("verify", "--remote", str(repo), "--json").json()["ok"]
    cli("gc", "--remote", str(repo), "--json")  # no live pack is taken for garbage:
    for point, hashes in expected.items():
        assert restored(cli, tmp_path, repo, point, "-after-gc") == hashes


def test_damaged_index_object_is_replaced(
    cli: Cli, tmp_path: Path, backed_up: tuple[Path, dict[str, dict[str, str]]]
) -> None:
    repo, expected = backed_up
    old = sorted((repo / "index").iterdir())
    damaged = old[0]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    # This machine's cache still has a good copy; another machine (no cache) sees the damage.
    elsewhere = {"VMKEEP_CACHE_DIR": str(tmp_path / "other-cache")}
    refused = cli("gc", "--remote", str(repo), ok=False, env=elsewhere)
    assert "index object" in refused.err

    out = cli("repair", "index", "--remote", str(repo), "--json").json()
    assert out["index_objects_unreadable"] == 1 and out["index_objects_removed"] == len(old)
    assert not any(p.exists() for p in old)  # the damaged one included
    cli("gc", "--remote", str(repo), "--json")
    for point, hashes in expected.items():
        assert restored(cli, tmp_path, repo, point) == hashes


def flipped_trailer(data: bytes) -> bytes:
    return data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:]  # inside the sealed trailer


def huge_trailer(data: bytes) -> bytes:
    return data[:-4] + (0xFFFFFFF0).to_bytes(4, "little")  # the length field claims 4 GiB


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize("damage", [flipped_trailer, huge_trailer, truncated])
def test_damaged_pack_is_reported_and_kept(
    cli: Cli, backed_up: tuple[Path, dict[str, dict[str, str]]], damage: Callable[[bytes], bytes]
) -> None:
    repo, _ = backed_up
    packs = sorted(p for p in (repo / "packs").rglob("*") if p.is_file())
    bad = packs[len(packs) // 2]
    data = damage(bad.read_bytes())
    bad.write_bytes(data)

    run = cli("repair", "index", "--remote", str(repo), ok=False)
    assert run.code == 3
    assert [line for line in run.err.splitlines() if line.strip()][-1].startswith("error: 1 pack")
    assert bad.exists() and bad.read_bytes() == data  # evidence left in place
    out = json.loads(cli("repair", "index", "--remote", str(repo), "--json", ok=False).out)
    assert out["packs_read"] == len(packs) - 1
    assert [b["pack"] for b in out["bad_packs"]] == [str(bad.relative_to(repo))]


def test_dry_run_writes_nothing(
    cli: Cli, backed_up: tuple[Path, dict[str, dict[str, str]]]
) -> None:
    repo, _ = backed_up
    for path in (repo / "index").iterdir():
        path.unlink()
    before = files(repo, ".")
    out = cli("repair", "index", "--remote", str(repo), "--dry-run", "--json").json()
    assert out["dry_run"] and out["blobs_indexed"] > 0 and out["index_objects_written"] >= 1
    after = files(repo, ".")
    assert {k: v for k, v in after.items() if not k.startswith("locks")} == {
        k: v for k, v in before.items() if not k.startswith("locks")
    }
    assert not list((repo / "index").iterdir())


def test_format_1_has_no_index_to_repair(cli: Cli, tmp_path: Path) -> None:
    repo = tmp_path / "repo1"
    cli("init", str(repo), "--format", "1", "--json")
    run = cli("repair", "index", "--remote", str(repo), ok=False)
    assert run.code not in (0, 70) and "no index to repair" in run.err
