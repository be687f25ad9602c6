"""verify of a format 3 repository reads its chunks in groups (the restore's grouped fetch
and decode); when a group fails, exactly its bad chunks are reported, with exactly the points
that reference them, and never a good chunk that shared the group."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.repository.spy_remote import spied, tiny_point
from tests.repository.test_packs import packed_repo, reopen, store
from vmkeep.fetch_pipeline import PipelineStats
from vmkeep.parallel import cpu_count
from vmkeep.progress import SilentProgress
from vmkeep.repository.blobs import KIND_BLOCK, KIND_RECIPE
from vmkeep.repository.packs import BlobEntry, pack_object_name
from vmkeep.repository.verify import in_pack_order, verify
from vmkeep.repository.verify_groups import (
    check_grouped,
    group_aim,
    plan_groups,
    window_bytes,
)

KiB, MiB = 1 << 10, 1 << 20
START = datetime(2026, 3, 1, tzinfo=UTC)
BLOCKS = 5  # 64 KiB blocks a chunk: 4 chunks fill a 1 MiB pack (a pack closes past its size)
A, B = 5, 9  # chunks of the two flushes: each ends with a pack of one chunk


class Layout:
    """Two flushes (a recipe pack and data packs each): point A of 5 chunks, point B of 9
    plus A's first; the chunks in verify's order, cut into its groups. Whichever flush
    comes first in that order, its last pack holds one chunk, too little for a group of its
    own: that group also reads the next flush's first pack, and so mixes two data packs and
    two recipe packs."""

    def __init__(self, tmp_path: Path) -> None:
        repo = packed_repo(tmp_path / "r", pack_size=MiB)
        rng = random.Random(11)
        a = store(repo, [rng.randbytes(BLOCKS * 64 * KiB) for _ in range(A)])
        b = store(repo, [rng.randbytes(BLOCKS * 64 * KiB) for _ in range(B)])
        self.points = {
            tiny_point(repo, 0, START, a).id: a,
            tiny_point(repo, 1, START + timedelta(hours=1), b + a[:1]).id: b + a[:1],
        }
        self.repo = reopen(repo)
        assert self.repo.packed is not None
        self.store = self.repo.packed
        self.order = in_pack_order(self.repo, set(a + b))
        self.groups = [g.chunk_ids for g in plan_groups(self.store, self.order)]
        self.root = Path(self.repo.remote.url)

    def blocks(self, chunk_id: bytes) -> list[BlobEntry]:
        index = self.store.index()
        entries = [index.get(KIND_BLOCK, b) for b in self.store.recipe_of(chunk_id)[1]]
        assert all(e is not None for e in entries)
        return [e for e in entries if e is not None]

    def recipe(self, chunk_id: bytes) -> BlobEntry:
        entry = self.store.index().get(KIND_RECIPE, chunk_id)
        assert entry is not None
        return entry

    def path(self, pack: bytes) -> Path:
        return self.root / pack_object_name(pack)

    def mixed_group(self, bad: Callable[[bytes], bool]) -> tuple[list[bytes], set[bytes]]:
        """The first group with both chunks that `bad` picks and chunks it does not."""
        for group in self.groups:
            picked = {c for c in group if bad(c)}
            if picked and len(picked) < len(group):
                return group, picked
        raise AssertionError("no group mixes good and bad chunks")

    def check(self, want: set[bytes], says: str) -> None:
        """verify reports exactly `want`, each with exactly the points that reference it."""
        report = verify(reopen(self.repo), None, SilentProgress())
        assert report.chunks_checked == len(self.order)
        got = {c.chunk_id: c.points for c in report.corrupt_chunks}
        users = {c.hex(): sorted(p for p, ids in self.points.items() if c in ids) for c in want}
        assert got == users
        assert all(says in c.error for c in report.corrupt_chunks)
        assert [c.chunk_id for c in report.corrupt_chunks] == [
            c.hex() for c in self.order if c in want
        ]


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path)


def test_groups_read_each_data_pack_once(layout: Layout) -> None:
    """One ranged GET per data pack (5), where groups of 4 consecutive chunks (the grouping
    before groups were cut at pack ends) read 6 or 7, as A or B comes first: one per chunk
    before that (14)."""
    data_packs = {e.pack for c in layout.order for e in layout.blocks(c)}
    assert len(data_packs) == 5  # A: 4 + 1 chunks, B: 4 + 4 + 1
    fours = [layout.order[i : i + 4] for i in range(0, len(layout.order), 4)]
    assert sum(len({e.pack for c in g for e in layout.blocks(c)}) for g in fours) in (6, 7)
    view, spy = spied(layout.repo)
    report = verify(view, None, SilentProgress())
    assert report.ok and report.chunks_checked == A + B
    assert report.bytes_checked == (A + B) * BLOCKS * 64 * KiB
    assert spy.calls[("get", "packs")] == len(data_packs) + 2  # + the two recipe packs, whole
    # each group reads the packs of its chunks and no other group reads them
    assert [len(g) for g in layout.groups] in ([4, 5, 4, 1], [4, 4, 5, 1])
    seen: set[bytes] = set()
    for group in layout.groups:
        packs = {e.pack for c in group for e in layout.blocks(c)}
        assert not packs & seen
        seen |= packs


def test_corrupt_block_in_a_group(layout: Layout) -> None:
    group = next(g for g in layout.groups if len(g) == 4)
    victim = group[1]
    entry = layout.blocks(victim)[2]
    path = layout.path(entry.pack)
    raw = bytearray(path.read_bytes())
    raw[entry.offset + entry.length // 2] ^= 0x40
    path.write_bytes(bytes(raw))
    layout.check({victim}, "corrupt")


def test_missing_data_pack_in_a_group(layout: Layout) -> None:
    def in_pack(pack: bytes) -> set[bytes]:
        return {c for c in layout.order if any(e.pack == pack for e in layout.blocks(c))}

    # a group whose blocks lie in two packs or more: the loss of its last chunk's last pack
    # leaves a chunk of the group good
    for group in layout.groups:
        pack = layout.blocks(group[-1])[-1].pack
        lost = in_pack(pack)
        if not set(group) <= lost:
            break
    else:
        raise AssertionError("no group spans two data packs")
    layout.path(pack).unlink()
    layout.check(lost, "missing")


def test_missing_recipe_pack_in_a_group(layout: Layout) -> None:
    first = layout.recipe(layout.order[0]).pack
    group, _ = layout.mixed_group(lambda c: layout.recipe(c).pack != first)
    pack = layout.recipe(group[-1]).pack
    lost = {c for c in layout.order if layout.recipe(c).pack == pack}
    layout.path(pack).unlink()
    layout.check(lost, "missing")


def test_truncated_pack_in_a_group(layout: Layout) -> None:
    """Cut a data pack in the middle of the second chunk of a group whose first chunk lies
    before the cut in the same pack: the first stays good, the ones past the cut are bad."""
    for group in layout.groups:
        head, victim = layout.blocks(group[0]), layout.blocks(group[1])
        if head[0].pack == victim[0].pack:
            break
    else:
        raise AssertionError("no group with two chunks in one pack")
    cut = victim[1].offset + victim[1].length // 2
    pack = victim[1].pack
    lost = {
        c
        for c in layout.order
        if any(e.pack == pack and e.offset + e.length > cut for e in layout.blocks(c))
    }
    assert group[1] in lost and group[0] not in lost
    with layout.path(pack).open("r+b") as f:
        f.truncate(cut)
    layout.check(lost, "truncated")


def test_memory_is_the_window(layout: Layout) -> None:
    """At most `window` groups are fetched and not yet decoded, whatever the chunk count."""
    stats = PipelineStats()
    checked = [r for results in check_grouped(layout.repo, layout.order, stats) for r in results]
    assert sorted(c for c, _, _ in checked) == sorted(layout.order)
    assert all(error is None for _, _, error in checked)
    aim = group_aim(layout.store)
    assert aim == MiB  # the pack size: groups of a pack's worth
    groups = list(plan_groups(layout.store, layout.order))
    assert all(g.nbytes <= 2 * aim for g in groups)
    assert stats.fetched_items == len(layout.groups)
    assert stats.peak_queued_bytes <= window_bytes(aim, cpu_count())
