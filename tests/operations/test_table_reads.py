"""How often commands read a table point's pieces (docs/FORMAT.md §5.5): a listing reads
none (the head's `data_bytes`), a restore each piece once, a delta walks its base's table
once (before: a listing walked it once, a restore twice, a delta's base twice)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from tests.operations import dirty_disk
from tests.operations.dirty_disk import DirtyConnector
from tests.operations.test_table_points import (
    SIZE,
    backup,
    is_table_point,
    make_vm,
    restored,
    sha,
)
from tests.repository.table_points import CHUNK, packed_repo, small_tables
from vmkeep.connectors.files import FilesConnector
from vmkeep.operations.backup import BackupOptions, backup_vm
from vmkeep.operations.restore import restore_vm
from vmkeep.progress import SilentProgress
from vmkeep.repository.manifest_table import Run, TableReader
from vmkeep.repository.point_cache import point_summaries

DATA = 35 * CHUNK + 1000  # make_vm's 36 chunks with data, the last of 1000 bytes


@pytest.fixture(autouse=True)
def _small(monkeypatch: pytest.MonkeyPatch) -> None:
    small_tables(monkeypatch)


def count_reads(monkeypatch: pytest.MonkeyPatch) -> tuple[Counter[tuple[str, int]], Counter[str]]:
    """Pieces read (point, number) and table walks begun (point)."""
    pieces: Counter[tuple[str, int]] = Counter()
    walks: Counter[str] = Counter()
    piece, iter_runs = TableReader.piece, TableReader.iter_runs

    def counted_piece(self: TableReader, number: int) -> list[Run]:
        pieces[(self._point, number)] += 1
        return piece(self, number)

    def counted_walk(self: TableReader) -> object:
        walks[self._point] += 1
        return iter_runs(self)

    monkeypatch.setattr(TableReader, "piece", counted_piece)
    monkeypatch.setattr(TableReader, "iter_runs", counted_walk)
    return pieces, walks


def test_listing_restore_and_delta_read_each_piece_once_at_most(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "r"
    repo = packed_repo(root, "aes-256-gcm")
    vm = make_vm(tmp_path / "vms")
    first, want = backup(repo, vm, "full"), sha(vm / "disk0.img")
    assert is_table_point(repo, root, first)
    pieces, walks = count_reads(monkeypatch)

    (summary,), problems = point_summaries(repo)
    assert not problems and summary.disks[0].data_bytes == DATA and summary.disks[0].size == SIZE
    assert not pieces and not walks  # from the head: no piece read

    table = repo.load_manifest(first).disks[0].table
    assert isinstance(table, TableReader) and table.data_bytes == DATA
    count = len(table.pieces)
    assert restored(repo, first, tmp_path / "o1") == want
    assert walks[first] == 1 and sorted(pieces.values()) == [1] * count  # each piece once


def test_a_delta_walks_its_base_table_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connector that reports dirty ranges (as libvirt's does): the delta reads 2 chunks
    and copies the base's other IDs in from one walk of its table."""
    root = tmp_path / "r"
    repo = packed_repo(root, "aes-256-gcm")
    vm, disk = dirty_disk.make_vm(tmp_path / "vms", 40 * CHUNK)
    rng = random.Random(9)
    disk.write(0, rng.randbytes(40 * CHUNK))
    disk.save()
    connector = DirtyConnector(disk)
    first = backup_vm(repo, connector, str(vm), BackupOptions(mode="full"), SilentProgress())
    assert is_table_point(repo, root, first.restore_point)
    pieces, walks = count_reads(monkeypatch)
    disk.dirty = []
    disk.write(7 * CHUNK, rng.randbytes(CHUNK))
    disk.write(30 * CHUNK + 5, rng.randbytes(100))
    disk.save()
    second = backup_vm(repo, connector, str(vm), BackupOptions(mode="delta"), SilentProgress())
    assert second.stats.chunks == 2  # the dirty chunks only: the base was used
    base = first.restore_point
    assert walks[base] == 1  # before: twice (its ranges, then its runs)
    count = len(repo.load_manifest(base).disks[0].table.pieces)  # type: ignore[union-attr]
    assert sum(n for (point, _), n in pieces.items() if point == base) <= count + 2
    out = tmp_path / "o"
    out.mkdir()
    report = restore_vm(repo, FilesConnector(out), second.restore_point, str(out), SilentProgress())
    assert (Path(report.location) / "disk0.img").read_bytes() == bytes(disk.content)
