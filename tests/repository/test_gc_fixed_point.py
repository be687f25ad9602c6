"""One gc of a format 3 repository leaves nothing for the next: after a gc that repacked
(a mostly dead pack, a lone small pack of the same kind, small recipe packs) and wrote a
consolidated index of several objects, a second gc repacks, deletes and writes nothing
(requests counted on the remote), and gc's `chunks_deleted` is the true number of
unreferenced chunks although gc no longer lists them."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.repository.spy_remote import spied, tiny_point
from tests.repository.test_packs import names, packed_repo, reopen, store
from vmkeep.progress import SilentProgress
from vmkeep.repository import pack_gc
from vmkeep.repository.blob_index import INDEX_PREFIX
from vmkeep.repository.gc import collect_garbage
from vmkeep.repository.packed_store import PackedStore
from vmkeep.repository.packs import PACKS_PREFIX
from vmkeep.repository.repository import Repository

KiB, MiB = 1 << 10, 1 << 20
START = datetime(2026, 3, 1, tzinfo=UTC)


def stored(root: Path) -> list[str]:
    return [n for n in names(root) if n.startswith((INDEX_PREFIX, PACKS_PREFIX))]


def _repository(tmp_path: Path) -> tuple[Repository, dict[bytes, bytes], set[bytes]]:
    """1 MiB packs. First flush: four 256 KiB chunks (one full pack) and a 100 KiB one (a
    lone small data pack). Second flush: eight 128 KiB chunks (one full pack), of which one
    stays referenced (12.5% live: repacked, into a small pack of the lone one's kind).
    Returns the repository, the referenced chunks' data and the unreferenced chunk IDs."""
    repo = packed_repo(tmp_path / "r", pack_size=MiB)
    rng = random.Random(21)
    first = [rng.randbytes(256 * KiB) for _ in range(4)] + [rng.randbytes(100 * KiB)]
    second = [rng.randbytes(128 * KiB) for _ in range(8)]
    ids1, ids2 = store(repo, first), store(repo, second)
    tiny_point(repo, 0, START, [*ids1, ids2[0]])
    live = dict(zip([*ids1, ids2[0]], [*first, second[0]], strict=True))
    return repo, live, set(ids2[1:])


def test_a_second_gc_has_nothing_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pack_gc, "MAX_INDEX_ENTRIES", 8)  # a consolidated index of 4 objects
    repo, live, _ = _repository(tmp_path)
    root = tmp_path / "r"
    first = collect_garbage(repo, SilentProgress())
    assert first.packs is not None
    assert first.packs.packs_repacked >= 2 and first.packs.index_objects_replaced == 2
    again = reopen(repo)
    for chunk_id, data in live.items():
        assert again.get_chunk(chunk_id) == data
    before = stored(root)
    spy_repo, spy = spied(reopen(repo))
    second = collect_garbage(spy_repo, SilentProgress())
    assert second.packs is not None
    assert second.packs.to_json() == pack_gc.PackSweep().to_json()  # all zero
    assert second.chunks_deleted == 0 and second.bytes_freed == 0
    for method in ("put", "delete"):
        assert spy.calls[(method, "index")] == spy.calls[(method, "packs")] == 0
    assert stored(root) == before
    # the 12.5% pack, the lone small data pack of its kind, the two small recipe packs
    assert first.packs.packs_repacked == 4
    assert len(names(root / INDEX_PREFIX)) == 4  # 26 live blobs, 8 an object


def test_chunks_deleted_is_the_number_of_unreferenced_chunks_without_a_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, live, dead = _repository(tmp_path)
    indexed = {c for c, _ in repo.list_chunks()}
    assert indexed == set(live) | dead and len(dead) == 7

    def refuse(self: PackedStore) -> None:
        raise AssertionError("gc listed every chunk")

    monkeypatch.setattr(PackedStore, "list_chunks", refuse)
    dry = collect_garbage(reopen(repo), SilentProgress(), dry_run=True)
    report = collect_garbage(reopen(repo), SilentProgress())
    assert dry.chunks_deleted == report.chunks_deleted == len(dead)
    assert report.chunks_kept == len(live)
    monkeypatch.undo()
    assert {c for c, _ in reopen(repo).list_chunks()} == set(live)  # really gone
    assert collect_garbage(reopen(repo), SilentProgress()).chunks_deleted == 0
