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
from vmkeep.repository.pack_gc import spare_locked
from vmkeep.repository.pack_gc_locks import GcLocks
from vmkeep.repository.pack_plan import CountPlan, stream_plan
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


def _small_packs_plan(kinds: list[int], live_share: list[float]) -> tuple[list[bytes], CountPlan]:
    """One pack per entry of `kinds` (100 blobs of 1,000 bytes: small), `live_share` of each
    pack's blobs live."""
    sizes, entries, live = {}, [], []
    packs = [bytes([k + 1]) * 32 for k in range(len(kinds))]
    for n, (pack, kind, share) in enumerate(zip(packs, kinds, live_share, strict=True)):
        sizes[pack] = 100 * 1000 + 4200
        for k in range(100):
            e = BlobEntry(kind, bytes([n, k]) + bytes(30), pack, 8 + k * 1000, 1000)
            entries.append(e)
            if k < share * 100:
                live.append(live_key(kind, e.blob_id))
    entries.sort(key=lambda e: live_key(e.kind, e.blob_id))
    return packs, stream_plan(sizes, entries, iter(sorted(live)), PACK_SIZE)


def test_a_lone_small_pack_joins_its_kinds_repack_but_is_never_copied_alone() -> None:
    """A lone small pack is merged when its kind is repacked anyway (else the repack's last,
    partly filled pack and it would be two small packs: the next gc would merge them), and
    a small pack that retention locks leave alone in its kind's repack is kept, not copied
    into a copy of itself at every gc."""
    packs, plan = _small_packs_plan([KIND_BLOCK, KIND_BLOCK, KIND_RECIPE], [1.0, 0.2, 1.0])
    assert plan.repack == [packs[1], packs[0]] and plan.keep == [packs[2]]
    locks = GcLocks(packs={packs[1]})
    assert spare_locked(plan, locks) == 1
    assert plan.repack == [] and sorted(plan.keep) == sorted(packs)
    packs, plan = _small_packs_plan([KIND_BLOCK, KIND_BLOCK, KIND_BLOCK], [1.0, 1.0, 1.0])
    assert sorted(plan.repack) == sorted(packs)  # three small packs of a kind: merged
    spare_locked(plan, GcLocks(packs={packs[0], packs[1]}))
    assert plan.repack == [] and sorted(plan.keep) == sorted(packs)
