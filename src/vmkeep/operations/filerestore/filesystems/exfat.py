"""exFAT, read lazily one directory at a time (see fat.py for why not dissect.fat's reader).
Layout from Microsoft's exFAT specification: boot sector, one FAT of 32-bit links, a cluster
heap, directory entry sets of 32-byte entries (0x85 file, 0xC0 stream extension, 0xC1 name)."""

from __future__ import annotations

import calendar
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from dissect.util.stream import RangeStream, RunlistStream
from dissect.util.ts import dostimestamp

from vmkeep.errors import ImageError

from ..model import Entry, FsInfo
from .nodefs import NodeFileSystem

EOC = 0xFFFFFFFF
ATTR_READ_ONLY, ATTR_DIRECTORY = 0x01, 0x10
VOLUME_DIRTY = 0x2
MAX_DIR_BYTES = 256 << 20  # exFAT caps a directory at 256 MiB


@dataclass(frozen=True)
class ExNode:
    is_dir: bool
    attributes: int
    first_cluster: int
    contiguous: bool
    data_length: int
    valid_length: int
    mtime_ns: int | None = None
    atime_ns: int | None = None
    ctime_ns: int | None = None


class ExfatFileSystem(NodeFileSystem[ExNode]):
    dot_entries = False  # exFAT stores no "." or "..": an entry so named is planted

    def __init__(self, fh: BinaryIO, size: int) -> None:
        super().__init__(fh, size, FsInfo("exfat"))
        with self.guard("boot sector"):
            self._mount(size)

    def _mount(self, size: int) -> None:
        self.volume.seek(0)
        boot = self.volume.read(512)
        if len(boot) < 512:
            raise ImageError("exFAT: truncated boot sector")
        (volume_sectors,) = struct.unpack_from("<Q", boot, 0x48)
        fat_sector, _fat_count, heap_sector, self.cluster_count, root = struct.unpack_from(
            "<5I", boot, 0x50
        )
        (serial,) = struct.unpack_from("<I", boot, 0x64)
        (flags,) = struct.unpack_from("<H", boot, 0x6A)
        sector_exp, cluster_exp = boot[0x6C], boot[0x6D]
        if not 9 <= sector_exp <= 12 or sector_exp + cluster_exp > 25:
            raise ImageError("exFAT: invalid sector or cluster size")
        self.sector_size = 1 << sector_exp
        self.cluster_size = self.sector_size << cluster_exp
        heap_offset = heap_sector * self.sector_size
        if heap_offset + self.cluster_count * self.cluster_size > size:
            raise ImageError("exFAT: the cluster heap ends past the volume")
        if volume_sectors * self.sector_size > size:
            raise ImageError("exFAT: larger than its volume")
        fat_length = 4 * (self.cluster_count + 2)
        if fat_sector * self.sector_size + fat_length > size:
            raise ImageError("exFAT: the FAT ends past the volume")
        self.fat = RangeStream(self.volume, fat_sector * self.sector_size, fat_length)
        self.heap = RangeStream(self.volume, heap_offset, self.cluster_count * self.cluster_size)
        chain = self._chain(root, 0, False)
        length = sum(c for _, c in chain) * self.cluster_size
        self.root = ExNode(True, ATTR_DIRECTORY, root, False, length, length)
        self.info.uuid, self.info.dirty = f"{serial:08x}", bool(flags & VOLUME_DIRTY)
        if self.info.dirty:
            self.info.warnings.append(
                "exfat was not cleanly unmounted (a crash-consistent backup): read as it is on "
                "disk; the last writes before the backup may be missing"
            )
        self.info.label = self._label()

    def _root(self) -> ExNode:
        return self.root

    def _chain(self, cluster: int, length: int, contiguous: bool) -> list[tuple[int, int]]:
        """(cluster - 2, count) runs; bounded by the volume's cluster count."""
        if contiguous:
            count = -(-length // self.cluster_size)
            if count and not (cluster >= 2 and cluster - 2 + count <= self.cluster_count):
                raise ImageError(f"exFAT: clusters {cluster}+{count} out of range")
            return [(cluster - 2, count)] if count else []
        runs: list[tuple[int, int]] = []
        for _ in range(self.cluster_count + 1):
            if not 2 <= cluster < self.cluster_count + 2:
                raise ImageError(f"exFAT: cluster {cluster} out of range")
            if runs and runs[-1][0] + runs[-1][1] == cluster - 2:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((cluster - 2, 1))
            self.fat.seek(cluster * 4)
            raw = self.fat.read(4)
            if len(raw) < 4:
                raise ImageError("exFAT: the FAT ends past the volume")
            (cluster,) = struct.unpack("<I", raw)
            if cluster == EOC:
                return runs
        raise ImageError("exFAT: a cluster chain loops")

    def _data(self, node: ExNode, length: int) -> BinaryIO:
        if node.first_cluster == 0 or length == 0:
            return RunlistStream(self.heap, [], 0, self.cluster_size)  # type: ignore[no-any-return]
        runs: list[tuple[int | None, int]] = list(
            self._chain(node.first_cluster, node.data_length, node.contiguous)
        )
        have = sum(c for _, c in runs) * self.cluster_size
        if have < min(node.valid_length, length):
            raise ImageError("exFAT: a file's clusters are fewer than its size")
        valid = -(-node.valid_length // self.cluster_size)
        kept, pos = [], 0
        for start, count in runs:  # beyond the valid data length the content reads as zeros
            take = max(min(count, valid - pos), 0)
            if take:
                kept.append((start, take))
            pos += count
        total = -(-length // self.cluster_size)
        if total > valid:
            kept.append((None, total - valid))
        return RunlistStream(self.heap, kept, length, self.cluster_size)  # type: ignore[no-any-return]

    def _sets(self, node: ExNode) -> Iterator[tuple[bytes, bytes]]:
        """The (primary entry, rest of the set) pairs of a directory."""
        if node.data_length > MAX_DIR_BYTES:
            raise ImageError("exFAT: a directory larger than 256 MiB")
        data = self._data(node, node.data_length)
        while True:
            primary = data.read(32)
            if len(primary) < 32 or primary[0] == 0:
                return
            if not primary[0] & 0x80:
                continue
            count = primary[1] if primary[0] == 0x85 else 0
            rest = data.read(32 * count)
            if len(rest) < 32 * count:
                return
            yield primary, rest

    def _label(self) -> str:
        for primary, _ in self._sets(self.root):
            if primary[0] == 0x83:
                return primary[2 : 2 + 2 * min(primary[1], 11)].decode("utf-16-le", "replace")
        return ""

    def _children(self, node: ExNode) -> Iterator[tuple[bytes, ExNode]]:
        for primary, rest in self._sets(node):
            if primary[0] != 0x85 or len(rest) < 64 or rest[0] != 0xC0:
                continue
            flags, name_len = rest[1], rest[3]
            (valid, first, length) = struct.unpack_from("<Q4xIQ", rest, 8)
            names = range(32, len(rest), 32)
            raw = b"".join(rest[i + 2 : i + 32] for i in names if rest[i] == 0xC1)
            name = raw[: 2 * name_len].decode("utf-16-le", "surrogatepass")
            (attributes,) = struct.unpack_from("<H", primary, 4)
            is_dir = bool(attributes & ATTR_DIRECTORY)
            yield (
                name.encode("utf-8", "surrogatepass"),
                ExNode(
                    is_dir=is_dir,
                    attributes=attributes,
                    first_cluster=first,
                    contiguous=bool(flags & 0x2),
                    data_length=length,
                    valid_length=length if is_dir else min(valid, length),
                    ctime_ns=_stamp(primary, 8, 20, 22),
                    mtime_ns=_stamp(primary, 12, 21, 23),
                    atime_ns=_stamp(primary, 16, None, 24),
                ),
            )

    def _fold(self, name: bytes) -> bytes:
        """exFAT names are case-insensitive (up-cased through the volume's table; Unicode's
        case folding stands in for it here)."""
        return casefold(name)

    def _kind(self, node: ExNode) -> str:
        return "dir" if node.is_dir else "file"

    def _dir_key(self, node: ExNode) -> ExNode:
        return node

    def _entry(self, name: bytes, node: ExNode) -> Entry:
        read_only = node.attributes & ATTR_READ_ONLY
        mode = 0o755 if node.is_dir else 0o444 if read_only else 0o644
        return Entry(
            name=name,
            kind="dir" if node.is_dir else "file",
            size=0 if node.is_dir else node.data_length,
            mode=mode,
            uid=None,
            gid=None,
            mtime_ns=node.mtime_ns,
            atime_ns=node.atime_ns,
            ctime_ns=node.ctime_ns,
            nlink=1,
            inode=node.first_cluster,
        )

    def _open(self, node: ExNode, stream: bytes | None) -> tuple[BinaryIO, int]:
        if stream is not None:
            raise ImageError("exFAT has no alternate data streams")
        return self._data(node, node.data_length), node.data_length


def casefold(name: bytes) -> bytes:
    """A name as a case-insensitive lookup compares it (exFAT, FAT)."""
    return name.decode("utf-8", "surrogateescape").casefold().encode("utf-8", "surrogatepass")


def _stamp(entry: bytes, at: int, centis_at: int | None, tz_at: int) -> int | None:
    """An exFAT time in UTC: a DOS local time, 10 ms steps, and its offset from UTC."""
    (stamp,) = struct.unpack_from("<I", entry, at)
    if not stamp >> 16:
        return None
    centis = entry[centis_at] if centis_at is not None else 0
    try:
        local = dostimestamp(stamp, centis)
    except (ValueError, OverflowError):
        return None
    tz = entry[tz_at]
    offset = 0
    if tz & 0x80:
        quarter = tz & 0x7F
        offset = (quarter - 0x80 if quarter & 0x40 else quarter) * 15 * 60
    seconds = calendar.timegm(local.timetuple()) - offset
    return int(seconds * 1_000_000_000 + local.microsecond * 1000)
