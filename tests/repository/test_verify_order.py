"""verify of a format 3 repository reads its chunks in the order of their recipes' packs and
offsets: each recipe pack is read once (in the chunks' hash order, most chunks read a
whole recipe pack again), and it still finds every corrupt block and every chunk of a
missing data or recipe pack, naming exactly the points that reference them."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.repository.spy_remote import spied, tiny_point
from tests.repository.test_packs import packed_repo, reopen, store
from vmkeep.progress import SilentProgress
from vmkeep.repository.blobs import KIND_BLOCK, KIND_RECIPE
from vmkeep.repository.manifest import Manifest
from vmkeep.repository.packs import pack_object_name
from vmkeep.repository.repository import Repository
from vmkeep.repository.verify import verify

KiB, MiB = 1 << 10, 1 << 20
START = datetime(2026, 3, 1, tzinfo=UTC)
POINTS, CHUNKS = 12, 20


def _many_packs(tmp_path: Path) -> tuple[Repository, list[Manifest], list[list[bytes]]]:
    """12 points of 20 chunks of one 64 KiB block each, one flush a point: 12 recipe packs,
    12 data packs."""
    repo = packed_repo(tmp_path / "r", pack_size=MiB)
    rng = random.Random(3)
    points, ids = [], []
    for p in range(POINTS):
        chunk_ids = store(repo, [rng.randbytes(64 * KiB) for _ in range(CHUNKS)])
        points.append(tiny_point(repo, p, START + timedelta(hours=p), chunk_ids))
        ids.append(chunk_ids)
    return reopen(repo), points, ids


def _pack_of(repo: Repository, kind: int, blob_id: bytes) -> Path:
    assert repo.packed is not None
    entry = repo.packed.index().get(kind, blob_id)
    assert entry is not None
    return Path(repo.remote.url) / pack_object_name(entry.pack)


def test_each_recipe_pack_is_read_once(tmp_path: Path) -> None:
    repo, _, ids = _many_packs(tmp_path)
    recipe_packs = {_pack_of(repo, KIND_RECIPE, c) for chunk_ids in ids for c in chunk_ids}
    assert len(recipe_packs) == POINTS
    view, spy = spied(repo)
    report = verify(view, None, SilentProgress())
    assert report.ok and report.chunks_checked == POINTS * CHUNKS
    # one whole GET of each recipe pack (was ~2 a chunk), and one ranged GET of each data
    # pack (24: 16 + 4 blocks a point; was 1 a chunk, then 60 with groups of 4 chunks)
    assert repo.packed is not None
    data_packs = {_pack_of(repo, KIND_BLOCK, repo.packed.recipe_of(c)[1][0]) for c in order_of(ids)}
    assert len(data_packs) == 2 * POINTS
    assert spy.calls[("get", "packs")] == len(data_packs) + POINTS


def order_of(ids: list[list[bytes]]) -> list[bytes]:
    return [c for chunk_ids in ids for c in chunk_ids]


def test_verify_finds_a_corrupt_block_and_missing_packs(tmp_path: Path) -> None:
    repo, points, ids = _many_packs(tmp_path)
    assert repo.packed is not None
    corrupt = ids[2][7]
    (block,) = repo.packed.recipe_of(corrupt)[1]
    entry = repo.packed.index().get(KIND_BLOCK, block)
    assert entry is not None
    path = _pack_of(repo, KIND_BLOCK, block)
    raw = bytearray(path.read_bytes())
    raw[entry.offset + entry.length // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    gone = _pack_of(repo, KIND_BLOCK, repo.packed.recipe_of(ids[5][0])[1][0])  # point 5's data
    lost = [c for c in ids[5] if _pack_of(repo, KIND_BLOCK, repo.packed.recipe_of(c)[1][0]) == gone]
    assert 1 < len(lost) < CHUNKS  # 20 blocks: one full 1 MiB pack and a second
    gone.unlink()
    _pack_of(repo, KIND_RECIPE, ids[9][0]).unlink()  # point 9's recipes
    report = verify(reopen(repo), None, SilentProgress())
    assert not report.ok and report.chunks_checked == POINTS * CHUNKS
    bad = {c.chunk_id: c.points for c in report.corrupt_chunks}
    want = {corrupt: points[2].id} | {c: points[5].id for c in lost}
    want |= {c: points[9].id for c in ids[9]}
    assert bad == {c.hex(): [p] for c, p in want.items()}
    errors = {c.chunk_id: c.error for c in report.corrupt_chunks}
    assert "missing" in errors[lost[0].hex()] and "gone" in errors[lost[0].hex()]
    assert "missing" in errors[ids[9][3].hex()]
