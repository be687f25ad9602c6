"""`files get --tar FILE | --zip FILE`: the same entries as `--to`, streamed into an archive
(never a whole file in memory). tar is POSIX.1-2001 (PAX): names, link targets, owners and
nanosecond times exactly, non-UTF-8 names as bytes (hdrcharset=BINARY), xattrs as
SCHILY.xattr records (what GNU tar and bsdtar restore), hard links as links, symlinks as
symlinks. zip has no owners, xattrs or hard links: hard links are stored as copies, symlinks
as Info-ZIP symlink entries, and a name that is not UTF-8 is stored with its bad bytes
replaced (with a warning). The archive file is created new (O_EXCL): nothing is replaced."""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
from datetime import UTC, datetime
from typing import IO, BinaryIO

from vmkeep.errors import ImageError
from vmkeep.progress import Progress

from .extract import BLOCK, GetResult, TargetExistsError, copy_content
from .model import Entry, FileSystem
from .walk import Item, walk

KIND_TYPES = {
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "fifo": tarfile.FIFOTYPE,
    "chardev": tarfile.CHRTYPE,
    "blockdev": tarfile.BLKTYPE,
}
ZIP_MIN_TIME = (1980, 1, 1, 0, 0, 0)
ZIP_MAX_TIME = (2107, 12, 31, 23, 59, 58)


def create_new(path: str) -> BinaryIO:
    """The archive file, made new; an existing file (or symlink) there is refused."""
    if path == "-":
        return os.fdopen(os.dup(1), "wb")
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except FileExistsError:
        raise TargetExistsError(f"{path} already exists") from None
    return os.fdopen(fd, "wb")


def _name(item: Item) -> str:
    return os.fsdecode(b"/".join(item.parts))


class _Reader:
    """A file's content as a file object for tarfile.addfile, holes as zeros, progress
    reported; an image that gives fewer bytes than the size raises ImageError."""

    def __init__(self, fs: FileSystem, item: Item, progress: Progress) -> None:
        self.src = fs.open(item.source)
        self.item, self.progress = item, progress
        self.left = item.entry.size
        self.buffer = memoryview(b"")

    def read(self, n: int = -1) -> bytes:
        """tarfile asks for small pieces; the image is read in 1 MiB blocks."""
        if not self.buffer and self.left:
            block = self.src.read(min(BLOCK, self.left))
            if not block:
                raise ImageError(f"{os.fsdecode(self.item.source)}: its data ends early")
            self.left -= len(block)
            self.progress.advance(len(block))
            self.buffer = memoryview(block)
        n = len(self.buffer) if n < 0 else n
        piece, self.buffer = self.buffer[:n], self.buffer[n:]
        return bytes(piece)


def _tarinfo(item: Item, fs: FileSystem, first: dict[int, str]) -> tarfile.TarInfo:
    entry: Entry = item.entry
    info = tarfile.TarInfo(_name(item))
    pax: dict[str, str] = {}
    info.pax_headers = pax
    info.mode = entry.mode
    info.uid = entry.uid or 0
    info.gid = entry.gid or 0
    if entry.mtime_ns is not None:
        info.mtime = entry.mtime_ns / 1e9
        pax["mtime"] = f"{entry.mtime_ns // 10**9}.{entry.mtime_ns % 10**9:09d}"
    if entry.atime_ns is not None:
        pax["atime"] = f"{entry.atime_ns // 10**9}.{entry.atime_ns % 10**9:09d}"
    if entry.kind != "dir" and entry.nlink > 1 and entry.inode in first:
        info.type = tarfile.LNKTYPE
        info.linkname = first[entry.inode]
    elif entry.kind == "file":
        info.size = entry.size
    else:
        info.type = KIND_TYPES.get(entry.kind, tarfile.REGTYPE)
        if entry.kind == "symlink":
            info.linkname = os.fsdecode(entry.target or b"")
        if entry.rdev is not None:
            info.devmajor, info.devminor = os.major(entry.rdev), os.minor(entry.rdev)
    if entry.kind == "file" and info.type == tarfile.REGTYPE:
        for key, value in fs.xattrs(item.source).items():
            pax["SCHILY.xattr." + os.fsdecode(key)] = value.decode("utf-8", "surrogateescape")
    return info


def write_tar(fs: FileSystem, paths: list[bytes], out: BinaryIO, progress: Progress) -> GetResult:
    result = GetResult()
    first: dict[int, str] = {}
    with tarfile.open(
        fileobj=out,
        mode="w|",
        format=tarfile.PAX_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
    ) as tar:
        for item in walk(fs, paths, result):
            if item.leave or item.entry.kind in ("socket", "other"):
                continue
            info = _tarinfo(item, fs, first)
            if info.type == tarfile.REGTYPE:
                tar.addfile(info, _Reader(fs, item, progress))
                result.files += 1
                result.bytes += info.size
            else:
                tar.addfile(info)
                result.dirs += item.entry.kind == "dir"
                result.links += info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE)
            if item.entry.kind != "dir" and item.entry.nlink > 1:
                first.setdefault(item.entry.inode, info.name)
    return result


def write_zip(fs: FileSystem, paths: list[bytes], out: BinaryIO, progress: Progress) -> GetResult:
    result = GetResult()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
        for item in walk(fs, paths, result):
            entry = item.entry
            if item.leave or entry.kind not in ("file", "dir", "symlink"):
                if not item.leave:
                    result.warnings.append(f"{_name(item)}: a {entry.kind}; not stored in a zip")
                continue
            name = b"/".join(item.parts).decode("utf-8", "replace")
            if name.encode() != b"/".join(item.parts):
                result.warnings.append(f"{name}: not UTF-8; stored with its bad bytes replaced")
            info = zipfile.ZipInfo(name + ("/" if entry.kind == "dir" else ""), _zip_time(entry))
            kind = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}[entry.kind]
            info.external_attr = ((kind | entry.mode) << 16) | (0x10 if entry.kind == "dir" else 0)
            info.create_system = 3  # unix: the mode bits above count
            if entry.kind == "dir":
                archive.writestr(info, b"")
                result.dirs += 1
            elif entry.kind == "symlink":
                archive.writestr(info, entry.target or b"")
                result.links += 1
            else:
                with archive.open(info, "w", force_zip64=entry.size >= 1 << 31) as dst:
                    copy_content(
                        fs,
                        item,
                        lambda b: _zip_write(dst, b, progress),
                        lambda n: _zip_zero(dst, n, progress),
                    )
                result.files += 1
                result.bytes += entry.size
    return result


def _zip_write(dst: IO[bytes], block: bytes, progress: Progress) -> None:
    dst.write(block)
    progress.advance(len(block))


def _zip_zero(dst: IO[bytes], n: int, progress: Progress) -> None:
    dst.write(bytes(n))
    progress.advance(n)


def _zip_time(entry: Entry) -> tuple[int, int, int, int, int, int]:
    if entry.mtime_ns is None:
        return ZIP_MIN_TIME
    when = datetime.fromtimestamp(entry.mtime_ns / 1e9, UTC)
    stamp = (when.year, when.month, when.day, when.hour, when.minute, when.second)
    return min(max(stamp, ZIP_MIN_TIME), ZIP_MAX_TIME)
