"""btrfs over dissect.btrfs. "/" is the default subvolume (the one the kernel mounts without
`subvol=`); other subvolumes and snapshots are directories at the paths where they were
created, as under a mount of the default one. Inode numbers repeat across subvolumes, so
outside the default subvolume an Entry's inode is (subvolume id << 48) | inode. Names are
looked up by their hash and then compared byte for byte (dissect trusts the hash alone);
xattrs are read here (dissect has none), file content through btrfs_data."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, BinaryIO

from dissect.btrfs import btrfs as dbtrfs
from dissect.btrfs.c_btrfs import c_btrfs
from dissect.btrfs.tree import BTree
from dissect.util.hash import crc32c

from vmkeep.errors import ImageError, NotFoundError

from ..model import Entry, FileSystem, FsInfo
from .btrfs_data import MAX_INLINE, ExtentReader, file_extents
from .nodefs import NodeFileSystem, kind_of_mode

MAGIC = b"_BHRfS_M"
SUPER_OFFSET = 0x10000
NODE_CACHE = 256  # B-tree nodes kept per tree (dissect keeps 8192: 128 MiB of 16 KiB nodes)
MAX_LINK = 4096
EMPTY_SUBVOLUME_INODE = 2  # BTRFS_EMPTY_SUBVOL_DIR_OBJECTID, what the kernel shows


def probe(fh: BinaryIO) -> bool:
    fh.seek(SUPER_OFFSET + 0x40)
    return fh.read(8) == MAGIC


def open(fh: BinaryIO, size: int) -> FileSystem:
    return BtrfsFileSystem(fh, size)


def name_hash(name: bytes) -> int:
    """btrfs's directory and xattr name hash: crc32c seeded with ~1."""
    return int((crc32c.update(1, name) ^ 0xFFFFFFFF) & 0xFFFFFFFF)


@dataclass(frozen=True)
class EmptySubvolume:
    """Where a snapshot holds a copy of a nested subvolume's entry: an empty directory."""

    parent_subvolume: int


def dir_items(data: Any) -> Iterator[Any]:
    """The dir items packed in one item (names whose hashes collide share it)."""
    buf = io.BytesIO(bytes(data))
    while buf.tell() < len(buf.getbuffer()):
        yield c_btrfs.btrfs_dir_item(buf)


