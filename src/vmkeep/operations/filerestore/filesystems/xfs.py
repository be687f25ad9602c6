"""XFS (v4 and v5) over dissect.xfs, with what it lacks done here: unwritten (preallocated)
extents read as zeros instead of the stale blocks under them, extents checked against the
file system's size, directories of more than one block read whole (xfs_dir), and extended
attributes (dissect.xfs has none), read from the attribute fork (xfs_attr)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, BinaryIO

from dissect.util.stream import RunlistStream
from dissect.xfs import xfs as dxfs

from vmkeep.errors import ImageError, NotFoundError

from ..model import Entry, FileSystem, FsInfo
from . import xfs_dir
from .nodefs import NodeFileSystem, kind_of_mode
from .xfs_attr import read_xattrs
from .xfs_log import log_is_clean

MAGIC = b"XFSB"
FMT_DEV, FMT_LOCAL, FMT_EXTENTS, FMT_BTREE = 0, 1, 2, 3
MAX_SYMLINK = 1024  # XFS_SYMLINK_MAXLEN


def probe(fh: BinaryIO) -> bool:
    return fh.read(4) == MAGIC


def open(fh: BinaryIO, size: int) -> FileSystem:
    return XfsFileSystem(fh, size)


class XfsFileSystem(NodeFileSystem[Any]):
    def __init__(self, fh: BinaryIO, size: int) -> None:
        super().__init__(fh, size, FsInfo("xfs"))
        with self.guard("superblock"):
            self.xfs = dxfs.XFS(self.volume)
            sb = self.xfs.sb
            self.block_size: int = self.xfs.block_size
            self.fs_blocks: int = sb.sb_agcount * sb.sb_agblocks
            self.dir_block: int = self.block_size << sb.sb_dirblklog
            self.has_ftype = bool(self.xfs._has_ftype)
            if self.fs_blocks * self.block_size > size:
                self.warn(
                    f"xfs: the file system claims {self.fs_blocks * self.block_size} bytes, "
                    f"the volume has {size}"
                )
            self.info.label = self.xfs.name
            self.info.uuid = str(self.xfs.uuid)
            self.root = self.xfs.root
            self.root.inode  # noqa: B018 - read now, so a broken root fails at open
            self._check_log()

    def _check_log(self) -> None:
        """`dirty` when the log does not end in an unmount record (see xfs_log)."""
        sb = self.xfs.sb
        if sb.sb_logstart == 0:
            self.warn("xfs: the log is on another device: whether it is clean is unknown")
            return
        agnum, agblock = dxfs.fsb_to_bb(sb.sb_logstart, sb.sb_agblklog)
        start = (agnum * sb.sb_agblocks + agblock) * self.block_size
        try:
            clean = log_is_clean(self.volume, start, sb.sb_logblocks * self.block_size)
        except ImageError as exc:
            self.warn(f"{exc}: whether the log is clean is unknown")
            return
        if not clean:
            self.info.dirty = True
            self.warn(
                "xfs: the log was not cleanly unmounted (a crash-consistent copy?): "
                "changes still only in the log are not seen; read anyway"
            )

    def _root(self) -> Any:
        return self.root

    def _kind(self, node: Any) -> str:
        return kind_of_mode(node.inode.di_mode)

    def _dir_key(self, node: Any) -> int:
        return int(node.inum)

    def _children(self, node: Any) -> Iterator[tuple[bytes, Any]]:
        if node.inode.di_format == FMT_LOCAL:  # short form, inside the inode: dissect reads it
            for child in node.iterdir():
                yield child.filename.encode(errors="surrogateescape"), child
            return
        if node.inode.di_format not in (FMT_EXTENTS, FMT_BTREE):
            raise ImageError(f"xfs: directory inode {node.inum} has a data fork of unknown format")
        runs = self._runs(node)
        length = sum(count for _, count in runs) * self.block_size
        stream = RunlistStream(self.xfs.fh, runs, length, self.block_size)
        blocks = xfs_dir.data_blocks(runs, self.block_size, self.dir_block)
        for name, inum in xfs_dir.entries(
            stream, blocks, self.dir_block, self.has_ftype, self.warn
        ):
            try:
                child = self.xfs.get_inode(inum, name.decode(errors="surrogateescape"))
            except dxfs.Error as exc:
                self.warn(f"xfs: skipped {name!r} in directory inode {node.inum}: {exc}")
                continue
            yield name, child

    def _entry(self, name: bytes, node: Any) -> Entry:
        di = node.inode
        kind = kind_of_mode(di.di_mode)
        return Entry(
            name=name,
            kind=kind,
            size=node.size,
            mode=di.di_mode & 0o7777,
            uid=di.di_uid,
            gid=di.di_gid,
            mtime_ns=node.mtime_ns,
            atime_ns=node.atime_ns,
            ctime_ns=node.ctime_ns,
            nlink=di.di_nlink if di.di_version > 1 else di.di_onlink,
            inode=node.inum,
            target=self._link(node) if kind == "symlink" else None,
            rdev=self._rdev(node) if kind in ("chardev", "blockdev") else None,
        )

    def _rdev(self, node: Any) -> int:
        """XFS keeps a device number as a 32-bit sysv dev_t (14-bit major, 18-bit minor)."""
        raw = int.from_bytes(node.datafork().read(4), "big")
        return os.makedev((raw >> 18) & 0x3FFF, raw & 0x3FFFF)

    def _link(self, node: Any) -> bytes:
        if not 0 < node.size <= MAX_SYMLINK:
            raise ImageError(f"xfs: symlink inode {node.inum} has a target of {node.size} bytes")
        target: bytes = node.link.encode(errors="surrogateescape")
        return target

    def _open(self, node: Any, stream: bytes | None) -> tuple[BinaryIO, int]:
        if stream is not None:
            raise NotFoundError("xfs: files have no named streams")
        if node.inode.di_format == FMT_LOCAL:
            return node.datafork(), node.size
        if node.inode.di_format not in (FMT_EXTENTS, FMT_BTREE):
            raise ImageError(f"xfs: inode {node.inum} has a data fork vmkeep cannot read")
        runs = self._runs(node)
        return RunlistStream(self.xfs.fh, runs, node.size, self.block_size), node.size

    def _runs(self, node: Any) -> list[tuple[int | None, int]]:
        """The data fork as (block or None, count) runs. Unlike dissect.xfs, an unwritten
        extent (flag set: preallocated, never written) is a hole, and an extent outside the
        file system or out of order is an ImageError instead of a read of whatever is there."""
        runs: list[tuple[int | None, int]] = []
        position = 0
        agblklog = self.xfs.sb.sb_agblklog
        for offset, fsblock, count, unwritten in node._iter_blocks():
            if offset < position:
                raise ImageError(f"xfs: inode {node.inum} has overlapping or unordered extents")
            if offset > position:
                runs.append((None, offset - position))
            agnum, agblock = dxfs.fsb_to_bb(fsblock, agblklog)
            block = agnum * self.xfs.sb.sb_agblocks + agblock
            if (
                block + count > self.fs_blocks
                or (block + count) * self.block_size > self.volume_size
            ):
                raise ImageError(
                    f"xfs: inode {node.inum} has an extent past the end of the file system"
                )
            runs.append((None, count) if unwritten else (block, count))
            position = offset + count
        wanted = -(-node.size // self.block_size)
        if position < wanted:
            runs.append((None, wanted - position))
        return runs

    @property
    def volume_size(self) -> int:
        return self.volume._size

    def _xattrs(self, node: Any) -> dict[bytes, bytes]:
        return read_xattrs(self, node)
