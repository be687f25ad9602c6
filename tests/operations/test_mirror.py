"""Mirror between two real local repositories with different passphrases: the target verifies
and restores hash-equal, chunks it holds are never uploaded again, a bad source point fails
alone and never appears in the target, and the target's lock, retention and refusals hold."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from tests.vm_dirs import write_raw_vm_json
from vmkeep.connectors.base import VmConfig
from vmkeep.connectors.files import FilesConnector
from vmkeep.errors import UsageError
from vmkeep.operations.backup import BackupOptions, backup_vm, vm_backup_lock
from vmkeep.operations.mirror import (
    COPIED,
    FAILED,
    PRESENT,
    RETENTION,
    MirrorOptions,
    MirrorReport,
    mirror,
)
from vmkeep.operations.restore import restore_vm
from vmkeep.operations.retention import RetentionPolicy
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.format import chunk_object_name, manifest_object_name
from vmkeep.repository.locks import RepositoryLock
from vmkeep.repository.repository import Repository
from vmkeep.repository.verify import verify

KiB, MiB = 1 << 10, 1 << 20
CHUNK = 64 * KiB
DISK_SIZE = 2 * MiB + 1000  # a short last chunk
SOURCE_PASS, TARGET_PASS = b"source passphrase", b"another target passphrase"


def make_vm(root: Path, name: str) -> Path:
    """A files VM: random data in the first MiB, a hole, random bytes up to the end."""
    vm = root / name
    vm.mkdir(parents=True)
    rng = random.Random(name)
    with open(vm / "disk0.img", "wb") as f:
        f.truncate(DISK_SIZE)
        f.write(rng.randbytes(MiB))
        f.seek(DISK_SIZE - 5000)
        f.write(rng.randbytes(5000))
    write_raw_vm_json(vm, name, rng)
    return vm


def change(vm: Path, seed: int, chunks: int = 3) -> None:
    """Rewrite `chunks` whole chunks of the data with new random bytes."""
    rng = random.Random(f"{vm}:{seed}")
    with open(vm / "disk0.img", "r+b") as f:
        for k in range(chunks):
            f.seek((seed * 7 + k * 3) % 16 * CHUNK)
            f.write(rng.randbytes(CHUNK))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def backup(repo: Repository, vm: Path, mode: str = "full") -> tuple[str, str, int]:
    """(point, disk hash at backup time, chunks new to the repository)."""
    report = backup_vm(repo, FilesConnector(), str(vm), BackupOptions(mode=mode), SilentProgress())
    return report.restore_point, sha256(vm / "disk0.img"), report.stats.chunks_new


def restored_hash(repo: Repository, point: str, where: Path) -> str:
    where.mkdir(parents=True)
    files = FilesConnector(where)
    report = restore_vm(repo, files, point, str(where), SilentProgress())
    return sha256(Path(report.location) / "disk0.img")


def chunk_objects(repo: Repository) -> set[bytes]:
    return {chunk_id for chunk_id, _ in repo.list_chunks()}


def run(source: Repository, target: Repository, **options: object) -> MirrorReport:
    return mirror(source, target, MirrorOptions(**options), SilentProgress())  # type: ignore[arg-type]


def statuses(report: MirrorReport) -> dict[str, str]:
    return {p.point_id: p.status for p in report.points}


@pytest.fixture
def repos(tmp_path: Path) -> tuple[Repository, Repository]:
    source = Repository.init(
        LocalRemote(tmp_path / "src"), "aes-256-gcm", lambda: SOURCE_PASS, CHUNK
    )
    target = Repository.init(
        LocalRemote(tmp_path / "dst"), "aes-256-gcm", lambda: TARGET_PASS, CHUNK
    )
    return source, target


def test_full_then_incremental_copies_only_what_the_target_lacks(
    tmp_path: Path, repos: tuple[Repository, Repository]
) -> None:
    source, target = repos
    vms = [make_vm(tmp_path / "vms", "web01"), make_vm(tmp_path / "vms", "db01")]
    expected: dict[str, str] = {}
    for seed, vm in enumerate(vms):
        point, digest, _ = backup(source, vm)
        expected[point] = digest
        change(vm, seed + 1)
        point, digest, _ = backup(source, vm, "delta")
        expected[point] = digest
    assert len(set(expected.values())) == 4

    report = run(source, target, mode="full")
    assert statuses(report) == dict.fromkeys(expected, COPIED)
    # Re-encrypted: not one chunk object name is shared (keyed IDs, another key), yet as many.
    assert chunk_objects(target).isdisjoint(chunk_objects(source))
    assert len(chunk_objects(target)) == len(chunk_objects(source))
    assert report.totals()["chunks_uploaded"] == len(chunk_objects(target))

    reopened = Repository.open(LocalRemote(tmp_path / "dst"), lambda: TARGET_PASS)
    checked = verify(reopened, None, SilentProgress())
    assert checked.ok and checked.points_checked == 4
    for n, (point, digest) in enumerate(expected.items()):
        assert restored_hash(reopened, point, tmp_path / f"restore-{n}") == digest
        mine, theirs = source.load_manifest(point), reopened.load_manifest(point)
        assert (theirs.created, theirs.vm, theirs.parent) == (mine.created, mine.vm, mine.parent)

    before = chunk_objects(target)
    again = run(source, target)
    assert statuses(again) == dict.fromkeys(expected, PRESENT)
    assert again.totals()["chunks_uploaded"] == again.totals()["bytes_fetched"] == 0
    assert chunk_objects(target) == before

    change(vms[0], 9, chunks=2)
    sizes = dict(source.list_chunks())
    point, digest, new_chunks = backup(source, vms[0], "delta")
    assert new_chunks == 2
    third = run(source, target)
    assert statuses(third)[point] == COPIED
    assert third.totals()["chunks_uploaded"] == new_chunks
    assert len(chunk_objects(target) - before) == new_chunks
    # Only the new chunks were read: the others' target IDs are known from earlier points.
    assert third.totals()["bytes_plaintext"] == new_chunks * CHUNK
    objects = sum(n for c, n in source.list_chunks() if c not in sizes)  # the new chunk objects
    assert third.totals()["bytes_fetched"] == objects > 0
    assert restored_hash(target, point, tmp_path / "restore-new") == digest


def test_vm_filter_by_glob_and_uuid(tmp_path: Path, repos: tuple[Repository, Repository]) -> None:
    source, target = repos
    points = {}
    for name in ("web01", "web02", "db01"):
        points[name] = backup(source, make_vm(tmp_path / "vms", name))[0]
    report = run(source, target, vms=["web*"])
    assert set(statuses(report)) == {points["web01"], points["web02"]}
    assert target.point_ids() == sorted([points["web01"], points["web02"]])
    db_uuid = source.load_manifest(points["db01"]).vm_uuid
    report = run(source, target, vms=[db_uuid])
    assert statuses(report) == {points["db01"]: COPIED}
    assert len(target.point_ids()) == 3

    tagged = backup_vm(
        source,
        FilesConnector(),
        str(tmp_path / "vms" / "db01"),
        BackupOptions(tags=["prod", "db"]),
        SilentProgress(),
    ).restore_point
    assert statuses(run(source, target, tags=["nightly"])) == {}
    assert statuses(run(source, target, tags=["db"], vms=["web*"])) == {}
    assert statuses(run(source, target, tags=["prod"])) == {tagged: COPIED}


def test_bad_source_chunks_fail_their_points_only(
    tmp_path: Path, repos: tuple[Repository, Repository]
) -> None:
    source, target = repos
    good, corrupt, deleted = (
        backup(source, make_vm(tmp_path / "vms", n))[0] for n in ("good", "bad", "gone")
    )
    # A chunk of each bad VM, referenced by no other point.
    shared = source.load_manifest(good).referenced_ids()
    bad_chunk = min(source.load_manifest(corrupt).referenced_ids() - shared)
    gone_chunk = min(source.load_manifest(deleted).referenced_ids() - shared)
    path = tmp_path / "src" / chunk_object_name(bad_chunk)
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    path.write_bytes(bytes(blob))
    (tmp_path / "src" / chunk_object_name(gone_chunk)).unlink()  # as a gc on the source would

    report = run(source, target, mode="full")
    result = statuses(report)
    assert result == {good: COPIED, corrupt: FAILED, deleted: FAILED}
    reasons = {p.point_id: p.reason for p in report.points}
    assert bad_chunk.hex()[:16] in reasons[corrupt] and "corrupt" in reasons[corrupt]
    assert "missing" in reasons[deleted]
    assert target.point_ids() == [good]  # never a point whose chunks are missing
    assert verify(target, None, SilentProgress()).ok


def test_verified_only_reads_every_chunk_back(
    tmp_path: Path, repos: tuple[Repository, Repository]
) -> None:
    source, plain_target = repos
    strict_target = Repository.init(LocalRemote(tmp_path / "dst2"), "none", lambda: b"", CHUNK)
    vm = make_vm(tmp_path / "vms", "web01")
    first = backup(source, vm)[0]
    run(source, plain_target)
    run(source, strict_target, verified_only=True)
    change(vm, 5)
    second = backup(source, vm, "delta")[0]
    # A chunk of the first point, reused by the second, rots in the source.
    ids = [source.load_manifest(p).referenced_ids() for p in (first, second)]
    path = tmp_path / "src" / chunk_object_name(min(ids[0] & ids[1]))
    path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 1]))

    lenient = run(source, plain_target)  # the target's copy is known good: not re-read
    assert statuses(lenient)[second] == COPIED
    strict = run(source, strict_target, verified_only=True)
    assert statuses(strict)[second] == FAILED
    assert strict_target.point_ids() == [first]


def test_target_lock_and_retention(tmp_path: Path, repos: tuple[Repository, Repository]) -> None:
    source, target = repos
    web, db = make_vm(tmp_path / "vms", "web01"), make_vm(tmp_path / "vms", "db01")
    web_points = [backup(source, web)[0]]
    for seed in (1, 2):
        change(web, seed)
        web_points.append(backup(source, web, "delta")[0])
    db_point = backup(source, db)[0]
    manifest = source.load_manifest(db_point)
    # A backup of db01 into the target holds the VM's lock: its point waits, web01 goes on.
    with vm_backup_lock(target, VmConfig("db01", manifest.vm_uuid, 1, 0, [])):
        report = run(source, target, retention=RetentionPolicy(keep_last=2))
    result = statuses(report)
    assert result[db_point] == FAILED
    assert "already being backed up" in {p.point_id: p.reason for p in report.points}[db_point]
    # keep-last 2 per VM: the oldest web point is not even copied.
    assert [result[p] for p in web_points] == [RETENTION, COPIED, COPIED]
    assert target.point_ids() == sorted(web_points[1:])

    change(web, 3)
    newest = backup(source, web, "delta")[0]
    report = run(source, target, retention=RetentionPolicy(keep_last=2))
    assert statuses(report)[newest] == COPIED and statuses(report)[db_point] == COPIED
    assert statuses(report)[web_points[0]] == RETENTION
    assert report.pruned == [web_points[1]]
    assert target.point_ids() == sorted([web_points[2], newest, db_point])


def test_refusals(tmp_path: Path, repos: tuple[Repository, Repository]) -> None:
    source, _ = repos
    same = Repository.open(LocalRemote(tmp_path / "src"), lambda: SOURCE_PASS)
    with pytest.raises(UsageError, match="its own source"):
        run(source, same)
    other = Repository.init(LocalRemote(tmp_path / "big"), "none", lambda: b"", 4 * MiB)
    with pytest.raises(UsageError, match="chunk size"):
        run(source, other)
    with pytest.raises(UsageError, match="mode"):
        run(source, other, mode="mirror")


def test_unencrypted_pair_reads_nothing_the_target_holds(tmp_path: Path) -> None:
    source = Repository.init(LocalRemote(tmp_path / "src"), "none", lambda: b"", CHUNK)
    target = Repository.init(LocalRemote(tmp_path / "dst"), "none", lambda: b"", CHUNK)
    vm = make_vm(tmp_path / "vms", "web01")
    point, digest, _ = backup(source, vm)
    backup(target, vm)  # the same data backed up straight into the target: the same IDs
    before = chunk_objects(target)
    report = run(source, target)
    assert statuses(report) == {point: COPIED}
    assert report.totals()["bytes_fetched"] == 0 and report.totals()["chunks_uploaded"] == 0
    assert chunk_objects(target) == before
    assert restored_hash(target, point, tmp_path / "restore") == digest
    strict = run(source, target, mode="full", verified_only=True)
    assert strict.totals()["bytes_fetched"] > 0 and strict.totals()["chunks_uploaded"] == 0


def test_full_mode_repairs_the_target_incremental_does_not(
    tmp_path: Path, repos: tuple[Repository, Repository]
) -> None:
    source, target = repos
    vm = make_vm(tmp_path / "vms", "web01")
    point, digest, _ = backup(source, vm)
    run(source, target)
    lost = min(chunk_objects(target))
    (tmp_path / "dst" / chunk_object_name(lost)).unlink()
    assert not verify(target, None, SilentProgress()).ok

    quick = run(source, target)
    assert statuses(quick) == {point: PRESENT} and quick.totals()["chunks_uploaded"] == 0
    full = run(source, target, mode="full")
    assert statuses(full) == {point: PRESENT}
    assert full.totals()["chunks_uploaded"] == 1
    assert lost in chunk_objects(target)
    assert verify(target, None, SilentProgress()).ok
    assert restored_hash(target, point, tmp_path / "restore") == digest


def test_a_running_gc_on_the_target_publishes_nothing(
    tmp_path: Path, repos: tuple[Repository, Repository]
) -> None:
    source, target = repos
    point = backup(source, make_vm(tmp_path / "vms", "web01"))[0]
    with RepositoryLock(target.remote, "exclusive", "gc"):
        report = run(source, target)
    assert statuses(report) == {point: FAILED}
    assert target.point_ids() == []
    assert statuses(run(source, target)) == {point: COPIED}


def test_an_unreadable_target_copy_fails_its_point(
    tmp_path: Path, repos: tuple[Repository, Repository]
) -> None:
    source, target = repos
    point = backup(source, make_vm(tmp_path / "vms", "web01"))[0]
    run(source, target)
    path = tmp_path / "dst" / manifest_object_name(point)
    path.write_bytes(path.read_bytes()[:-3])
    report = run(source, target)
    assert statuses(report) == {point: FAILED}
    assert "unreadable" in report.points[0].reason
