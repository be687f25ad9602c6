"""S3 Object Lock against a real SeaweedFS bucket with Object Lock enabled: the server itself
refuses to delete a locked version, vmkeep deletes versions (not delete markers) so space is
really freed, extends the lock of reused chunks, and prune/gc keep what is still locked."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tests.remotes.object_lock_setup import (
    LOCKED,
    PASS,
    PLAIN,
    disk_hash,
    lock_server,
    remote_for,
    unique,
)
from tests.remotes.s3_server import SeaweedServer
from vmkeep.connectors.files import FilesConnector
from vmkeep.connectors.files.demo import create_demo_vm, modify_demo_vm
from vmkeep.errors import ObjectLockedError, UsageError
from vmkeep.operations.backup import BackupOptions, backup_vm
from vmkeep.operations.prune import apply_prune
from vmkeep.operations.remote_probe import probe_remote
from vmkeep.operations.restore import restore_vm
from vmkeep.operations.retention import PointRef, RetentionPolicy, prune_plan
from vmkeep.progress import SilentProgress
from vmkeep.remotes.object_lock import LockPolicy
from vmkeep.remotes.s3 import S3Remote
from vmkeep.repository.format import chunk_object_name
from vmkeep.repository.gc import collect_garbage
from vmkeep.repository.repository import Repository


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    yield from lock_server(tmp_path_factory)


def versions(server: SeaweedServer, key: str) -> list[str]:
    page = server.client().list_object_versions(Bucket=LOCKED, Prefix=key)
    found = [*page.get("Versions", []), *page.get("DeleteMarkers", [])]
    return [v["VersionId"] for v in found if v["Key"] == key]


def test_the_server_refuses_to_delete_a_locked_version(server: SeaweedServer) -> None:
    prefix = unique("refuse")
    remote = remote_for(server, prefix)
    remote.set_lock_policy(LockPolicy.from_days(1))
    name = "chunks/ab/" + "ab" * 32
    remote.put(name, b"locked chunk")
    key = f"{prefix}/{name}"
    head = server.client().head_object(Bucket=LOCKED, Key=key)
    assert head["ObjectLockMode"] == "COMPLIANCE"
    lock_end = head["ObjectLockRetainUntilDate"]
    # a day, plus the margin chunks get (at least a day; second-granular on SeaweedFS)
    expected = datetime.now(UTC) + timedelta(days=2)
    assert abs((lock_end - expected).total_seconds()) < 30
    with pytest.raises(ClientError) as refused:  # the plain API, behind vmkeep's back
        server.client().delete_object(Bucket=LOCKED, Key=key, VersionId=head["VersionId"])
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    with pytest.raises(ObjectLockedError) as locked:
        remote.delete(name)
    assert locked.value.until is not None and abs((locked.value.until - lock_end).seconds) < 2
    assert [o.name for o in remote.list("chunks/")] == [name]  # still listed, no delete marker
    assert versions(server, key) == [head["VersionId"]]


def test_a_bucket_without_object_lock_is_refused(server: SeaweedServer) -> None:
    remote = remote_for(server, unique("plain"), PLAIN)
    with pytest.raises(UsageError, match="does not have Object Lock"):
        remote.set_lock_policy(LockPolicy.from_days(7))


def test_deletes_remove_every_version_once_expired(server: SeaweedServer) -> None:
    prefix = unique("expire")
    remote = remote_for(server, prefix)
    remote.set_lock_policy(LockPolicy(seconds=3))
    remote.put("manifests/p1", b"first")
    remote.put("manifests/p1", b"second")  # a second version of the same name
    remote.put("locks/shared-x", b"{}")  # never locked: locks must stay deletable
    remote.delete("locks/shared-x")
    key = f"{prefix}/manifests/p1"
    assert len(versions(server, key)) == 2
    with pytest.raises(ObjectLockedError):
        remote.delete("manifests/p1")
    assert len(versions(server, key)) == 2
    time.sleep(4.5)
    remote.delete("manifests/p1")
    assert versions(server, key) == []  # freed: no version and no delete marker is left
    assert versions(server, f"{prefix}/locks/shared-x") == []
    assert list(remote.list("")) == []


def test_reused_chunks_get_their_lock_extended_with_a_margin(server: SeaweedServer) -> None:
    prefix = unique("extend")
    writer = remote_for(server, prefix)
    writer.set_lock_policy(LockPolicy(seconds=40))  # chunks: 40 s + 40 s margin
    names = [f"chunks/0{i}/" + f"0{i}" * 32 for i in range(4)]
    for name in names:
        writer.put(name, name.encode())
    # The same process knows its own locks: no request at all.
    assert writer.protect_point("p0", names, [], datetime.now(UTC)).checked == 0
    # A later backup (another process) whose point must stay locked 2 minutes from now: the
    # chunks' 80 s do not reach need + margin/2, so they are extended to need + margin.
    later = remote_for(server, prefix)
    later.set_lock_policy(LockPolicy(seconds=120))
    need = datetime.now(UTC) + timedelta(seconds=120)
    stats = later.protect_point("p1", names, ["manifests/p1"], need)
    assert (stats.checked, stats.extended) == (4, 4)
    assert stats.floor == need + timedelta(seconds=120)
    client = server.client()
    for name in names:
        end = client.head_object(Bucket=LOCKED, Key=f"{prefix}/{name}")["ObjectLockRetainUntilDate"]
        assert end >= need.replace(microsecond=0) + timedelta(seconds=119)
    # The next backup a few seconds later finds the margin covers it: read, not extended.
    again = remote_for(server, prefix)
    again.set_lock_policy(LockPolicy(seconds=120))
    stats = again.protect_point("p2", names, [], need + timedelta(seconds=5))
    assert (stats.checked, stats.extended) == (4, 0)
    # Chunks an earlier point's manifest vouches for are not even asked about.
    stats = again.protect_point("p3", names, [], need, assured=set(names[:3]))
    assert (stats.assured, stats.checked) == (3, 0)  # the 4th: known from the HEAD above


def count_heads(remote: S3Remote) -> list[str]:
    """Object keys the remote's client sends HEAD requests for, as they happen."""
    heads: list[str] = []

    def seen(params: dict[str, object], **_: object) -> None:
        heads.append(str(params.get("Key")))

    remote._client.meta.events.register("provide-client-params.s3.HeadObject", seen)
    return heads


