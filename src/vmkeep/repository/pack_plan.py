"""gc's pack plan in bounded memory (issue 15, "gc memory" and "gc's per-pack state"): a
merge join of the index's entries in key order (blob ID then kind, index_file.py) with the
sorted live keys of live_set.LiveKeys tallies live bytes per pack (pack_tally.py: a
combining external sort); a second merge join of those tallies with the pack listing, both
in pack order, decides each pack's fate and writes it as a row of a plan file, one pack at a
time. What stays in memory is a few counters per kind (packs hold one kind), whatever the
number of packs. The decisions are those of the in-memory plan gc made before, same
thresholds, same results (tests/repository/pack_plan_reference.py is that plan, the oracle
of tests/repository/test_pack_plan.py); the entries of the packs to repack or keep are not
held here: the join hands each live one to `sink` (pack_repack.py sorts them by pack for the
repack and the consolidated index)."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from vmkeep.errors import IntegrityError

from .blobs import KIND_RECIPE
from .live_set import LiveKeys, live_key
from .pack_tally import DEAD, KIND, LIVE_BYTES, LIVE_COUNT, NO_KIND, PackTallies, Tally
from .packs import BlobEntry, pack_overhead

REPACK_BELOW = 0.5  # a pack whose live blobs are less than half of it is rewritten
SMALL_PACK = 0.25  # below a quarter of the pack size, packs of one kind are merged

# Fates. A row holds one of the first five (SMALL: kept, under SMALL_PACK; UNLISTED: named
# by the index, not on the remote); `PackPlan.fates` resolves SMALL into KEEP or REPACK.
DELETE, REPACK, KEEP, SMALL, UNLISTED, SMALL_REPACK = range(6)
LISTED = struct.Struct(">32sQ")  # the pack listing's records: pack ID, size
ROW = struct.Struct(">32sQBBB")  # pack, size, kind, fate, has dead entries
_READ = ROW.size * 2048
KINDS = 256


class Fate(NamedTuple):
    pack: bytes
    size: int  # on the remote (0: unlisted)
    fate: int  # DELETE, REPACK, KEEP or UNLISTED (named by the index only)
    dead: bool  # an index entry of this pack is dead


@dataclass
class Summary:
    """The plan's totals once retention locks are applied (PackPlan.apply_locks)."""

    deleted: int = 0  # packs deleted, the repacked ones included
    repacked: int = 0
    freed: int = 0  # bytes of the packs deleted
    spared: int = 0  # packs under a lock moved from repack or delete to keep
    dead_outside: int = 0  # packs with a dead index entry that no lock holds


@dataclass
class PackPlan:
    """The plan on disk (`rows`: one row per pack listed or named by the index, in pack
    order) and the per-kind counts that resolve small packs."""

    rows_path: Path
    dead_entries: int = 0
    dead_recipes: int = 0  # indexed chunks (recipes) no restore point references
    live_entries: int = 0  # what a consolidated index lists
    repacked_kinds: set[int] = field(default_factory=set)  # kinds of the packs to repack
    small_kept: list[int] = field(default_factory=lambda: [0] * KINDS)  # small packs kept
    alone: list[bool] = field(default_factory=lambda: [False] * KINDS)  # see apply_locks
    locks: Callable[[], Callable[[bytes], bool]] = lambda: lambda _: False  # GcLocks.holds

    def rows(self) -> Iterator[tuple[bytes, int, int, int, bool]]:
        with open(self.rows_path, "rb") as f:
            while data := f.read(_READ):
                for at in range(0, len(data) - ROW.size + 1, ROW.size):
                    pack, size, kind, fate, dead = ROW.unpack_from(data, at)
                    yield pack, size, kind, fate, bool(dead)

    def merged(self, fate: int, kind: int) -> int:
        """merge_small of the in-memory plan: small kept packs of one kind are repacked
        together once there are two or more, so that the objects on the remote follow the
        data stored, not the number of backups (restic's prune does the same). A lone small
        pack stays, unless packs of its kind are repacked anyway: the repack ends with a
        partly filled pack of that kind, which with the lone one would be two small packs,
        so the next gc would repack again (one gc reaches the fixed point)."""
        if fate != SMALL:
            return fate
        return SMALL_REPACK if self.small_kept[kind] >= 2 or kind in self.repacked_kinds else KEEP

    @staticmethod
    def _spared(pack: bytes, fate: int, holds: Callable[[bytes], bool]) -> int:
        """A pack under a retention lock (or listed by a locked index object) moves from
        repack and delete to keep: its dead blobs stay until the lock ends."""
        if fate in (DELETE, REPACK, SMALL_REPACK) and holds(pack):
            return KEEP
        return fate

    def candidates(self) -> Iterator[bytes]:
        """The packs to repack before retention locks (whose own locks gc must ask about)."""
        for pack, _, kind, fate, _ in self.rows():
            if self.merged(fate, kind) in (REPACK, SMALL_REPACK):
                yield pack

    def apply_locks(self, locks: Callable[[], Callable[[bytes], bool]]) -> Summary:
        """Spares the packs `locks()` holds (a predicate asked in pack order, made anew for
        each pass); then a small pack left alone in its kind's repack would be copied into a
        copy of itself at every gc: it is kept instead (`alone`). Returns the totals of the
        final fates (one pass: the alone small pack of a kind is known once its kind's
        repacked packs are counted)."""
        self.locks = locks
        holds = locks()
        total = Summary()
        repacks = [0] * KINDS
        small: list[int | None] = [None] * KINDS  # size of a kind's last small pack to repack
        for pack, size, kind, fate, dead in self.rows():
            total.dead_outside += dead and not holds(pack)
            merged = self.merged(fate, kind)
            spared = self._spared(pack, merged, holds)
            total.spared += spared != merged
            if spared in (REPACK, SMALL_REPACK):
                repacks[kind] += 1
                total.repacked += 1
                if spared == SMALL_REPACK:
                    small[kind] = size
            if spared in (DELETE, REPACK, SMALL_REPACK):
                total.deleted += 1
                total.freed += size
        for kind, lone in enumerate(small):
            self.alone[kind] = repacks[kind] == 1 and lone is not None
            if lone is not None and self.alone[kind]:
                total.repacked -= 1
                total.deleted -= 1
                total.freed -= lone
        return total

    def fates(self) -> Iterator[Fate]:
        """Each pack's final fate, in pack order."""
        holds = self.locks()
        for pack, size, kind, fate, dead in self.rows():
            final = self._spared(pack, self.merged(fate, kind), holds)
            if final == SMALL_REPACK:
                final = KEEP if self.alone[kind] else REPACK
            yield Fate(pack, size, final, dead)


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
    plan: PackPlan,
    entries: Iterable[BlobEntry],
    live: Iterator[bytes],
    tallies: PackTallies,
    sink: Callable[[BlobEntry], None] | None = None,
) -> None:
    """Live bytes and counts per pack into `tallies`, the join's totals into `plan`; each
    live entry also goes to `sink`."""
    held, new = tallies.held, tallies.new  # PackTallies.live and .dead, inlined
    count = 0
    for entry, is_live in join(entries, live):
        tally = held.get(entry.pack) or new(entry.pack)
        if not is_live:
            plan.dead_entries += 1
            plan.dead_recipes += entry.kind == KIND_RECIPE
            tally[DEAD] += 1
            continue
        if sink is not None:
            sink(entry)
        count += 1
        tally[LIVE_BYTES] += entry.length
        tally[LIVE_COUNT] += 1
        if tally[KIND] == NO_KIND:
            tally[KIND] = entry.kind
    plan.live_entries = count


