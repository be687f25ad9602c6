"""NTFS over dissect.ntfs, mapped onto POSIX-like entries (docs/FILE-RESTORE.md, "NTFS"):

- names are UTF-16 on disk and UTF-8 here; an unpaired surrogate (which Windows allows) is
  encoded as its three-byte UTF-8 form (WTF-8), so every name maps to distinct bytes and back;
- a directory's entries come from the $I30 index root and the index buffers its $BITMAP marks
  in use (dissect walks every buffer, stale ones included); DOS 8.3 aliases are left out, and
  so are the system files ($MFT, $Bitmap, ... and $Extend) at the root;
- mode: 0o755 for directories, 0o644 for files, 0o777 for symlinks, write bits cleared for
  the read-only attribute; uid and gid are None; times are $STANDARD_INFORMATION's, 100 ns
  ticks since 1601 turned into ns since 1970; the inode is the MFT record number, nlink the
  number of its non-DOS names;
- symlinks: Windows symlinks and junctions (reparse points; relative targets get "/" for
  "\\", absolute ones are kept as Windows wrote them), WSL symlinks, and the Interix
  symlinks ntfs-3g writes; other reparse points (dedup, cloud files, ...) are kind "other"
  with a warning;
- alternate data streams are Entry.streams, read with open(path, stream=name).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any, BinaryIO

from dissect.ntfs import NTFS
from dissect.ntfs.c_ntfs import ATTRIBUTE_TYPE_CODE as ATTR
from dissect.ntfs.c_ntfs import c_ntfs
from dissect.ntfs.index import IndexEntry
from dissect.ntfs.util import segment_reference

from vmkeep.errors import ImageError, NotFoundError, UnsupportedImageError

from ..model import Entry, FileSystem, FsInfo
from .nodefs import NodeFileSystem, show

MAGIC = b"NTFS    "
ROOT_RECORD, VOLUME_RECORD, FIRST_USER_RECORD = 5, 3, 16
DOS_ONLY = 2  # $FILE_NAME namespace of an 8.3 alias
READ_ONLY, SYSTEM, ENCRYPTED = 0x1, 0x4, 0x4000
VOLUME_DIRTY = 0x1
TAG_SYMLINK, TAG_JUNCTION, TAG_WSL = 0xA000000C, 0xA0000003, 0xA000001D
INTERIX = b"IntxLNK\x01"
MAX_LINK = 8 + 2 * 4096
MAX_REPARSE = 16 * 1024
MAX_INDEX_BUFFERS = 8 << 20  # 32 GiB of 4 KiB index buffers: no directory has more


def _lenient_utf16(cls: Any, stream: BinaryIO, count: int, context: Any = None) -> str:
    """dissect.ntfs decodes every UTF-16 field strictly, so one name with an unpaired
    surrogate (legal on NTFS) makes its whole MFT record unreadable. Decode NTFS's wide
    strings (and only those: the override is on dissect.ntfs's own type) keeping them."""
    data = stream.read(-1) if count < 0 else stream.read(count * 2)  # < 0: to the end
    if count >= 0 and len(data) != count * 2:
        raise EOFError(f"read {len(data)} bytes of a {count * 2}-byte name")
    text: str = str.__new__(cls, data.decode("utf-16-le", "surrogatepass"))
    return text


c_ntfs.typedefs["wchar"]._read_array = classmethod(_lenient_utf16)


def probe(fh: BinaryIO) -> bool:
    fh.seek(3)
    return fh.read(8) == MAGIC


def open(fh: BinaryIO, size: int) -> FileSystem:
    return NtfsFileSystem(fh, size)


def utf16_name(raw: bytes) -> bytes:
    """A UTF-16LE name as UTF-8, unpaired surrogates kept (WTF-8)."""
    return raw.decode("utf-16-le", "surrogatepass").encode("utf-8", "surrogatepass")


class NtfsFileSystem(NodeFileSystem[Any]):
    dot_entries = False  # only the root's own "." is stored, and _children drops it

    def __init__(self, fh: BinaryIO, size: int) -> None:
        super().__init__(fh, size, FsInfo("ntfs"))
        with self.guard("boot sector"):
            self.ntfs = NTFS(self.volume)
            self.root = self.ntfs.mft.get(ROOT_RECORD)
            if not self.root.is_dir():
                raise ImageError("ntfs: the root record is not a directory")
            self.info.label = self.ntfs.volume_name or ""
            self.info.uuid = f"{self.ntfs.serial:016X}"
            self.info.dirty = self._volume_dirty()
            if self.info.dirty:
                self.warn("ntfs: the volume is marked dirty (not cleanly unmounted); read anyway")

    def _volume_dirty(self) -> bool:
        """The dirty flag of $Volume's $VOLUME_INFORMATION (8 reserved bytes, version, flags)."""
        info = self.ntfs.mft.get(VOLUME_RECORD).attributes[ATTR.VOLUME_INFORMATION]
        if not info:
            return False
        data = info[0].open().read(12)
        return len(data) >= 12 and bool(struct.unpack_from("<H", data, 10)[0] & VOLUME_DIRTY)

    def _root(self) -> Any:
        return self.root

    def _attributes(self, record: Any) -> int:
        info = record.attributes[ATTR.STANDARD_INFORMATION]
        return int(info[0].file_attributes) if info else 0

    def _kind(self, record: Any) -> str:
        reparse = record.attributes[ATTR.REPARSE_POINT]
        if reparse:
            tag = struct.unpack_from("<I", self._reparse_data(reparse), 0)[0]
            return "symlink" if tag in (TAG_SYMLINK, TAG_JUNCTION, TAG_WSL) else "other"
        if record.is_dir():
            return "dir"
        if self._interix(record) is not None:
            return "symlink"
        return "file"

    @staticmethod
    def _reparse_data(reparse: Any) -> bytes:
        """A reparse point's data: at most 16 KiB (MAXIMUM_REPARSE_DATA_BUFFER_SIZE), whatever
        size a hostile attribute claims."""
        data: bytes = reparse[0].open().read(MAX_REPARSE)
        if len(data) < 8:
            raise ImageError("ntfs: reparse point too short")
        return data

    def _interix(self, record: Any) -> bytes | None:
        """The target of an Interix symlink (a system file "IntxLNK\\1" + UTF-16 target)."""
        if not self._attributes(record) & SYSTEM or not record.has_stream(""):
            return None
        size = record.size()
        if not len(INTERIX) < size <= MAX_LINK:
            return None
        data: bytes = record.open().read(size)
        if not data.startswith(INTERIX):
            return None
        return utf16_name(data[len(INTERIX) :])

    def _children(self, record: Any) -> Iterator[tuple[bytes, Any]]:
        index = record.index("$I30")
        at_root = record.segment == ROOT_RECORD
        for entry in self._index_entries(record, index):
            key = entry.key
            if len(key) < 0x42 or key[0x41] == DOS_ONLY:
                continue
            name = utf16_name(key[0x42 : 0x42 + 2 * key[0x40]])
            segment = segment_reference(entry.header.FileReference)
            if at_root and segment < FIRST_USER_RECORD:
                continue  # the file system's own files ($MFT, ..., $Extend), the root's "."
            yield name, entry  # read its record in _entry, so a bad one skips only this entry

    def _index_entries(self, record: Any, index: Any) -> Iterator[Any]:
        """Entries of the index root, then of the index buffers in use per $BITMAP."""
        branches = False
        for entry in index.root.entries():
            branches = branches or entry.is_node
            if entry.is_end:
                break
            yield entry
        if index._index_stream is None:
            if branches:
                self.warn(f"ntfs: record {record.segment}: a directory index without its blocks")
            return
        buffer_size = max(index.root.bytes_per_index_buffer, 1)
        buffers = min(index._index_stream.size // buffer_size, MAX_INDEX_BUFFERS)
        has_bitmap = record.has_stream("$I30", ATTR.BITMAP)
        bitmap = record.open("$I30", ATTR.BITMAP).read(buffers // 8 + 1) if has_bitmap else b""
        buffers = min(len(bitmap) * 8, buffers)
        for number in range(buffers):
            if not bitmap[number // 8] >> (number % 8) & 1:
                continue
            vcn = (number * buffer_size) >> index._vcn_size_shift
            for entry in index.index_buffer(vcn).entries():
                if entry.is_end:
                    break
                yield entry

    def _dir_key(self, record: Any) -> int:
        return int(record.segment)

    def _find(self, record: Any, name: bytes) -> tuple[bytes, Any] | None:
        found = super()._find(record, name)
        return None if found is None else (found[0], found[1].dereference())

    def _entry(self, name: bytes, node: Any) -> Entry:
        record = node.dereference() if isinstance(node, IndexEntry) else node
        kind = self._kind(record)
        attributes = self._attributes(record)
        mode = {"dir": 0o755, "symlink": 0o777}.get(kind, 0o644)
        if attributes & READ_ONLY and kind != "symlink":
            mode &= ~0o222
        info = record.attributes[ATTR.STANDARD_INFORMATION]
        times = info[0] if info else None
        if kind == "other":
            self.warn(f"ntfs: {show(name)}: a reparse point vmkeep does not follow")
        return Entry(
            name=name,
            kind=kind,
            size=record.size() if kind == "file" and record.has_stream("") else 0,
            mode=mode,
            uid=None,
            gid=None,
            mtime_ns=times.last_modification_time_ns if times else None,
            atime_ns=times.last_access_time_ns if times else None,
            ctime_ns=times.last_change_time_ns if times else None,
            nlink=max(1, sum(1 for a in record.attributes[ATTR.FILE_NAME] if a.flags != DOS_ONLY)),
            inode=record.segment,
            target=self._link(record) if kind == "symlink" else None,
            streams=tuple(self._streams(record)),
        )

    def _streams(self, record: Any) -> Iterator[bytes]:
        seen: set[bytes] = set()
        for attr in record.attributes[ATTR.DATA]:
            name = attr.header.name
            if name and name not in seen:
                seen.add(name)
                yield name.encode("utf-8", "surrogatepass")

    def _link(self, record: Any) -> bytes:
        reparse = record.attributes[ATTR.REPARSE_POINT]
        if not reparse:
            target = self._interix(record)
            if target is None:
                raise ImageError(f"ntfs: record {record.segment} is not a symlink")
            return target
        return reparse_target(self._reparse_data(reparse))

    def _open(self, record: Any, stream: bytes | None) -> tuple[BinaryIO, int]:
        if self._attributes(record) & ENCRYPTED:
            raise UnsupportedImageError(
                f"ntfs: record {record.segment} is EFS-encrypted: its content needs the user's key"
            )
        name = "" if stream is None else stream.decode("utf-8", "surrogatepass")
        if not record.has_stream(name):
            raise NotFoundError(f"ntfs: record {record.segment} has no stream {name!r}")
        size: int = record.size(name)
        return record.open(name), size


def reparse_target(data: bytes) -> bytes:
    """A symlink's, junction's or WSL link's target. Windows links name their target twice
    (substitute and print name); the print name is the one users wrote."""
    if len(data) < 8:
        raise ImageError("ntfs: reparse point too short")
    tag, length = struct.unpack_from("<IH", data, 0)
    body = data[8 : 8 + length]
    if tag == TAG_WSL:
        return body[4:]
    fields = 12 if tag == TAG_SYMLINK else 8
    if len(body) < fields:
        raise ImageError("ntfs: reparse point too short")
    _, _, print_off, print_len = struct.unpack_from("<HHHH", body, 0)
    relative = tag == TAG_SYMLINK and struct.unpack_from("<I", body, 8)[0] & 1
    raw = body[fields + print_off : fields + print_off + print_len]
    if not raw:
        sub_off, sub_len = struct.unpack_from("<HH", body, 0)
        raw = body[fields + sub_off : fields + sub_off + sub_len]
    target = utf16_name(raw)
    return target.replace(b"\\", b"/") if relative else target
