"""Version 2 manifest objects (docs/FORMAT.md §5.5): a point with a big disk is written with
its IDs in sealed pieces outside the JSON and read back equal, a piece at a time (ranged
reads counted); other points stay version 1; a backup's file-built table equals the
in-memory one."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from vmkeep.remotes.local import LocalRemote
from vmkeep.repository import manifest_v2
from vmkeep.repository.format import ID_SIZE, ZERO_ID
from vmkeep.repository.index_runs import IndexBuilder
from vmkeep.repository.manifest_table import TableReader
from vmkeep.repository.repository import Repository
from vmkeep.repository.table_builder import file_table

from .spy_remote import CountingRemote
from .table_points import (
    CHUNK,
    PIECE_IDS,
    object_path,
    packed_repo,
    random_runs,
    small_tables,
    synthetic_point,
)

BIG_RUNS = [(0, 9), (12, 1), (20, 6)]  # 16 stored IDs: tables of 4 pieces (+ a split run)


@pytest.fixture(autouse=True)
def _small(monkeypatch: pytest.MonkeyPatch) -> None:
    small_tables(monkeypatch)


@pytest.mark.parametrize("encryption", ["none", "aes-256-gcm"])
def test_a_big_disk_round_trips_through_pieces(tmp_path: Path, encryption: str) -> None:
    repo = packed_repo(tmp_path / "r", encryption)
    big = random_runs(1, BIG_RUNS)
    small = random_runs(2, [(1, 3)])
    point = synthetic_point([("big", 40 * CHUNK, big), ("small", 8 * CHUNK, small)])
    repo.save_manifest(point)
    raw = object_path(tmp_path / "r", point.id).read_bytes()
    assert raw[:4] == b"VMKM" and raw[4] == 2
    assert big[0][1][:ID_SIZE] not in raw or encryption == "none"  # encrypted: IDs not in clear
    loaded = repo.load_manifest(point.id)
    disk, inline = loaded.disks
    assert isinstance(disk.table, TableReader) and inline.table is None
    assert len(disk.table.pieces) == 5  # 9 = 4 + 4 + 1 (with the next run's 1 and 2 IDs), ...
    assert disk.runs == big or _joined(disk.runs) == _joined(big)
    assert list(disk.entries()) == list(point.disks[0].entries())
    assert inline.runs == small
    assert disk.run_ranges() == [(0, 9), (12, 13), (20, 26)]
    for i in range(40):
        assert disk.chunk_id(i) == point.disks[0].chunk_id(i)
    assert disk.chunk_id(-1) == ZERO_ID and disk.chunk_id(10**9) == ZERO_ID
    assert loaded.referenced_ids() == point.referenced_ids()
    assert sorted(loaded.iter_ids()) == sorted(point.iter_ids())


def _joined(runs: list[tuple[int, bytes]]) -> list[tuple[int, int, bytes]]:
    """Runs as (index, ID) pairs: records may cut a run, the entries are the same."""
    return [
        (f + k, 0, ids[k * ID_SIZE : (k + 1) * ID_SIZE])
        for f, ids in runs
        for k in range(len(ids) // ID_SIZE)
    ]


def test_other_points_stay_version_1(tmp_path: Path) -> None:
    repo = packed_repo(tmp_path / "r")
    point = synthetic_point([("a", 40 * CHUNK, random_runs(3, [(0, 8)]))])  # at the threshold
    repo.save_manifest(point)
    assert object_path(tmp_path / "r", point.id).read_bytes()[4] == 1
    assert repo.load_manifest(point.id).disks[0].table is None


def test_format_2_never_writes_version_2(tmp_path: Path) -> None:
    repo = Repository.init(LocalRemote(tmp_path / "r"), "none", lambda: b"x", chunk_size=CHUNK)
    point = synthetic_point([("a", 40 * CHUNK, random_runs(4, BIG_RUNS))])
    repo.save_manifest(point)
    assert object_path(tmp_path / "r", point.id).read_bytes()[4] == 1
    assert repo.load_manifest(point.id).disks[0].runs == point.disks[0].runs


def test_a_large_object_is_read_by_ranges_a_piece_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above WHOLE_READ: header, tail and head are three ranged gets, no piece is read until
    the disk is walked, a walk reads each piece once, a random access one piece."""
    monkeypatch.setattr(manifest_v2, "WHOLE_READ", 0)
    repo = packed_repo(tmp_path / "r")
    point = synthetic_point([("big", 40 * CHUNK, random_runs(5, BIG_RUNS))])
    repo.save_manifest(point)
    spy = CountingRemote(repo.remote)
    repo.remote = spy
    loaded = repo.load_manifest(point.id)
    assert spy.calls[("get", "manifests")] == 3
    disk = loaded.disks[0]
    assert list(disk.entries()) == list(point.disks[0].entries())
    assert spy.calls[("get", "manifests")] == 3 + 5
    assert disk.chunk_id(21) == point.disks[0].chunk_id(21)
    assert disk.chunk_id(22) == point.disks[0].chunk_id(22)  # same piece: cached
    assert spy.calls[("get", "manifests")] == 3 + 5 + 1


def test_a_file_table_equals_the_in_memory_index(tmp_path: Path) -> None:
    """The backup's table in a file (set, put_run, clear) gives the runs IndexBuilder gives."""
    rng = random.Random(6)
    ranges = [(0, 30), (40, 45), (100, 170)]
    built, filed = IndexBuilder(ranges), file_table(ranges)
    for start, stop in ranges:
        ids = rng.randbytes((stop - start) * ID_SIZE)
        built.put_run(start, ids)
        filed.put_run(start, ids)
    for index in rng.sample([i for s, e in ranges for i in range(s, e)], 40):
        chunk_id = rng.choice([ZERO_ID, rng.randbytes(ID_SIZE)])
        built.set(index, chunk_id)
        filed.set(index, chunk_id)
    built.clear([(5, 12), (120, 160)])
    filed.clear([(5, 12), (120, 160)])
    runs = built.runs()
    assert _joined(list(filed.iter_runs())) == _joined(runs)
    assert [filed.chunk_id(i) for i in range(200)] == [
        dict(
            (f + k, ids[k * 32 : k * 32 + 32]) for f, ids in runs for k in range(len(ids) // 32)
        ).get(i, ZERO_ID)
        for i in range(200)
    ]
    with pytest.raises(IndexError):
        filed.set(35, ZERO_ID)
    assert PIECE_IDS == 4