@pytest.mark.parametrize("encryption", ["aes-256-gcm", "none"])
def test_the_next_backup_trusts_its_parents_lock_claim_only_when_encrypted(
    server: SeaweedServer, tmp_path: Path, encryption: str
) -> None:
    """A daily delta must not HEAD every chunk of the disk: the previous point's manifest
    (authenticated when encrypted) says until when all its chunks are locked."""
    prefix = unique(f"claim-{encryption[:4]}")
    first_process = remote_for(server, prefix)
    repo = Repository.init(first_process, encryption, lambda: PASS, format_version=1)
    first_process.set_lock_policy(LockPolicy.from_days(7))
    (tmp_path / "vms").mkdir()
    vm = create_demo_vm(tmp_path / "vms", "claim", 32 * 1024 * 1024)
    first = backup_vm(repo, FilesConnector(), str(vm), BackupOptions(), SilentProgress())
    claim = repo.load_manifest(first.restore_point).lock
    assert claim is not None and claim["mode"] == "compliance"
    # config holds the wrapped keys: its version is locked as long as the point's chunks
    config = server.client().head_object(Bucket=LOCKED, Key=f"{prefix}/config")
    assert config["ObjectLockRetainUntilDate"] >= datetime.fromisoformat(claim["until"])
    with pytest.raises(ClientError):
        server.client().delete_object(
            Bucket=LOCKED, Key=f"{prefix}/config", VersionId=config["VersionId"]
        )
    assert datetime.fromisoformat(claim["chunks_until"]) > datetime.fromisoformat(claim["until"])

    next_process = remote_for(server, prefix)  # tomorrow's run knows nothing in memory
    repo2 = Repository.open(next_process, lambda: PASS)
    next_process.set_lock_policy(LockPolicy.from_days(7))
    heads = count_heads(next_process)
    modify_demo_vm(vm, 3)
    second = backup_vm(
        repo2, FilesConnector(), str(vm), BackupOptions(mode="delta"), SilentProgress()
    )
    reused = (
        repo2.load_manifest(second.restore_point).referenced_ids()
        & repo2.load_manifest(first.restore_point).referenced_ids()
    )
    # HEADs of the reused chunks (a new chunk is looked up once before it is stored, §2 of
    # docs/SCALE.md: that is dedup, not the lock)
    reused_hex = {c.hex() for c in reused}
    chunk_heads = [k for k in heads if "/chunks/" in k and k.rsplit("/", 1)[-1] in reused_hex]
    if encryption == "none":  # a forgeable manifest vouches for nothing: every chunk is asked
        assert len(chunk_heads) == len(reused) > 0
    else:
        assert chunk_heads == [] and reused
    lock = repo2.load_manifest(second.restore_point).lock
    assert lock is not None
    assert datetime.fromisoformat(lock["chunks_until"]) >= datetime.fromisoformat(lock["until"])


