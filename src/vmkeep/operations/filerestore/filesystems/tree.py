"""Path walking shared by the adapters: one place that splits paths, follows symlinks in
directory components (bounded, inside the file system) and refuses hostile entry names, so
each adapter only says how to list a directory and describe a node."""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO, Generic, TypeVar

from vmkeep.errors import ImageError, NotFoundError, VmkeepError

from ..model import Entry, FsInfo

MAX_HOPS = 40  # symlinks followed while resolving one path, as Linux (ELOOP)
MAX_DEPTH = 4096  # path components: a deeper path is a hostile image, not a guest's tree

N = TypeVar("N")


def reraise_ours(exc: Exception) -> None:
    """In a handler that turns a library's parsing failure into ImageError: vmkeep's own
    errors (ImageError, a repository's IntegrityError, a remote's) pass through as they are."""
    if isinstance(exc, VmkeepError):
        raise exc


def split_path(path: bytes) -> list[bytes]:
    """The components of an absolute or relative path, without empty ones and ".";
    ".." is kept (resolved against the walked parents, never above the root)."""
    parts = [p for p in path.split(b"/") if p and p != b"."]
    if len(parts) > MAX_DEPTH:
        raise ImageError(f"path too deep ({len(parts)} components)")
    return parts


def bad_name(name: bytes) -> bool:
    """A name no guest's file system may hold in a directory: extracting it could escape."""
    return name in (b"", b".", b"..") or b"/" in name or b"\x00" in name


class NodeFS(Generic[N]):
    """The FileSystem protocol over an adapter's nodes. Subclasses give the root, the raw
    children of a directory node (name, node), and what a node is."""

    info: FsInfo

    # -- what an adapter provides ------------------------------------------------

    def _root(self) -> N:
        raise NotImplementedError

    def _children(self, node: N) -> Iterator[tuple[bytes, N]]:
        """Raw (name, node) pairs of a directory, "." and ".." included if stored."""
        raise NotImplementedError

    def _entry(self, name: bytes, node: N) -> Entry:
        raise NotImplementedError

    def _open_node(self, node: N, path: bytes, stream: bytes | None) -> BinaryIO:
        raise NotImplementedError

    def _xattrs_of(self, node: N) -> dict[bytes, bytes]:
        return {}

    # -- the FileSystem protocol -------------------------------------------------

    def lookup(self, path: bytes) -> Entry:
        name, node = self._resolve(path)
        return self._entry(name, node)

    def listdir(self, path: bytes) -> Iterator[Entry]:
        _, node = self._resolve(path)
        entry = self._entry(b"/", node)
        if entry.kind != "dir":
            raise ImageError(f"{_show(path)} is not a directory")
        yield from self._valid_children(node, path)

    def open(self, path: bytes, stream: bytes | None = None) -> BinaryIO:
        _, node = self._resolve(path)
        kind = self._entry(b"/", node).kind
        if kind != "file":
            raise ImageError(f"{_show(path)} is not a regular file ({kind})")
        return self._open_node(node, path, stream)

    def xattrs(self, path: bytes) -> dict[bytes, bytes]:
        _, node = self._resolve(path)
        return self._xattrs_of(node)

    # -- walking -----------------------------------------------------------------

    def _valid_children(self, node: N, path: bytes) -> Iterator[Entry]:
        """Entries without the normal "." and ".."; a second "." or "..", an empty name or one
        with "/" or NUL is skipped with a warning (a hostile image)."""
        seen_dots: set[bytes] = set()
        for name, child in self._children(node):
            if name in (b".", b"..") and name not in seen_dots:
                seen_dots.add(name)
                continue
            if bad_name(name):
                self.warn(f"{_show(path)}: skipped an entry with an unsafe name {name!r}")
                continue
            try:
                yield self._entry(name, child)
            except ImageError as exc:
                self.warn(f"{_show(path)}: skipped {_show(name)}: {exc}")

    def _find(self, node: N, name: bytes) -> tuple[bytes, N] | None:
        """The stored name and node of `name` in a directory."""
        for child_name, child in self._children(node):
            if child_name == name:
                return child_name, child
        return None

    def _resolve(self, path: bytes) -> tuple[bytes, N]:
        """The node at `path`; symlinks are followed in directory components only."""
        todo = split_path(path)
        todo.reverse()
        stack: list[tuple[bytes, N]] = [(b"/", self._root())]
        hops = 0
        while todo:
            part = todo.pop()
            if part == b"..":
                if len(stack) > 1:
                    stack.pop()
                continue
            parent = stack[-1][1]
            if self._entry(b"/", parent).kind != "dir":
                raise NotFoundError(f"{_show(path)}: {_show(stack[-1][0])} is not a directory")
            found = self._find(parent, part)
            if found is None or bad_name(part):
                raise NotFoundError(f"no such file or directory: {_show(path)}")
            part, child = found
            entry = self._entry(part, child)
            if entry.kind == "symlink" and todo:
                hops += 1
                if hops > MAX_HOPS:
                    raise ImageError(f"{_show(path)}: too many levels of symbolic links")
                target = split_path(entry.target or b"")
                if (entry.target or b"").startswith(b"/"):
                    stack = stack[:1]
                todo.extend(reversed(target))
                if len(todo) > MAX_DEPTH:
                    raise ImageError(f"{_show(path)}: symbolic links expand too deep")
                continue
            stack.append((part, child))
        return stack[-1]

    def warn(self, message: str) -> None:
        """A warning kept once per message (bounded: a hostile directory repeats itself)."""
        if message not in self.info.warnings and len(self.info.warnings) < 1000:
            self.info.warnings.append(message)


def _show(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace")
