"""XFS extended attributes, which dissect.xfs does not read: the attribute fork of an inode
in short form (inside the inode), or as leaf blocks (one, or a chain under dabtree node
blocks) whose values are local or in remote value blocks. Layouts from the XFS on-disk format
(xfs_da_format.h); every count, offset and pointer is checked against the block it is in."""

from __future__ import annotations

import struct
from typing import Any, Protocol

from dissect.xfs import xfs as dxfs

from vmkeep.errors import ImageError


class XfsFileSystem(Protocol):
    """What the attribute reader needs of xfs.py's file system (a protocol: xfs.py imports
    this module)."""

    xfs: Any  # dissect.xfs's XFS
    block_size: int
    fs_blocks: int


FMT_LOCAL, FMT_EXTENTS, FMT_BTREE = 1, 2, 3
LEAF_MAGICS = {0xFBEE: 32, 0x3BEE: 80}  # leaf magic -> header size (v4, v5)
NODE_MAGICS = {0xFEBE: 16, 0x3EBE: 64}  # dabtree node magic -> header size
REMOTE_MAGIC = 0x5841524D  # "XARM", the v5 remote value block header
REMOTE_HEADER = 56
F_LOCAL, F_ROOT, F_SECURE, F_PARENT, F_INCOMPLETE = 0x01, 0x02, 0x04, 0x08, 0x80
MAX_VALUE = 65536  # XATTR_SIZE_MAX
MAX_DEPTH = 8
ACL_NAMES = (b"SGI_ACL_FILE", b"SGI_ACL_DEFAULT")  # XFS's own ACL format: not passed on


def read_xattrs(fs: XfsFileSystem, node: Any) -> dict[bytes, bytes]:
    di = node.inode
    if di.di_forkoff == 0:
        return {}
    fork = node.attrfork().read()
    if di.di_aformat == FMT_LOCAL:
        return _shortform(fork)
    if di.di_aformat == FMT_EXTENTS:
        runs = [dxfs.parse_fsblock(fork[i * 16 : i * 16 + 16]) for i in range(node.attr_extents)]
    elif di.di_aformat == FMT_BTREE:
        runs = _btree_runs(fs, node, fork)
    else:
        raise ImageError(f"xfs: inode {node.inum} has an attribute fork of unknown format")
    if not runs:
        return {}  # an emptied fork (the kernel's xfs_inode_hasattr says no attributes)
    return _AttrBlocks(fs, node.inum, runs).read()


def _name(flags: int, name: bytes) -> bytes | None:
    """The Linux xattr name of an XFS attribute, or None for one not to pass on."""
    if flags & (F_PARENT | F_INCOMPLETE):
        return None
    if flags & F_ROOT:
        return None if name in ACL_NAMES else b"trusted." + name
    if flags & F_SECURE:
        return b"security." + name
    return b"user." + name


def _shortform(fork: bytes) -> dict[bytes, bytes]:
    if len(fork) < 4:
        raise ImageError("xfs: short attribute fork too small")
    count = fork[2]
    pos, result = 4, {}
    for _ in range(count):
        if pos + 3 > len(fork):
            raise ImageError("xfs: short attribute fork overruns the inode")
        namelen, valuelen, flags = fork[pos], fork[pos + 1], fork[pos + 2]
        end = pos + 3 + namelen + valuelen
        if end > len(fork):
            raise ImageError("xfs: short attribute fork overruns the inode")
        name = _name(flags, fork[pos + 3 : pos + 3 + namelen])
        if name is not None:
            result[name] = fork[pos + 3 + namelen : end]
        pos = end
    return result


def _btree_runs(fs: XfsFileSystem, node: Any, fork: bytes) -> list[tuple[int, int, int, int]]:
    """The extents of an attribute fork held in a B+tree rooted in the inode."""
    if len(fork) < 4:
        raise ImageError("xfs: attribute fork too small")
    numrecs = struct.unpack_from(">H", fork, 2)[0]
    maxrecs = (len(fork) - 4) // 16
    if numrecs > maxrecs:
        raise ImageError(f"xfs: inode {node.inum}: attribute fork root has {numrecs} records")
    runs: list[tuple[int, int, int, int]] = []
    for i in range(numrecs):
        ptr = struct.unpack_from(">Q", fork, 4 + maxrecs * 8 + i * 8)[0]
        runs.extend(node.ag.walk_extents(ptr))
    return runs


