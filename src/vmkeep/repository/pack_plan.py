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
) -> tuple[dict[bytes, PackCount], set[bytes], int]:
    """Live bytes and count per pack, the packs with dead entries and how many dead entries;
    each live entry also goes to `sink`."""
    counts: dict[bytes, PackCount] = {}
    dead_packs: set[bytes] = set()
    dead = 0
    for entry, is_live in join(entries, live):
        if not is_live:
            dead += 1
            dead_packs.add(entry.pack)
            continue
        if sink is not None:
            sink(entry)
        count = counts.setdefault(entry.pack, PackCount())
        count.live_bytes += entry.length
        count.live_count += 1
        if count.kind < 0:
            count.kind = entry.kind
    return counts, dead_packs, dead


def stream_plan(
    sizes: dict[bytes, int],
    entries: Iterable[BlobEntry],
    live: Iterator[bytes],
    pack_size: int,
    sink: Callable[[BlobEntry], None] | None = None,
) -> CountPlan:
    """What happens to each listed pack: its live bytes against its size on the remote (dead
    blobs a former gc dropped from the index still take room in a kept pack)."""
    counts, dead_packs, dead = count_packs(entries, live, sink)
    plan = CountPlan(dead_entries=dead, dead_packs=dead_packs)
    for pack_id, size in sizes.items():
        count = counts.get(pack_id)
        # The pack's header and trailer are not garbage: without them, a pack of a few small
        # blobs (a backup's last recipes) would be repacked by every gc, into its own copy.
        if count is None:
            plan.delete.append(pack_id)
        elif count.live_bytes + pack_overhead(count.live_count) < size * REPACK_BELOW:
            plan.repack.append(pack_id)
        else:
            plan.keep.append(pack_id)
    # Small kept packs of one kind (each backup closes its last, partly filled packs) are
    # repacked together once there are two or more, so that the objects on the remote follow
    # the data stored, not the number of backups (restic's prune does the same). A lone small
    # pack stays: rewriting it would gain nothing.
    small: dict[int, list[bytes]] = {}
    for pack_id in plan.keep:
        if sizes[pack_id] < pack_size * SMALL_PACK:
            small.setdefault(counts[pack_id].kind, []).append(pack_id)
    merged = {p for packs in small.values() if len(packs) >= 2 for p in packs}
    plan.repack += [p for packs in small.values() if len(packs) >= 2 for p in packs]
    plan.keep = [p for p in plan.keep if p not in merged]
    return plan
