"""A format 3 delta reads only the dirty blocks of a dirty chunk (operations/dirty_blocks.py):
exactly the data bytes of the blocks the dirty extents touch are read, chunk IDs are those of
whole reads, the stats are those of a whole-read delta but for bytes_read, and a restore of
the delta equals the disk."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from vmkeep.connectors.base import Extent
from vmkeep.errors import ConnectorError
from vmkeep.operations import dirty_blocks
from vmkeep.operations.backup import BackupOptions, backup_vm
from vmkeep.operations.chunk_uploader import BackupStats
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.format import ZERO_ID
from vmkeep.repository.repository import Repository

from ..repository.spy_remote import CountingRemote
from .dirty_disk import (
    BLOCK,
    CHUNK,
    PASSPHRASE,
    SIZE,
    DirtyConnector,
    KiB,
    MiB,
    Recorded,
    expected_reads,
    make_vm,
    new_repo,
    restored,
    run_delta,
    sha,
    whole_ids,
)


@pytest.mark.parametrize("encryption", ["none", "aes-256-gcm"])
def test_delta_reads_only_the_dirty_blocks(tmp_path: Path, encryption: str) -> None:
    progress = Recorded()
    repo, disk, report, reader = run_delta(tmp_path, encryption, None, progress)
    assert progress.total == progress.advanced == SIZE  # every chunk is dirty
    assert progress.notes == []
    want = expected_reads(disk, SIZE)
    assert sorted(reader.reads) == want
    assert report.stats.bytes_read == sum(n for _, n in want)
    # 3.5 MiB of chunk 3 (read whole: 4 MiB) and ~1 MiB of the rest, not 9 dirty chunks whole
    assert report.stats.bytes_read < 6 * MiB
    (index,) = repo.load_manifest(report.restore_point).disks
    content = bytes(disk.content)
    assert [index.chunk_id(i) for i in range(9)] == whole_ids(repo, content)
    assert index.chunk_id(6) == ZERO_ID
    assert sha(restored(repo, report.restore_point, tmp_path / "out")) == sha(content)


def test_stats_are_those_of_a_whole_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same delta with every dirty chunk read whole (the previous behaviour): the same
    chunks, new bytes and stored bytes; only bytes_read differs."""
    _, _, by_blocks, _ = run_delta(tmp_path / "blocks")
    monkeypatch.setattr(dirty_blocks, "WHOLE_ABOVE", -1.0)
    _, _, whole, reader = run_delta(tmp_path / "whole")
    assert sum(n for _, n in reader.reads) == whole.stats.bytes_read
    a, b = by_blocks.stats, whole.stats
    for name in BackupStats.__dataclass_fields__:
        if name != "bytes_read":
            assert getattr(a, name) == getattr(b, name), name
    assert a.chunks == 9 and a.chunks_new == 8 and a.bytes_zero == CHUNK  # chunk 6
    assert a.bytes_read * 3 < b.bytes_read


def test_a_chunk_shorter_than_a_block_at_the_end(tmp_path: Path) -> None:
    """A disk whose last chunk is 100 KiB (less than a block) and whose chunk before is
    dirty in one block: the short chunk is dirty too."""
    size = 2 * CHUNK + 100 * KiB
    rng = random.Random(3)
    vm, disk = make_vm(tmp_path / "vms", size)
    disk.write(0, rng.randbytes(size))
    disk.save()
    repo = new_repo(tmp_path / "repo")
    connector = DirtyConnector(disk)
    backup_vm(repo, connector, str(vm), BackupOptions(), SilentProgress())
    disk.dirty = []
    disk.write(CHUNK + 200 * KiB, rng.randbytes(8 * KiB))
    disk.write(2 * CHUNK + 50 * KiB, rng.randbytes(50 * KiB))
    disk.save()
    report = backup_vm(repo, connector, str(vm), BackupOptions(mode="delta"), SilentProgress())
    assert connector.reader is not None
    # chunk 1: its second block; chunk 2: read whole (all of it is one dirty block)
    assert sorted(connector.reader.reads) == [(CHUNK + BLOCK, BLOCK), (2 * CHUNK, 100 * KiB)]
    content = bytes(disk.content)
    (index,) = repo.load_manifest(report.restore_point).disks
    assert [index.chunk_id(i) for i in range(3)] == whole_ids(repo, content)
    assert sha(restored(repo, report.restore_point, tmp_path / "out")) == sha(content)


