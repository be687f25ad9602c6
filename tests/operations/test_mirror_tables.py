"""Mirror of points whose disk is kept in a table (docs/MIRROR.md, FORMAT.md §5.5), with the
threshold and piece size lowered as in test_table_points.py: into a format 3 target the copy
is a version 2 object written from a file table, with no table, ID set or listing of the
target's chunks in memory; a delta is copied by place against its twin (only its changed
chunks read); a repeated chunk the bounded cache forgot is read again, never uploaded twice;
into a format 1/2 target the table is materialised when its IDs fit, else the point fails with
one clear reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.operations.test_table_points import (
    backup,
    change,
    is_table_point,
    make_vm,
    restored,
    sha,
)
from tests.repository.table_points import CHUNK, object_path, packed_repo, small_tables
from vmkeep.interfaces.cli.mirror_commands import check_migration
from vmkeep.operations import mirror_table
from vmkeep.operations.mirror import COPIED, FAILED, MirrorOptions, mirror
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.manifest import DiskIndex, Manifest
from vmkeep.repository.repository import Repository
from vmkeep.repository.table_builder import FileTable
from vmkeep.repository.verify import verify

STORED = 36  # non-zero chunks of make_vm's disk (41 less a hole of 5)


@pytest.fixture(autouse=True)
def _small(monkeypatch: pytest.MonkeyPatch) -> None:
    small_tables(monkeypatch)
    monkeypatch.setattr(mirror_table, "BATCH", 5)  # several batches a disk


def guard_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """DiskIndex.runs and Manifest.referenced_ids fail on tables; a format 3 target's chunks
    are never listed (a set of every chunk of the target)."""
    runs, referenced = DiskIndex.runs, Manifest.referenced_ids

    def guarded_runs(self: DiskIndex) -> object:
        assert self.table is None, "a table materialised"
        return runs.fget(self)  # type: ignore[attr-defined]

    def guarded_ids(self: Manifest) -> set[bytes]:
        assert not self.has_table(), "a table point's IDs made a set"
        return referenced(self)

    def no_listing(self: Repository) -> object:
        raise AssertionError("the target's chunks listed")

    monkeypatch.setattr(DiskIndex, "runs", property(guarded_runs))
    monkeypatch.setattr(Manifest, "referenced_ids", guarded_ids)
    monkeypatch.setattr(Repository, "list_chunks", no_listing)


def test_mirror_of_table_points_in_bounded_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encrypted both sides (one plaintext, two IDs): a full and a delta in one run (the
    delta's twin is the full just copied), a second delta in a later run (its twin the
    delta both hold); each delta reads only its changed chunks from the source."""
    source = packed_repo(tmp_path / "s", "aes-256-gcm")
    target = packed_repo(tmp_path / "t", "aes-256-gcm")
    vm = make_vm(tmp_path / "vms")
    guard_tables(monkeypatch)
    full, full_sha = backup(source, vm, "full"), sha(vm / "disk0.img")
    change(vm, [0, 12, 39], seed=2)  # 12 fills part of the hole
    delta, delta_sha = backup(source, vm, "delta"), sha(vm / "disk0.img")

    report = mirror(source, target, MirrorOptions(), SilentProgress())
    first, second = report.points
    assert [p.status for p in report.points] == [COPIED, COPIED], report.to_json()
    assert (first.chunks, first.chunks_uploaded) == (STORED, STORED)
    assert (second.chunks, second.chunks_uploaded, second.chunks_present) == (STORED + 1, 3, 34)
    assert second.bytes_plaintext == 3 * CHUNK  # only the changed chunks were read

    change(vm, [5], seed=3)
    later, later_sha = backup(source, vm, "delta"), sha(vm / "disk0.img")
    lookups = []
    has_chunk = Repository.has_chunk

    def counted(self: Repository, chunk_id: bytes) -> bool:
        lookups.append(chunk_id)
        return has_chunk(self, chunk_id)

    monkeypatch.setattr(Repository, "has_chunk", counted)
    (third,) = mirror(source, target, MirrorOptions(), SilentProgress()).points[2:]
    assert third.status == COPIED and third.bytes_plaintext == CHUNK
    assert len(lookups) == 1  # the changed chunk: the twin's others are trusted (incremental)
    assert (third.chunks_uploaded, third.chunks_present) == (1, STORED)

    for point, want in ((full, full_sha), (delta, delta_sha), (later, later_sha)):
        assert is_table_point(target, tmp_path / "t", point)
        assert restored(target, point, tmp_path / f"o-{point}") == want
    checked = verify(target, None, SilentProgress())
    assert checked.ok and checked.points_checked == 3


