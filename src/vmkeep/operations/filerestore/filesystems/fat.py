"""FAT12/16/32 through dissect.fat (boot sector, FAT, directory entries and long names) with
cluster chains walked by vmkeep under a bound (a FAT whose chain loops would otherwise hang),
and exFAT read by vmkeep itself: dissect.fat's exFAT reader parses the whole tree eagerly when
opened, follows FAT chains without a bound and reads only the first cluster of a contiguous
directory, so it is not usable on a guest's (or an attacker's) volume.

FAT has no owners, permissions or inodes: entries are owned by nobody (uid/gid None), files
are 0o644 (0o444 read-only) and directories 0o755, and the "inode" is the first cluster. FAT
times are local times of the guest; they are read as UTC (exFAT times carry their offset)."""

from __future__ import annotations

import calendar
import datetime
from collections.abc import Hashable, Iterator
from typing import Any, BinaryIO

from dissect.fat.fat import FATFS, RootDirectory, _iter_dirent
from dissect.util.stream import RangeStream, RunlistStream
from dissect.util.ts import dostimestamp

from vmkeep.errors import ImageError

from ..model import Entry, FsInfo
from . import exfat
from .nodefs import NodeFileSystem, reraise_ours

ATTR_READ_ONLY, ATTR_VOLUME_ID = 0x01, 0x08

Node = Any  # dissect.fat DirectoryEntry or RootDirectory (untyped)


def probe(fh: BinaryIO) -> bool:
    fh.seek(0)
    sector = fh.read(512)
    if sector[3:11] == b"EXFAT   ":
        return True
    if len(sector) < 512 or sector[510:512] != b"\x55\xaa" or sector[0] not in (0xEB, 0xE9):
        return False
    return sector[54:59] == b"FAT12" or sector[54:59] == b"FAT16" or sector[82:87] == b"FAT32"


def open(fh: BinaryIO, size: int) -> NodeFileSystem[Any]:
    fh.seek(3)
    if fh.read(8) == b"EXFAT   ":
        return exfat.ExfatFileSystem(fh, size)
    return FatFileSystem(fh, size)


