"""The streaming pack plan (sorted live keys spilled in several runs, merge-joined with the
index's sorted entries; per-pack tallies and the pack listing external-sorted and
merge-joined by pack) decides exactly what the in-memory plan decides, on >= 1 M random
entries with packs of every fate, and on tens of thousands of packs with sort buffers of a
few hundred packs."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.repository.pack_plan_reference import PackPlan, Streamed, plan_from, streamed
from vmkeep.errors import IntegrityError
from vmkeep.repository import pack_gc_locks
from vmkeep.repository.blobs import KIND_BLOCK, KIND_RECIPE
from vmkeep.repository.live_set import LiveKeys, live_key
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


def same_plan(got: Streamed, reference: PackPlan) -> None:
    """Each pack once, with the reference's fate; the same totals."""
    assert sorted(got.delete) == sorted(reference.delete)
    assert sorted(got.repack) == sorted(reference.repack)
    assert sorted(got.keep) == sorted(reference.keep)
    assert got.plan.dead_entries == reference.dead_entries
    assert got.total.deleted == len(reference.delete) + len(reference.repack)
    assert got.total.repacked == len(reference.repack)
    doomed = [*reference.delete, *reference.repack]
    assert got.total.freed == sum(reference.sizes[p] for p in doomed)


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
        got = streamed(tmp_path, sizes.items(), entries, keys.sorted_unique(), PACK_SIZE)
        assert len(keys.runs) >= 3
    assert os.listdir(tmp_path) == []
    same_plan(got, reference)
    assert got.delete and got.repack and got.keep  # every fate is exercised


Many = tuple[dict[bytes, int], list[BlobEntry], set[tuple[int, bytes]], list[tuple[bytes, int]]]


def _many_packs(rng: random.Random) -> Many:
    """30,000 packs of 1 to 12 blobs (small packs of two kinds, so merged; dead, repacked
    and kept ones), listed in a scattered order, one of them twice (as under a second
    name), and packs the index names that are not listed. Returns the listed sizes, the
    index's entries, the live blobs and the listing."""
    sizes: dict[bytes, int] = {}
    entries: list[BlobEntry] = []
    live: set[tuple[int, bytes]] = set()
    for n in range(30_000):
        pack = rng.randbytes(32)
        kind = KIND_RECIPE if n % 7 == 0 else KIND_BLOCK
        share = rng.choice([0.0, 0.2, 0.6, 1.0])
        count = rng.randint(1, 12)
        if n % 1000 != 999:  # every 1000th pack is indexed but gone from the remote
            sizes[pack] = count * 5000 + rng.choice([100, 4000, 40_000])
        for k in range(count):
            e = BlobEntry(kind, rng.randbytes(32), pack, k * 5000, 5000)
            entries.append(e)
            if rng.random() < share:
                live.add((e.kind, e.blob_id))
    entries.sort(key=lambda e: live_key(e.kind, e.blob_id))
    listing = list(sizes.items())
    rng.shuffle(listing)
    listing.append((listing[0][0], listing[0][1] + 1))  # listed twice: planned once
    return sizes, entries, live, listing


def _keys(live: set[tuple[int, bytes]]) -> Iterator[bytes]:
    return iter(sorted(live_key(k, b) for k, b in live))


def test_many_packs_with_tiny_sort_buffers_give_the_in_memory_plan(tmp_path: Path) -> None:
    """With sort buffers of a few hundred packs (the listing and the tallies each spill
    dozens of runs), each listed pack gets exactly the fate of the in-memory plan, once."""
    sizes, entries, live, listing = _many_packs(random.Random(1915))
    reference = plan_from(dict(sizes), entries, live, 200_000)  # every pack small
    got = streamed(tmp_path, listing, entries, _keys(live), 200_000, buffers=(300, 250))
    assert os.listdir(tmp_path) == []
    assert got.runs["listed"] >= 50 and got.runs["tallies"] >= 50
    same_plan(got, reference)
    assert len(got.delete) + len(got.repack) + len(got.keep) == len(sizes)
    assert got.delete and got.repack and got.keep


