"""What every file system adapter gives file restore: entries and a small read-only API.

Names and paths are bytes, as stored in the image: a name that is not UTF-8 is kept as it
is, never replaced, so what is extracted is what the guest had. Paths are absolute inside
the file system and separated by b"/".
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

KINDS = ("file", "dir", "symlink", "fifo", "socket", "chardev", "blockdev", "other")


@dataclass(frozen=True)
class Entry:
    """One directory entry with its inode's metadata. Times are nanoseconds since the epoch
    (None when the file system does not record them); `inode` is unique within the file
    system, so hard links are the entries that share it (and `nlink` > 1)."""

    name: bytes
    kind: str  # one of KINDS
    size: int
    mode: int  # permission bits, incl. setuid/setgid/sticky (st_mode & 0o7777)
    uid: int | None
    gid: int | None
    mtime_ns: int | None
    atime_ns: int | None
    ctime_ns: int | None
    nlink: int
    inode: int
    target: bytes | None = None  # a symlink's target, as stored
    streams: tuple[bytes, ...] = ()  # NTFS alternate data streams of a file (names)
    rdev: int | None = None  # device number of a chardev/blockdev


@dataclass
class FsInfo:
    type_name: str  # "ext2", "ext3", "ext4", "xfs", "btrfs", "ntfs", "vfat", "exfat"
    label: str = ""
    uuid: str = ""
    dirty: bool = False  # not cleanly unmounted: read anyway, with a warning
    warnings: list[str] = field(default_factory=list)


class FileSystem(Protocol):
    """A file system opened read-only over a volume (a file object of a partition or LV).

    `lookup` follows symlinks in the directory components of a path, inside the file system
    and at most 40 hops (like Linux), never in the last component; a loop or a dangling link
    is an ImageError. Every method raises ImageError (or NotFoundError for a path that does
    not exist) on a corrupt structure; none may hang or allocate without bound on a hostile
    image."""

    info: FsInfo

    def lookup(self, path: bytes) -> Entry: ...

    def listdir(self, path: bytes) -> Iterator[Entry]:
        """The entries of a directory, streamed (a huge directory never sits in memory), without
        "." and "..". A hostile entry name ("", "." , "..", or containing b"/" or NUL) is skipped
        with a warning added to `info.warnings`."""
        ...

    def open(self, path: bytes, stream: bytes | None = None) -> BinaryIO:
        """A regular file's content (or one of its NTFS streams), read-only and seekable; holes,
        sparse ranges and unwritten extents read as zeros."""
        ...

    def xattrs(self, path: bytes) -> dict[bytes, bytes]:
        """Extended attributes (e.g. b"user.comment", b"security.selinux"); {} when none."""
        ...