class _AttrBlocks:
    """The attribute fork's logical blocks, read through its extents."""

    def __init__(self, fs: XfsFileSystem, inum: int, runs: list[tuple[int, int, int, int]]) -> None:
        self.fs = fs
        self.inum = inum
        self.bs = fs.block_size
        self.map: list[tuple[int, int, int]] = []  # (logical, physical, count)
        sb = fs.xfs.sb
        for offset, fsblock, count, _ in runs:
            agnum, agblock = dxfs.fsb_to_bb(fsblock, sb.sb_agblklog)
            physical = agnum * sb.sb_agblocks + agblock
            if physical + count > fs.fs_blocks:
                raise ImageError(
                    f"xfs: inode {inum} has an attribute extent past the end of the file system"
                )
            self.map.append((offset, physical, count))
        self.mapped = sum(count for _, _, count in self.map)

    def block(self, logical: int) -> bytes:
        for start, physical, count in self.map:
            if start <= logical < start + count:
                self.fs.xfs.fh.seek((physical + logical - start) * self.bs)
                data: bytes = self.fs.xfs.fh.read(self.bs)
                if len(data) != self.bs:
                    raise ImageError(
                        f"xfs: inode {self.inum}: attribute block past the end of the volume"
                    )
                return data
        raise ImageError(f"xfs: inode {self.inum}: attribute block {logical} is not mapped")

    def read(self) -> dict[bytes, bytes]:
        logical = self._first_leaf()
        seen: set[int] = set()
        result: dict[bytes, bytes] = {}
        while True:
            if logical in seen:
                raise ImageError(f"xfs: inode {self.inum}: attribute leaf chain loops")
            seen.add(logical)
            data = self.block(logical)
            result.update(self._leaf(data))
            logical = struct.unpack_from(">I", data, 0)[0]  # forw: the next leaf, 0 at the end
            if logical == 0:
                return result

    def _first_leaf(self) -> int:
        """Block 0 is a leaf, or the root of a dabtree: descend its leftmost pointers."""
        logical = 0
        for _ in range(MAX_DEPTH):
            data = self.block(logical)
            magic = struct.unpack_from(">H", data, 8)[0]
            if magic in LEAF_MAGICS:
                return logical
            if magic not in NODE_MAGICS:
                raise ImageError(
                    f"xfs: inode {self.inum}: attribute block {logical} has a bad magic"
                )
            header = NODE_MAGICS[magic]
            count = struct.unpack_from(">H", data, header - (8 if header == 64 else 4))[0]
            if count == 0 or header + count * 8 > self.bs:
                raise ImageError(
                    f"xfs: inode {self.inum}: attribute node block {logical} is corrupt"
                )
            logical = struct.unpack_from(">I", data, header + 4)[0]  # entry 0 "before"
        raise ImageError(f"xfs: inode {self.inum}: attribute tree too deep")

    def _leaf(self, data: bytes) -> dict[bytes, bytes]:
        magic = struct.unpack_from(">H", data, 8)[0]
        if magic not in LEAF_MAGICS:
            raise ImageError(f"xfs: inode {self.inum}: attribute leaf has a bad magic")
        header = LEAF_MAGICS[magic]
        count = struct.unpack_from(">H", data, header - (24 if header == 80 else 20))[0]
        if header + count * 8 > self.bs:
            raise ImageError(f"xfs: inode {self.inum}: attribute leaf claims {count} entries")
        result: dict[bytes, bytes] = {}
        for i in range(count):
            _, nameidx, flags = struct.unpack_from(">IHB", data, header + i * 8)
            item = self._item(data, nameidx, flags, v5=header == 80)
            if item is not None:
                result[item[0]] = item[1]
        return result

    def _item(self, data: bytes, idx: int, flags: int, v5: bool) -> tuple[bytes, bytes] | None:
        if flags & F_LOCAL:
            if idx + 3 > self.bs:
                raise ImageError(f"xfs: inode {self.inum}: attribute entry outside its block")
            valuelen, namelen = struct.unpack_from(">HB", data, idx)
            end = idx + 3 + namelen + valuelen
            if end > self.bs:
                raise ImageError(f"xfs: inode {self.inum}: attribute entry outside its block")
            name = _name(flags, data[idx + 3 : idx + 3 + namelen])
            return None if name is None else (name, data[idx + 3 + namelen : end])
        if idx + 9 > self.bs:
            raise ImageError(f"xfs: inode {self.inum}: attribute entry outside its block")
        valueblk, valuelen, namelen = struct.unpack_from(">IIB", data, idx)
        if idx + 9 + namelen > self.bs or valuelen > MAX_VALUE:
            raise ImageError(f"xfs: inode {self.inum}: remote attribute entry is corrupt")
        name = _name(flags, data[idx + 9 : idx + 9 + namelen])
        return None if name is None else (name, self._remote(valueblk, valuelen, v5))

    def _remote(self, logical: int, length: int, v5: bool) -> bytes:
        """A value kept in its own blocks (v5: each block starts with an XARM header)."""
        parts, left = [], length
        while left > 0:
            data = self.block(logical)
            if v5:
                if struct.unpack_from(">I", data, 0)[0] != REMOTE_MAGIC:
                    raise ImageError(
                        f"xfs: inode {self.inum}: remote attribute block has a bad magic"
                    )
                data = data[REMOTE_HEADER:]
            parts.append(data[:left])
            left -= len(parts[-1])
            logical += 1
        return b"".join(parts)
