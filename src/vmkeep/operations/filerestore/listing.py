"""`files ls`: a directory's entries, streamed and paged (`offset`, `limit`), as JSON objects
or `ls -l`-like lines. Names are bytes in the image: JSON gives them decoded (bad bytes as
\\xNN) plus `name_hex` when they are not UTF-8, so a script can ask for the exact name."""

from __future__ import annotations

import itertools
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from .model import Entry, FileSystem

TYPE_CHAR = {
    "file": "-",
    "dir": "d",
    "symlink": "l",
    "fifo": "p",
    "socket": "s",
    "chardev": "c",
    "blockdev": "b",
    "other": "?",
}
KIND_BITS = {
    "file": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "fifo": stat.S_IFIFO,
    "socket": stat.S_IFSOCK,
    "chardev": stat.S_IFCHR,
    "blockdev": stat.S_IFBLK,
}


def entries(
    fs: FileSystem, path: bytes, offset: int = 0, limit: int | None = None
) -> Iterator[Entry]:
    """The entry at `path` if it is not a directory, else its children, paged."""
    entry = fs.lookup(path)
    if entry.kind != "dir":
        return iter([entry])
    stop = None if limit is None else offset + limit
    return itertools.islice(fs.listdir(path), offset, stop)


def show_name(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace")


def entry_json(entry: Entry) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": show_name(entry.name),
        "kind": entry.kind,
        "size": entry.size,
        "mode": f"{entry.mode:04o}",
        "uid": entry.uid,
        "gid": entry.gid,
        "mtime_ns": entry.mtime_ns,
        "atime_ns": entry.atime_ns,
        "ctime_ns": entry.ctime_ns,
        "nlink": entry.nlink,
        "inode": entry.inode,
    }
    if not _utf8(entry.name):
        doc["name_hex"] = entry.name.hex()
    if entry.target is not None:
        doc["target"] = show_name(entry.target)
        if not _utf8(entry.target):
            doc["target_hex"] = entry.target.hex()
    if entry.streams:
        doc["streams"] = [show_name(s) for s in entry.streams]
    if entry.rdev is not None:
        doc["rdev"] = entry.rdev
    return doc


def entry_line(entry: Entry) -> str:
    """`-rw-r--r--  1 0 0  1234 2026-12-06 07:00:00 name -> target` (times in UTC)."""
    mode = stat.filemode(KIND_BITS.get(entry.kind, 0) | entry.mode)
    if entry.kind == "other":
        mode = "?" + mode[1:]
    owner = "-" if entry.uid is None else str(entry.uid)
    group = "-" if entry.gid is None else str(entry.gid)
    when = (
        datetime.fromtimestamp(entry.mtime_ns // 10**9, UTC).strftime("%Y-%m-%d %H:%M:%S")
        if entry.mtime_ns is not None
        else "-" * 19
    )
    name = show_name(entry.name)
    line = f"{mode} {entry.nlink:>3} {owner:>5} {group:>5} {entry.size:>12} {when} {name}"
    if entry.target is not None:
        line += f" -> {show_name(entry.target)}"
    return line


def _utf8(name: bytes) -> bool:
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
