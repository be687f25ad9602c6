"""Merges that write a new blob index file (index_file.py describes the file): records of
an old file, minus the index objects a gc deleted, plus new entries, sorted one ID-prefix
byte's partition at a time with memory bounded by a spill budget, written bucket by bucket
beside the old file and renamed over it (a crash midway leaves the old file and a temporary
directory the next merge removes)."""

from __future__ import annotations

import os
import time
from array import array
from bisect import bisect_left
from collections.abc import Iterable
from pathlib import Path

from .index_file import (
    BIG_ENDIAN,
    HEAD,
    MAC_SIZE,
    MAGIC,
    PARTITIONS,
    RECORD,
    IndexFile,
    Piece,
    bits_for,
    bucket_mac,
    bucket_of,
    head_mac,
)
from .packs import BlobEntry

_NO_MAC = bytes(MAC_SIZE)  # an empty bucket's room
_AFTER_ALL = b"\xff" * (RECORD.size + 1)  # above every record


class _Spill:
    """New records spread over PARTITIONS by their first ID byte: in memory up to a budget,
    then appended to one temporary file per partition (a cold build of millions of blobs
    never holds them all)."""

    BUDGET = 16 << 20

    def __init__(self, tmpdir: Path) -> None:
        self.tmpdir = tmpdir
        self.bufs = [bytearray() for _ in range(PARTITIONS)]
        self.spilled = [False] * PARTITIONS
        self.buffered = 0
        self.count = 0

    def add(self, record: bytes) -> None:
        self.bufs[record[0]] += record
        self.buffered += len(record)
        self.count += 1
        if self.buffered >= self.BUDGET:
            self._spill()

    def _spill(self) -> None:
        for p, buf in enumerate(self.bufs):
            if buf:
                with open(self.tmpdir / f"part-{p:02x}", "ab") as f:
                    f.write(buf)
                self.spilled[p] = True
                buf.clear()
        self.buffered = 0

    def take(self, p: int) -> list[bytes]:
        """Partition `p`'s records, sorted; its file is removed."""
        data = bytes(self.bufs[p])
        self.bufs[p] = bytearray()
        if self.spilled[p]:
            path = self.tmpdir / f"part-{p:02x}"
            data = path.read_bytes() + data
            path.unlink()
        return sorted(data[i : i + RECORD.size] for i in range(0, len(data), RECORD.size))


STALE_SECONDS = 24 * 3600