def test_backup_prune_gc_restore_with_a_short_lock(server: SeaweedServer, tmp_path: Path) -> None:
    """The whole cycle with a 10 s lock: while locked, prune keeps the old point (still
    listed, with its unlock date) and gc keeps its chunks; once expired, both free them, and
    no object version is left behind."""
    prefix = unique("cycle")
    remote = remote_for(server, prefix)
    repo = Repository.init(remote, "aes-256-gcm", lambda: PASS, format_version=1)
    remote.set_lock_policy(LockPolicy(seconds=10))
    (tmp_path / "vms").mkdir()
    vm = create_demo_vm(tmp_path / "vms", "imm", 32 * 1024 * 1024)
    first_hash = disk_hash(vm)
    connector = FilesConnector()
    first = backup_vm(repo, connector, str(vm), BackupOptions(), SilentProgress())
    modify_demo_vm(vm, 7)
    second = backup_vm(repo, connector, str(vm), BackupOptions(mode="delta"), SilentProgress())
    manifests, _ = repo.load_manifests()
    plan = prune_plan(
        [PointRef(m.id, m.vm_uuid, m.schedule, m.created) for m in manifests],
        RetentionPolicy(keep_last=1),
    )
    result = apply_prune(repo, plan, dry_run=False)
    assert result.removed == [] and list(result.locked) == [first.restore_point]
    until = result.locked[first.restore_point]
    assert until is not None and until > datetime.now(UTC)
    assert repo.point_ids() == sorted([first.restore_point, second.restore_point])
    (tmp_path / "r").mkdir()
    out = restore_vm(repo, connector, first.restore_point, str(tmp_path / "r"), SilentProgress())
    assert disk_hash(Path(out.location)) == first_hash

    # the manifest unlocked; its chunks carry the margin (10 s) on top
    time.sleep(max(0.0, (until - datetime.now(UTC)).total_seconds()) + 1.5)
    result = apply_prune(repo, plan, dry_run=False)
    assert result.removed == [first.restore_point] and not result.locked
    old_chunks = repo.load_manifest(second.restore_point).referenced_ids()
    report = collect_garbage(repo, SilentProgress())
    # The chunk the modification replaced: unreferenced, but still inside its margin.
    assert report.chunks_deleted == 0 and report.locked.count >= 1
    assert report.locked.last_unlock is not None
    time.sleep(max(0.0, (report.locked.last_unlock - datetime.now(UTC)).total_seconds()) + 1.5)
    report = collect_garbage(repo, SilentProgress())
    assert report.chunks_deleted >= 1 and report.locked.count == 0
    page = server.client().list_object_versions(Bucket=LOCKED, Prefix=f"{prefix}/chunks/")
    keys = {v["Key"] for v in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]}
    assert keys == {f"{prefix}/{chunk_object_name(c)}" for c in old_chunks}


def test_gc_keeps_locked_garbage_and_says_until_when(server: SeaweedServer) -> None:
    prefix = unique("gc")
    remote = remote_for(server, prefix)
    repo = Repository.init(remote, "none", lambda: PASS, format_version=1)
    remote.set_lock_policy(LockPolicy.from_days(1))
    orphan = b"left by a backup that was killed before its manifest"
    repo.put_chunk(repo.chunk_id(orphan), orphan, 3)
    report = collect_garbage(repo, SilentProgress())
    assert (report.chunks_deleted, report.locked.count) == (0, 1)
    assert report.locked.first_unlock is not None
    assert report.locked.first_unlock > datetime.now(UTC) + timedelta(hours=23)
    assert [cid for cid, _ in repo.list_chunks()] == [repo.chunk_id(orphan)]


def test_remote_test_checks_that_delete_and_overwrite_are_refused(
    server: SeaweedServer,
) -> None:
    report = probe_remote(remote_for(server, unique("probe")), 4 * 1024 * 1024)
    assert report.immutable is True
    assert report.checks["immutable: delete/overwrite refused"] == "ok", report.checks
    plain = probe_remote(remote_for(server, unique("probe"), PLAIN), 4 * 1024 * 1024)
    assert plain.immutable is False and plain.ok
