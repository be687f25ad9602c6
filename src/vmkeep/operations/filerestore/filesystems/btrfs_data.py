"""A btrfs file's content from its extent items, read here rather than by dissect.btrfs: the
decompressors are bounded by the extent's declared size (a compressed extent is at most
128 KiB of data, so a hostile one cannot expand without limit), zstd goes through the
`zstandard` package vmkeep already depends on (dissect wants `backports.zstd`), and the last
decompressed extent is kept, so reading a compressed file sequentially decompresses each
extent once instead of once per sector."""

from __future__ import annotations

import io
import zlib
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, BinaryIO

import zstandard
from dissect.btrfs.c_btrfs import c_btrfs
from dissect.util.compression import lzo
from dissect.util.stream import AlignedStream

from vmkeep.errors import ImageError

NONE, ZLIB, LZO, ZSTD = 0, 1, 2, 3
MAX_COMPRESSED = 128 << 10  # BTRFS_MAX_COMPRESSED: data per compressed extent
MAX_INLINE = 64 << 10


@dataclass(frozen=True, slots=True)  # a fragmented file has millions of them
class Extent:
    """`length` bytes of the file from `skip` bytes into an on-disk extent (a hole when
    `disk` is 0)."""

    length: int
    disk: int = 0
    disk_length: int = 0
    skip: int = 0
    compression: int = NONE


def decompress(data: bytes, compression: int, limit: int, sector: int) -> bytes:
    """At most `limit` bytes out of a compressed extent."""
    if compression == ZLIB:
        return zlib.decompressobj().decompress(data, limit)
    if compression == ZSTD:
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(data), read_across_frames=False
        )
        return reader.read(limit)
    if compression == LZO:
        return _lzo(data, limit, sector)
    raise ImageError(f"btrfs: unknown compression type {compression}")


def _lzo(data: bytes, limit: int, sector: int) -> bytes:
    """btrfs's LZO framing: a total length, then segments (length + payload) that never
    straddle a sector boundary, each at most one sector of output."""
    total = int.from_bytes(data[:4], "little")
    if total > len(data):
        raise ImageError("btrfs: LZO extent longer than its data")
    out, pos = bytearray(), 4
    while pos + 4 <= total and len(out) < limit:
        length = int.from_bytes(data[pos : pos + 4], "little")
        pos += 4
        if length == 0 or pos + length > total:
            break
        out += lzo.decompress(data[pos : pos + length], False, sector + sector // 16 + 67)
        pos += length
        if sector - pos % sector < 4:
            pos += sector - pos % sector
    return bytes(out[:limit])


def file_extents(tree: Any, inum: int, size: int, sector: int) -> tuple[list[Extent], bytes | None]:
    """The extents of inode `inum` up to `size` (holes filled in), or its inline data."""
    extents: list[Extent] = []
    position = 0
    for item, data in tree.cursor().iter(
        inum, c_btrfs.BTRFS_EXTENT_DATA_KEY, 0, ignore_offset=True
    ):
        head = c_btrfs.btrfs_file_extent_item_inline(data)
        if head.type == c_btrfs.BTRFS_FILE_EXTENT_INLINE:
            body = bytes(data[len(c_btrfs.btrfs_file_extent_item_inline) :])
            if head.compression != NONE:
                body = decompress(body, head.compression, min(head.ram_bytes, MAX_INLINE), sector)
            return [], body[:size]
        reg = c_btrfs.btrfs_file_extent_item_reg(data)
        start = item.key.offset
        if start < position:
            raise ImageError(f"btrfs: inode {inum} has overlapping file extents")
        if start >= size:
            break
        if start > position:
            extents.append(Extent(start - position))
        length = min(reg.num_bytes, size - start)
        if reg.type == c_btrfs.BTRFS_FILE_EXTENT_PREALLOC or reg.disk_bytenr == 0:
            extents.append(Extent(length))  # preallocated or a hole: zeros
        else:
            if reg.compression != NONE and (
                reg.disk_num_bytes > MAX_COMPRESSED or reg.ram_bytes > MAX_COMPRESSED
            ):
                raise ImageError(f"btrfs: inode {inum} has a compressed extent of absurd size")
            extents.append(
                Extent(length, reg.disk_bytenr, reg.disk_num_bytes, reg.offset, reg.compression)
            )
        position = start + length
    if position < size:
        extents.append(Extent(size - position))
    return extents, None


class ExtentReader(AlignedStream):  # type: ignore[misc]
    """A file's bytes over its extents on the file system's logical address space."""

    def __init__(self, logical: BinaryIO, extents: list[Extent], size: int, sector: int) -> None:
        self._logical = logical
        self._extents = extents
        self._starts: list[int] = []
        offset = 0
        for extent in extents:
            self._starts.append(offset)
            offset += extent.length
        self._sector = sector
        self._cached: tuple[int, bytes] | None = None
        super().__init__(size, sector)

    def _read(self, offset: int, length: int) -> bytes:
        parts: list[bytes] = []
        index = bisect_right(self._starts, offset) - 1
        while length > 0 and 0 <= index < len(self._extents):
            extent = self._extents[index]
            inside = offset - self._starts[index]
            count = min(length, extent.length - inside)
            if count <= 0:
                break
            parts.append(self._piece(index, extent, inside, count))
            offset += count
            length -= count
            index += 1
        return b"".join(parts)

    def _piece(self, index: int, extent: Extent, inside: int, count: int) -> bytes:
        if extent.disk == 0:
            return b"\x00" * count
        if extent.compression == NONE:
            self._logical.seek(extent.disk + extent.skip + inside)
            return self._whole(self._logical.read(count), count)
        if self._cached is None or self._cached[0] != index:
            self._logical.seek(extent.disk)
            raw = self._whole(self._logical.read(extent.disk_length), extent.disk_length)
            self._cached = (
                index,
                decompress(raw, extent.compression, MAX_COMPRESSED, self._sector),
            )
        data = self._cached[1][extent.skip + inside : extent.skip + inside + count]
        return data.ljust(count, b"\x00")  # a compressed extent may end before its length

    @staticmethod
    def _whole(data: bytes, length: int) -> bytes:
        """Data from the volume, or an ImageError where the extent lies past its end."""
        if len(data) != length:
            raise ImageError("btrfs: a file extent lies past the end of the volume")
        return data
