"""A gc that overlapped a backup of a table point (docs/FORMAT.md §6, §5.5): format 3's check
that every chunk survived walks the point's IDs a batch at a time (never a list of them),
passes while every pack is there and refuses once a pack of one chunk is gone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.operations.test_table_points import backup, is_table_point, make_vm
from tests.repository.table_points import packed_repo, small_tables
from vmkeep.errors import GcOverlapError
from vmkeep.operations.backup import referenced
from vmkeep.repository import packed_missing
from vmkeep.repository.blobs import KIND_RECIPE
from vmkeep.repository.gc_epoch import confirm_no_sweep, new_epoch, read_gc_mark, write_gc_mark
from vmkeep.repository.locks import RepositoryLock
from vmkeep.repository.packs import pack_object_name

BATCH = 4


def test_a_gc_overlapping_a_table_point_is_checked_in_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small_tables(monkeypatch)
    monkeypatch.setattr(packed_missing, "BATCH", BATCH)
    root = tmp_path / "r"
    repo = packed_repo(root, "aes-256-gcm")
    point = backup(repo, make_vm(tmp_path / "vms"), "full")
    assert is_table_point(repo, root, point)
    manifest = repo.load_manifest(point)
    with RepositoryLock(repo.remote, "exclusive", "gc") as lock:
        write_gc_mark(repo.remote, lock, new_epoch(), "done")
    done = read_gc_mark(repo.remote)
    assert done is not None and not done.running

    pulled, seen_at = [0], []  # IDs walked; how many when each was looked up
    looked_up = packed_missing.packs_of

    def counted(ids: Iterator[bytes]) -> Iterator[bytes]:
        for chunk_id in ids:
            pulled[0] += 1
            yield chunk_id

    def spy(store: packed_missing.Store, chunk_id: bytes) -> set[bytes] | None:
        seen_at.append(pulled[0])
        return looked_up(store, chunk_id)

    monkeypatch.setattr(packed_missing, "packs_of", spy)
    ids = counted(iter(referenced(manifest)))
    confirm_no_sweep(repo.remote, None, done, ids, repo.missing_chunks)  # every chunk there
    assert pulled[0] == len(seen_at) == 36  # every ID walked, a batch at a time: the
    assert all(n <= (k // BATCH + 1) * BATCH for k, n in enumerate(seen_at))  # k-th in its

    last = list(manifest.iter_ids())[-1]
    entry = repo.packed.index().get(KIND_RECIPE, last)  # type: ignore[union-attr]
    assert entry is not None
    (root / pack_object_name(entry.pack)).unlink()
    pulled[0] = 0
    with pytest.raises(GcOverlapError, match=r"deleted \d+ chunk\(s\) it references"):
        confirm_no_sweep(
            repo.remote, None, done, counted(referenced(manifest)), repo.missing_chunks
        )
