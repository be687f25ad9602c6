"""A backup that outlives its lease while a gc sweeps must never leave a restore point whose
chunks are gone (docs/FORMAT.md §6). Real processes: the backup stops itself (SIGSTOP) at a
fixed point, a gc runs meanwhile under another host name, then the backup is continued.

Every case starts from one full backup that was then forgotten, so all its chunks are garbage
that the second backup of the same (unchanged) VM reuses without uploading them."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli
from tests.remotes.s3_server import SeaweedServer, started_or_skip

from .lease_helpers import (
    assert_clean_failure,
    gc_from,
    needs_other_host,
    start_stopped_backup,
)


@pytest.fixture
def repo_dir(chunk_repo: Path) -> Path:
    """Format 1: these tests count chunk objects (format 3: test_lease_loss_packs.py)."""
    return chunk_repo


def _chunk_files(repo: Path) -> set[str]:
    return {p.name for p in (repo / "chunks").rglob("*") if p.is_file()}


def _garbage_repo(cli: Cli, vm: Path, repo: Path) -> set[str]:
    """One backup of `vm`, forgotten: every chunk in the repository is garbage."""
    point = cli("backup", str(vm), "--remote", str(repo), "--json").json()["restore_point"]
    cli("forget", point, "--remote", str(repo))
    chunks = _chunk_files(repo)
    assert chunks
    return chunks


def _points(cli: Cli, repo: str) -> list[str]:
    rows = cli("list", "--remote", repo, "--json").json()["restore_points"]
    return [row["restore_point"] for row in rows]


def _assert_nothing_kept(cli: Cli, repo: Path) -> None:
    assert _points(cli, str(repo)) == []
    assert not list((repo / "manifests").iterdir())


def test_paused_past_its_lease_while_gc_sweeps(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path
) -> None:
    """Paused after dedup, longer than the lease; a gc elsewhere takes the lock over and
    sweeps what the backup reuses: the backup fails without writing its manifest."""
    needs_other_host()
    vm = make_vm()
    _garbage_repo(cli, vm, repo_dir)
    backup = start_stopped_backup(cli, vm, str(repo_dir), "stored", 2, tmp_path / "stop")
    backup.hold(1.0)  # the lock is older than gc's lease
    gc = gc_from(cli, str(repo_dir), lease=0.5)
    assert gc.code == 0, gc.err
    assert gc.json()["chunks_deleted"] > 0 and _chunk_files(repo_dir) == set()
    run = backup.resume(paused_at_least=1.5)  # over half its lease: the lock may be lost
    assert_clean_failure(run, "lost its repository lock")
    _assert_nothing_kept(cli, repo_dir)


def test_gc_whose_lock_listing_missed_the_backup(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path
) -> None:
    """The lock cannot help when gc's listing of locks/ misses the backup's lock (an object
    store listing that lags, or a skewed clock): the gc epoch makes the backup stat its
    chunks, find them gone and fail, although its own lock looks intact."""
    vm = make_vm()
    _garbage_repo(cli, vm, repo_dir)
    backup = start_stopped_backup(cli, vm, str(repo_dir), "stored", 60, tmp_path / "stop")
    (lock,) = (repo_dir / "locks").iterdir()
    hidden = tmp_path / lock.name
    lock.rename(hidden)  # what a lagging listing would not show
    cli("gc", "--remote", str(repo_dir))
    hidden.rename(lock)
    assert _chunk_files(repo_dir) == set()
    run = backup.resume()
    assert_clean_failure(run, "a gc ran during this backup", "deleted")
    _assert_nothing_kept(cli, repo_dir)


def test_overlapping_gc_that_kept_every_chunk(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path
) -> None:
    """An overlapping gc that deleted nothing the backup needs: the backup confirms every
    chunk and keeps its restore point, which verifies."""
    vm = make_vm()
    first = cli("backup", str(vm), "--remote", str(repo_dir), "--json").json()["restore_point"]
    before = _chunk_files(repo_dir)
    backup = start_stopped_backup(cli, vm, str(repo_dir), "stored", 60, tmp_path / "stop")
    (lock,) = (repo_dir / "locks").iterdir()
    lock.rename(tmp_path / lock.name)
    assert cli("gc", "--remote", str(repo_dir), "--json").json()["chunks_deleted"] == 0
    (tmp_path / lock.name).rename(lock)
    run = backup.resume()
    assert run.code == 0, run.err
    second = run.json()["restore_point"]
    assert sorted(_points(cli, str(repo_dir))) == sorted([first, second])
    assert _chunk_files(repo_dir) == before
    assert cli("verify", "--remote", str(repo_dir), "--json").json()["ok"]


def test_gc_during_the_manifest_write(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path
) -> None:
    """Paused after its checks, right before the manifest write; a gc whose clock runs far
    ahead (a short lease) sweeps. The manifest then lands, the backup sees the new gc epoch,
    finds its chunks gone, withdraws the point and fails."""
    needs_other_host()
    vm = make_vm()
    _garbage_repo(cli, vm, repo_dir)
    backup = start_stopped_backup(cli, vm, str(repo_dir), "manifest", 60, tmp_path / "stop")
    backup.hold(1.0)
    gc = gc_from(cli, str(repo_dir), lease=0.2)
    assert gc.code == 0 and gc.json()["chunks_deleted"] > 0, gc.err
    run = backup.resume()
    assert_clean_failure(run, "a gc ran during this backup")
    _assert_nothing_kept(cli, repo_dir)


def test_paused_backup_on_this_host_keeps_its_lock(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path
) -> None:
    """On the backup's own host a gc asks the process, not the clock: a paused backup whose
    lease ran out in gc's eyes still blocks it, and then completes."""
    vm = make_vm()
    chunks = _garbage_repo(cli, vm, repo_dir)
    backup = start_stopped_backup(cli, vm, str(repo_dir), "stored", 60, tmp_path / "stop")
    gc = cli("gc", "--remote", str(repo_dir), ok=False, env={"VMKEEP_LOCK_LEASE_SECONDS": "0.2"})
    assert "busy" in gc.err and "backup" in gc.err
    assert _chunk_files(repo_dir) == chunks
    run = backup.resume()
    assert run.code == 0, run.err
    assert _points(cli, str(repo_dir)) == [run.json()["restore_point"]]
    assert cli("verify", "--remote", str(repo_dir), "--json").json()["ok"]