def test_many_locked_packs_spilled_are_all_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention locks on every 5th pack (an external sort of a few dozen runs, as on an
    immutable remote whose locked index objects list every pack): exactly those of them
    the in-memory plan would repack or delete are kept instead, and no other."""
    monkeypatch.setattr(pack_gc_locks, "HELD_BUFFER", 97)
    runs: list[int] = []

    class Counted(LiveKeys):
        def close(self) -> None:
            runs.append(len(self.runs))
            super().close()

    monkeypatch.setattr(pack_gc_locks, "LiveKeys", Counted)
    sizes, entries, live, listing = _many_packs(random.Random(2015))
    locked = set(list(sizes)[::5])
    ref = plan_from(dict(sizes), entries, live, 200_000)
    doomed = [p for p in [*ref.delete, *ref.repack] if p not in locked]
    spared = [p for p in [*ref.delete, *ref.repack] if p in locked]
    got = streamed(tmp_path, listing, entries, _keys(live), 200_000, locked=locked)
    assert os.listdir(tmp_path) == []
    assert sorted(got.delete) == sorted(p for p in ref.delete if p not in locked)
    assert sorted(got.repack) == sorted(p for p in ref.repack if p not in locked)
    assert sorted(got.keep) == sorted([*ref.keep, *spared])
    assert got.total.spared == len(spared) > 1000
    assert runs and min(runs) >= 30  # the locked packs really were an external sort
    assert got.total.freed == sum(sizes[p] for p in doomed)


def test_the_plan_files_are_removed_when_the_plan_fails(tmp_path: Path) -> None:
    a = BlobEntry(KIND_BLOCK, b"\x02" * 32, b"p" * 32, 0, 10)
    b = BlobEntry(KIND_BLOCK, b"\x01" * 32, b"p" * 32, 10, 10)
    with pytest.raises(IntegrityError, match="out of key order"):
        streamed(tmp_path, [(b"p" * 32, 100)], [a, b], iter([]), PACK_SIZE, buffers=(1, 1))
    assert os.listdir(tmp_path) == []


def _small_packs_plan(
    kinds: list[int], live_share: list[float], tmp_path: Path, locked: tuple[bytes, ...] = ()
) -> tuple[list[bytes], Streamed]:
    """One pack per entry of `kinds` (100 blobs of 1,000 bytes: small), `live_share` of each
    pack's blobs live; the packs `locked` under a retention lock."""
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
    keys = iter(sorted(live))
    got = streamed(tmp_path, sizes.items(), entries, keys, PACK_SIZE, locked=locked)
    return packs, got


def test_a_lone_small_pack_joins_its_kinds_repack_but_is_never_copied_alone(
    tmp_path: Path,
) -> None:
    """A lone small pack is merged when its kind is repacked anyway (else the repack's last,
    partly filled pack and it would be two small packs: the next gc would merge them), and
    a small pack that retention locks leave alone in its kind's repack is kept, not copied
    into a copy of itself at every gc."""
    kinds, shares = [KIND_BLOCK, KIND_BLOCK, KIND_RECIPE], [1.0, 0.2, 1.0]
    packs, plan = _small_packs_plan(kinds, shares, tmp_path)
    assert plan.repack == [packs[0], packs[1]] and plan.keep == [packs[2]]
    packs, plan = _small_packs_plan(kinds, shares, tmp_path, (packs[1],))
    assert plan.total.spared == 1 and plan.total.repacked == 0 and plan.total.freed == 0
    assert plan.repack == [] and plan.keep == packs
    packs, plan = _small_packs_plan([KIND_BLOCK] * 3, [1.0] * 3, tmp_path)
    assert plan.repack == packs  # three small packs of a kind: merged
    packs, plan = _small_packs_plan([KIND_BLOCK] * 3, [1.0] * 3, tmp_path, (*packs[:2],))
    assert plan.repack == [] and plan.keep == packs and plan.total.spared == 2
