"""Points with a disk kept in a version 2 manifest object (docs/FORMAT.md §5.5), through the
real operations of a files-connector VM in a format 3 repository, with the table threshold
and piece size lowered so that a 2.5 MiB disk of 64 KiB chunks makes tables of ~9 pieces:
backup full and delta write version 2 objects, restore is hash-equal, verify is clean; a
flipped byte in a piece makes verify report the point and restore and gc refuse; gc after a
forget keeps every chunk of the table point and deletes the forgotten one's; mirror and list
work."""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.repository.table_points import (
    CHUNK,
    THRESHOLD,
    flip,
    object_path,
    packed_repo,
    small_tables,
)
from tests.vm_dirs import write_raw_vm_json
from vmkeep.connectors.base import VmConfig
from vmkeep.connectors.files import FilesConnector
from vmkeep.errors import IntegrityError, RepositoryError, UsageError
from vmkeep.operations.backup import BackupOptions, backup_vm, check_index_size
from vmkeep.operations.export import export_disk
from vmkeep.operations.mirror import COPIED, MirrorOptions, mirror
from vmkeep.operations.point_disk import open_point_disk
from vmkeep.operations.restore import restore_vm
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.remotes.object_lock import LockPolicy, ProtectStats
from vmkeep.remotes.retention_records import decode_record, record_name
from vmkeep.repository import table_lock
from vmkeep.repository.gc import collect_garbage
from vmkeep.repository.limits import MANIFEST_BYTES_PER_ID, MAX_MANIFEST_DOC
from vmkeep.repository.manifest import DiskIndex, Manifest
from vmkeep.repository.manifest_table import TableReader
from vmkeep.repository.point_cache import point_summaries
from vmkeep.repository.repository import Repository
from vmkeep.repository.verify import verify

SIZE = 40 * CHUNK + 1000  # a short last chunk
HOLE = range(10, 15)  # chunks left as a hole: the table has two runs


@pytest.fixture(autouse=True)
def _small(monkeypatch: pytest.MonkeyPatch) -> None:
    small_tables(monkeypatch)


def make_vm(root: Path) -> Path:
    vm = root / "big"
    vm.mkdir(parents=True)
    rng = random.Random(1)
    with open(vm / "disk0.img", "wb") as f:
        f.truncate(SIZE)
        for k in range(41):
            if k not in HOLE:
                f.seek(k * CHUNK)
                f.write(rng.randbytes(min(CHUNK, SIZE - k * CHUNK)))
    write_raw_vm_json(vm, "big", rng)
    return vm


def change(vm: Path, chunks: list[int], seed: int) -> None:
    rng = random.Random(seed)
    with open(vm / "disk0.img", "r+b") as f:
        for k in chunks:
            f.seek(k * CHUNK)
            f.write(rng.randbytes(CHUNK))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def backup(repo: Repository, vm: Path, mode: str) -> str:
    report = backup_vm(repo, FilesConnector(), str(vm), BackupOptions(mode=mode), SilentProgress())
    return report.restore_point


def restored(repo: Repository, point: str, where: Path) -> str:
    where.mkdir(parents=True)
    report = restore_vm(repo, FilesConnector(where), point, str(where), SilentProgress())
    return sha(Path(report.location) / "disk0.img")


def is_table_point(repo: Repository, root: Path, point: str) -> bool:
    if object_path(root, point).read_bytes()[4] != 2:
        return False
    table = repo.load_manifest(point).disks[0].table
    return isinstance(table, TableReader) and len(table.pieces) >= 8


def ids_of(repo: Repository, point: str) -> set[bytes]:
    return repo.load_manifest(point).referenced_ids()


@pytest.mark.parametrize("encryption", ["none", "aes-256-gcm"])
def test_backup_restore_verify_gc_of_table_points(tmp_path: Path, encryption: str) -> None:
    root = tmp_path / "r"
    repo = packed_repo(root, encryption)
    vm = make_vm(tmp_path / "vms")
    first, first_sha = backup(repo, vm, "full"), sha(vm / "disk0.img")
    change(vm, [0, 3, 12, 39], seed=2)  # 12 fills part of the hole
    second, second_sha = backup(repo, vm, "delta"), sha(vm / "disk0.img")
    assert first_sha != second_sha
    assert is_table_point(repo, root, first) and is_table_point(repo, root, second)
    assert len(ids_of(repo, first)) == 41 - len(HOLE)
    assert restored(repo, first, tmp_path / "o1") == first_sha
    assert restored(repo, second, tmp_path / "o2") == second_sha
    report = verify(repo, None, SilentProgress())
    assert report.ok and report.points_checked == 2
    assert report.chunks_checked == len(ids_of(repo, first) | ids_of(repo, second))
    (summary_1, summary_2), problems = point_summaries(repo)  # the tables walked
    assert not problems
    assert summary_1.data_bytes == 35 * CHUNK + 1000  # 36 chunks, the last of 1000 bytes
    assert summary_2.data_bytes == 36 * CHUNK + 1000  # chunk 12 filled

    gone = ids_of(repo, first) - ids_of(repo, second)
    assert len(gone) == 3  # chunks 0, 3, 39 as they were
    repo.delete_manifest(first)
    collect_garbage(repo, SilentProgress())
    repo.packed.reload()  # type: ignore[union-attr]
    assert not any(repo.has_chunk(c) for c in gone)
    assert all(repo.has_chunk(c) for c in ids_of(repo, second))
    assert restored(repo, second, tmp_path / "o3") == second_sha


