"""The in-memory pack plan gc made before the streaming one (pack_plan.stream_plan): every
live entry held per pack, a set of every live blob, a dict of every pack. A test oracle
only: the streaming plan's decisions are checked (tests/repository/test_pack_plan.py,
tests/e2e/test_format3_gc_streamed.py) and benchmarked (bench/gc_plan_scale.py) against it;
`streamed` runs the streaming plan and lists its fates."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from vmkeep.repository.live_set import LiveKeys
from vmkeep.repository.pack_gc_locks import GcLocks
from vmkeep.repository.pack_plan import (
    DELETE,
    KEEP,
    LISTED,
    REPACK,
    REPACK_BELOW,
    SMALL_PACK,
    Summary,
    listing,
    stream_plan,
)
from vmkeep.repository.pack_plan import PackPlan as StreamPlan
from vmkeep.repository.pack_tally import TALLY
from vmkeep.repository.packs import BlobEntry, pack_overhead


@dataclass
class PackPlan:
    keep: dict[bytes, list[BlobEntry]] = field(default_factory=dict)  # pack → live entries
    repack: dict[bytes, list[BlobEntry]] = field(default_factory=dict)
    delete: list[bytes] = field(default_factory=list)  # no live blob, or unindexed
    sizes: dict[bytes, int] = field(default_factory=dict)
    dead_entries: int = 0
    dead_packs: set[bytes] = field(default_factory=set)  # packs a dead index entry names


def plan_from(
    sizes: dict[bytes, int],
    entries: Iterable[BlobEntry],
    live: set[tuple[int, bytes]],
    pack_size: int,
) -> PackPlan:
    """What happens to each pack: its live bytes against its size on the remote."""
    plan = PackPlan(sizes=sizes)
    by_pack: dict[bytes, list[BlobEntry]] = {}
    for entry in entries:
        if (entry.kind, entry.blob_id) in live:
            by_pack.setdefault(entry.pack, []).append(entry)
        else:
            plan.dead_entries += 1
            plan.dead_packs.add(entry.pack)
    for pack_id, size in plan.sizes.items():
        entries = by_pack.get(pack_id, [])
        # The pack's header and trailer are not garbage: without them, a pack of a few small
        # blobs (a backup's last recipes) would be repacked by every gc, into its own copy.
        live_bytes = sum(e.length for e in entries) + pack_overhead(len(entries))
        if not entries:
            plan.delete.append(pack_id)
        elif live_bytes < size * REPACK_BELOW:
            plan.repack[pack_id] = entries
        else:
            plan.keep[pack_id] = entries
    consolidate_small(plan, pack_size)
    return plan


def consolidate_small(plan: PackPlan, pack_size: int) -> None:
    """Small kept packs of one kind (each backup closes its last, partly filled packs) are
    repacked together once there are two or more, so that the objects on the remote follow
    the data stored, not the number of backups (restic's prune does the same). A lone small
    pack stays, unless packs of its kind are repacked anyway (their repack ends with a small
    pack of that kind: the next gc would merge the two)."""
    repacked = {entries[0].kind for entries in plan.repack.values()}
    small: dict[int, list[bytes]] = {}
    for pack_id, entries in plan.keep.items():
        if plan.sizes[pack_id] < pack_size * SMALL_PACK:
            small.setdefault(entries[0].kind, []).append(pack_id)
    for kind, packs in small.items():
        if len(packs) >= 2 or kind in repacked:
            for pack_id in packs:
                plan.repack[pack_id] = plan.keep.pop(pack_id)


@dataclass
class Streamed:
    """pack_plan.stream_plan's final fates as lists (pack order), for comparison."""

    plan: StreamPlan
    total: Summary
    delete: list[bytes] = field(default_factory=list)
    repack: list[bytes] = field(default_factory=list)
    keep: list[bytes] = field(default_factory=list)
    runs: dict[str, int] = field(default_factory=dict)  # runs each sort spilled


def streamed(
    parent: Path,
    sizes: Iterable[tuple[bytes, int]],
    entries: Iterable[BlobEntry],
    live: Iterator[bytes],
    pack_size: int,
    buffers: tuple[int, int] = (1 << 16, 1 << 16),
    locked: Iterable[bytes] = (),
) -> Streamed:
    """The streaming plan of `sizes` (the listing: (pack, size) in any order), the index's
    `entries` and the sorted `live` keys, with sort buffers of `buffers` (listing, tallies)
    records; the packs `locked` under a retention lock. Its run files are removed before it
    returns."""
    locks = GcLocks(parent)
    for pack in locked:
        locks.keep(pack)
    with (
        LiveKeys(parent, buffers[0], LISTED.size) as listed,
        LiveKeys(parent, buffers[1], TALLY.size) as tallies,
        closing(locks),
    ):
        for pack, size in sizes:
            listed.add(listing(pack, size))
        plan = stream_plan(listed.dir / "plan", listed, tallies, entries, live, pack_size)
        got = Streamed(plan, plan.apply_locks(locks.holds))
        for fate in plan.fates():
            {DELETE: got.delete, REPACK: got.repack, KEEP: got.keep}.get(fate.fate, []).append(
                fate.pack
            )
        got.runs = {"listed": len(listed.runs), "tallies": len(tallies.runs)}
    return got
