"""gc's per-pack tallies in bounded memory (issue 15, "gc's per-pack state"): the plan's
merge join (pack_plan.py) meets the index's entries in blob-ID order, so their packs come at
random. The live bytes, live count and dead count of up to `limit` packs are held in a
dict; when it is full, they are spilled as records sorted by pack into an external sort
(live_set.LiveKeys), and `merged` sums each pack's records across the runs (a combining
sort, as MapReduce's combiner). Memory follows `limit`, not the number of packs (a dict of
every pack took ~270 bytes a pack: 1.7 GiB at 100 TiB of 16 MiB packs); a repository of
fewer packs than `limit` writes one run, at the end."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import NamedTuple

from .live_set import BUFFER_KEYS, LiveKeys

# pack, run (records of one pack merge in the order they were spilled), live bytes, live
# count, dead count, kind of the first live entry met (NO_KIND: none)
TALLY = struct.Struct(">32sIQQQB")
TALLY_BUFFER = BUFFER_KEYS // 4  # packs held before a spill (~200 B each: ~50 MiB; 4 TiB)
NO_KIND = 255  # live entries are recipes or blocks (the mark adds no other kind)
LIVE_BYTES, LIVE_COUNT, DEAD, KIND = range(4)  # a held tally's fields


class Tally(NamedTuple):
    pack: bytes
    live_bytes: int
    live_count: int
    dead_count: int
    kind: int  # of the pack's first live entry in key order (packs hold one kind)


class PackTallies:
    """Counts per pack, fed in any pack order; `merged` yields each pack once, in order."""

    def __init__(self, sort: LiveKeys) -> None:
        if sort.key_size != TALLY.size:
            raise ValueError("the tallies' sort needs TALLY records")
        self._sort = sort
        self._limit = max(1, sort.buffer_keys)
        self.held: dict[bytes, list[int]] = {}  # pack: [live bytes, live count, dead, kind]
        self._run = 0

    def live(self, pack: bytes, length: int, kind: int) -> None:
        tally = self.held.get(pack) or self.new(pack)
        tally[LIVE_BYTES] += length
        tally[LIVE_COUNT] += 1
        if tally[KIND] == NO_KIND:
            tally[KIND] = kind

    def dead(self, pack: bytes) -> None:
        (self.held.get(pack) or self.new(pack))[DEAD] += 1

    def new(self, pack: bytes) -> list[int]:
        """A pack's tally, added to `held` (after a spill if it is full). The plan's join
        updates `held` itself, `held.get(pack) or new(pack)`: a call per entry costs."""
        if len(self.held) >= self._limit:
            self._spill()
        tally = self.held[pack] = [0, 0, 0, NO_KIND]
        return tally

    def _spill(self) -> None:
        """The held tallies into the sort (as many as its buffer: one run), then forgotten
        (`held` is emptied in place: the join holds it)."""
        for pack, (live_bytes, live_count, dead, kind) in self.held.items():
            self._sort.add(TALLY.pack(pack, self._run, live_bytes, live_count, dead, kind))
        self.held.clear()
        self._run += 1

    def merged(self) -> Iterator[Tally]:
        """Every pack fed, once, in pack order, its counts summed over the runs; its kind is
        that of the earliest run with a live entry (the first live entry in key order)."""
        self._spill()
        current: list[int] | None = None
        pack = b""
        for record in self._sort.sorted_unique():
            at, _, live_bytes, live_count, dead, kind = TALLY.unpack(record)
            if current is not None and at == pack:
                current[0] += live_bytes
                current[1] += live_count
                current[2] += dead
                if current[3] == NO_KIND:
                    current[3] = kind
                continue
            if current is not None:
                yield Tally(pack, *current)
            pack, current = at, [live_bytes, live_count, dead, kind]
        if current is not None:
            yield Tally(pack, *current)
