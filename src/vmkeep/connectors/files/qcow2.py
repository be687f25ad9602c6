"""A pure-Python qcow2 reader (versions 2 and 3), so the files connector needs no qemu at run
time. Every size and offset read from the image is checked against the file before use: a
hostile or damaged image raises ConnectorError, never IndexError or a huge allocation."""

from __future__ import annotations

import io
import os
import struct
import threading
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from vmkeep.connectors.base import Extent
from vmkeep.connectors.files.fileio import change_token, open_image, pread_full
from vmkeep.errors import ConnectorError

MAGIC = b"QFI\xfb"
HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
HEADER_V3_EXTRA = struct.Struct(">QQQII")  # up to byte 104
V3_HEADER_LENGTH = 112  # with the compression type byte, padded to 8

OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9-55 of L1 and standard L2 entries
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
COMPRESSION_DEFLATE = 0
COMPRESSION_ZSTD = 1

MAX_L1_BYTES = 32 << 20  # qemu's own limit (QCOW_MAX_L1_SIZE)
MAX_BACKING_NAME = 1023
L2_CACHE_TABLES = 128

_HOLE, _DATA, _COMPRESSED = 0, 1, 2


@dataclass(frozen=True)
class Qcow2Header:
    """The header fields the reader needs, already validated."""

    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    incompatible_features: int
    compression_type: int
    nb_snapshots: int

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


class Qcow2FeatureError(ConnectorError):
    """A valid image using a feature this reader does not implement (a backing file, an
    external data file, subclusters): QEMU can read it (the libvirt connector then does)."""


def _fail(path: Path, why: str) -> ConnectorError:
    return ConnectorError(f"{path}: {why}")


def _unsupported(path: Path, why: str) -> Qcow2FeatureError:
    return Qcow2FeatureError(f"{path}: {why}")