def remove_stale(path: Path) -> None:
    """Temporary directories of merges killed midway (a cold build's can hold hundreds of
    MB): those of processes gone from this machine, or older than a day."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 2)[1])
            alive = os.path.exists(f"/proc/{pid}") and pid != os.getpid()
            if alive and time.time() - tmp.lstat().st_mtime < STALE_SECONDS:
                continue
            if tmp.is_dir() and not tmp.is_symlink():
                for part in tmp.iterdir():
                    part.unlink()
                tmp.rmdir()
        except (OSError, ValueError, IndexError):
            continue


class Merge:
    """A new index file from an old one (or none) without the sources it drops, plus new
    entries; written beside `path` and renamed over it."""

    def __init__(
        self,
        path: Path,
        key: bytes,
        old: IndexFile | None,
        dropped: set[int],
        spread: int = 1,
    ) -> None:
        """`spread` > 1: that many times the buckets (a small delta file: a lookup that
        misses finds its bucket empty in the table and reads nothing)."""
        self.spread = spread
        self.path = path
        self.key = key
        self.old = old
        remove_stale(path)
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
        self.tmp.mkdir(mode=0o700)
        self.spill = _Spill(self.tmp)
        kept = [] if old is None else [s for i, s in enumerate(old.sources) if i not in dropped]
        self.remap: dict[int, int] | None = None
        if old is not None and dropped:
            live = [i for i in range(len(old.sources)) if i not in dropped]
            self.remap = {i: n for n, i in enumerate(live)}
        self.sources = kept
        self.packs = list(old.packs) if old is not None else []
        self._pack_numbers = {p: n for n, p in enumerate(self.packs)}

    def add_source(self, index_id: bytes, entries: Iterable[BlobEntry]) -> None:
        source = len(self.sources)
        self.sources.append(index_id)
        for e in entries:
            pack = self._pack_numbers.get(e.pack)
            if pack is None:
                pack = self._pack_numbers[e.pack] = len(self.packs)
                self.packs.append(e.pack)
            self.spill.add(RECORD.pack(e.blob_id, e.kind, source, pack, e.offset, e.length))

    def add_file(self, other: IndexFile, keep: set[bytes]) -> None:
        """Every record of `other` whose source is in `keep` (a delta folded into a base),
        with its source and pack renumbered."""
        sources: dict[int, int] = {}
        for i, s in enumerate(other.sources):
            if s in keep and s not in self.sources:
                sources[i] = len(self.sources)
                self.sources.append(s)
        packs = []
        for p in other.packs:
            if p not in self._pack_numbers:
                self._pack_numbers[p] = len(self.packs)
                self.packs.append(p)
            packs.append(self._pack_numbers[p])
        for record in other.records():
            blob_id, kind, source, pack, offset, length = RECORD.unpack(record)
            if source in sources and pack < len(packs):
                self.spill.add(
                    RECORD.pack(blob_id, kind, sources[source], packs[pack], offset, length)
                )

    def finish(self) -> IndexFile:
        try:
            return self._write()
        finally:
            self.abort()

    def abort(self) -> None:
        """Remove the temporary files (idempotent)."""
        if self.tmp.is_dir():
            for p in self.tmp.iterdir():
                p.unlink()
            self.tmp.rmdir()

    def _write(self) -> IndexFile:
        old = self.old
        count = (old.count if old is not None else 0) + self.spill.count
        bits = bits_for(count * self.spread)
        salt = os.urandom(16)
        out_path = self.tmp / "index"
        fd = os.open(out_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            writer = BucketWriter(fd, self.key, salt, bits)
            per = 1 << (bits - 8)
            for p in range(PARTITIONS):
                new = self.spill.take(p)
                if old is not None and old.bits == bits and self.remap is None:
                    self._merge_buckets(writer, p * per, per, new)
                else:
                    writer.write_sorted(self._old_records(p) + new)
            writer.finish(self.sources, self.packs)
            os.replace(out_path, self.path)
            return IndexFile(fd, self.key)
        except BaseException:
            os.close(fd)
            raise

    def _old_records(self, p: int) -> list[bytes]:
        """Old records of partition `p`, with sources renumbered and dropped ones left out."""
        old = self.old
        if old is None:
            return []
        per = max(1, (1 << old.bits) >> 8)
        data = old.read_buckets(p * per, (p + 1) * per)
        out: list[bytes] = []
        for at in range(0, len(data), RECORD.size):
            record = data[at : at + RECORD.size]
            if self.remap is not None:
                source = self.remap.get(int.from_bytes(record[33:37], "big"))
                if source is None:
                    continue
                record = record[:33] + source.to_bytes(4, "big") + record[37:]
            out.append(record)
        return out

    def _merge_buckets(self, writer: BucketWriter, first: int, per: int, new: list[bytes]) -> None:
        """Same bucket layout, nothing dropped: untouched buckets are copied as they are."""
        old = self.old
        assert old is not None
        data = old.read_buckets(first, first + per)
        pos = base = 0
        for b in range(first, first + per):
            n = (old.fanout[b + 1] - old.fanout[b]) * RECORD.size
            bucket = data[base : base + n]
            base += n
            end = bisect_left(new, writer.bucket_end(b), pos)
            if end - pos > 4:
                split = [bucket[i : i + RECORD.size] for i in range(0, n, RECORD.size)]
                bucket = b"".join(sorted(split + new[pos:end]))
            elif end > pos:
                bucket = _insert(bucket, new[pos:end])
            pos = end
            writer.bucket(b, bucket)


def _insert(bucket: bytes, records: list[bytes]) -> bytes:
    """A few records spliced into a sorted bucket (a bisection each: no list of it)."""
    for record in records:
        lo, hi = 0, len(bucket) // RECORD.size
        while lo < hi:
            mid = (lo + hi) // 2
            if bucket[mid * RECORD.size : (mid + 1) * RECORD.size] < record:
                lo = mid + 1
            else:
                hi = mid
        bucket = bucket[: lo * RECORD.size] + record + bucket[lo * RECORD.size :]
    return bucket


class BucketWriter:
    """Writes buckets in order after the header's room; then the tables, the header MAC and
    the header."""

    def __init__(self, fd: int, key: bytes, salt: bytes, bits: int) -> None:
        self.fd = fd
        self.key = key
        self.salt = salt
        self.bits = bits
        self.fanout = array("Q", [0])
        self.count = 0
        self._buf = bytearray()
        self._pos = HEAD.size

    def bucket(self, b: int, records: bytes) -> None:
        """Bucket `b`'s records (in order; the buckets skipped since the last are empty)."""
        self._empty_until(b)
        if not records:
            return
        self.count += len(records) // RECORD.size
        self.fanout.append(self.count)
        self._buf += records
        self._buf += bucket_mac(self.key, self.salt, b, records)
        if len(self._buf) >= 4 << 20:
            self._flush()

    def _empty_until(self, b: int) -> None:
        """The empty buckets before `b`, at once: zeros instead of a MAC (the table, under
        the header's MAC, says they are empty, and nothing reads their room). Most buckets
        of a spread delta are empty; a MAC each was most of the cost of writing one."""
        gap = b + 1 - len(self.fanout)
        assert gap >= 0
        if gap:
            self.fanout.extend(array("Q", [self.count]) * gap)
            self._buf += _NO_MAC * gap

    def write_sorted(self, records: list[bytes]) -> None:
        """Records of buckets after those written so far, in any order."""
        records.sort()
        pos = 0
        while pos < len(records):
            b = bucket_of(records[pos], self.bits)
            end = bisect_left(records, self.bucket_end(b), pos)
            self.bucket(b, b"".join(records[pos:end]))
            pos = end

    def bucket_end(self, b: int) -> bytes:
        """A key above every record of bucket `b` and below those of the next (records
        compare as bytes: a 4-byte prefix sorts before every record that starts with it)."""
        after = b + 1
        if after >> self.bits:
            return _AFTER_ALL
        return (after << (32 - self.bits)).to_bytes(4, "big")

    def _flush(self) -> None:
        self._write(self._buf)
        self._buf.clear()

    def _write(self, data: Piece) -> None:
        with memoryview(data) as whole, whole.cast("B") as view:
            while view:
                written = os.pwrite(self.fd, view, self._pos)
                self._pos += written
                view = view[written:]

    def finish(self, sources: list[bytes], packs: list[bytes]) -> None:
        """The tables after the buckets, the header MAC, then the header (the bucket table
        is written from its array: no copy of up to 8 MiB)."""
        self._empty_until(1 << self.bits)
        if BIG_ENDIAN:
            self.fanout.byteswap()  # stored little-endian; no longer used here
        head = HEAD.pack(MAGIC, self.bits, self.count, len(sources), len(packs), self.salt)
        ids = b"".join(sources) + b"".join(packs)
        mac = head_mac(self.key, self.salt, head, ids, self.fanout)
        self._buf += ids
        self._flush()
        self._write(self.fanout)
        self._buf += mac
        self._flush()
        os.pwrite(self.fd, head, 0)
