"""The on-disk blob index as a base file plus a few delta files (docs/DATA-PATH.md "Blob
index on disk"): a backup's new index object costs a small delta file, not a rewrite of the
whole index (a size-tiered, LSM-like layout).

Each file is a complete, self-verifying IndexFile (own sources, packs, salt, MACs) in the
repository's cache directory: `blobindex` and `blobindex.d-<random>`. The open index is the
union of the files that verify; a file that does not (damaged, truncated, foreign, a
symlink) is deleted and its sources are read again from the remote. Deltas are folded into
the base once they hold more than 1/BASE_SHARE of its records: the base is rewritten once
per BASE_SHARE-th of its size added, so the bytes written per new record stay bounded
whatever the repository's size. More than MAX_DELTAS deltas before that are joined into one
delta (a rewrite of the deltas only: at most 1/BASE_SHARE of the base), which bounds the
files a lookup probes. Files are written beside and renamed into place; a delta deleted by
another process's fold or join stays readable through the descriptor this process holds."""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterator
from pathlib import Path

from .index_file import Damaged, IndexFile
from .index_merge import remove_stale
from .packs import BlobEntry

MAX_DELTAS = 4
BASE_SHARE = 8
# A delta has ~1 record per bucket (a base: ~64): a lookup that misses it finds its bucket
# empty in the table (no read) about a third of the time. More spread costs each backup's
# open more (a MAC per bucket written, the table read): bench/index_scale.py, 4 M blobs,
# 5 files: spread 1 126 k lookups per CPU-s, 64 153 k, 256 168 k (1 file: ~200 k); open
# after a backup 0.10 s, 0.24 s, 0.73 s.
DELTA_SPREAD = 64


def delta_pattern(base: Path) -> str:
    return f"{base.name}.d-*"


def new_delta_path(base: Path) -> Path:
    return base.with_name(f"{base.name}.d-{os.urandom(8).hex()}")


def remove_stale_deltas(base: Path) -> None:
    """Temporary directories of delta writes killed midway (named after their delta)."""
    remove_stale(base.with_name(delta_pattern(base)))


def open_deltas(base: Path, key: bytes) -> list[tuple[Path, IndexFile]]:
    """The delta files that verify; the others are deleted (rebuilt from the remote). One
    gone since the listing (folded by another process) is simply absent."""
    out = []
    for path in sorted(base.parent.glob(delta_pattern(base))):
        try:
            out.append((path, IndexFile.open(path, key)))
        except Damaged:
            if path.is_symlink() or path.exists():
                path.unlink(missing_ok=True)
    return out


def delete_deltas(base: Path) -> None:
    for path in base.parent.glob(delta_pattern(base)):
        path.unlink(missing_ok=True)


def tier_step(base: IndexFile | None, deltas: list[IndexFile]) -> str:
    """What the files need after a new delta: "keep", "join" (the deltas into one) or
    "fold" (the deltas into the base)."""
    if not deltas:
        return "keep"
    if base is None or int(sum(d.count for d in deltas)) * BASE_SHARE > int(base.count):
        return "fold"
    return "join" if len(deltas) > MAX_DELTAS else "keep"


class Tiers:
    """Lookups over the base and the deltas: first hit wins (a blob found in two files is
    the same blob, and every record names a listed source)."""

    def __init__(self, files: list[IndexFile]) -> None:
        self.files = files

    @property
    def sources(self) -> list[bytes]:
        return [s for f in self.files for s in f.sources]

    def find(
        self, kind: int, blob_id: bytes, check_miss: bool = True
    ) -> tuple[bytes, int, int] | None:
        """(pack ID, offset, length), as IndexFile.find checks it (raises Damaged)."""
        for f in self.files:
            found = f.find(kind, blob_id, check_miss)
            if found is not None:
                _, pack, offset, length = found
                return f.packs[pack], offset, length
        return None

    def entries(self) -> Iterator[BlobEntry]:
        """Each blob once, in ID order (the files' sorted streams merged)."""
        last: tuple[bytes, int] | None = None
        streams = [f.entries() for f in self.files]
        for e in heapq.merge(*streams, key=lambda e: (e.blob_id, e.kind)):
            if (e.blob_id, e.kind) != last:
                last = (e.blob_id, e.kind)
                yield e

    def close(self) -> None:
        for f in self.files:
            f.close()
