"""`files get --to DIR`: write entries below DIR and nowhere else, whatever the image holds.

Every file is created relative to an open directory fd (openat-style), by a name that holds no
"/" and is not "." or "..", with O_EXCL|O_NOFOLLOW; every directory is made by vmkeep (mkdir
fails on an existing name) and entered with O_DIRECTORY|O_NOFOLLOW, so neither a symlink in
the image nor one planted in DIR can lead a write elsewhere. Nothing existing is replaced: a
name that exists in the target is an error (directories made by an earlier, interrupted get
are not reused either). Symlinks are made as symlinks, never followed; hard links are linked
to the first copy. Content is streamed in 1 MiB blocks and holes stay holes."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from vmkeep.errors import ImageError, VmkeepError
from vmkeep.progress import Progress

from .model import Entry, FileSystem
from .walk import Item, walk

BLOCK = 1 << 20
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class TargetExistsError(VmkeepError):
    """get never replaces what is already in the target directory."""


@dataclass
class GetResult:
    files: int = 0
    dirs: int = 0
    links: int = 0
    bytes: int = 0
    skipped: int = 0  # entries the image could not give (each with a warning)
    warnings: list[str] = field(default_factory=list)


@dataclass
class GetOptions:
    owners: bool = field(default_factory=lambda: os.geteuid() == 0)


def total_bytes(fs: FileSystem, paths: list[bytes]) -> int:
    """The size of what get will write (a metadata-only walk, for the progress bar)."""
    items = walk(fs, paths, GetResult())
    return sum(i.entry.size for i in items if i.entry.kind == "file" and not i.leave)


def copy_content(
    fs: FileSystem, item: Item, write: Callable[[bytes], None], skip: Callable[[int], None]
) -> int:
    """Streams a file's content, calling `skip(n)` for holes (known from the file system's
    allocation when the adapter tells it, else all-zero blocks); ImageError if the image
    yields fewer bytes than the file's size."""
    size = item.entry.size
    src = fs.open(item.source)
    done = 0
    for start, length in _data_ranges(fs, item.source, size):
        if start > done:
            skip(start - done)
            done = start
        src.seek(start)
        end = start + length
        while done < end:
            block = src.read(min(BLOCK, end - done))
            if not block:
                raise ImageError(f"{_show(item.source)}: its data ends early ({done} of {size})")
            if block.count(0) == len(block):
                skip(len(block))
            else:
                write(block)
            done += len(block)
    if done < size:
        skip(size - done)
    return size