def read_header(fd: int, path: Path, file_size: int) -> Qcow2Header:
    """Parse and validate the header; refuse what this reader cannot read faithfully."""
    raw = pread_full(fd, 4096, 0)
    if len(raw) < HEADER_V2.size:
        raise _fail(path, "not a qcow2 image (file too short for a header)")
    (magic, version, backing_off, backing_len, cluster_bits, size, crypt, l1_size, l1_off, _rt_off,
     _rt_clusters, nb_snapshots, _snap_off) = HEADER_V2.unpack_from(raw)  # fmt: skip
    if magic != MAGIC:
        raise _fail(path, "not a qcow2 image (bad magic)")
    if version not in (2, 3):
        raise _fail(path, f"unsupported qcow2 version {version}")
    incompat = 0
    compression = COMPRESSION_DEFLATE
    if version == 3:
        if len(raw) < HEADER_V3_EXTRA.size + HEADER_V2.size:
            raise _fail(path, "truncated qcow2 v3 header")
        incompat, _compat, _autoclear, refcount_order, header_len = HEADER_V3_EXTRA.unpack_from(
            raw, HEADER_V2.size
        )
        if not 104 <= header_len <= len(raw) or refcount_order > 6:
            raise _fail(path, f"corrupt qcow2 v3 header (length {header_len})")
        if header_len > 104:
            compression = raw[104]
    if not 9 <= cluster_bits <= 21:
        raise _fail(path, f"corrupt qcow2 header: cluster_bits {cluster_bits} out of range")
    if crypt != 0:
        raise _fail(path, "encrypted qcow2 images are not supported; decrypt it with qemu-img")
    if backing_off:
        if backing_len > MAX_BACKING_NAME or backing_off + backing_len > file_size:
            raise _fail(path, "corrupt qcow2 header: backing file name out of bounds")
        name = pread_full(fd, backing_len, backing_off).decode("utf-8", "replace")
        raise _unsupported(
            path,
            f"has a backing file {name!r}; backing chains are not supported: flatten it first "
            "with 'qemu-img convert -O qcow2'",
        )
    if incompat & INCOMPAT_DATA_FILE:
        raise _unsupported(path, "qcow2 images with an external data file are not supported")
    if incompat & INCOMPAT_EXTL2:
        raise _unsupported(
            path, "qcow2 images with extended L2 entries (subclusters) are not supported"
        )
    if incompat & INCOMPAT_CORRUPT:
        raise _fail(path, "image is marked corrupt; repair it with 'qemu-img check -r all'")
    if incompat & ~(INCOMPAT_DIRTY | INCOMPAT_COMPRESSION):
        raise _fail(path, f"unknown qcow2 incompatible features 0x{incompat:x}")
    if bool(incompat & INCOMPAT_COMPRESSION) != (compression != COMPRESSION_DEFLATE):
        raise _fail(path, "corrupt qcow2 header: compression type flag mismatch")
    if compression not in (COMPRESSION_DEFLATE, COMPRESSION_ZSTD):
        raise _fail(path, f"unsupported qcow2 compression type {compression}")
    cluster_size = 1 << cluster_bits
    per_l1 = cluster_size * (cluster_size // 8)
    needed = -(-size // per_l1)
    if l1_size < needed:
        raise _fail(path, f"corrupt qcow2 header: L1 table too small for {size} bytes")
    if needed * 8 > MAX_L1_BYTES or l1_size * 8 > MAX_L1_BYTES:
        raise _fail(path, f"corrupt qcow2 header: L1 table of {l1_size} entries is too large")
    if needed and (l1_off % cluster_size or l1_off + needed * 8 > file_size or l1_off == 0):
        raise _fail(path, f"corrupt qcow2 header: L1 table offset {l1_off} is invalid or past EOF")
    return Qcow2Header(
        version, cluster_bits, size, l1_size, l1_off, incompat, compression, nb_snapshots
    )


class Qcow2Reader:
    """Read view of a qcow2 image. Zero and unallocated clusters read as zeros and are reported
    as holes. `read` is thread-safe: only pread is used, and the L2 cache is locked."""

    def __init__(self, path: Path | str, *, within: Path | None = None) -> None:
        self.path = Path(path)
        self._fd = open_image(self.path, within=within)
        try:
            self._file_size = os.fstat(self._fd).st_size
            self.change_token: str | None = "qcow2:" + change_token(self._fd)
            self.dirty_since: str | None = None  # set by FilesBackupSession when unchanged
            self.header = read_header(self._fd, self.path, self._file_size)
            self._load_l1()
        except OSError as exc:
            os.close(self._fd)
            raise _fail(self.path, f"cannot read: {exc.strerror}") from None
        except BaseException:
            os.close(self._fd)
            raise
        self.size = self.header.size
        self._cs = self.header.cluster_size
        self._l2_entries = self._cs // 8
        self._csize_shift = 62 - (self.header.cluster_bits - 8)
        self._csize_mask = (1 << (self.header.cluster_bits - 8)) - 1
        self._coffset_mask = (1 << self._csize_shift) - 1
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, array[int]] = OrderedDict()

    def _load_l1(self) -> None:
        h = self.header
        per_l1 = h.cluster_size * (h.cluster_size // 8)
        count = -(-h.size // per_l1)
        raw = pread_full(self._fd, count * 8, h.l1_table_offset) if count else b""
        if len(raw) != count * 8:
            raise _fail(self.path, "truncated L1 table")
        self._l1 = _be_array(raw)

    def _l2_table(self, l1_index: int) -> array[int] | None:
        """The L2 table for one L1 slot, or None when the whole slot is unallocated."""
        entry = self._l1[l1_index]
        offset = entry & OFFSET_MASK
        if offset == 0:
            return None
        with self._lock:
            table = self._cache.get(offset)
            if table is not None:
                self._cache.move_to_end(offset)
                return table
        if offset % self._cs or offset + self._cs > self._file_size:
            raise _fail(self.path, f"L2 table offset {offset} is invalid or past end of file")
        try:
            raw = pread_full(self._fd, self._cs, offset)
        except OSError as exc:
            raise _fail(self.path, f"cannot read L2 table: {exc.strerror}") from None
        if len(raw) != self._cs:
            raise _fail(self.path, "truncated L2 table")
        table = _be_array(raw)
        with self._lock:
            self._cache[offset] = table
            while len(self._cache) > L2_CACHE_TABLES:
                self._cache.popitem(last=False)
        return table

    def _entry(self, cluster: int) -> int:
        table = self._l2_table(cluster // self._l2_entries)
        return 0 if table is None else table[cluster % self._l2_entries]

    def _classify(self, entry: int) -> tuple[int, int, int]:
        """(kind, a, b): hole; data at host offset a; compressed at host offset a, b bytes."""
        if entry & OFLAG_COMPRESSED:
            coff = entry & self._coffset_mask
            sectors = ((entry >> self._csize_shift) & self._csize_mask) + 1
            if coff >= self._file_size:
                raise _fail(self.path, f"compressed cluster offset {coff} past end of file")
            return _COMPRESSED, coff, sectors * 512 - (coff & 511)
        offset = entry & OFFSET_MASK
        if entry & OFLAG_ZERO or offset == 0:
            return _HOLE, 0, 0
        if offset % self._cs or offset >= self._file_size:
            raise _fail(self.path, f"data cluster offset {offset} is invalid or past end of file")
        return _DATA, offset, 0

    def data_host_offset(self, offset: int) -> int | None:
        """Where the byte at guest `offset` lives in the file, if its cluster is plain data."""
        kind, host, _ = self._classify(self._entry(offset // self._cs))
        return host + offset % self._cs if kind == _DATA else None

    def extents(self) -> Iterator[Extent]:
        """Data and hole extents covering [0, size); adjacent clusters of a kind are merged."""
        start, is_data = 0, False
        span = self._cs * self._l2_entries
        for l1_index in range(len(self._l1)):
            base = l1_index * span
            table = self._l2_table(l1_index)
            if table is None:
                if is_data:
                    yield Extent(start, base - start, True)
                    start, is_data = base, False
                continue
            for i in range(min(self._l2_entries, -(-(self.size - base) // self._cs))):
                entry = table[i]
                data = bool(entry & OFLAG_COMPRESSED) or (
                    not entry & OFLAG_ZERO and entry & OFFSET_MASK != 0
                )
                if data != is_data:
                    pos = base + i * self._cs
                    if pos > start:
                        yield Extent(start, pos - start, is_data)
                    start, is_data = pos, data
        if self.size > start:
            yield Extent(start, self.size - start, is_data)

    def dirty_extents(self) -> Iterator[Extent]:
        """Images carry no change tracking: a delta base exists only when nothing changed."""
        return iter(())

    def read(self, offset: int, length: int) -> bytes:
        """Bytes at [offset, offset+length), fewer only at the end of the disk."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, self.size)
        if end <= offset:
            return b""
        parts: list[bytes] = []
        run_kind = run_host = run_len = 0  # a pending run of plain data or of zeros
        pos = offset
        while pos < end:
            cluster, intra = divmod(pos, self._cs)
            n = min(self._cs - intra, end - pos)
            kind, a, b = self._classify(self._entry(cluster))
            extends = kind == _HOLE or run_host + run_len == a + intra
            if run_len and kind == run_kind and kind != _COMPRESSED and extends:
                run_len += n
            else:
                self._flush(parts, run_kind, run_host, run_len)
                run_kind, run_host, run_len = kind, a + intra, n
                if kind == _COMPRESSED:
                    parts.append(self._decompress(a, b)[intra : intra + n])
                    run_len = 0
            pos += n
        self._flush(parts, run_kind, run_host, run_len)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _flush(self, parts: list[bytes], kind: int, host: int, length: int) -> None:
        if not length:
            return
        if kind == _HOLE:
            parts.append(bytes(length))
            return
        try:
            data = pread_full(self._fd, length, host)
        except OSError as exc:
            raise _fail(self.path, f"cannot read: {exc.strerror}") from None
        parts.append(data if len(data) == length else data + bytes(length - len(data)))

    def _decompress(self, coff: int, csize: int) -> bytes:
        """One compressed cluster, inflated to exactly the cluster size and never more."""
        try:
            data = pread_full(self._fd, csize, coff)
        except OSError as exc:
            raise _fail(self.path, f"cannot read: {exc.strerror}") from None
        try:
            if self.header.compression_type == COMPRESSION_ZSTD:
                parts: list[bytes] = []
                got = 0
                reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data))
                while got < self._cs:
                    piece = reader.read(self._cs - got)
                    if not piece:
                        break
                    parts.append(piece)
                    got += len(piece)
                result = b"".join(parts)
            else:
                result = zlib.decompressobj(-15).decompress(data, self._cs)
        except (zlib.error, zstandard.ZstdError) as exc:
            raise _fail(self.path, f"corrupt compressed cluster at offset {coff}: {exc}") from None
        if len(result) != self._cs:
            raise _fail(self.path, f"corrupt compressed cluster at offset {coff}")
        return result

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _be_array(raw: bytes) -> array[int]:
    """Big-endian 64-bit entries as a compact array (never a list of Python ints)."""
    table = array("Q", raw)
    if array("H", [1]).tobytes() != b"\x00\x01":
        table.byteswap()
    return table