def test_a_second_full_finds_every_chunk_without_the_previous_ids(tmp_path: Path) -> None:
    """The previous point has a table: its IDs are not made a set; the index answers."""
    repo = packed_repo(tmp_path / "r")
    vm = make_vm(tmp_path / "vms")
    backup(repo, vm, "full")
    again = backup_vm(repo, FilesConnector(), str(vm), BackupOptions(), SilentProgress())
    assert again.stats.chunks == 36 and again.stats.chunks_new == 0  # the hole is not read
    assert again.stats.bytes_written == 0


def test_a_bad_piece_makes_the_point_bad(tmp_path: Path) -> None:
    root = tmp_path / "r"
    repo = packed_repo(root, "aes-256-gcm")
    vm = make_vm(tmp_path / "vms")
    good, good_sha = backup(repo, vm, "full"), sha(vm / "disk0.img")
    change(vm, [5], seed=3)
    bad = backup(repo, vm, "delta")
    table = repo.load_manifest(bad).disks[0].table
    assert isinstance(table, TableReader)
    flip(object_path(root, bad), table.pieces[3].offset + 30)
    report = verify(repo, None, SilentProgress())
    assert not report.ok and report.points_checked == 1
    assert [p.point_id for p in report.corrupt_manifests] == [bad]
    assert "piece 3" in report.corrupt_manifests[0].error
    with pytest.raises(IntegrityError, match="piece 3 is corrupt"):
        restored(repo, bad, tmp_path / "o1")
    with pytest.raises(RepositoryError, match=f"gc refuses to run: restore point {bad}"):
        collect_garbage(repo, SilentProgress())
    assert restored(repo, good, tmp_path / "o2") == good_sha
    points, problems = point_summaries(repo)  # heads only (the table's data_bytes): listed
    assert [p.id for p in points] == [good, bad] and not problems  # verify is the check


def test_a_locked_table_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Retention locks (local records) without a set of a table point's IDs: the full's
    record names every pack; the delta's own packs are in its record, and together the
    records name every pack both points use. A parent's claim (an S3 lock; local records
    make none) covers the chunks kept at their place, and a changed chunk's predecessor is
    the parent's chunk at its place."""
    root = tmp_path / "r"
    repo = packed_repo(root, "aes-256-gcm")
    assert isinstance(repo.remote, LocalRemote)
    repo.remote.set_lock_policy(LockPolicy(seconds=3600))
    referenced = Manifest.referenced_ids

    def guarded_ids(self: Manifest) -> set[bytes]:
        assert not self.has_table(), "a table point's IDs made a set"
        return referenced(self)

    monkeypatch.setattr(Manifest, "referenced_ids", guarded_ids)
    vm = make_vm(tmp_path / "vms")
    first = backup(repo, vm, "full")
    packs = {str(p.relative_to(root)) for p in (root / "packs").rglob("*") if p.is_file()}
    change(vm, [1, 2], seed=4)
    second, want = backup(repo, vm, "delta"), sha(vm / "disk0.img")
    every = {str(p.relative_to(root)) for p in (root / "packs").rglob("*") if p.is_file()}
    records = []
    for point in (first, second):
        assert is_table_point(repo, root, point) and repo.load_manifest(point).lock
        record = decode_record(point, (root / record_name(point)).read_bytes())
        assert record is not None
        records.append(set(record.objects))
    assert packs and packs <= records[0]  # every pack then was the full's
    assert every - packs and every - packs <= records[1]  # the delta's own packs
    assert every <= records[0] | records[1]
    assert restored(repo, second, tmp_path / "o") == want

    parent, child = repo.load_manifest(first), repo.load_manifest(second)
    seen: dict[str, Any] = {}

    def spy(*args: Any) -> ProtectStats:
        seen["ids"] = list(args[3])  # walks the child's table, filling the predecessors
        seen["before"] = dict(args[5])
        return ProtectStats()

    monkeypatch.setattr(table_lock, "protect_packed_point", spy)
    until = datetime.now(UTC)
    stats = table_lock.protect_table_point(repo.packed, repo.remote, child, parent, until)  # type: ignore[arg-type]
    new, old = child.disks[0], parent.disks[0]
    assert stats.assured == 36 - 2
    assert seen["ids"] == [new.chunk_id(1), new.chunk_id(2)]
    assert seen["before"] == {new.chunk_id(i): old.chunk_id(i) for i in (1, 2)}
    table_lock.protect_table_point(repo.packed, repo.remote, child, None, until)  # type: ignore[arg-type]
    assert len(seen["ids"]) == 36 and seen["before"] == {}  # no claim: every chunk