class FatFileSystem(NodeFileSystem[Node]):
    def __init__(self, fh: BinaryIO, size: int) -> None:
        super().__init__(fh, size, FsInfo("vfat"))
        with self.guard("boot sector"):
            fs = self.fs = FATFS(self.volume)
            sectors = fs.total_sectors - fs.first_data_sector
            self.cluster_count = sectors // fs.bpb.BPB_SecPerClus
            if fs.total_sectors * fs.sector_size > size:
                raise ImageError("FAT file system: larger than its volume")
            self.info.label, self.info.uuid = fs.volume_label, fs.volume_id

    def _root(self) -> Node:
        root = self.fs.root
        if root.cluster is not None and root._runlist is None:
            root._runlist = self._chain(root.cluster)
        return root

    def _chain(self, cluster: int) -> list[tuple[int, int]]:
        """A cluster chain as (cluster - 2, count) runs; a loop or an out-of-range link is
        an ImageError, found after at most as many steps as the volume has clusters."""
        runs: list[tuple[int, int]] = []
        steps = 0
        eoc = {12: 0xFF8, 16: 0xFFF8, 32: 0x0FFFFFF8}[self.fs.fat.bits_per_entry]
        while True:
            if not 2 <= cluster < self.cluster_count + 2:
                raise ImageError(f"FAT: cluster {cluster} out of range")
            steps += 1
            if steps > self.cluster_count:
                raise ImageError("FAT: a cluster chain loops")
            if runs and runs[-1][0] + runs[-1][1] == cluster - 2:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((cluster - 2, 1))
            try:
                value = self.fs.fat.get(cluster)
            except Exception as exc:  # a corrupt image breaks dissect in many ways
                reraise_ours(exc)
                raise ImageError(f"FAT: {exc}") from exc
            if self.fs.fat.bits_per_entry == 32:
                value &= 0x0FFFFFFF
            if value >= eoc:
                return runs
            cluster = value

    def _children(self, node: Node) -> Iterator[tuple[bytes, Node]]:
        self._runs(node)  # never dissect's own chain walk: it has no bound
        try:
            stream = node.open()
            for child in _iter_dirent(self.fs, stream, node):
                if child.dirent.DIR_Attr & ATTR_VOLUME_ID and not child.is_directory():
                    continue
                yield _name(child).encode("utf-8", "surrogatepass"), child
        except Exception as exc:  # a corrupt image breaks dissect in many ways
            reraise_ours(exc)
            raise ImageError(f"FAT directory: {exc}") from exc

    def _runs(self, node: Node) -> list[tuple[int, int]]:
        """A node's cluster runs, walked (bounded) when first needed: a looping chain fails
        the one file or directory that has it, not the listing of its parent."""
        if node._runlist is None:
            node._runlist = self._chain(node.cluster) if node.cluster else []
        return node._runlist  # type: ignore[no-any-return]

    def _fold(self, name: bytes) -> bytes:
        """FAT names are case-insensitive, as Linux's vfat looks them up."""
        return exfat.casefold(name)

    def _kind(self, node: Node) -> str:
        return "dir" if isinstance(node, RootDirectory) or node.is_directory() else "file"

    def _dir_key(self, node: Node) -> Hashable:
        return "root" if isinstance(node, RootDirectory) else node.cluster

    def _entry(self, name: bytes, node: Node) -> Entry:
        is_dir = isinstance(node, RootDirectory) or node.is_directory()
        if is_dir:
            mode, size = 0o755, 0
        else:
            mode = 0o444 if node.dirent.DIR_Attr & ATTR_READ_ONLY else 0o644
            size = node.dirent.DIR_FileSize
        root = isinstance(node, RootDirectory)
        d = None if root else node.dirent
        return Entry(
            name=name,
            kind="dir" if is_dir else "file",
            size=size,
            mode=mode,
            uid=None,
            gid=None,
            mtime_ns=None if d is None else _dos_ns((d.DIR_WrtDate << 16) | d.DIR_WrtTime),
            atime_ns=None if d is None else _dos_ns(d.DIR_LstAccDate << 16),
            ctime_ns=None,
            nlink=1,
            inode=0 if root else node.cluster,
        )

    def _open(self, node: Node, stream: bytes | None) -> tuple[BinaryIO, int]:
        if stream is not None:
            raise ImageError("FAT has no alternate data streams")
        size = node.dirent.DIR_FileSize
        runs = self._runs(node)
        if sum(count for _, count in runs) * self.fs.cluster_size < size:
            raise ImageError(
                f"FAT: the file at cluster {node.cluster}: its cluster chain is shorter than "
                "its size"
            )
        data = RangeStream(
            self.fs.fh,
            self.fs.first_data_sector * self.fs.sector_size,
            self.cluster_count * self.fs.cluster_size,
        )
        return RunlistStream(data, runs, size, self.fs.cluster_size), size


def _name(child: Node) -> str:
    """The long name, else the short one with Windows NT's lower-case flags applied (as
    Linux shows "readme.txt" for a short entry that mtools or Windows wrote in lower case)."""
    if child.ldirents:
        return str(child.name)
    if child.short_name in (".", ".."):
        return str(child.short_name)
    base, _, ext = str(child.short_name).partition(".")
    flags = child.dirent.DIR_NTRes
    base = base.lower() if flags & 0x08 else base
    ext = ext.lower() if flags & 0x10 else ext
    return f"{base}.{ext}" if ext else base


def _dos_ns(stamp: int) -> int | None:
    """A FAT date and time (local time of the guest, read as UTC), or None when unset."""
    if not stamp >> 16:
        return None
    try:
        when: datetime.datetime = dostimestamp(stamp)
    except (ValueError, OverflowError):
        return None
    return calendar.timegm(when.timetuple()) * 1_000_000_000
