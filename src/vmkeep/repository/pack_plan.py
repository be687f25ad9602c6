"""gc's pack plan by a merge join (issue 15, "gc memory"): the index's entries in key order
(blob ID then kind, index_file.py) against the sorted live keys of live_set.LiveKeys, with
only a few counters per pack. The decisions are those of the in-memory plan gc made before,
same thresholds, same results (tests/repository/pack_plan_reference.py is that plan, the
oracle of tests/repository/test_pack_plan.py); the entries of the packs to repack or keep
are not held here: the join hands each live one to `sink` (pack_repack.py sorts them by
pack for the repack and the consolidated index)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from vmkeep.errors import IntegrityError

from .blobs import KIND_RECIPE
from .live_set import live_key
from .packs import BlobEntry, pack_overhead

REPACK_BELOW = 0.5  # a pack whose live blobs are less than half of it is rewritten
SMALL_PACK = 0.25  # below a quarter of the pack size, packs of one kind are merged


@dataclass
class PackCount:
    live_bytes: int = 0
    live_count: int = 0
    kind: int = -1  # of the first live entry met (packs hold one kind)


@dataclass
class CountPlan:
    keep: list[bytes] = field(default_factory=list)
    repack: list[bytes] = field(default_factory=list)
    delete: list[bytes] = field(default_factory=list)
    dead_entries: int = 0
    dead_packs: set[bytes] = field(default_factory=set)  # packs a dead index entry names
    dead_recipes: int = 0  # indexed chunks (recipes) no restore point references
    live_entries: int = 0  # what a consolidated index lists
    kinds: dict[bytes, int] = field(default_factory=dict)  # of each pack to repack
    small: set[bytes] = field(default_factory=set)  # repacked only for being small


def join(entries: Iterable[BlobEntry], live: Iterator[bytes]) -> Iterator[tuple[BlobEntry, bool]]:
    """Each index entry and whether it is live, by one pass over both sorted streams.
    Entries out of key order (or one key twice) would make live blobs look dead: that stops
    gc. The index yields each blob once (BlobIndex.entries: the first file's record)."""
    current = next(live, None)
    last = b""
    for entry in entries:
        key = live_key(entry.kind, entry.blob_id)
        if key <= last:
            raise IntegrityError(
                "gc: the blob index is out of key order; run `vmkeep repair index`"
            )
        last = key
        while current is not None and current < key:
            current = next(live, None)
        yield entry, current == key


def count_packs(
    entries: Iterable[BlobEntry],
    live: Iterator[bytes],
    sink: Callable[[BlobEntry], None] | None = None,
) -> tuple[dict[bytes, PackCount], CountPlan]:
    """Live bytes and count per pack, and a plan holding only the join's tallies (dead
    entries, dead recipes, the packs with dead entries, live entries); each live entry also
    goes to `sink`."""
    counts: dict[bytes, PackCount] = {}
    plan = CountPlan()
    for entry, is_live in join(entries, live):
        if not is_live:
            plan.dead_entries += 1
            plan.dead_recipes += entry.kind == KIND_RECIPE
            plan.dead_packs.add(entry.pack)
            continue
        if sink is not None:
            sink(entry)
        count = counts.setdefault(entry.pack, PackCount())
        count.live_bytes += entry.length
        count.live_count += 1
        if count.kind < 0:
            count.kind = entry.kind
    plan.live_entries = sum(c.live_count for c in counts.values())
    return counts, plan


def stream_plan(
    sizes: dict[bytes, int],
    entries: Iterable[BlobEntry],
    live: Iterator[bytes],
    pack_size: int,
    sink: Callable[[BlobEntry], None] | None = None,
) -> CountPlan:
    """What happens to each listed pack: its live bytes against its size on the remote (dead
    blobs a former gc dropped from the index still take room in a kept pack)."""
    counts, plan = count_packs(entries, live, sink)
    for pack_id, size in sizes.items():
        count = counts.get(pack_id)
        # The pack's header and trailer are not garbage: without them, a pack of a few small
        # blobs (a backup's last recipes) would be repacked by every gc, into its own copy.
        if count is None:
            plan.delete.append(pack_id)
        elif count.live_bytes + pack_overhead(count.live_count) < size * REPACK_BELOW:
            plan.repack.append(pack_id)
            plan.kinds[pack_id] = count.kind
        else:
            plan.keep.append(pack_id)
    merge_small(plan, sizes, counts, pack_size)
    return plan


def merge_small(
    plan: CountPlan, sizes: dict[bytes, int], counts: dict[bytes, PackCount], pack_size: int
) -> None:
    """Small kept packs of one kind (each backup closes its last, partly filled packs) are
    repacked together once there are two or more, so that the objects on the remote follow
    the data stored, not the number of backups (restic's prune does the same). A lone small
    pack stays, unless packs of its kind are repacked anyway: the repack ends with a partly
    filled pack of that kind, which with the lone one would be two small packs, so the next
    gc would repack again (one gc reaches the fixed point)."""
    repacked = set(plan.kinds.values())
    small: dict[int, list[bytes]] = {}
    for pack_id in plan.keep:
        if sizes[pack_id] < pack_size * SMALL_PACK:
            small.setdefault(counts[pack_id].kind, []).append(pack_id)
    merged = [
        p for kind, packs in small.items() if len(packs) >= 2 or kind in repacked for p in packs
    ]
    plan.repack += merged
    plan.small.update(merged)
    plan.kinds.update((p, counts[p].kind) for p in merged)
    plan.keep = [p for p in plan.keep if p not in plan.small]


def settle_small(plan: CountPlan) -> None:
    """After packs left the repack (retention locks: pack_gc.spare_locked), a small pack left
    alone in its kind's repack would be copied into a copy of itself at every gc: it is kept
    instead."""
    by_kind: dict[int, list[bytes]] = {}
    for pack_id in plan.repack:
        by_kind.setdefault(plan.kinds[pack_id], []).append(pack_id)
    alone = {p[0] for p in by_kind.values() if len(p) == 1 and p[0] in plan.small}
    plan.keep += [p for p in plan.repack if p in alone]
    plan.repack = [p for p in plan.repack if p not in alone]
