"""XFS directories in block, leaf and node form, read here: dissect.xfs cuts them into file
system blocks, so with a directory block size above the block size (mkfs.xfs -n size=...)
every entry past a directory block's first file system block is silently lost; and it walks
every block up to the directory's size, mapped or not. This reads whole directory blocks
(block_size << sb_dirblklog) of the mapped extents below the leaf offset only. Layout from
the XFS on-disk format (xfs_da_format.h)."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import BinaryIO

from vmkeep.errors import ImageError

LEAF_OFFSET = 32 << 30  # XFS_DIR2_LEAF_OFFSET: the data section ends here
BLOCK_MAGICS = {0x58443242: 16, 0x58444233: 64}  # XD2B, XDB3: one-block directory -> header
DATA_MAGICS = {0x58443244: 16, 0x58444433: 64}  # XD2D, XDD3: data block of a larger one
FREE_TAG = 0xFFFF


def data_blocks(runs: list[tuple[int | None, int]], block_size: int, dir_block: int) -> list[int]:
    """The directory blocks (by index) of the data section that have mapped storage."""
    per = dir_block // block_size
    limit = LEAF_OFFSET // dir_block
    found: list[int] = []
    position = 0
    for start, count in runs:
        if start is not None:
            first, last = position // per, (position + count - 1) // per
            for index in range(first, min(last, limit - 1) + 1):
                if not found or found[-1] != index:
                    found.append(index)
        position += count
    return found


def entries(
    stream: BinaryIO, blocks: list[int], dir_block: int, ftype: bool, warn: Callable[[str], None]
) -> Iterator[tuple[bytes, int]]:
    """(name, inode number) of every entry in the given directory blocks of `stream`; a
    corrupt block ends with a warning, the others are still read."""
    for index in blocks:
        stream.seek(index * dir_block)
        data = stream.read(dir_block)
        try:
            if len(data) != dir_block:
                raise ImageError("xfs: a directory block lies past the end of the volume")
            yield from _block_entries(data, ftype)
        except ImageError as exc:
            warn(f"{exc} (directory block {index}: the rest of it skipped)")


def _block_entries(data: bytes, ftype: bool) -> Iterator[tuple[bytes, int]]:
    magic = struct.unpack_from(">I", data, 0)[0]
    end = len(data)
    if magic in BLOCK_MAGICS:
        header = BLOCK_MAGICS[magic]
        count = struct.unpack_from(">I", data, end - 8)[0]
        end -= 8 + 8 * count  # the tail and the leaf entries before it
        if end < header:
            raise ImageError("xfs: a directory block claims more leaf entries than it holds")
    elif magic in DATA_MAGICS:
        header = DATA_MAGICS[magic]
    else:
        raise ImageError(f"xfs: a directory block has a bad magic {magic:#x}")
    pos = header
    while pos + 8 <= end:
        if struct.unpack_from(">H", data, pos)[0] == FREE_TAG:
            length = struct.unpack_from(">H", data, pos + 2)[0]
            if length < 8 or length % 8:
                raise ImageError("xfs: a directory block has a corrupt free region")
            pos += length
            continue
        inum, namelen = struct.unpack_from(">QB", data, pos)
        size = (8 + 1 + namelen + (1 if ftype else 0) + 2 + 7) // 8 * 8
        if namelen == 0 or pos + size > end:
            raise ImageError("xfs: a directory entry overruns its block")
        yield data[pos + 9 : pos + 9 + namelen], inum
        pos += size
