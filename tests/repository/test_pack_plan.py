"""The streaming pack plan (sorted live keys spilled in several runs, merge-joined with the
index's sorted entries) decides exactly what the in-memory plan decides, on >= 1 M random
entries with packs of every fate."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.repository.pack_plan_reference import plan_from
from vmkeep.errors import IntegrityError
from vmkeep.repository.blobs import KIND_BLOCK, KIND_RECIPE
from vmkeep.repository.live_set import LiveKeys, live_key
from vmkeep.repository.pack_plan import stream_plan
from vmkeep.repository.packs import BlobEntry

PACK_SIZE = 16 << 20


def _repository(rng: random.Random, blobs: int) -> tuple[dict[bytes, int], list[BlobEntry]]:
    """Packs of one kind each, of varied size; blob lengths fill them."""
    sizes: dict[bytes, int] = {}
    entries: list[BlobEntry] = []
    ids = os.urandom(32 * blobs)
    at = 0
    while at < blobs:
        pack = rng.randbytes(32)
        kind = KIND_RECIPE if rng.random() < 0.2 else KIND_BLOCK
        n = min(blobs - at, rng.choice([3, 40, 250, 1000]))
        length = rng.choice([300, 16_000, 40_000])
        sizes[pack] = n * length + 4096
        for k in range(n):
            blob_id = ids[32 * (at + k) : 32 * (at + k + 1)]
            entries.append(BlobEntry(kind, blob_id, pack, k * length, length))
        at += n
    sizes[rng.randbytes(32)] = 5000  # a pack the index does not list
    entries.sort(key=lambda e: live_key(e.kind, e.blob_id))
    return sizes, entries


def test_stream_plan_equals_in_memory_plan_on_a_million_entries(tmp_path: Path) -> None:
    rng = random.Random(15)
    sizes, entries = _repository(rng, 1_000_000)
    packs = list(sizes)
    fate = {p: rng.choice([0.0, 0.3, 0.7, 1.0]) for p in packs}  # share of live blobs
    live = {(e.kind, e.blob_id) for e in entries if rng.random() < fate[e.pack]}
    reference = plan_from(dict(sizes), entries, live, PACK_SIZE)
    with LiveKeys(tmp_path, buffer_keys=150_000) as keys:
        for kind, blob_id in live:
            keys.add(live_key(kind, blob_id))
            if rng.random() < 0.05:  # a blob named by two recipes is added twice
                keys.add(live_key(kind, blob_id))
        keys.add(live_key(KIND_BLOCK, bytes(32)))  # live but not indexed: ignored
        got = stream_plan(sizes, entries, keys.sorted_unique(), PACK_SIZE)
        assert len(keys.runs) >= 3
    assert os.listdir(tmp_path) == []
    assert got.delete == reference.delete
    assert got.repack == list(reference.repack)
    assert got.keep == list(reference.keep)
    assert got.dead_entries == reference.dead_entries
    assert got.delete and got.repack and got.keep  # every fate is exercised


def test_entries_out_of_order_stop_the_plan(tmp_path: Path) -> None:
    a = BlobEntry(KIND_BLOCK, b"\x02" * 32, b"p" * 32, 0, 10)
    b = BlobEntry(KIND_BLOCK, b"\x01" * 32, b"p" * 32, 10, 10)
    with pytest.raises(IntegrityError, match="out of key order"):
        stream_plan({b"p" * 32: 100}, [a, b], iter([]), PACK_SIZE)