def test_dirty_block_runs_round_out_and_join() -> None:
    runs = dirty_blocks.dirty_block_runs
    assert runs([(100, 10)], 64, 4, 0) == [(1, 2)]
    assert runs([(60, 10)], 64, 4, 0) == [(0, 2)]  # straddles two blocks
    assert runs([(0, 10), (64, 1)], 64, 4, 0) == [(0, 2)]  # adjacent blocks: one run
    assert runs([(0, 10), (128, 1)], 64, 4, 0) == [(0, 1), (2, 3)]
    assert runs([(0, 10), (128, 1)], 64, 4, 65) == [(0, 3)]  # a gap under 65 bytes joined
    assert runs([(200, 500)], 64, 4, 0) == [(3, 4)]  # never past the chunk's blocks


def test_previous_recipes_cost_requests_per_pack_and_window(tmp_path: Path) -> None:
    """256 chunks of 256 KiB whose previous recipes alternate between three recipe packs
    (the full's and two deltas'): the third delta reads them with a few ranged GETs per
    window of chunks and pack, not one per chunk, and no block."""
    small, size = 256 * KiB, 64 * MiB
    rng = random.Random(5)
    vm, disk = make_vm(tmp_path / "vms", size)
    disk.write(0, rng.randbytes(size))
    disk.save()
    path = tmp_path / "repo"
    Repository.init(LocalRemote(str(path)), "aes-256-gcm", lambda: PASSPHRASE, small, 3, 64 * KiB)
    connector = DirtyConnector(disk)
    spy: CountingRemote | None = None
    rounds: list[set[int]] = [set(), {0}, {1}, {0, 1, 2}]  # a full, then chunks i % 3 in
    for writes in rounds:
        spy = CountingRemote(LocalRemote(str(path)))
        repo = Repository.open(spy, lambda: PASSPHRASE)
        disk.dirty = []
        for i in range(size // small):
            if i % 3 in writes:
                disk.write(i * small + 100 * KiB, rng.randbytes(4 * KiB))
        disk.save()
        mode = "delta" if disk.dirty else "full"
        report = backup_vm(repo, connector, str(vm), BackupOptions(mode=mode), SilentProgress())
    assert spy is not None and report.stats.chunks == size // small
    assert report.stats.bytes_read == (size // small) * 64 * KiB  # one block per chunk
    windows = -(-(size // small) // dirty_blocks.WINDOW)
    assert spy.calls[("get", "packs")] <= 3 * windows, spy.calls  # not 256
    content = bytes(disk.content)
    assert sha(restored(repo, report.restore_point, tmp_path / "out")) == sha(content)


def test_dirty_extents_out_of_order_fail_the_delta(tmp_path: Path) -> None:
    """A chunk's dirty ranges are gathered in one pass over the dirty extents: a connector
    that reports them out of order could make a chunk keep a stale block, so the delta
    fails in one line and writes no restore point."""
    rng = random.Random(9)
    vm, disk = make_vm(tmp_path / "vms")
    disk.write(0, rng.randbytes(SIZE))
    disk.save()
    repo = new_repo(tmp_path / "repo")
    connector = DirtyConnector(disk)
    backup_vm(repo, connector, str(vm), BackupOptions(), SilentProgress())
    disk.dirty = []
    disk.as_written = True
    disk.write(CHUNK + 3 * MiB, rng.randbytes(64 * KiB))
    disk.write(CHUNK, rng.randbytes(64 * KiB))  # same chunk, reported after
    disk.save()
    with pytest.raises(ConnectorError, match="dirty extents out of order"):
        backup_vm(repo, connector, str(vm), BackupOptions(mode="delta"), SilentProgress())
    assert len(repo.point_ids()) == 1


def test_overlapping_dirty_extents_are_merged() -> None:
    extents = [Extent(0, 10, True), Extent(5, 3, True), Extent(8, 4, True), Extent(20, 1, True)]
    extents += [Extent(21, 5, False), Extent(30, 2, True)]
    got = [(e.offset, e.length) for e in dirty_blocks.in_order(extents, "d")]
    assert got == [(0, 12), (20, 1), (30, 2)]
    late = [Extent(10, 5, True), Extent(12, 1, True), Extent(3, 1, True)]
    with pytest.raises(ConnectorError, match="out of order"):
        list(dirty_blocks.in_order(late, "d"))
