"""The format 3 blob index as a sorted file on local disk (docs/DATA-PATH.md "Blob index on
disk"): memory no longer follows the repository's size.

One file per repository under its cache directory: fixed-width records (blob ID, kind,
source index object, pack number, offset, length) sorted by ID, grouped in buckets by the
ID's top bits (IDs are keyed hashes: buckets are even). A lookup is one `pread` of one
bucket (tens of records) and a bisection; in memory stay only the bucket offsets (at most
8 MiB), the pack table and the names of the merged index objects.

Trust: the file is a cache. Its header, tables and every bucket carry a MAC keyed from the
repository key and bound to the repository id and a per-file salt, so a file edited,
truncated, copied from another repository or spliced from two versions does not verify
and is rebuilt. Each record names the index object it came from, so entries of index
objects a gc deleted are dropped at the next merge: the file never says more than the
index objects the remote lists.

Updates never modify a file in place: a merge writes a new file beside it and renames it
over (two processes sharing the cache directory each install a complete file)."""

from __future__ import annotations

import contextlib
import hmac
import os
import struct
import threading
import time
from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Union

import blake3

from .format import ID_SIZE
from .packs import BlobEntry

RECORD = struct.Struct(">32sBIIII")  # blob ID, kind, source, pack number, offset, length
KEY_SIZE = ID_SIZE + 1
MAC_SIZE = 16
MAGIC = b"VMKBIDX1"
# magic, bucket bits, records, sources, packs, salt
HEAD = struct.Struct(">8sBQII16s")
HEAD_MAC = 32
MIN_BITS, MAX_BITS = 8, 20  # 256 buckets .. 1 Mi buckets (8 MiB of offsets)
PER_BUCKET = 64  # records a bucket holds on average
PARTITIONS = 256  # a merge sorts one ID-prefix byte's records at a time
_MAC_CONTEXT = "vmkeep 2026-12 blob index cache MAC v1"
_KIND_BYTES = [bytes((k,)) for k in range(256)]
_NO_MAC = bytes(MAC_SIZE)
Piece = Union[bytes, bytearray, memoryview, "array[int]"]
_BIG_ENDIAN = struct.pack("=H", 1) != struct.pack("<H", 1)
_AFTER_ALL = b"\xff" * (RECORD.size + 1)


class Damaged(Exception):
    """The file does not verify (edited, truncated, foreign): rebuild it."""


def mac_key(repo_key: bytes | None, repo_id: str) -> bytes:
    """Keyed from the repository key when there is one (an unencrypted repository's cache
    gets the trust of its unauthenticated objects: a checksum), bound to the repository."""
    material = (repo_key or b"") + b"\0" + repo_id.encode()
    return blake3.blake3(material, derive_key_context=_MAC_CONTEXT).digest()