def _data_ranges(fs: FileSystem, path: bytes, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the file's allocated data, clipped to its size, in order."""
    runs = getattr(fs, "data_runs", None)
    if runs is None:
        return [(0, size)]
    out: list[tuple[int, int]] = []
    for start, length in runs(path):
        end = min(start + length, size)
        if start >= end:
            continue
        if out and out[-1][0] + out[-1][1] >= start:
            out[-1] = (out[-1][0], max(out[-1][0] + out[-1][1], end) - out[-1][0])
        else:
            out.append((start, end - start))
    return out


class DirTarget:
    def __init__(self, target: str, progress: Progress, options: GetOptions) -> None:
        os.makedirs(target, exist_ok=True)
        self.root = os.open(target, DIR_FLAGS)
        self.progress = progress
        self.options = options
        self.result = GetResult()
        self._dirs: dict[tuple[bytes, ...], int] = {(): self.root}
        self._linked: dict[int, tuple[bytes, ...]] = {}

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def get(self, fs: FileSystem, paths: list[bytes]) -> GetResult:
        try:
            for item in walk(fs, paths, self.result):
                self._one(fs, item)
        finally:
            self.close()
        return self.result

    def _one(self, fs: FileSystem, item: Item) -> None:
        entry = item.entry
        if item.leave:
            fd = self._dirs.pop(item.parts)
            try:
                self._metadata(fd, entry)
            finally:
                os.close(fd)
            return
        parent = self._dirs[item.parts[:-1]]
        name = item.parts[-1]
        if entry.kind == "dir":
            self._mkdir(parent, name, item)
        elif entry.nlink > 1 and entry.kind != "dir" and entry.inode in self._linked:
            self._link(parent, name, self._linked[entry.inode], item)
        elif entry.kind == "file":
            self._file(fs, parent, name, item)
        elif entry.kind == "symlink":
            self._symlink(parent, name, item)
        else:
            self._special(parent, name, item)
        if entry.nlink > 1 and entry.kind != "dir":
            self._linked.setdefault(entry.inode, item.parts)

    def _mkdir(self, parent: int, name: bytes, item: Item) -> None:
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            raise _exists(item) from None
        self._dirs[item.parts] = os.open(name, DIR_FLAGS, dir_fd=parent)
        self.result.dirs += 1

    def _file(self, fs: FileSystem, parent: int, name: bytes, item: Item) -> None:
        fd = self._create(parent, name, item)
        try:

            def write(block: bytes) -> None:
                view = memoryview(block)
                while view:
                    view = view[os.write(fd, view) :]
                self.progress.advance(len(block))

            def skip(n: int) -> None:
                os.lseek(fd, n, os.SEEK_CUR)
                self.progress.advance(n)

            try:
                written = copy_content(fs, item, write, skip)
            except ImageError as exc:  # no half file is left behind
                os.unlink(name, dir_fd=parent)
                self.result.skipped += 1
                self.result.warnings.append(f"{_show(item.source)}: not restored: {exc.message}")
                return
            os.ftruncate(fd, written)
            self._xattrs(fs, fd, item)
            self._metadata(fd, item.entry)
        finally:
            os.close(fd)
        self.result.files += 1
        self.result.bytes += item.entry.size

    def _create(self, parent: int, name: bytes, item: Item) -> int:
        try:
            return os.open(name, FILE_FLAGS, 0o600, dir_fd=parent)
        except FileExistsError:
            raise _exists(item) from None

    def _symlink(self, parent: int, name: bytes, item: Item) -> None:
        try:
            os.symlink(item.entry.target or b"", name, dir_fd=parent)
        except FileExistsError:
            raise _exists(item) from None
        entry = item.entry
        if self.options.owners and entry.uid is not None and entry.gid is not None:
            os.chown(name, entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)
        if entry.mtime_ns is not None:
            times = (entry.atime_ns or entry.mtime_ns, entry.mtime_ns)
            os.utime(name, ns=times, dir_fd=parent, follow_symlinks=False)
        self.result.links += 1

    def _link(self, parent: int, name: bytes, first: tuple[bytes, ...], item: Item) -> None:
        src_dir = self._dirs.get(first[:-1])
        if src_dir is None:  # the first copy's directory is finished: link by its path
            src_dir, src_name = self.root, b"/".join(first)
        else:
            src_name = first[-1]
        try:
            os.link(src_name, name, src_dir_fd=src_dir, dst_dir_fd=parent, follow_symlinks=False)
        except FileExistsError:
            raise _exists(item) from None
        self.result.links += 1

    def _special(self, parent: int, name: bytes, item: Item) -> None:
        entry = item.entry
        try:
            if entry.kind == "fifo":
                os.mkfifo(name, entry.mode & 0o777, dir_fd=parent)
            elif entry.kind in ("chardev", "blockdev") and os.geteuid() == 0:
                kind = stat.S_IFCHR if entry.kind == "chardev" else stat.S_IFBLK
                os.mknod(name, kind | (entry.mode & 0o777), entry.rdev or 0, dir_fd=parent)
            else:
                self.result.warnings.append(f"{_show(item.source)}: a {entry.kind}; not restored")
                return
        except FileExistsError:
            raise _exists(item) from None
        if self.options.owners and entry.uid is not None and entry.gid is not None:
            os.chown(name, entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)
        os.chmod(name, entry.mode, dir_fd=parent)  # never a symlink: made just above
        if entry.mtime_ns is not None:
            times = (entry.atime_ns or entry.mtime_ns, entry.mtime_ns)
            os.utime(name, ns=times, dir_fd=parent, follow_symlinks=False)

    def _xattrs(self, fs: FileSystem, fd: int, item: Item) -> None:
        for key, value in fs.xattrs(item.source).items():
            try:
                os.setxattr(fd, key, value)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES, errno.EINVAL):
                    raise
                self.result.warnings.append(
                    f"{_show(item.source)}: xattr {_show(key)} not set ({exc.strerror})"
                )

    def _metadata(self, fd: int, entry: Entry) -> None:
        if self.options.owners and entry.uid is not None and entry.gid is not None:
            os.fchown(fd, entry.uid, entry.gid)
        os.fchmod(fd, entry.mode)
        if entry.mtime_ns is not None:
            os.utime(fd, ns=(entry.atime_ns or entry.mtime_ns, entry.mtime_ns))


def _exists(item: Item) -> TargetExistsError:
    return TargetExistsError(f"{_show(b'/'.join(item.parts))} already exists in the target")


def _show(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace")
