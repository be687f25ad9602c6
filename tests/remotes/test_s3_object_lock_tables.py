"""Retention locks of table points (docs/FORMAT.md §5.5) on a real SeaweedFS bucket with
Object Lock: a delta's claim on its table-point parent covers the chunks it kept at their
place (repository/table_lock.py: no set of either point's IDs), every pack either point
uses carries a lock past the delta's end, and the delta restores."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.operations.test_table_points import change, make_vm, restored, sha
from tests.remotes.object_lock_setup import LOCKED, PASS, lock_server, remote_for, unique
from tests.remotes.s3_server import SeaweedServer
from tests.repository.table_points import CHUNK, small_tables
from vmkeep.connectors.files import FilesConnector
from vmkeep.operations.backup import BackupOptions, backup_vm
from vmkeep.progress import SilentProgress
from vmkeep.remotes.object_lock import LockPolicy, ProtectStats
from vmkeep.repository import retention_lock
from vmkeep.repository.manifest import Manifest
from vmkeep.repository.repository import Repository


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    yield from lock_server(tmp_path_factory)


def test_a_locked_delta_of_a_table_point(
    server: SeaweedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small_tables(monkeypatch)
    prefix = unique("tables")
    remote = remote_for(server, prefix)
    repo = Repository.init(remote, "aes-256-gcm", lambda: PASS, CHUNK, 3, CHUNK, 1 << 20)
    remote.set_lock_policy(LockPolicy.from_days(1))
    referenced = Manifest.referenced_ids

    def guarded_ids(self: Manifest) -> set[bytes]:
        assert not self.has_table(), "a table point's IDs made a set"
        return referenced(self)

    monkeypatch.setattr(Manifest, "referenced_ids", guarded_ids)
    stats: list[ProtectStats] = []
    real = retention_lock.protect_table_point

    def spy(*args: Any) -> ProtectStats:
        stats.append(real(*args))
        return stats[-1]

    monkeypatch.setattr(retention_lock, "protect_table_point", spy)
    vm = make_vm(tmp_path / "vms")
    options = BackupOptions()
    first = backup_vm(repo, FilesConnector(), str(vm), options, SilentProgress()).restore_point
    change(vm, [4, 20], seed=6)
    options.mode = "delta"
    second = backup_vm(repo, FilesConnector(), str(vm), options, SilentProgress()).restore_point
    want = sha(vm / "disk0.img")
    assert len(stats) == 2 and stats[0].assured == 0
    assert stats[1].assured == 36 - 2  # the parent's claim, by place
    lock = repo.load_manifest(second).lock
    assert lock is not None
    until = datetime.fromisoformat(lock["until"])
    client = server.client()
    for obj in remote.list("packs/"):
        head = client.head_object(Bucket=LOCKED, Key=f"{prefix}/{obj.name}")
        assert head["ObjectLockRetainUntilDate"] >= until, obj.name
    assert first != second and restored(repo, second, tmp_path / "o") == want
