"""A format 3 delta keeps the unchanged blocks of a dirty chunk from the previous point's
recipe (operations/dirty_blocks.py). Whoever writes the remote damages those recipes, points
their index entries at other recipes, or (a key holder) serves a recipe of the wrong length:
the delta reads those chunks whole, says so, and its point restores the disk's bytes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from tests.operations.dirty_disk import (
    CHUNK,
    PASSPHRASE,
    SIZE,
    Recorded,
    restored,
    run_delta,
    sha,
    whole_ids,
)
from vmkeep.operations import dirty_blocks
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository import recipe_fetch
from vmkeep.repository.blob_index import encode_index, index_object_name
from vmkeep.repository.blobs import KIND_RECIPE
from vmkeep.repository.packs import BlobEntry, pack_object_name
from vmkeep.repository.repository import Repository


def _store(repo: Path) -> Any:
    store = Repository.open(LocalRemote(str(repo)), lambda: PASSPHRASE).packed
    assert store is not None
    return store


def _recipes(repo: Path) -> list[BlobEntry]:
    return [e for e in _store(repo).reload().index.entries() if e.kind == KIND_RECIPE]


def damage_recipes(repo: Path) -> None:
    """Flip a byte in the middle of every recipe blob of the full backup."""
    for e in _recipes(repo):
        path = repo / pack_object_name(e.pack)
        with open(path, "r+b") as f:
            f.seek(e.offset + e.length // 2)
            byte = f.read(1)
            f.seek(e.offset + e.length // 2)
            f.write(bytes([byte[0] ^ 0xFF]))


def swap_recipe_entries(repo: Path) -> None:
    """An index whose recipe entries point at each other's blobs (the last, 1.5 MiB chunk's
    at a 4 MiB chunk's recipe), written with the key: the index verifies, its entries lie."""
    store = _store(repo)
    entries = list(store.reload().index.entries())
    recipes = [e for e in entries if e.kind == KIND_RECIPE]
    others = [e for e in entries if e.kind != KIND_RECIPE]
    moved = [
        dataclasses.replace(e, offset=o.offset, length=o.length, pack=o.pack)
        for e, o in zip(recipes, recipes[1:] + recipes[:1], strict=True)
    ]
    for p in (repo / "index").iterdir():
        p.unlink()
    data, index_id = encode_index(store.sealer, store.repo_id, others + moved)
    store.remote.put(index_object_name(index_id), data)


@pytest.mark.parametrize("attack", [damage_recipes, swap_recipe_entries])
def test_unusable_previous_recipes_make_whole_reads(tmp_path: Path, attack: Any) -> None:
    notes = Recorded()
    repo, disk, report, reader = run_delta(tmp_path, "aes-256-gcm", attack, notes)
    # Every dirty chunk with data but chunk 5 (empty before: no recipe needed) is read whole.
    whole = {i for i in range(9) if i != 5 and any(disk.data[i * CHUNK : (i + 1) * CHUNK])}
    starts = {off // CHUNK for off, _ in reader.reads}
    for i in whole:
        start, end = i * CHUNK, min((i + 1) * CHUNK, SIZE)
        got = sum(n for off, n in reader.reads if start <= off < end)
        assert got == sum(disk.data[start:end]), i
    assert starts >= whole
    (note,) = [n for n in notes.notes if "read whole" in n]
    assert "7 dirty chunks read whole" in note and "vmkeep verify" in note
    content = bytes(disk.content)
    (index,) = repo.load_manifest(report.restore_point).disks
    assert [index.chunk_id(i) for i in range(9)] == whole_ids(repo, content)
    # every chunk with data is dirty, so the delta's point references no damaged recipe
    assert sha(restored(repo, report.restore_point, tmp_path / "out")) == sha(content)


def test_a_recipe_of_the_wrong_length_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recipe that authenticates but says the short last chunk is 4 MiB (only a key
    holder could write one, so it is injected at fetch_recipes): that chunk is read whole."""
    real = recipe_fetch.fetch_recipes

    def lying(store: Any, ids: Any) -> Any:
        got = real(store, ids)
        for chunk_id, recipe in got.items():
            if not isinstance(recipe, str) and recipe[0] < CHUNK:
                got[chunk_id] = (CHUNK, recipe[1] + recipe[1][:20])
        return got

    monkeypatch.setattr(dirty_blocks, "fetch_recipes", lying)
    notes = Recorded()
    repo, disk, report, reader = run_delta(tmp_path, "aes-256-gcm", None, notes)
    assert sum(n for off, n in reader.reads if off >= 8 * CHUNK) == SIZE - 8 * CHUNK
    (note,) = [n for n in notes.notes if "read whole" in n]
    assert "1 dirty chunks read whole" in note and "chunk 8: recipe of 4194304 bytes" in note
    content = bytes(disk.content)
    assert sha(restored(repo, report.restore_point, tmp_path / "out")) == sha(content)
