"""gc's second sort: live index entries external-sorted as records come back grouped by
pack in offset order (bounded groups), each entry exactly once, and the kept entries' file
gives back what was put in."""

from __future__ import annotations

import os
import random
from pathlib import Path

from vmkeep.repository.blobs import KIND_BLOCK, KIND_RECIPE
from vmkeep.repository.live_set import LiveKeys
from vmkeep.repository.pack_repack import RECORD, KeptEntries, by_pack, entry_of, record
from vmkeep.repository.packs import BlobEntry


def _entries(rng: random.Random, count: int) -> list[BlobEntry]:
    packs = [rng.randbytes(32) for _ in range(40)]
    offsets = {p: 0 for p in packs}
    out = []
    for _ in range(count):
        pack = rng.choice(packs)
        length = rng.randrange(1, 70_000)
        kind = rng.choice((KIND_BLOCK, KIND_RECIPE))
        out.append(BlobEntry(kind, os.urandom(32), pack, offsets[pack], length))
        offsets[pack] += length
    return out


def test_records_sorted_by_pack_and_offset_in_bounded_groups(tmp_path: Path) -> None:
    entries = _entries(random.Random(3), 50_000)
    assert entry_of(record(entries[0])) == entries[0]
    shuffled = entries[:]
    random.Random(4).shuffle(shuffled)  # the join meets them in blob ID order
    with LiveKeys(tmp_path, buffer_keys=4000, key_size=RECORD.size) as sort:
        for e in shuffled:
            sort.add(record(e))
        groups = list(by_pack(sort.sorted_unique(), limit=300))
        assert len(sort.runs) >= 10
    assert os.listdir(tmp_path) == []
    assert all(0 < len(g) <= 300 and {e.pack for e in g} == {p} for p, g in groups)
    got = [e for _, g in groups for e in g]
    assert got == sorted(entries, key=lambda e: (e.pack, e.offset))
    seen: list[bytes] = []
    for pack, _ in groups:  # a pack's groups are consecutive: each pack met once
        if not seen or seen[-1] != pack:
            seen.append(pack)
    assert len(seen) == len({e.pack for e in entries}) == 40


def test_kept_entries_file_round_trip(tmp_path: Path) -> None:
    entries = _entries(random.Random(5), 3000)
    kept = KeptEntries(tmp_path / "kept")
    kept.add(entries[:1000])
    kept.add(entries[1000:])
    assert list(kept.entries()) == entries
    kept.close()
