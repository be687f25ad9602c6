"""gc's pack plan by a merge join (issue 15, "gc memory"): the index's entries in key order
(blob ID then kind, index_file.py) against the sorted live keys of live_set.LiveKeys, with
only a few counters per pack. The decisions are pack_gc.plan_from's, same thresholds, same
results (tests/repository/test_pack_plan.py checks it); the entries of the packs to repack
or keep are read again by a later streaming pass, never held here."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from vmkeep.errors import IntegrityError

from .live_set import live_key
from .pack_gc import REPACK_BELOW, SMALL_PACK
from .packs import BlobEntry, pack_overhead


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


def count_packs(
    entries: Iterable[BlobEntry], live: Iterator[bytes]
) -> tuple[dict[bytes, PackCount], int]:
    """Live bytes and count per pack, and the dead entries, by one pass over both sorted
    streams. Entries out of key order would make live blobs look dead: that stops gc."""
    counts: dict[bytes, PackCount] = {}
    dead = 0
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
        if current != key:
            dead += 1
            continue
        count = counts.setdefault(entry.pack, PackCount())
        count.live_bytes += entry.length
        count.live_count += 1
        if count.kind < 0:
            count.kind = entry.kind
    return counts, dead


def stream_plan(
    sizes: dict[bytes, int], entries: Iterable[BlobEntry], live: Iterator[bytes], pack_size: int
) -> CountPlan:
    """What happens to each listed pack (pack_gc.plan_from's rules on counters)."""
    counts, dead = count_packs(entries, live)
    plan = CountPlan(dead_entries=dead)
    for pack_id, size in sizes.items():
        count = counts.get(pack_id)
        if count is None:
            plan.delete.append(pack_id)
        elif count.live_bytes + pack_overhead(count.live_count) < size * REPACK_BELOW:
            plan.repack.append(pack_id)
        else:
            plan.keep.append(pack_id)
    small: dict[int, list[bytes]] = {}
    for pack_id in plan.keep:
        if sizes[pack_id] < pack_size * SMALL_PACK:
            small.setdefault(counts[pack_id].kind, []).append(pack_id)
    merged = {p for packs in small.values() if len(packs) >= 2 for p in packs}
    plan.repack += [p for packs in small.values() if len(packs) >= 2 for p in packs]
    plan.keep = [p for p in plan.keep if p not in merged]
    return plan