def test_mirror_and_list_of_a_table_point(tmp_path: Path) -> None:
    source, target = packed_repo(tmp_path / "s"), packed_repo(tmp_path / "t", "aes-256-gcm")
    vm = make_vm(tmp_path / "vms")
    point, want = backup(source, vm, "full"), sha(vm / "disk0.img")
    report = mirror(source, target, MirrorOptions(), SilentProgress())
    assert [p.status for p in report.points] == [COPIED]
    copy = point  # the same point id in the target
    assert is_table_point(target, tmp_path / "t", copy)
    assert restored(target, copy, tmp_path / "o") == want
    (summary,), problems = point_summaries(target)
    assert not problems and summary.id == copy and summary.disks[0].size == SIZE


def test_format_3_counts_only_inline_disks_against_the_document_bound() -> None:
    """A disk over the threshold goes to a table: no document bound for it in format 3;
    formats 1 and 2 (and format 3's inline disks) keep refusing before reading."""
    vm = VmConfig(name="huge", uuid="u", vcpus=1, memory=1, disks=[], metadata={})
    too_many = MAX_MANIFEST_DOC // MANIFEST_BYTES_PER_ID + 1
    check_index_size(vm, [[(0, too_many)]], packed=True)
    with pytest.raises(UsageError, match="more than one restore point's index may hold"):
        check_index_size(vm, [[(0, too_many)]], packed=False)
    inline = [[(0, THRESHOLD)] for _ in range(too_many // THRESHOLD + 1)]
    with pytest.raises(UsageError):
        check_index_size(vm, inline, packed=True)


def test_no_command_but_locks_materialises_a_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backup full and delta, restore, verify, listing, mirror and gc of table points never
    hold a table whole: DiskIndex.runs (materialising) and Manifest.referenced_ids (a set)
    fail on table points while they run."""
    root = tmp_path / "r"
    repo = packed_repo(root, "aes-256-gcm")
    vm = make_vm(tmp_path / "vms")
    runs, referenced = DiskIndex.runs, Manifest.referenced_ids

    def guarded_runs(self: DiskIndex) -> object:
        assert self.table is None, "a table materialised"
        return runs.fget(self)  # type: ignore[attr-defined]

    def guarded_ids(self: Manifest) -> set[bytes]:
        assert not self.has_table(), "a table point's IDs made a set"
        return referenced(self)

    monkeypatch.setattr(DiskIndex, "runs", property(guarded_runs))
    monkeypatch.setattr(Manifest, "referenced_ids", guarded_ids)
    first = backup(repo, vm, "full")
    change(vm, [7, 30], seed=5)
    second, want = backup(repo, vm, "delta"), sha(vm / "disk0.img")
    assert is_table_point(repo, root, first) and is_table_point(repo, root, second)
    assert restored(repo, second, tmp_path / "o") == want
    assert verify(repo, None, SilentProgress()).ok
    assert len(point_summaries(repo)[0]) == 2
    target = packed_repo(tmp_path / "t", "aes-256-gcm")
    assert [p.status for p in mirror(repo, target, MirrorOptions(), SilentProgress()).points] == [
        COPIED,
        COPIED,
    ]
    assert restored(target, second, tmp_path / "o-mirror") == want
    repo.delete_manifest(first)
    collect_garbage(repo, SilentProgress())
    assert restored(repo, second, tmp_path / "o2") == want


def test_export_and_point_disk_reads_of_a_table_point(tmp_path: Path) -> None:
    """Export (the restore's path) and PointDisk (mount, NBD, file restore: chunk IDs by
    index through the piece cache, extents from the table) give the disk's bytes."""
    root = tmp_path / "r"
    repo = packed_repo(root)
    vm = make_vm(tmp_path / "vms")
    point, disk = backup(repo, vm, "full"), (vm / "disk0.img").read_bytes()
    out = tmp_path / "export.raw"
    export_disk(repo, point, "disk0", "raw", out, SilentProgress())
    assert out.read_bytes() == disk
    with open_point_disk(repo, point, "disk0") as reader:
        assert isinstance(reader.index.table, TableReader)
        rng = random.Random(7)
        for _ in range(40):
            offset = rng.randrange(SIZE)
            length = rng.randrange(1, 3 * CHUNK)
            assert reader.pread(offset, length) == disk[offset : offset + length]
        data = [(e.offset, e.length) for e in reader.extents() if e.data]
    assert data == [(0, 10 * CHUNK), (15 * CHUNK, SIZE - 15 * CHUNK)]
