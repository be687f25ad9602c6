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
from array import array
from collections import OrderedDict
from collections.abc import Iterator
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
Piece = Union[bytes, bytearray, memoryview, "array[int]"]
# the bucket table is stored little-endian
BIG_ENDIAN = struct.pack("=H", 1) != struct.pack("<H", 1)


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
        if not hmac.compare_digest(mac, head_mac(key, self.salt, head, ids, self.fanout)):
            raise Damaged("header does not verify")
        cut = nsources * ID_SIZE
        self.sources = [ids[i : i + ID_SIZE] for i in range(0, cut, ID_SIZE)]
        self.packs = [ids[i : i + ID_SIZE] for i in range(cut, len(ids), ID_SIZE)]
        if BIG_ENDIAN:
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
                if not hmac.compare_digest(mac, bucket_mac(self._key, self.salt, b, records)):
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
            mac = bucket_mac(self._key, self.salt, b, memoryview(data)[:size])
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


def bucket_mac(key: bytes, salt: bytes, bucket: int, records: Piece) -> bytes:
    """A bucket's MAC, bound to its number and the file's salt (the reader and the writer
    both call this one function, so they agree by construction)."""
    return _mac(key, bucket.to_bytes(4, "big") + salt, (records,))


def head_mac(key: bytes, salt: bytes, head: bytes, ids: bytes, fanout: array[int]) -> bytes:
    """The MAC over the header and the tables (its bucket table as stored: little-endian)."""
    return _mac(key, b"head" + salt, (head, ids, fanout), HEAD_MAC)


def _mac(key: bytes, context: bytes, pieces: tuple[Piece, ...], size: int = MAC_SIZE) -> bytes:
    h = blake3.blake3(context, key=key)
    for piece in pieces:
        with memoryview(piece) as view, view.cast("B") as octets:
            h.update(octets)
    return h.digest(size)
