"""What every file system adapter shares: path walking with symlinks, hostile-name
filtering, a small directory lookup cache, and a guard that turns any parser failure on a
hostile image into an ImageError within a bounded amount of work.

The dissect parsers trust the image: a B-tree node that points at itself, a directory whose
size claims terabytes or a truncated structure would make them loop, recurse or raise
anything from EOFError to KeyError. Every call into them therefore runs under `guard()`:
reads of the volume are counted against a per-operation budget (bytes and read calls), and
any exception that is not already a VmkeepError becomes one ImageError naming the file
system. Data reads of a file opened with `open()` are not budgeted (a 10 GiB file is
legitimate); they are wrapped so their failures become ImageErrors too.
"""

from __future__ import annotations

import io
import stat
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO, Generic, TypeVar, cast

from vmkeep.errors import ImageError, NotFoundError, VmkeepError

from ..model import Entry, FsInfo

N = TypeVar("N")

SYMLINK_HOPS = 40  # like Linux's MAXSYMLINKS
MAX_DEPTH = 4096  # path components: a deeper path is a hostile image, not a guest's tree
BUDGET_BYTES = 512 << 20  # volume bytes one operation (a lookup, one listed entry) may read
BUDGET_READS = 200_000  # and read calls: a loop in a tree ends here, in seconds
MAX_READ = 64 << 20  # one metadata read (a hostile block size must not allocate more)
MAX_WARNINGS = 100
DIR_CACHE_DIRS, DIR_CACHE_ENTRIES = 8, 10_000  # directories whose names lookups keep


class WorkBudget:
    """Work left for the operation in progress; None outside one (data reads are free)."""

    def __init__(self) -> None:
        self.bytes: int | None = None
        self.reads = 0

    def start(self) -> tuple[int | None, int]:
        saved = (self.bytes, self.reads)
        self.bytes, self.reads = BUDGET_BYTES, BUDGET_READS
        return saved

    def restore(self, saved: tuple[int | None, int]) -> None:
        self.bytes, self.reads = saved

    def charge(self, length: int) -> None:
        if self.bytes is None:
            return
        if length > MAX_READ:
            raise ImageError(f"a structure asks for a read of {length} bytes at once")
        self.bytes -= max(length, 0)
        self.reads -= 1
        if self.bytes < 0 or self.reads < 0:
            raise ImageError(
                "too much work for one step (a loop or an absurd size in the structure?)"
            )