def outer_join(
    listed: Iterator[bytes], tallies: Iterator[Tally]
) -> Iterator[tuple[bytes, int | None, Tally | None]]:
    """(pack, size or None if unlisted, tally or None if the index names no live or dead
    blob of it) for every pack of either sorted stream, once each (a pack listed twice, as
    under two names, counts once)."""
    record = next(listed, None)
    tally = next(tallies, None)
    last = None
    while record is not None or tally is not None:
        if record is not None:
            pack, size = LISTED.unpack(record)
            if pack == last:
                record = next(listed, None)
                continue
            if tally is None or pack <= tally.pack:
                match = tally if tally is not None and tally.pack == pack else None
                yield pack, size, match
                last = pack
                record = next(listed, None)
                if match is not None:
                    tally = next(tallies, None)
                continue
        assert tally is not None
        yield tally.pack, None, tally
        tally = next(tallies, None)


def first_fate(size: int | None, tally: Tally | None, pack_size: int) -> int:
    """A listed pack's fate by its live bytes against its size on the remote (dead blobs a
    former gc dropped from the index still take room in a kept pack)."""
    if size is None:
        return UNLISTED
    if tally is None or tally.live_count == 0:
        return DELETE
    # The pack's header and trailer are not garbage: without them, a pack of a few small
    # blobs (a backup's last recipes) would be repacked by every gc, into its own copy.
    if tally.live_bytes + pack_overhead(tally.live_count) < size * REPACK_BELOW:
        return REPACK
    return SMALL if size < pack_size * SMALL_PACK else KEEP


def write_plan(
    plan: PackPlan, listed: Iterator[bytes], tallies: Iterator[Tally], pack_size: int
) -> PackPlan:
    """Each pack's fate as a row of `plan.rows_path`, in pack order; the per-kind counts."""
    with open(plan.rows_path, "xb", buffering=1 << 16) as f:
        for pack, size, tally in outer_join(listed, tallies):
            fate = first_fate(size, tally, pack_size)
            kind = tally.kind if tally is not None else 0
            if fate == REPACK:
                plan.repacked_kinds.add(kind)
            elif fate == SMALL:
                plan.small_kept[kind] += 1
            dead = tally is not None and tally.dead_count > 0
            f.write(ROW.pack(pack, size or 0, kind, fate, dead))
    return plan


def stream_plan(
    rows: Path,
    listed: LiveKeys,
    tally_sort: LiveKeys,
    entries: Iterable[BlobEntry],
    live: Iterator[bytes],
    pack_size: int,
    sink: Callable[[BlobEntry], None] | None = None,
) -> PackPlan:
    """The plan of the packs `listed` holds (LISTED records) against the index's `entries`
    and the sorted `live` keys, written to `rows`; `tally_sort` takes the per-pack tallies
    (TALLY records)."""
    listed.flush()  # the listing's last run on disk, not in memory, while the join counts
    plan = PackPlan(rows)
    tallies = PackTallies(tally_sort)
    count_packs(plan, entries, live, tallies, sink)
    return write_plan(plan, listed.sorted_unique(), tallies.merged(), pack_size)


def listing(pack: bytes, size: int) -> bytes:
    return LISTED.pack(pack, size)
