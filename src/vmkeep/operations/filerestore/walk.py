"""The entries to get, in order: each requested path and, for a directory, everything under
it, depth first, streamed (one directory listing per level is open at a time, never the whole
tree). A directory that is its own ancestor (a hostile image's loop) is skipped with a
warning; so is anything deeper than MAX_DEPTH levels."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from vmkeep.errors import ImageError, UsageError

from .filesystems.nodefs import hostile_name, split_path
from .model import Entry, FileSystem

MAX_DEPTH = 256


@dataclass(frozen=True)
class Item:
    """An entry to restore: `parts` is its path below the target (names as bytes), `source`
    its path in the file system; `leave` marks the end of a directory (set its metadata)."""

    entry: Entry
    parts: tuple[bytes, ...]
    source: bytes
    leave: bool = False


def top_name(path: bytes) -> bytes | None:
    """The name a requested path gets in the target: its last component; None for the
    root (its content goes straight into the target)."""
    parts = split_path(path)
    if not parts:
        return None
    name = parts[-1]
    if hostile_name(name):
        raise UsageError(f"cannot get {path!r}: name the file or directory, not '..'")
    return name


class Trouble(Protocol):
    """Where the walk reports what it skipped (GetResult)."""

    warnings: list[str]
    skipped: int


def walk(fs: FileSystem, paths: list[bytes], trouble: Trouble) -> Iterator[Item]:
    for path in paths:
        entry = fs.lookup(path)
        name = top_name(path)
        base: tuple[bytes, ...] = (name,) if name is not None else ()
        if name is not None:
            yield Item(entry, base, path)
        if entry.kind == "dir":
            yield from _below(fs, path, base, entry, trouble)
            if name is not None:
                yield Item(entry, base, path, leave=True)


def _below(
    fs: FileSystem, path: bytes, base: tuple[bytes, ...], top: Entry, trouble: Trouble
) -> Iterator[Item]:
    stack: list[tuple[bytes, tuple[bytes, ...], Entry, Iterator[Entry]]] = [
        (path, base, top, fs.listdir(path))
    ]
    ancestors = {top.inode}
    while stack:
        dir_path, parts, dir_entry, children = stack[-1]
        try:
            child = next(children, None)
        except ImageError as exc:  # an unreadable directory: the rest of the tree goes on
            trouble.skipped += 1
            trouble.warnings.append(f"{_show(dir_path)}: not listed completely: {exc.message}")
            child = None
        if child is None:
            stack.pop()
            ancestors.discard(dir_entry.inode)
            if parts != base:
                yield Item(dir_entry, parts, dir_path, leave=True)
            continue
        child_path = dir_path.rstrip(b"/") + b"/" + child.name
        child_parts = (*parts, child.name)
        if child.kind == "dir" and child.inode in ancestors:
            trouble.warnings.append(f"{_show(child_path)}: a directory loop in the image; skipped")
            continue
        if child.kind == "dir" and len(stack) >= MAX_DEPTH:
            trouble.warnings.append(f"{_show(child_path)}: deeper than {MAX_DEPTH} levels; skipped")
            continue
        yield Item(child, child_parts, child_path)
        if child.kind == "dir":
            ancestors.add(child.inode)
            stack.append((child_path, child_parts, child, fs.listdir(child_path)))


def _show(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace")