def test_a_repeat_the_cache_forgot_is_read_again_never_stored_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ID cache holds one entry: chunk 30 equal to chunk 2 (other batches) is read again
    to learn its target ID, found in the target's index, not uploaded."""
    monkeypatch.setattr(mirror_table, "REMEMBERED", 1)
    source = packed_repo(tmp_path / "s", "aes-256-gcm")
    target = packed_repo(tmp_path / "t", "aes-256-gcm")
    vm = make_vm(tmp_path / "vms")
    with open(vm / "disk0.img", "r+b") as f:
        f.seek(2 * CHUNK)
        same = f.read(CHUNK)
        f.seek(30 * CHUNK)
        f.write(same)
    point, want = backup(source, vm, "full"), sha(vm / "disk0.img")
    guard_tables(monkeypatch)
    (result,) = mirror(source, target, MirrorOptions(), SilentProgress()).points
    assert result.status == COPIED
    assert (result.chunks, result.chunks_uploaded, result.chunks_present) == (STORED, 35, 1)
    assert result.bytes_plaintext == STORED * CHUNK - CHUNK + 1000  # all read, the last short
    assert restored(target, point, tmp_path / "o") == want
    assert verify(target, None, SilentProgress()).ok


def format_2_repo(root: Path) -> Repository:
    return Repository.init(
        LocalRemote(root), "aes-256-gcm", lambda: b"pw", chunk_size=CHUNK, format_version=2
    )


def test_into_a_format_2_target_the_table_is_materialised(tmp_path: Path) -> None:
    source = packed_repo(tmp_path / "s", "aes-256-gcm")
    target = format_2_repo(tmp_path / "t")
    vm = make_vm(tmp_path / "vms")
    point, want = backup(source, vm, "full"), sha(vm / "disk0.img")
    assert is_table_point(source, tmp_path / "s", point)
    (result,) = mirror(source, target, MirrorOptions(), SilentProgress()).points
    assert result.status == COPIED and result.chunks_uploaded == STORED
    assert object_path(tmp_path / "t", point).read_bytes()[4] == 1  # a version 1 object
    assert len(target.load_manifest(point).referenced_ids()) == STORED
    assert restored(target, point, tmp_path / "o") == want
    assert verify(target, None, SilentProgress()).ok


def test_into_a_format_2_target_a_table_too_big_for_its_document_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The document bound lowered under the point's 36 IDs: the point fails with one clear
    reason before any chunk is copied; the target holds no manifest and no chunk."""
    monkeypatch.setattr(mirror_table, "MAX_MANIFEST_DOC", 30 * mirror_table.MANIFEST_BYTES_PER_ID)
    source = packed_repo(tmp_path / "s")
    target = format_2_repo(tmp_path / "t")
    vm = make_vm(tmp_path / "vms")
    point = backup(source, vm, "full")
    report = mirror(source, target, MirrorOptions(), SilentProgress())
    (result,) = report.points
    assert result.status == FAILED and report.failed == [result]
    assert result.reason == (
        f"restore point {point} has 36 chunk IDs, more than a restore point of a format 1 or 2 "
        "repository may hold (30): mirror it into a format 3 repository"
    )
    assert result.bytes_fetched == 0 and result.chunks_uploaded == 0
    assert not (tmp_path / "t" / "manifests").exists() or not any(
        (tmp_path / "t" / "manifests").rglob("*")
    )
    assert not any(target.list_chunks())


def test_migrate_of_a_format_2_point_over_the_threshold_writes_a_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`vmkeep migrate` (check_migration, then a full mirror): a format 2 point whose disk
    has more IDs than a format 3 point keeps inline becomes a version 2 object there, its
    IDs built in a file table, and restores hash-equal."""
    source = format_2_repo(tmp_path / "s")
    target = packed_repo(tmp_path / "t", "aes-256-gcm")
    vm = make_vm(tmp_path / "vms")
    point, want = backup(source, vm, "full"), sha(vm / "disk0.img")
    assert object_path(tmp_path / "s", point).read_bytes()[4] == 1  # inline, 36 IDs > 8
    check_migration(source, target)
    built = []
    file_table = mirror_table.file_table

    def spy(ranges: list[tuple[int, int]]) -> FileTable:
        built.append(ranges)
        return file_table(ranges)

    monkeypatch.setattr(mirror_table, "file_table", spy)
    guard_tables(monkeypatch)
    (result,) = mirror(source, target, MirrorOptions(mode="full"), SilentProgress()).points
    assert result.status == COPIED and result.chunks_uploaded == STORED
    assert built == [[(0, 10), (15, 41)]]  # the source's runs: the hole left out
    assert is_table_point(target, tmp_path / "t", point)
    assert restored(target, point, tmp_path / "o") == want
    assert verify(target, None, SilentProgress()).ok
