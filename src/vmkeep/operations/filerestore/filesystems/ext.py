"""ext2/3/4 through dissect.extfs, with vmkeep's own directory and extent walking: names stay
bytes, the extent tree is read with a depth bound (a hostile tree cannot recurse forever),
unwritten extents read as zeros wherever they sit, and no run may point past the file system."""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from typing import Any, BinaryIO, cast

from dissect.extfs import ExtFS
from dissect.extfs import exceptions as ext_errors
from dissect.extfs.c_ext import c_ext
from dissect.util.stream import RunlistStream

from vmkeep.errors import ImageError, VmkeepError
from vmkeep.pread_file import PreadFile

from ..model import Entry, FsInfo
from .ext_journal import Replay, ReplayedVolume, plan
from .ext_xattr import read_xattrs
from .nodefs import NodeFileSystem, kind_of_mode

MAGIC_OFFSET = 1024 + 0x38
EXTENTS_FL = 0x80000
INLINE_DATA_FL = 0x10000000
STATE_VALID = 0x1
INCOMPAT_RECOVER = 0x4
MAX_EXTENT_DEPTH = 5  # Linux's limit on the extent tree
UNINIT_LEN = 0x8000
MAX_DIR_BYTES = 4 << 30  # ext4's largedir limit; a bigger directory is a hostile image

Node = Any  # dissect.extfs.INode (untyped)


def probe(fh: BinaryIO) -> bool:
    fh.seek(MAGIC_OFFSET)
    return fh.read(2) == b"\x53\xef"


def open(fh: BinaryIO, size: int) -> ExtFileSystem:
    return ExtFileSystem(fh, size)


def _journal_replay(fs: Any) -> tuple[BinaryIO, Replay] | None:
    """The journal and what to replay from it, when the file system needs recovery and has
    an internal journal; None otherwise (or when the journal cannot be read: the volume is
    then read as it is, with the dirty warning)."""
    sb = fs.sb
    if not sb.s_feature_incompat & INCOMPAT_RECOVER or not sb.s_journal_inum:
        return None
    try:
        journal = fs.get_inode(sb.s_journal_inum).open()
        replay = plan(journal, fs.block_size)
    except Exception:
        return None
    if replay is None or not replay.blocks:
        return None
    return journal, replay