class VolumeFile(io.RawIOBase):
    """The volume as the parsers see it: reads past `size` are short, and every read is
    charged to the budget before it happens (so a hostile length never allocates)."""

    def __init__(self, fh: BinaryIO, size: int, budget: WorkBudget) -> None:
        super().__init__()
        self._fh = fh
        self._size = size
        self._pos = 0
        self._budget = budget

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ImageError("a structure points before the start of the volume")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        end = self._size if size is None or size < 0 else min(self._size, self._pos + size)
        length = max(0, end - self._pos)
        self._budget.charge(length)
        if length == 0:
            return b""
        self._fh.seek(self._pos)
        data = self._fh.read(length)
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class GuardedStream(io.RawIOBase):
    """A file's content stream from a parser, whose failures become ImageErrors."""

    def __init__(self, inner: BinaryIO, size: int, what: str) -> None:
        super().__init__()
        self._inner = inner
        self._size = size
        self._what = what

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (VmkeepError, MemoryError):
            raise
        except Exception as exc:
            detail = f"{type(exc).__name__}: {exc}"[:200]
            raise ImageError(f"{self._what}: unreadable content ({detail})") from exc

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return cast(int, self._call(lambda: self._inner.seek(offset, whence)))

    def tell(self) -> int:
        return cast(int, self._call(self._inner.tell))

    def read(self, size: int | None = -1) -> bytes:
        position = self.tell()
        left = max(0, self._size - position)
        want = left if size is None or size < 0 else min(size, left)
        data = cast(bytes, self._call(lambda: self._inner.read(want)))
        if len(data) < want:
            raise ImageError(
                f"{self._what}: content at {position + len(data)} lies past the end of the volume"
            )
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def show(path: bytes) -> str:
    """A path for a message: undecodable bytes and control characters escaped, so a name in
    the image cannot write escape sequences to a terminal or split a log line."""
    text = path.decode(errors="backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def hostile_name(name: bytes) -> bool:
    """A name that would mean something else on extraction (or nothing at all)."""
    return name in (b"", b".", b"..") or b"/" in name or b"\x00" in name


def split_path(path: bytes) -> list[bytes]:
    """The components of an absolute or relative path, without empty ones and ".";
    ".." is kept (resolved against the walked parents, never above the root)."""
    parts = [p for p in path.split(b"/") if p and p != b"."]
    if len(parts) > MAX_DEPTH:
        raise ImageError(f"path too deep ({len(parts)} components)")
    return parts


def reraise_ours(exc: Exception) -> None:
    """In a handler that turns a library's parsing failure into ImageError: vmkeep's own
    errors (ImageError, a repository's IntegrityError, a remote's) pass through as they are."""
    if isinstance(exc, VmkeepError):
        raise exc


class NodeFileSystem(Generic[N]):
    """The FileSystem protocol over a parser's nodes. Subclasses say how to get a node's
    children, metadata, link target, content and xattrs; this class walks paths (following
    symlinks in directory components, at most 40 hops, never leaving the file system),
    filters hostile names and guards every call."""

    dot_entries = True  # the directories store "." and ".." (first of each dropped silently)

    def __init__(self, fh: BinaryIO, size: int, info: FsInfo) -> None:
        self.info = info
        self.budget = WorkBudget()
        self.volume = VolumeFile(fh, size, self.budget)
        self._dirs: OrderedDict[Hashable, dict[bytes, tuple[bytes, N]]] = OrderedDict()

    # --- what a subclass provides -------------------------------------------------------
    def _root(self) -> N:
        raise NotImplementedError

    def _children(self, node: N) -> Iterator[tuple[bytes, N]]:
        """(name, node) of a directory, in on-disk order; may include "." and ".."."""
        raise NotImplementedError

    def _find(self, node: N, name: bytes) -> tuple[bytes, N] | None:
        """The stored name and node of the child named `name` (compared through `_fold`),
        or None. The default scans the directory once and keeps the names of a few small
        directories, so walking a tree is not quadratic."""
        key = self._dir_key(node)
        cached = self._dirs.get(key)
        wanted = self._fold(name)
        if cached is not None:
            self._dirs.move_to_end(key)
            return cached.get(wanted)
        names: dict[bytes, tuple[bytes, N]] | None = {}
        found = None
        left = (self.budget.bytes, self.budget.reads)
        try:
            for child_name, child in self._children(node):
                folded = self._fold(child_name)
                if folded == wanted and found is None:
                    found = (child_name, child)
                    left = (self.budget.bytes, self.budget.reads)
                if names is not None:
                    names.setdefault(folded, (child_name, child))
                    if len(names) > DIR_CACHE_ENTRIES:
                        names = None
                        if found is not None:
                            return found
                elif found is not None:
                    return found
        except MemoryError:
            raise
        except Exception:
            if found is None:
                raise
            # a corrupt entry or too much work after it: the name is still found, as if the
            # scan had stopped there (the budget it had then), and nothing is cached
            self.budget.bytes, self.budget.reads = left
            return found
        if names is not None:
            self._dirs[key] = names
            if len(self._dirs) > DIR_CACHE_DIRS:
                self._dirs.popitem(last=False)
        return found

    def _fold(self, name: bytes) -> bytes:
        """A name as lookups compare it: as stored; a case-insensitive file system folds."""
        return name

    def _dir_key(self, node: N) -> Hashable:
        """What identifies a directory in the lookup cache (e.g. its inode number)."""
        raise NotImplementedError

    def _entry(self, name: bytes, node: N) -> Entry:
        raise NotImplementedError

    def _kind(self, node: N) -> str:
        raise NotImplementedError

    def _link(self, node: N) -> bytes:
        raise NotImplementedError

    def _open(self, node: N, stream: bytes | None) -> tuple[BinaryIO, int]:
        """The content stream and its size."""
        raise NotImplementedError

    def _xattrs(self, node: N) -> dict[bytes, bytes]:
        return {}

    # --- the FileSystem protocol --------------------------------------------------------
    @contextmanager
    def guard(self, what: bytes | str) -> Iterator[None]:
        """Budget the work inside and turn any parser failure into an ImageError."""
        shown = show(what) if isinstance(what, bytes) else what
        saved = self.budget.start()
        try:
            yield
        except (VmkeepError, MemoryError):
            raise  # a MemoryError is a bound this code failed to keep: not the image's fault
        except EOFError as exc:
            raise ImageError(
                f"{self.info.type_name}: {shown}: a structure lies past the end of the volume "
                "(a truncated image?)"
            ) from exc
        except RecursionError as exc:
            raise ImageError(
                f"{self.info.type_name}: {shown}: structure nested too deeply (a loop?)"
            ) from exc
        except Exception as exc:
            detail = f"{type(exc).__name__}: {exc}"[:200]
            raise ImageError(
                f"{self.info.type_name}: {shown}: corrupt structure ({detail})"
            ) from exc
        finally:
            self.budget.restore(saved)

    def warn(self, message: str) -> None:
        """A warning for the caller, once per message and bounded in number (a hostile
        directory repeats itself)."""
        if message in self.info.warnings:
            return
        if len(self.info.warnings) < MAX_WARNINGS:
            self.info.warnings.append(message)
        elif len(self.info.warnings) == MAX_WARNINGS:
            self.info.warnings.append("more warnings left out")

    def lookup(self, path: bytes) -> Entry:
        with self.guard(path):
            name, node = self._resolve(path)
            return self._entry(name, node)

    def listdir(self, path: bytes) -> Iterator[Entry]:
        with self.guard(path):
            _, node = self._resolve(path)
            if self._kind(node) != "dir":
                raise NotFoundError(f"{show(path)}: not a directory")
            children = self._children(node)
        seen_dot = seen_dotdot = False
        while True:
            with self.guard(path):
                item = next(children, None)
                if item is None:
                    return
                name, child = item
                if self.dot_entries and name == b"." and not seen_dot:
                    seen_dot = True
                    continue
                if self.dot_entries and name == b".." and not seen_dotdot:
                    seen_dotdot = True
                    continue
                if hostile_name(name):
                    shown = show(path)
                    self.warn(f"{shown}: skipped an entry with an invalid name {name!r}")
                    continue
            try:
                with self.guard(path + b"/" + name):
                    entry = self._entry(name, child)
            except ImageError as exc:
                self.warn(f"{show(path)}: skipped {show(name)}: {exc}")
                continue
            yield entry

    def open(self, path: bytes, stream: bytes | None = None) -> BinaryIO:
        with self.guard(path):
            _, node = self._resolve(path)
            if self._kind(node) != "file" and stream is None:
                raise NotFoundError(f"{show(path)}: not a regular file")
            inner, size = self._open(node, stream)
        raw = GuardedStream(inner, size, f"{self.info.type_name}: {show(path)}")
        return cast(BinaryIO, raw)

    def xattrs(self, path: bytes) -> dict[bytes, bytes]:
        with self.guard(path):
            _, node = self._resolve(path)
            return self._xattrs(node)

    def _resolve(self, path: bytes) -> tuple[bytes, N]:
        """The last component's stored name and node; symlinks in directory components
        followed (at most SYMLINK_HOPS, expanding to at most MAX_DEPTH components)."""
        parts = [(p, False) for p in split_path(path)]
        stack: list[tuple[bytes, N]] = [(b"/", self._root())]
        hops = 0
        while parts:
            part, from_link = parts.pop(0)
            if part == b"..":
                if len(stack) > 1:
                    stack.pop()
                continue
            parent = stack[-1][1]
            if self._kind(parent) != "dir":
                raise self._missing(path, from_link, "a component is not a directory")
            found = None if hostile_name(part) else self._find(parent, part)
            if found is None:
                raise self._missing(path, from_link, "no such file or directory")
            part, child = found
            if parts and self._kind(child) == "symlink":
                hops += 1
                if hops > SYMLINK_HOPS:
                    raise ImageError(f"{show(path)}: too many levels of symbolic links")
                target = self._link(child)
                if target.startswith(b"/"):
                    del stack[1:]
                parts[:0] = [(p, True) for p in target.split(b"/") if p and p != b"."]
                if len(parts) > MAX_DEPTH:
                    raise ImageError(f"{show(path)}: symbolic links expand too deep")
                continue
            stack.append((part, child))
        return stack[-1]

    def _missing(self, path: bytes, from_link: bool, why: str) -> VmkeepError:
        """Not found for a path as given; an ImageError when a symlink's target is (dangling)."""
        shown = show(path)
        if from_link:
            return ImageError(f"{shown}: a symbolic link on the way leads nowhere ({why})")
        return NotFoundError(f"{shown}: {why}")


def kind_of_mode(mode: int) -> str:
    """The Entry kind of a POSIX st_mode."""
    fmt = stat.S_IFMT(mode)
    return {
        stat.S_IFREG: "file",
        stat.S_IFDIR: "dir",
        stat.S_IFLNK: "symlink",
        stat.S_IFIFO: "fifo",
        stat.S_IFSOCK: "socket",
        stat.S_IFCHR: "chardev",
        stat.S_IFBLK: "blockdev",
    }.get(fmt, "other")
