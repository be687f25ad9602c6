"""The local cache of point summaries (docs/SCALE.md) in the hands of an attacker or of bad
luck: whatever the cache file holds (garbage, a symlink, a directory), the commands list the
repository's real points, never fail on it, and never write through a planted symlink; a
point another client forgot leaves every listing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.hostile.conftest import Cli, tree


def cache_file(tmp_path: Path, repo: Path) -> Path:
    repo_id = json.loads((repo / "config").read_text())["id"]
    return tmp_path / "cache" / repo_id / "points"  # Cli's VMKEEP_CACHE_DIR is HOME/cache


def listed(cli: Cli, repo: Path, **env: str) -> list[str]:
    run = cli("list", "--remote", str(repo), "--json", env=env or None)
    return sorted(r["restore_point"] for r in run.json()["restore_points"])


@pytest.mark.parametrize("damage", ["garbage", "symlink", "directory", "empty"])
def test_whatever_the_cache_holds_the_listing_is_the_repository(
    cli: Cli, make_vm, repo_dir: Path, tmp_path: Path, damage: str
) -> None:
    vm = make_vm()
    points = sorted(
        cli("backup", str(vm), "--remote", str(repo_dir), "--json").json()["restore_point"]
        for _ in range(2)
    )
    assert listed(cli, repo_dir) == points
    path = cache_file(tmp_path, repo_dir)
    victim = tmp_path / "victim"
    victim.write_text("not yours\n")
    before = tree(victim.parent / "vms")
    path.unlink()
    if damage == "garbage":
        path.write_bytes(os.urandom(4096))
    elif damage == "symlink":
        path.symlink_to(victim)
    elif damage == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"")
    assert listed(cli, repo_dir) == points
    assert listed(cli, repo_dir) == points
    cli("prune", "--remote", str(repo_dir), "--keep-last", "1", "--dry-run")
    assert victim.read_text() == "not yours\n"
    assert tree(victim.parent / "vms") == before
    if damage != "directory":  # rebuilt in place (a planted symlink is replaced, not followed)
        assert path.is_file() and not path.is_symlink()


def test_a_point_forgotten_by_another_client_leaves_the_listings(
    cli: Cli, make_vm, repo_dir: Path, tmp_path: Path
) -> None:
    vm = make_vm()
    points = [
        cli("backup", str(vm), "--remote", str(repo_dir), "--json").json()["restore_point"]
        for _ in range(3)
    ]
    assert listed(cli, repo_dir) == sorted(points)  # this client's cache knows all three
    other = {"VMKEEP_CACHE_DIR": str(tmp_path / "other-cache")}
    cli("forget", points[1], "--remote", str(repo_dir), env=other)
    assert listed(cli, repo_dir) == sorted([points[0], points[2]])
    plan = cli("prune", "--remote", str(repo_dir), "--keep-last", "5", "--dry-run", "--json")
    assert sorted(d["restore_point"] for d in plan.json()["decisions"]) == sorted(
        [points[0], points[2]]
    )
    cached = cache_file(tmp_path, repo_dir).read_text(errors="replace")
    assert f'"id":"{points[1]}"' not in cached and f'"id":"{points[2]}"' in cached
