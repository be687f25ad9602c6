"""The benchmark's disk image: a sparse raw file, half allocated, half of that compressible.

The layout (where the allocated regions are, which kind each one is, where the 1% change
lands) comes from a seed; the random bytes themselves come from os.urandom.
"""

from __future__ import annotations

import glob
import hashlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

MiB = 1 << 20
GiB = 1 << 30
ALIGN = 64 * 1024  # regions start and end on 64 KiB boundaries
PIECE = 4 * MiB  # write granularity
CHANGE_BLOCK = 64 * 1024
CORPUS_GLOBS = ("/usr/lib/*-linux-gnu/*.so*", "/usr/bin/*")


@dataclass(frozen=True)
class Region:
    offset: int
    length: int
    compressible: bool


@dataclass(frozen=True)
class Layout:
    size: int
    regions: list[Region]

    @property
    def allocated(self) -> int:
        return sum(r.length for r in self.regions)


def plan_layout(size: int, seed: int) -> Layout:
    """Regions of 1–64 MiB (smaller for small images) covering half the image, holes between."""
    rng = random.Random(seed)
    target = size // 2 // ALIGN * ALIGN
    biggest = max(ALIGN, min(64 * MiB, target // 8) // ALIGN * ALIGN)
    smallest = min(MiB, biggest)
    lengths: list[int] = []
    while sum(lengths) < target:
        n = rng.randrange(smallest, biggest + 1, ALIGN)
        lengths.append(min(n, target - sum(lengths)))
    # Spread the hole space over the len+1 gaps with random weights.
    holes_units = (size - target) // ALIGN
    weights = [rng.random() for _ in range(len(lengths) + 1)]
    gaps = [int(holes_units * w / sum(weights)) * ALIGN for w in weights]
    # Balance the two kinds by bytes: largest regions first, each to the kind with fewer bytes.
    compressible: set[int] = set()
    totals = [0, 0]  # random, compressible
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        kind = int(totals[1] <= totals[0])
        totals[kind] += lengths[i]
        if kind:
            compressible.add(i)
    regions: list[Region] = []
    pos = 0
    for i, (gap, length) in enumerate(zip(gaps, lengths, strict=False)):
        pos += gap
        regions.append(Region(pos, length, i in compressible))
        pos += length
    return Layout(size, regions)


class Corpus:
    """Real OS binaries, concatenated and cycled. Bytes after the first pass get 16 random
    bytes stamped every 4 KiB, so the repetition is not free deduplication for any tool."""

    def __init__(self) -> None:
        self.files = sorted(
            {
                p
                for g in CORPUS_GLOBS
                for p in glob.glob(g)
                if os.path.isfile(p) and not os.path.islink(p)
            }
        )
        if not self.files:
            raise RuntimeError(f"no corpus files found in {CORPUS_GLOBS}")
        self._stream = self._iterate()
        self._pending = b""
        self.passes = 0

    def _iterate(self) -> Iterator[bytes]:
        while True:
            for path in self.files:
                try:
                    with open(path, "rb") as f:
                        while block := f.read(PIECE):
                            yield self._stamp(block) if self.passes else block
                except OSError:
                    continue
            self.passes += 1

    @staticmethod
    def _stamp(block: bytes) -> bytes:
        out = bytearray(block)
        for pos in range(0, len(out) - 16, 4096):
            out[pos : pos + 16] = os.urandom(16)
        return bytes(out)

    def read(self, n: int) -> bytes:
        parts = [self._pending]
        have = len(self._pending)
        while have < n:
            block = next(self._stream)
            parts.append(block)
            have += len(block)
        data = b"".join(parts)
        self._pending = data[n:]
        return data[:n]


def build_image(path: str, size: int, seed: int) -> Layout:
    layout = plan_layout(size, seed)
    corpus = Corpus()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for region in layout.regions:
            for offset in range(region.offset, region.offset + region.length, PIECE):
                n = min(PIECE, region.offset + region.length - offset)
                os.pwrite(fd, corpus.read(n) if region.compressible else os.urandom(n), offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return layout


def allocated_bytes(path: str) -> int:
    return os.stat(path).st_blocks * 512


def plan_change(layout: Layout, fraction: float, seed: int) -> list[int]:
    """Offsets of 64 KiB blocks (4 KiB aligned, inside allocated regions) totalling `fraction`
    of the image size. Blocks do not overlap."""
    rng = random.Random(seed + 1)
    count = max(1, round(layout.size * fraction / CHANGE_BLOCK))
    usable = [r for r in layout.regions if r.length >= CHANGE_BLOCK]
    weights = [r.length for r in usable]
    taken: set[int] = set()
    offsets: list[int] = []
    while len(offsets) < count:
        region = rng.choices(usable, weights)[0]
        slot = rng.randrange(0, (region.length - CHANGE_BLOCK) // 4096 + 1)
        offset = region.offset + slot * 4096
        pages = range(offset // 4096, (offset + CHANGE_BLOCK) // 4096)
        if taken.isdisjoint(pages):
            taken.update(pages)
            offsets.append(offset)
    return sorted(offsets)


def apply_change(path: str, offsets: list[int]) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset in offsets:
            os.pwrite(fd, os.urandom(CHANGE_BLOCK), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def touched_chunks(offsets: list[int], chunk_size: int) -> int:
    """How many aligned chunks of `chunk_size` the change touches."""
    return len(
        {o // chunk_size for o in offsets} | {(o + CHANGE_BLOCK - 1) // chunk_size for o in offsets}
    )


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * MiB):
            h.update(block)
    return h.hexdigest()
