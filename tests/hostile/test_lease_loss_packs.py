"""The lease-loss protocol of docs/FORMAT.md §6 with format 3 (packs): a gc that overlaps a
backup (its listing of locks/ missed the backup's lock) and deletes packs the backup needs
— garbage it deduplicated against, or packs it uploaded but had not indexed yet — makes the
backup fail with no restore point; a gc that kept everything lets it complete."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from tests.e2e.conftest import Cli
from tests.e2e.test_faults import random_vm
from tests.e2e.test_format3 import init3

from .lease_helpers import StoppedBackup, assert_clean_failure, start_stopped_backup

MiB = 1 << 20


def _packs(repo: Path) -> set[str]:
    """Complete packs (not the temporary file of an upload the stop interrupted)."""
    return {
        p.name for p in (repo / "packs").rglob("*") if p.is_file() and not p.name.startswith(".")
    }


def _points(cli: Cli, repo: Path) -> list[str]:
    rows = cli("list", "--remote", str(repo), "--json").json()["restore_points"]
    return [row["restore_point"] for row in rows]


def _gc_missing_the_lock(cli: Cli, repo: Path, tmp_path: Path) -> dict[str, int]:
    """gc while the stopped backup's lock is hidden (a listing that lags)."""
    (lock,) = (repo / "locks").iterdir()
    hidden = tmp_path / lock.name
    lock.rename(hidden)
    try:
        return dict(cli("gc", "--remote", str(repo), "--json").json())
    finally:
        hidden.rename(lock)


def _stopped(cli: Cli, vm: Path, repo: Path, tmp_path: Path) -> StoppedBackup:
    return start_stopped_backup(cli, vm, str(repo), "stored", 60, tmp_path / "stop")


def test_gc_deletes_the_garbage_a_backup_reuses(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    init3(cli, str(repo))
    vm = make_vm()
    point = cli("backup", str(vm), "--remote", str(repo), "--json").json()["restore_point"]
    cli("forget", point, "--remote", str(repo))
    backup = _stopped(cli, vm, repo, tmp_path)  # every chunk deduplicated against garbage
    assert _gc_missing_the_lock(cli, repo, tmp_path)["packs_deleted"] > 0
    assert _packs(repo) == set()
    run = backup.resume()
    assert_clean_failure(run, "a gc ran during this backup", "deleted")
    assert _points(cli, repo) == []


def test_gc_deletes_packs_not_yet_indexed(cli: Cli, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init3(cli, str(repo), "--pack-size", "1M")
    vm = random_vm(tmp_path, "fresh", 16 * MiB, 21)
    backup = _stopped(cli, vm, repo, tmp_path)
    uploaded = _packs(repo)
    assert uploaded  # full packs uploaded, the index not written yet
    assert _gc_missing_the_lock(cli, repo, tmp_path)["packs_deleted"] == len(uploaded)
    run = backup.resume()
    # Either the gc check finds its packs gone, or (when the stop fell in an upload whose
    # temporary file gc purged) the upload itself fails: one line, no restore point.
    assert_clean_failure(run)
    words = ("a gc ran during this backup", "could not be stored", "writing")
    assert any(w in run.err for w in words), run.err
    assert _points(cli, repo) == []


def test_overlapping_gc_that_kept_everything(
    cli: Cli, make_vm: Callable[..., Path], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    init3(cli, str(repo))
    vm = make_vm()
    first = cli("backup", str(vm), "--remote", str(repo), "--json").json()["restore_point"]
    before = _packs(repo)
    backup = _stopped(cli, vm, repo, tmp_path)
    assert _gc_missing_the_lock(cli, repo, tmp_path)["packs_deleted"] == 0
    run = backup.resume()
    assert run.code == 0, run.err
    assert sorted(_points(cli, repo)) == sorted([first, run.json()["restore_point"]])
    assert before <= _packs(repo)
    assert cli("verify", "--remote", str(repo), "--json").json()["ok"]
    assert os.path.isdir(repo / "index")