def bits_for(count: int) -> int:
    return min(MAX_BITS, max(MIN_BITS, (count // PER_BUCKET).bit_length()))


def bucket_of(blob_id: bytes, bits: int) -> int:
    return int.from_bytes(blob_id[:4], "big") >> (32 - bits)


class IndexFile:
    """An open, verified index file. Lookups are thread-safe (`pread` on one descriptor)."""

    def __init__(self, fd: int, key: bytes) -> None:
        """Takes `fd` over only if the file verifies (the caller closes it otherwise)."""
        self.fd = -1
        self._key = key
        head = os.pread(fd, HEAD.size, 0)
        if len(head) != HEAD.size:
            raise Damaged("short header")
        magic, self.bits, self.count, nsources, npacks, self.salt = HEAD.unpack(head)
        if magic != MAGIC or not MIN_BITS <= self.bits <= MAX_BITS:
            raise Damaged("bad header")
        buckets = 1 << self.bits
        self.data_end = HEAD.size + self.count * RECORD.size + buckets * MAC_SIZE
        size = os.fstat(fd).st_size
        tables = (nsources + npacks) * ID_SIZE + (buckets + 1) * 8
        if size != self.data_end + tables + HEAD_MAC:
            raise Damaged("wrong size")
        # The tables are read in place (the bucket table of a large file is 8 MiB: read
        # into its array, not copied through three temporary buffers).
        ids = os.pread(fd, (nsources + npacks) * ID_SIZE, self.data_end)
        self.fanout = array("Q", [0]) * (buckets + 1)
        at = self.data_end + len(ids)
        if (
            len(ids) != (nsources + npacks) * ID_SIZE
            or os.preadv(fd, [self.fanout], at) != (buckets + 1) * 8
        ):
            raise Damaged("short tables")
        mac = os.pread(fd, HEAD_MAC, at + (buckets + 1) * 8)
        if not hmac.compare_digest(mac, _head_mac(key, self.salt, head, ids, self.fanout)):
            raise Damaged("header does not verify")
        cut = nsources * ID_SIZE
        self.sources = [ids[i : i + ID_SIZE] for i in range(0, cut, ID_SIZE)]
        self.packs = [ids[i : i + ID_SIZE] for i in range(cut, len(ids), ID_SIZE)]
        if _BIG_ENDIAN:
            self.fanout.byteswap()  # stored little-endian
        if self.fanout[0] != 0 or self.fanout[-1] != self.count:
            raise Damaged("bad bucket table")
        if any(a > b for a, b in pairwise(self.fanout)):
            raise Damaged("bad bucket table")
        self.fd = fd
        self._buckets = BucketCache()

    @classmethod
    def open(cls, path: Path, key: bytes) -> IndexFile:
        """Damaged (also for a missing or unreadable file: both mean "build it")."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise Damaged(str(exc)) from exc
        try:
            return cls(fd, key)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        """Idempotent; also when the last reference goes (a reload drops the old index)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit `os` may be gone
            self.close()

    def read_buckets(self, first: int, stop: int) -> bytes:
        """Records of buckets [first, stop), each bucket verified; no MACs in the result."""
        lo, hi = self.fanout[first], self.fanout[stop]
        start = HEAD.size + lo * RECORD.size + first * MAC_SIZE
        length = (hi - lo) * RECORD.size + (stop - first) * MAC_SIZE
        raw = memoryview(os.pread(self.fd, length, start))
        if len(raw) != length:
            raise Damaged("truncated")
        out = bytearray()
        pos = 0
        fanout = self.fanout
        for b in range(first, stop):
            n = (fanout[b + 1] - fanout[b]) * RECORD.size
            if n:  # an empty bucket's room holds no MAC: the table says it is empty
                records, mac = raw[pos : pos + n], raw[pos + n : pos + n + MAC_SIZE]
                if not hmac.compare_digest(mac, _bucket_mac(self._key, self.salt, b, records)):
                    raise Damaged(f"bucket {b} does not verify")
                out += records
            pos += n + MAC_SIZE
        return bytes(out)

    def find(
        self, kind: int, blob_id: bytes, check_miss: bool = True
    ) -> tuple[int, int, int, int] | None:
        """(source, pack number, offset, length) of the first record of (ID, kind): the
        blob's bucket (tens of records), searched with bytes.find. A bucket comes from the
        cache of buckets this object verified, else from one pread; a hit is always
        verified; a miss only with `check_miss` (a dedup test that misses at worst stores a
        block twice, never skips one, so the backup's tests of new blocks skip the MAC; a
        read that misses checks it). Only verified buckets are cached."""
        b = int.from_bytes(blob_id[:4], "big") >> (32 - self.bits)
        data = self._buckets.get(b)
        if data is None:
            data = self._read_bucket(b)
            if data is None:
                return None  # an empty bucket (the table says so, and it verified)
            verified = False
        else:
            verified = True
        key = blob_id + _KIND_BYTES[kind]
        size = (self.fanout[b + 1] - self.fanout[b]) * RECORD.size
        at = data.find(key, 0, size)  # C speed; a match must start at a record
        while at >= 0 and at % RECORD.size:
            at = data.find(key, at + 1, size)
        hit = at >= 0
        if not verified and (hit or check_miss):
            mac = _bucket_mac(self._key, self.salt, b, memoryview(data)[:size])
            if not hmac.compare_digest(data[size:], mac):
                raise Damaged(f"bucket {b} does not verify")
            self._buckets.put(b, data)
        if not hit:
            return None
        _, _, source, pack, offset, length = RECORD.unpack_from(data, at)
        if pack >= len(self.packs) or source >= len(self.sources):
            raise Damaged("a record names no pack")
        return source, pack, offset, length

    def _read_bucket(self, b: int) -> bytes | None:
        """Bucket `b`'s records and MAC as read (not verified), or None when it is empty."""
        first = self.fanout[b]
        size = (self.fanout[b + 1] - first) * RECORD.size
        if not size:
            return None
        data = os.pread(self.fd, size + MAC_SIZE, HEAD.size + first * RECORD.size + b * MAC_SIZE)
        if len(data) != size + MAC_SIZE:
            raise Damaged("truncated")
        return data

    def entries(self) -> Iterator[BlobEntry]:
        """Each blob once (the first of its records: a blob listed by several index objects
        has one record per source), in record order."""
        last = b""
        for record in self.records():
            blob_id, kind, _, pack, offset, length = RECORD.unpack(record)
            if record[:KEY_SIZE] != last:
                last = record[:KEY_SIZE]
                yield BlobEntry(kind, blob_id, self.packs[pack], offset, length)

    def records(self) -> Iterator[bytes]:
        """Every record in order, one partition's worth of buckets read at a time."""
        step = max(1, (1 << self.bits) // PARTITIONS)
        for first in range(0, 1 << self.bits, step):
            data = self.read_buckets(first, first + step)
            for at in range(0, len(data), RECORD.size):
                yield data[at : at + RECORD.size]


class BucketCache:
    """Buckets (records and MAC, as read) that their IndexFile has verified, most recently
    used last, at most BUDGET bytes: a restore looks up every block of a chunk, and one pread
    and one keyed BLAKE3 of ~3 KiB per lookup was ~9% of its samples, while the buckets of a
    repository of up to ~80,000 blobs fit in the budget. A cached bucket was checked once
    against its MAC; an edit of the file after that is not seen by this process (it trusts
    what it verified), and an unverified bucket is never put here."""

    BUDGET = 4 << 20

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: OrderedDict[int, bytes] = OrderedDict()
        self.nbytes = 0

    def get(self, bucket: int) -> bytes | None:
        with self._lock:
            data = self._items.get(bucket)
            if data is not None:
                self._items.move_to_end(bucket)
            return data

    def put(self, bucket: int, data: bytes) -> None:
        with self._lock:
            if bucket in self._items or len(data) > self.BUDGET:
                return
            self._items[bucket] = data
            self.nbytes += len(data)
            while self.nbytes > self.BUDGET:
                _, dropped = self._items.popitem(last=False)
                self.nbytes -= len(dropped)

    def __len__(self) -> int:
        return len(self._items)


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


def _remove_stale(path: Path) -> None:
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
        _remove_stale(path)
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
            writer = _BucketWriter(fd, self.key, salt, bits)
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

    def _merge_buckets(self, writer: _BucketWriter, first: int, per: int, new: list[bytes]) -> None:
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


class _BucketWriter:
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
        self._buf += _bucket_mac(self.key, self.salt, b, records)
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
        if _BIG_ENDIAN:
            self.fanout.byteswap()  # stored little-endian; no longer used here
        head = HEAD.pack(MAGIC, self.bits, self.count, len(sources), len(packs), self.salt)
        ids = b"".join(sources) + b"".join(packs)
        mac = _head_mac(self.key, self.salt, head, ids, self.fanout)
        self._buf += ids
        self._flush()
        self._write(self.fanout)
        self._buf += mac
        self._flush()
        os.pwrite(self.fd, head, 0)


def _bucket_mac(key: bytes, salt: bytes, bucket: int, records: Piece) -> bytes:
    """A bucket's MAC, bound to its number and the file's salt (the reader and the writer
    both call this one function, so they agree by construction)."""
    return _mac(key, bucket.to_bytes(4, "big") + salt, (records,))


def _head_mac(key: bytes, salt: bytes, head: bytes, ids: bytes, fanout: array[int]) -> bytes:
    """The MAC over the header and the tables (its bucket table as stored: little-endian)."""
    return _mac(key, b"head" + salt, (head, ids, fanout), HEAD_MAC)


def _mac(key: bytes, context: bytes, pieces: tuple[Piece, ...], size: int = MAC_SIZE) -> bytes:
    h = blake3.blake3(context, key=key)
    for piece in pieces:
        with memoryview(piece) as view, view.cast("B") as octets:
            h.update(octets)
    return h.digest(size)
