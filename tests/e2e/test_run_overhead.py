"""Per-run overhead (docs/RUN-OVERHEAD.md): a backup to a path or URL opens no state database,
and what it used to get from there (the lock policy) is still right."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .conftest import Cli


def points(cli: Cli, repo: Path) -> list[str]:
    listed = cli("list", "--remote", str(repo), "--json").json()["restore_points"]
    return [p["restore_point"] for p in listed]


def test_backup_to_a_path_opens_no_state_database(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path
) -> None:
    data = Path(cli.env["VMKEEP_DATA_DIR"])
    vm = make_vm("web01")
    first = cli("backup", str(vm), "--remote", str(repo_dir), "--json").json()["restore_point"]
    second = cli("backup", str(vm), "--remote", str(repo_dir), "--mode", "delta", "--json")
    assert points(cli, repo_dir) == [first, second.json()["restore_point"]]
    # The database (and its directory) would have been created by opening it.
    assert not data.exists()
    # --lock-days is still read for a path: a negative one is refused before any work.
    bad = cli("backup", str(vm), "--remote", str(repo_dir), "--lock-days", "-1", ok=False)
    assert "--lock-days must be 0" in bad.err
    assert points(cli, repo_dir) == [first, second.json()["restore_point"]]
    assert not data.exists()


def test_backup_to_a_named_remote_still_uses_the_state_database(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path
) -> None:
    data = Path(cli.env["VMKEEP_DATA_DIR"])
    cli("remote", "add", "here", str(repo_dir))
    vm = make_vm("web01")
    point = cli("backup", str(vm), "--remote", "here", "--json").json()["restore_point"]
    assert points(cli, repo_dir) == [point]
    assert (data / "vmkeep.db").is_file()