class ExtFileSystem(NodeFileSystem[Node]):
    def __init__(self, fh: BinaryIO, size: int) -> None:
        super().__init__(fh, size, FsInfo("ext"))
        with self.guard("superblock"):
            fs = ExtFS(self.volume)
        replay = _journal_replay(fs)  # outside the guard: a journal may be read whole
        if replay is not None:
            journal, replayed = replay
            with self.guard("superblock"):
                base = cast(BinaryIO, self.volume)
                fs = ExtFS(PreadFile(ReplayedVolume(base, journal, replayed, fs.block_size)))
        self.fs = fs
        with self.guard("superblock"):
            sb = fs.sb
            self.block_size: int = fs.block_size
            self.block_count: int = min(fs.block_count, size // self.block_size)
            dirty = not (sb.s_state & STATE_VALID) or bool(sb.s_feature_incompat & INCOMPAT_RECOVER)
            self.info.type_name = f"ext{fs.type}"
            self.info.label = fs.volume_name
            self.info.uuid = str(fs.uuid)
            self.info.dirty = dirty
        if replay is not None:
            self.info.warnings.append(
                f"{self.info.type_name} was not cleanly unmounted (a crash-consistent backup): "
                f"its journal was replayed in memory ({len(replayed.blocks)} blocks of "
                f"{replayed.transactions} committed transactions); writes not yet committed to the "
                "journal when the backup was taken are missing"
            )
        elif dirty:
            self.info.warnings.append(
                f"{self.info.type_name} was not cleanly unmounted (a crash-consistent backup): "
                "read as it is on disk, without replaying its journal; the last writes before "
                "the backup may be missing"
            )

    def _root(self) -> Node:
        return self.fs.root

    def _kind(self, node: Node) -> str:
        return kind_of_mode(self._mode(node))

    def _dir_key(self, node: Node) -> int:
        return int(node.inum)

    def _node(self, inum: int) -> Node:
        try:
            return self.fs.get_inode(inum)
        except ext_errors.Error as exc:
            raise ImageError(str(exc)) from exc

    def _mode(self, node: Node) -> int:
        return int(_guard(lambda: node.inode.i_mode))

    def _children(self, node: Node) -> Iterator[tuple[bytes, Node]]:
        if stat.S_IFMT(self._mode(node)) != stat.S_IFDIR:
            raise ImageError(f"inode {node.inum} is not a directory")
        if node.inode.i_flags & INLINE_DATA_FL:
            raise ImageError(f"inode {node.inum}: inline-data directories are not supported")
        size = _guard(lambda: node.size)
        if size > MAX_DIR_BYTES:
            raise ImageError(f"directory inode {node.inum} claims {size} bytes")
        data = self._stream(node, size)
        dirtype = self.fs._dirtype
        offset = 0
        while offset + 8 <= size:
            data.seek(offset)
            head = _guard(lambda: dirtype(data))
            if head.rec_len < 8 or head.rec_len % 4:
                raise ImageError(f"directory inode {node.inum}: corrupt entry at {offset}")
            if 0 < head.inode <= self.fs.sb.s_inodes_count:
                name = data.read(head.name_len)
                try:
                    child = self._node(head.inode)
                except ImageError as exc:
                    self.warn(f"directory inode {node.inum}: skipped an entry: {exc.message}")
                else:
                    yield name, child
            offset += head.rec_len

    def _entry(self, name: bytes, node: Node) -> Entry:
        raw = _guard(lambda: node.inode)
        mode = raw.i_mode
        kind = kind_of_mode(mode)
        size = _guard(lambda: node.size)
        target = self._link(node) if kind == "symlink" else None
        rdev = None
        if kind in ("chardev", "blockdev"):
            rdev = _rdev(bytes(raw.i_block))
        return Entry(
            name=name,
            kind=kind,
            size=size if kind in ("file", "dir", "symlink") else 0,
            mode=mode & 0o7777,
            uid=raw.i_uid | (raw.i_uid_high << 16),
            gid=raw.i_gid | (raw.i_gid_high << 16),
            mtime_ns=node.mtime_ns,
            atime_ns=node.atime_ns,
            ctime_ns=node.ctime_ns,
            nlink=raw.i_links_count,
            inode=node.inum,
            target=target,
            rdev=rdev,
        )

    def _link(self, node: Node) -> bytes:
        """A fast symlink's target is in i_block (no data blocks), a slow one's in its data."""
        size = _guard(lambda: node.size)
        if size > 4096:
            raise ImageError(f"symlink inode {node.inum} claims {size} bytes")
        raw = node.inode
        blocks = raw.i_blocks_lo
        if raw.i_file_acl_lo:
            blocks -= self.block_size // 512
        if size < 60 and blocks <= 0 and not raw.i_flags & EXTENTS_FL:
            return bytes(raw.i_block)[:size]
        return self._stream(node, size).read(size)

    def _open(self, node: Node, stream: bytes | None) -> tuple[BinaryIO, int]:
        if stream is not None:
            raise ImageError("ext has no alternate data streams")
        size = _guard(lambda: node.size)
        return self._stream(node, size), size

    def _xattrs(self, node: Node) -> dict[bytes, bytes]:
        found, warning = _guard(lambda: read_xattrs(self.fs, node, self.block_count))
        if warning:
            self.warn(warning)
        return found  # type: ignore[no-any-return]

    def data_runs(self, path: bytes) -> list[tuple[int, int]]:
        """(offset, length) of a file's allocated data, for sparse extraction."""
        with self.guard(path):
            _, node = self._resolve(path)
            if node.inode.i_flags & INLINE_DATA_FL:
                return [(0, node.size)]
            extents = self._runs(node, node.size)
        runs, pos = [], 0
        for block, count in extents:
            if block is not None:
                runs.append((pos * self.block_size, count * self.block_size))
            pos += count
        return runs

    # -- data ----------------------------------------------------------------------

    def _stream(self, node: Node, size: int) -> BinaryIO:
        raw = node.inode
        if raw.i_flags & INLINE_DATA_FL:
            buf = io.BytesIO(bytes(raw.i_block)[:size])
            return buf
        return RunlistStream(self.fs.fh, self._runs(node, size), size, self.block_size)  # type: ignore[no-any-return]

    def _runs(self, node: Node, size: int) -> list[tuple[int | None, int]]:
        if node._runlist is None:
            expected = -(-size // self.block_size)
            if node.inode.i_flags & EXTENTS_FL:
                node._runlist = self._extent_runs(node, expected)
            else:
                node._runlist = _guard(node.dataruns)
            for block, count in node._runlist:
                if block is not None and (block < 0 or block + count > self.block_count):
                    raise ImageError(
                        f"inode {node.inum}: data points past the end of the file system"
                    )
        return node._runlist  # type: ignore[no-any-return]

    def _extent_runs(self, node: Node, expected: int) -> list[tuple[int | None, int]]:
        extents: list[tuple[int, int, int | None]] = []  # (logical, length, physical|None)
        self._walk_extents(io.BytesIO(bytes(node.inode.i_block)), node, 0, extents)
        extents.sort()
        runs: list[tuple[int | None, int]] = []
        pos = 0
        for logical, length, physical in extents:
            if logical < pos:
                raise ImageError(f"inode {node.inum}: overlapping extents")
            if logical >= expected:
                break
            length = min(length, expected - logical)
            if logical > pos:
                runs.append((None, logical - pos))
            runs.append((physical, length))
            pos = logical + length
        if pos < expected:
            runs.append((None, expected - pos))
        return runs

    def _walk_extents(
        self, buf: BinaryIO, node: Node, level: int, out: list[tuple[int, int, int | None]]
    ) -> None:
        header = _guard(lambda: c_ext.ext4_extent_header(buf))
        if header.eh_magic != 0xF30A or level > MAX_EXTENT_DEPTH:
            raise ImageError(f"inode {node.inum}: corrupt extent tree")
        for _ in range(header.eh_entries):
            if header.eh_depth == 0:
                ext = _guard(lambda: c_ext.ext4_extent(buf))
                length = ext.ee_len
                start = (ext.ee_start_hi << 32) | ext.ee_start_lo
                if length > UNINIT_LEN:  # unwritten: reads as zeros, as in Linux
                    out.append((ext.ee_block, length - UNINIT_LEN, None))
                else:
                    out.append((ext.ee_block, length, start))
                if len(out) > self.block_count:
                    raise ImageError(f"inode {node.inum}: more extents than blocks")
                continue
            idx = _guard(lambda: c_ext.ext4_extent_idx(buf))
            child = (idx.ei_leaf_hi << 32) | idx.ei_leaf_lo
            if child >= self.block_count:
                raise ImageError(f"inode {node.inum}: extent tree points past the end")
            self.fs.fh.seek(child * self.block_size)
            block = self.fs.fh.read(self.block_size)
            self._walk_extents(io.BytesIO(block), node, level + 1, out)


def _rdev(block: bytes) -> int:
    """Linux stores an old device number in i_block[0], a new one in i_block[1]."""
    old = int.from_bytes(block[0:4], "little")
    if old:
        return os.makedev((old >> 8) & 0xFF, old & 0xFF)
    new = int.from_bytes(block[4:8], "little")
    return os.makedev((new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00))


def _guard(fn: Any) -> Any:
    """Calls into dissect with its parsing errors turned into ImageError."""
    try:
        return fn()
    except VmkeepError:  # ImageError, or the repository's own errors: as they are
        raise
    except Exception as exc:  # dissect's parsing of a corrupt image fails in many ways
        raise ImageError(f"ext: {exc or exc.__class__.__name__}") from exc