def test_lock_removed_by_someone_else(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path, tmp_path: Path
) -> None:
    """Whoever removes the backup's lock (a gc that judged it stale) makes the backup fail
    before its manifest, even with no gc epoch change and no lease gap."""
    vm = make_vm()
    _garbage_repo(cli, vm, repo_dir)
    backup = start_stopped_backup(cli, vm, str(repo_dir), "stored", 60, tmp_path / "stop")
    (lock,) = (repo_dir / "locks").iterdir()
    lock.unlink()
    run = backup.resume()
    assert_clean_failure(run, "lost its repository lock", "removed")
    _assert_nothing_kept(cli, repo_dir)


@pytest.fixture(scope="module")
def seaweed() -> Iterator[SeaweedServer]:
    with (
        tempfile.TemporaryDirectory(prefix="vmkeep-lease-s3-", ignore_cleanup_errors=True) as work,
        started_or_skip(SeaweedServer(Path(work)), ("vmkeep",)) as server,
    ):
        yield server


def _s3_repo(cli: Cli, server: SeaweedServer) -> tuple[str, str]:
    """A fresh repository on the S3 server: its URL and its key prefix in the bucket."""
    prefix = f"repo-{uuid.uuid4().hex[:8]}"
    cli.env.update(AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key)
    url = f"s3://vmkeep/{prefix}?endpoint={server.endpoint}&region=us-east-1&path_style=1"
    cli("init", url, "--format", "1")  # chunk objects are counted
    return url, prefix


def _s3_names(server: SeaweedServer, prefix: str) -> set[str]:
    pages = (
        server.client().get_paginator("list_objects_v2").paginate(Bucket="vmkeep", Prefix=prefix)
    )
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


@pytest.mark.parametrize("stage", ["stored", "manifest"])
def test_lease_loss_on_s3(
    cli: Cli,
    make_vm: Callable[..., Path],
    seaweed: SeaweedServer,
    tmp_path: Path,
    stage: str,
) -> None:
    """The same on an object store: paused after dedup past the lease (the lock check
    fails), or right before the manifest (the gc epoch read after it withdraws the point)."""
    needs_other_host()
    url, prefix = _s3_repo(cli, seaweed)
    vm = make_vm()
    point = cli("backup", str(vm), "--remote", url, "--json").json()["restore_point"]
    cli("forget", point, "--remote", url)
    chunks = f"{prefix}/chunks/"
    assert _s3_names(seaweed, chunks)
    lease = 2 if stage == "stored" else 60
    backup = start_stopped_backup(cli, vm, url, stage, lease, tmp_path / "stop")
    backup.hold(1.0)
    gc = gc_from(cli, url, lease=0.5)
    assert gc.code == 0 and gc.json()["chunks_deleted"] > 0, gc.err
    assert _s3_names(seaweed, chunks) == set()
    run = backup.resume(paused_at_least=1.5)
    words = "lost its repository lock" if stage == "stored" else "a gc ran during this backup"
    assert_clean_failure(run, words)
    assert _points(cli, url) == []
    assert _s3_names(seaweed, f"{prefix}/manifests/") == set()


def test_a_crashed_gc_does_not_block_backups(
    cli: Cli, make_vm: Callable[..., Path], repo_dir: Path
) -> None:
    """A gc killed mid-sweep leaves its marker "running" and no lock: backups confirm their
    chunks and go on; the next gc that completes marks the epoch done."""
    vm = make_vm()
    cli("backup", str(vm), "--remote", str(repo_dir))
    marker = repo_dir / "gc-epoch"
    marker.write_text('{"epoch": "dead", "state": "running", "lock": "locks/exclusive-gone"}')
    run = cli("backup", str(vm), "--remote", str(repo_dir), "--json")
    assert run.json()["restore_point"] in _points(cli, str(repo_dir))
    cli("gc", "--remote", str(repo_dir))
    assert '"state": "done"' in marker.read_text()
    assert cli("verify", "--remote", str(repo_dir), "--json").json()["ok"]
