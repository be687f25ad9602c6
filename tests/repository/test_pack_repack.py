"""gc's second sort: live index entries external-sorted as records come back grouped by
pack in offset order (bounded groups), each entry exactly once, and the kept entries' file
gives back what was put in; the repack's fates and the packs to delete stream from the
plan's rows."""

from __future__ import annotations

import os
import random
from pathlib import Path

from vmkeep.repository.blobs import KIND_BLOCK, KIND_RECIPE
from vmkeep.repository.live_set import LiveKeys
from vmkeep.repository.pack_gc import doomed
from vmkeep.repository.pack_plan import DELETE, KEEP, REPACK, UNLISTED, Fate
from vmkeep.repository.pack_repack import (
    RECORD,
    FateCursor,
    KeptEntries,
    by_pack,
    entry_of,
    record,
)
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


def test_fates_follow_the_packs_in_order_and_deletes_spare_written_and_held_packs() -> None:
    """The repack asks each pack's fate in pack order of a cursor over the plan's rows (a
    pack the rows lack is UNLISTED); the packs to delete are the DELETE and REPACK rows,
    less a pack the repack just wrote (however unlikely its name is to equal an old one's)
    and the packs locked index objects list."""
    packs = sorted(bytes([n]) * 32 for n in range(1, 9))
    kinds = [DELETE, REPACK, KEEP, UNLISTED, REPACK, DELETE, KEEP, DELETE]
    fates = [Fate(p, 100, f, False) for p, f in zip(packs, kinds, strict=True)]
    cursor = FateCursor(iter(fates))
    asked = [cursor(p) for p in [packs[0], packs[0], packs[2], packs[3], packs[4]]]
    assert asked == [DELETE, DELETE, KEEP, UNLISTED, REPACK]
    assert cursor(packs[6][:31] + b"\x00") == UNLISTED  # between two rows
    assert cursor(b"\xff" * 32) == UNLISTED  # past the last row
    written = iter([bytes(32), packs[1], b"\xfe" * 32])
    gone = list(doomed(iter(fates), written, held={packs[5]}))
    assert gone == [packs[0], packs[4], packs[7]]
