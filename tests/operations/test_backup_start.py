"""A backup's start costs O(1) requests in the number of restore points and chunks: it reads
its VM's previous manifest and the newest one (from the cached summaries), never lists the
chunks, and stats only the chunks that are new relative to its previous point (docs/SCALE.md).
Counted with a spy around a real local remote."""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.repository.spy_remote import CountingRemote, many_points, spied
from tests.repository.test_data_path import make_vm
from vmkeep.connectors.base import VmConfig
from vmkeep.connectors.files import FilesConnector
from vmkeep.errors import RepositoryError
from vmkeep.operations.backup import BackupOptions, BackupReport, backup_vm
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.format import DEFAULT_CHUNK_SIZE, chunk_object_name
from vmkeep.repository.point_cache import point_cache, point_summaries
from vmkeep.repository.repository import Repository


def backup(repo: Repository, vm: Path, mode: str = "full") -> tuple[BackupReport, CountingRemote]:
    point_summaries(repo)  # the cache is warm: only the backup's own requests are counted
    view, spy = spied(repo)
    report = backup_vm(view, FilesConnector(), str(vm), BackupOptions(mode=mode), SilentProgress())
    return report, spy


def test_backup_start_reads_two_manifests_and_lists_no_chunk(
    repo: Repository, tmp_path: Path
) -> None:
    many_points(repo, 40)
    vm, _ = make_vm(tmp_path)
    first, spy = backup(repo, vm)
    stored = first.stats.chunks_new
    assert stored > 0
    assert spy.calls[("get", "manifests")] == 1  # the repository's newest point only
    assert spy.calls[("list", "chunks/")] == 0
    assert spy.calls[("stat", "chunks")] == stored  # each new chunk looked up once
    assert spy.calls[("put", "chunks")] == stored

    many_points(repo, 30, start=datetime.now(UTC) + timedelta(hours=1))  # newer, other VMs
    second, spy = backup(repo, vm)
    assert spy.calls[("get", "manifests")] == 2  # its previous point and the newest point
    assert spy.calls[("list", "chunks/")] == 0
    assert spy.calls[("stat", "chunks")] == 0  # every chunk is one of the previous point's
    assert spy.calls[("put", "chunks")] == 0 and second.stats.chunks_new == 0

    with open(vm / "disk0.img", "r+b") as f:  # one chunk changes
        f.write(os.urandom(DEFAULT_CHUNK_SIZE))
    third, spy = backup(repo, vm)
    assert spy.calls[("get", "manifests")] == 2
    assert spy.calls[("stat", "chunks")] == 1 and spy.calls[("put", "chunks")] == 1
    assert third.stats.chunks_new == 1
    chunk0 = repo.load_manifest(third.restore_point).disks[0].chunk_id(0)
    assert repo.remote.stat(chunk_object_name(chunk0)) is not None


def test_a_chunk_another_vm_stored_is_found_by_stat(repo: Repository, tmp_path: Path) -> None:
    vm, _ = make_vm(tmp_path)
    first, _ = backup(repo, vm)
    twin = tmp_path / "twin"
    shutil.copytree(vm, twin)
    config = json.loads((twin / "vm.json").read_text())
    config.update(name="twin", uuid="5d1c8e2a-0000-4000-8000-0000000071a1")
    (twin / "vm.json").write_text(json.dumps(config))
    report, spy = backup(repo, twin)
    assert report.stats.chunks_new == 0 and report.stats.bytes_written == 0
    assert spy.calls[("put", "chunks")] == 0
    assert spy.calls[("stat", "chunks")] == first.stats.chunks_new


def test_a_delta_reads_its_previous_manifest_only(repo: Repository, tmp_path: Path) -> None:
    many_points(repo, 10)
    vm, _ = make_vm(tmp_path)
    backup(repo, vm)
    report, spy = backup(repo, vm, mode="delta")
    assert report.stats.bytes_read == 0  # unchanged: the previous index is reused
    assert spy.calls[("get", "manifests")] == 1  # the VM's point is the newest one too
    assert sum(n for (op, where), n in spy.calls.items() if where == "chunks") == 0


def test_backup_refuses_when_the_newest_point_disagrees_with_the_config(tmp_path: Path) -> None:
    """The check that replaced reading every manifest (FORMAT.md §5.2): the newest point is
    read even when the cache knows it, and an encrypted manifest in a repository whose config
    says unencrypted refuses the backup before any chunk is written."""
    plain = Repository.init(LocalRemote(tmp_path / "plain"), "none", lambda: b"", format_version=1)
    other = Repository.init(
        LocalRemote(tmp_path / "enc"), "aes-256-gcm", lambda: b"pw", format_version=1
    )
    newest = many_points(plain, 3)[-1]
    sealed = many_points(other, 1)[0]
    point_summaries(plain)  # the cache now vouches for all three
    (tmp_path / "plain" / "manifests" / newest.id).write_bytes(
        (tmp_path / "enc" / "manifests" / sealed.id).read_bytes()
    )
    chunks_before = sorted(p.name for p in (tmp_path / "plain" / "chunks").rglob("*"))
    vm, _ = make_vm(tmp_path)
    with pytest.raises(RepositoryError, match="config says unencrypted"):
        backup_vm(plain, FilesConnector(), str(vm), BackupOptions(), SilentProgress())
    assert sorted(p.name for p in (tmp_path / "plain" / "chunks").rglob("*")) == chunks_before


class CountingLookups(FilesConnector):
    """The files connector, counting get_vm calls."""

    lookups = 0

    def get_vm(self, ref: str) -> VmConfig:
        self.lookups += 1
        return super().get_vm(ref)


def test_backup_of_a_vm_config_read_before_does_not_look_it_up_again(
    repo: Repository, tmp_path: Path
) -> None:
    """The CLI reads the VM while the repository key is derived (docs/RUN-OVERHEAD.md) and
    hands backup_vm the VmConfig: the point is that VM's, with no second lookup."""
    vm, _ = make_vm(tmp_path)
    source = CountingLookups()
    config = source.get_vm(str(vm))
    report = backup_vm(repo, source, config, BackupOptions(), SilentProgress())
    assert source.lookups == 1
    assert report.vm_uuid == config.uuid
    assert repo.load_manifest(report.restore_point).vm["uuid"] == config.uuid


def test_the_next_backup_reads_the_previous_manifest_once(repo: Repository, tmp_path: Path) -> None:
    """The next backup of a VM reads the manifest of the point the last one wrote once: to
    summarise it into the cache and as its previous point (not twice); a point withdrawn
    since is still left out (the listing is authoritative). A backup does not put its own
    point into the cache: only manifests read back are cached (docs/SCALE.md)."""
    vm, _ = make_vm(tmp_path)
    first = backup_vm(repo, FilesConnector(), str(vm), BackupOptions(), SilentProgress())
    view, spy = spied(repo)
    second = backup_vm(
        view, FilesConnector(), str(vm), BackupOptions(mode="delta"), SilentProgress()
    )
    assert spy.calls[("get", "manifests")] == 1
    assert second.stats.chunks_new == 0
    cached = point_cache(repo)
    assert cached is not None and set(cached.load()) == {first.restore_point}  # read back only
    repo.delete_manifest(second.restore_point)  # e.g. withdrawn after a gc overlap
    points, _ = point_summaries(repo)
    assert [p.id for p in points] == [first.restore_point]