class BtrfsFileSystem(NodeFileSystem[Any]):
    dot_entries = False  # never stored: an entry named "." or ".." is planted

    def __init__(self, fh: BinaryIO, size: int) -> None:
        super().__init__(fh, size, FsInfo("btrfs"))
        with self.guard("superblock"):
            self.fs = dbtrfs.Btrfs(self.volume)
            self._limit_caches()
            self.sector: int = self.fs.sector_size
            self.default_id: int = self.fs.default_subvolume.objectid
            self.info.label = self.fs.label
            self.info.uuid = str(self.fs.uuid)
            if self.fs.sb.log_root:
                self.info.dirty = True
                self.warn(
                    "btrfs: the log tree was not replayed: "
                    "writes fsync'd after the last commit are missing"
                )
            self.root = self.fs.root
            self.root.inode  # noqa: B018 - read now, so a broken root fails at open

    def _limit_caches(self) -> None:
        """Bound the node cache of every subvolume tree dissect opens."""
        open_tree = self.fs._open_tree

        def bounded(objectid: int) -> BTree:
            tree = open_tree(objectid)
            if not getattr(tree, "_vmkeep_bounded", False):
                tree._read_node = lru_cache(NODE_CACHE)(BTree._read_node.__get__(tree))
                tree._vmkeep_bounded = True
            return tree

        self.fs._open_tree = bounded

    def _root(self) -> Any:
        return self.root

    def _kind(self, node: Any) -> str:
        return "dir" if isinstance(node, EmptySubvolume) else kind_of_mode(node.inode.mode)

    def _dir_key(self, node: Any) -> tuple[int, int]:
        if isinstance(node, EmptySubvolume):
            return (node.parent_subvolume, EMPTY_SUBVOLUME_INODE)
        return (node.subvolume.objectid, node.inum)

    def _children(self, node: Any) -> Iterator[tuple[bytes, Any]]:
        if isinstance(node, EmptySubvolume):
            return
        cursor = node.subvolume.tree.cursor()
        # DIR_INDEX items in creation order, from index 2 ("." and ".." are not stored)
        for _, data in cursor.iter(node.inum, c_btrfs.BTRFS_DIR_INDEX_KEY, 2, ignore_offset=True):
            for item in dir_items(data):
                yield bytes(item.name), self._target(node, item)

    def _find(self, node: Any, name: bytes) -> tuple[bytes, Any] | None:
        if isinstance(node, EmptySubvolume):
            return None
        try:
            _, data = node.subvolume.tree.find(
                node.inum, c_btrfs.BTRFS_DIR_ITEM_KEY, name_hash(name)
            )
        except KeyError:
            return None
        for item in dir_items(data):
            if item.name == name:
                return name, self._target(node, item)
        return None

    def _target(self, parent: Any, item: Any) -> Any:
        """The node a directory item names: an inode, or a subvolume's root directory. A
        subvolume entry copied into a snapshot has no root ref from there, and the kernel
        shows it as an empty directory: so does this."""
        location = item.location
        if location.type == c_btrfs.BTRFS_INODE_ITEM_KEY:
            return parent.subvolume.inode(location.objectid, item.type, parent)
        if location.type != c_btrfs.BTRFS_ROOT_ITEM_KEY:
            raise ImageError(
                f"btrfs: directory entry {bytes(item.name)!r} points at an item "
                f"of type {location.type}"
            )
        if not self._has_root_ref(parent, location.objectid, bytes(item.name)):
            return EmptySubvolume(parent.subvolume.objectid)
        return self.fs.open_subvolume(location.objectid, parent).root

    def _has_root_ref(self, parent: Any, subvolume: int, name: bytes) -> bool:
        try:
            _, data = self.fs._root_tree.find(
                parent.subvolume.objectid, c_btrfs.BTRFS_ROOT_REF_KEY, subvolume
            )
        except KeyError:
            return False
        ref = c_btrfs.btrfs_root_ref(data)
        return bool(ref.dirid == parent.inum and ref.name == name)

    def _inode_number(self, node: Any) -> int:
        subvolume: int = node.subvolume.objectid
        inum: int = node.inum
        return inum if subvolume == self.default_id else (subvolume << 48) | inum

    def _entry(self, name: bytes, node: Any) -> Entry:
        if isinstance(node, EmptySubvolume):
            inode = (node.parent_subvolume << 48) | EMPTY_SUBVOLUME_INODE
            return Entry(name, "dir", 0, 0o755, 0, 0, None, None, None, 1, inode)
        item = node.inode
        kind = kind_of_mode(item.mode)
        return Entry(
            name=name,
            kind=kind,
            size=item.size,
            mode=item.mode & 0o7777,
            uid=item.uid,
            gid=item.gid,
            mtime_ns=node.mtime_ns,
            atime_ns=node.atime_ns,
            ctime_ns=node.ctime_ns,
            nlink=item.nlink,
            inode=self._inode_number(node),
            target=self._link(node) if kind == "symlink" else None,
            # the kernel's dev_t: 12-bit major above a 20-bit minor
            rdev=os.makedev(item.rdev >> 20, item.rdev & 0xFFFFF)
            if kind in ("chardev", "blockdev")
            else None,
        )

    def _link(self, node: Any) -> bytes:
        size = node.inode.size
        if not 0 < size <= MAX_LINK:
            raise ImageError(f"btrfs: symlink inode {node.inum} has a target of {size} bytes")
        _, inline = file_extents(node.subvolume.tree, node.inum, size, self.sector)
        if inline is None:
            raise ImageError(f"btrfs: symlink inode {node.inum} has no inline target")
        return inline

    def _open(self, node: Any, stream: bytes | None) -> tuple[BinaryIO, int]:
        if stream is not None:
            raise NotFoundError("btrfs: files have no named streams")
        size: int = node.inode.size
        extents, inline = file_extents(node.subvolume.tree, node.inum, size, self.sector)
        if inline is not None:
            if size > MAX_INLINE:
                raise ImageError(f"btrfs: inode {node.inum} claims {size} bytes of inline data")
            return io.BytesIO(inline.ljust(size, b"\x00")), size
        return ExtentReader(self.fs._logical_fh, extents, size, self.sector), size

    def _xattrs(self, node: Any) -> dict[bytes, bytes]:
        result: dict[bytes, bytes] = {}
        if isinstance(node, EmptySubvolume):
            return result
        cursor = node.subvolume.tree.cursor()
        for _, data in cursor.iter(node.inum, c_btrfs.BTRFS_XATTR_ITEM_KEY, 0, ignore_offset=True):
            for item in dir_items(data):
                result[bytes(item.name)] = bytes(item.data)
        return result
