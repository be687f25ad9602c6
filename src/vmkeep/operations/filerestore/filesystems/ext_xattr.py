"""ext2/3/4 extended attributes, read by vmkeep: dissect.extfs reads a value stored in an EA
inode with the size the entry claims (up to 4 GiB into memory on a hostile image). Here every
value is bounded by Linux's XATTR_SIZE_MAX (64 KiB) and by the area it lies in; a bad entry
ends the list with a warning instead of failing the file.

Layout (Linux fs/ext4/xattr.h): in the inode after i_extra_isize, a 4-byte magic then entries
whose value offsets count from the first entry; in the block named by i_file_acl, a 32-byte
header then entries whose value offsets count from the block's start. An entry is name_len,
name_index, value_offs (u16), value_inum, value_size, hash (u32 each), then the name, padded
to 4 bytes."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any

MAGIC = 0xEA020000
ENTRY = struct.Struct("<BBHIII")
MAX_VALUE = 64 * 1024
PREFIXES = {1: b"user.", 4: b"trusted.", 6: b"security.", 7: b"system.", 8: b"system.richacl"}
FIXED_NAMES = {2: b"system.posix_acl_access", 3: b"system.posix_acl_default"}


def _entries(
    area: bytes, start: int, value_base: int, read_inode: Callable[[int, int], bytes]
) -> Iterator[tuple[bytes, bytes]]:
    pos = start
    while pos + ENTRY.size <= len(area):
        name_len, index, value_offs, value_inum, value_size, _ = ENTRY.unpack_from(area, pos)
        if name_len == 0 and index == 0 and value_offs == 0 and value_inum == 0:
            return
        name = area[pos + ENTRY.size : pos + ENTRY.size + name_len]
        pos += (ENTRY.size + name_len + 3) & ~3
        if len(name) < name_len or value_size > MAX_VALUE:
            raise ValueError("an extended attribute entry runs past its area or is too large")
        if value_inum:
            value = read_inode(value_inum, value_size)
        else:
            at = value_base + value_offs
            value = area[at : at + value_size]
        if len(value) != value_size:
            raise ValueError("an extended attribute value runs past its area")
        if index in FIXED_NAMES:
            yield FIXED_NAMES[index], value
        elif index in PREFIXES or index == 0:
            yield PREFIXES.get(index, b"") + name, value


def read_xattrs(fs: Any, node: Any, block_count: int) -> tuple[dict[bytes, bytes], str | None]:
    """(attributes, a warning or None) of an inode; `fs` is dissect's ExtFS."""

    def read_inode(inum: int, size: int) -> bytes:
        if not 0 < inum <= fs.sb.s_inodes_count:
            raise ValueError("an extended attribute names an inode out of range")
        stream = fs.get_inode(inum).open()
        return bytes(stream.read(size))

    found: dict[bytes, bytes] = {}
    try:
        extra = bytes(node.inode.i_extra)
        if len(extra) >= 4 and struct.unpack_from("<I", extra)[0] == MAGIC:
            found.update(_entries(extra, 4, 4, read_inode))
        raw = node.inode
        block = (raw.i_file_acl_high << 32) | raw.i_file_acl_lo
        if block:
            if block >= block_count:
                raise ValueError("the extended attribute block lies past the end")
            fs.fh.seek(block * fs.block_size)
            area = fs.fh.read(fs.block_size)
            if len(area) >= 32 and struct.unpack_from("<I", area)[0] == MAGIC:
                found.update(_entries(area, 32, 0, read_inode))
    except (ValueError, EOFError, struct.error) as exc:
        return found, f"inode {node.inum}: extended attributes cut short: {exc}"
    return found, None
