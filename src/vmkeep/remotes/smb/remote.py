"""`SmbRemote`: the Remote interface over files below a directory of an SMB share."""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO, TypeVar

from vmkeep.errors import NotFoundError, ObjectExistsError, RemoteError, UsageError

from ..base import ObjectStat
from ..parts_reader import Parts
from .files import TEMP_PREFIX, Body, ShareFiles, join
from .messages import DirEntry
from .pool import Pool
from .target import DEFAULT_PORT, Target

_T = TypeVar("_T")
_BAD_NAME_CHARS = set('\\:*?"<>|') | {chr(c) for c in range(32)}


class SmbRemote:
    """Objects are files on an SMB share, below an optional directory of it.

    Safe for concurrent use: each operation borrows its own connection. Transient failures
    (lost connection, timeouts, server busy) are retried with exponential backoff for at most
    `retry_time` seconds, then raise RemoteError."""

    def __init__(
        self,
        host: str,
        share: str,
        *,
        username: str,
        password: str,
        port: int = DEFAULT_PORT,
        path: str = "",
        connect_timeout: float = 10.0,
        request_timeout: float = 60.0,
        retry_time: float = 30.0,
        list_page_bytes: int = 65536,
        require_signing: bool = True,
        encrypt: bool | None = None,
    ) -> None:
        parts = [p for p in path.replace("\\", "/").split("/") if p]
        if any(p in (".", "..") or set(p) & _BAD_NAME_CHARS for p in parts):
            raise UsageError(f"invalid path {path!r} in the SMB share")
        self._root = "\\".join(parts)
        self._target = Target(
            host=host,
            port=port,
            share=share,
            username=username,
            password=password,
            connect_timeout=connect_timeout,
            request_timeout=request_timeout,
            require_signing=require_signing,
            encrypt=encrypt,
        )
        self._page_bytes = max(1024, list_page_bytes)
        self.list_pages = 0  # QUERY_DIRECTORY round trips so far (tests check paging with it)
        host_part = f"[{host}]" if ":" in host else host
        port_part = "" if port == DEFAULT_PORT else f":{port}"
        tail = "/" + "/".join(parts) if parts else ""
        self._share_url = f"smb://{username}@{host_part}{port_part}/{share}"
        self.url = self._share_url + tail
        self._pool = Pool(self._target, retry_time)
        self._links = True  # False once the share refused a hard link (see ShareFiles._link)
        self._finalizer = weakref.finalize(self, self._pool.close)

    def close(self) -> None:
        """Disconnect every pooled connection (also done when the remote is garbage collected)."""
        self._finalizer()

    # --- names ------------------------------------------------------------------------------

    def _path(self, name: str) -> str:
        parts = name.split("/")
        if not name or any(
            p in ("", ".", "..") or p.startswith(TEMP_PREFIX) or set(p) & _BAD_NAME_CHARS
            for p in parts
        ):
            raise RemoteError(f"invalid object name {name!r}")
        return join(self._root, "\\".join(parts))

    def _where(self, path: str) -> str:
        """`path` is relative to the share (it already includes the repository folder)."""
        return f"{self._share_url}/{path.replace(chr(92), '/')}" if path else self.url

    # --- running on a borrowed connection ---------------------------------------------------

    def _run(self, fn: Callable[[ShareFiles], _T]) -> _T:
        """Run `fn` on the share through a borrowed connection, retrying transient failures."""
        return self._pool.run(lambda conn: fn(ShareFiles(conn, self._where)))

    def _read(
        self, files: ShareFiles, path: str, name: str, offset: int, length: int | None
    ) -> bytes:
        data = files.read(path, offset, length)
        if data is None:
            raise NotFoundError(f"object {name} not found in {self.url}")
        return data

    def _scan(self, dir_path: str, pattern: str) -> list[DirEntry]:
        """Every entry of one directory; empty when it does not exist."""
        return self._run(
            lambda files: files.scan(dir_path, pattern, self._page_bytes, self._count_page)
        )

    def _count_page(self) -> None:
        self.list_pages += 1

    def _unlinker(self, path: str) -> Callable[[ShareFiles], bool]:
        return lambda files: files.unlink(path)

    # --- the Remote interface ---------------------------------------------------------------

    def put(self, name: str, data: bytes, *, overwrite: bool = True) -> None:
        """Temp file, FLUSH (the server fsyncs), then rename (or, without `overwrite`, hard
        link): readers never see a partial object, and an existing name is refused
        atomically."""
        self._put(
            name,
            data,
            overwrite,
            lambda files, path: self._read(files, path, name, 0, None) == data,
        )

    def put_file(self, name: str, file: BinaryIO, size: int) -> bool:
        """As put(overwrite=False), the body streamed from `file` (a version 2 manifest,
        docs/FORMAT.md §5.5, never held in memory): each WRITE's bytes read from it."""
        fd = file.fileno()

        def piece(offset: int, length: int) -> bytes:
            return os.pread(fd, length, offset)

        self._put(name, (size, piece), False, self._holds(name, size, piece))
        return True

    def put_parts(self, name: str, parts: Sequence[bytes | memoryview]) -> None:
        """An object made of `parts` (a data pack), each WRITE's bytes taken from them: they
        are never joined into one buffer."""
        body = Parts(parts)
        self._put(name, (body.size, body.pread), True, self._holds(name, body.size, body.pread))

    def _holds(
        self, name: str, size: int, piece: Callable[[int, int], bytes]
    ) -> Callable[[ShareFiles, str], bool]:
        """Whether the object at a path holds exactly `size` bytes as `piece` gives them,
        compared 4 MiB at a time."""

        def same(files: ShareFiles, path: str) -> bool:
            step = 4 << 20
            for at in range(0, size, step):
                n = min(step, size - at)
                if self._read(files, path, name, at, n) != piece(at, n):
                    return False
            return self._read(files, path, name, size, 1) == b""

        return same

    def _put(
        self,
        name: str,
        data: Body,
        overwrite: bool,
        same: Callable[[ShareFiles, str], bool],
    ) -> None:
        path = self._path(name)
        state = {"sent": False}  # a rename or link whose answer was lost may have happened

        def attempt(files: ShareFiles) -> None:
            maybe_done = state["sent"]
            files.links = self._links
            try:
                files.write(path, name, data, overwrite, state)
            except ObjectExistsError:
                # Our own earlier attempt may have succeeded before the connection broke.
                if maybe_done and same(files, path):
                    return
                raise
            finally:
                self._links = self._links and files.links

        self._run(attempt)

    def flush(self) -> None:
        """Nothing to do: each put FLUSHes its file before the rename, so it is durable (as
        far as the server's fsync goes) when put returns."""

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(name)
        if offset < 0 or (length is not None and length < 0):
            raise RemoteError(f"invalid range {offset}+{length} of {name}")
        return self._run(lambda files: self._read(files, path, name, offset, length))

    def stat(self, name: str) -> ObjectStat | None:
        path = self._path(name)
        opened = self._run(lambda files: files.stat(path))
        return None if opened is None else ObjectStat(name, opened.size, opened.mtime)

    def list(self, prefix: str) -> Iterator[ObjectStat]:
        """Walks only the directories the prefix can match; one directory in memory at a time."""
        head, _, tail = prefix.rpartition("/")
        base = head + "/" if head else ""
        if head and any(p in ("", ".", "..") for p in head.split("/")):
            return
        start = join(self._root, head.replace("/", "\\"))
        stack = [(start, base, tail + "*")]
        while stack:
            dir_path, rel, pattern = stack.pop()
            for entry_name, size, mtime, is_dir in self._scan(dir_path, pattern):
                name = rel + entry_name
                if is_dir:
                    if (name + "/").startswith(prefix) or prefix.startswith(name + "/"):
                        stack.append((join(dir_path, entry_name), name + "/", "*"))
                elif not entry_name.startswith(TEMP_PREFIX) and name.startswith(prefix):
                    yield ObjectStat(name, size, mtime)

    def delete(self, name: str) -> None:
        self._run(self._unlinker(self._path(name)))

    def purge_incomplete(self, older_than: float) -> int:
        """Remove temp files of dead writers older than `older_than` seconds (by the server's
        modification time: keep `older_than` well above any clock skew)."""
        limit = time.time() - older_than
        removed = 0
        stack = [self._root]
        while stack:
            dir_path = stack.pop()
            for entry_name, _size, mtime, is_dir in self._scan(dir_path, "*"):
                path = join(dir_path, entry_name)
                if is_dir:
                    stack.append(path)
                elif entry_name.startswith(TEMP_PREFIX) and mtime < limit:
                    removed += self._run(self._unlinker(path))
        return removed

    def free_space(self) -> int | None:
        """Bytes the user may still write, from FileFsFullSizeInformation; None when the
        server will not tell."""

        def attempt(files: ShareFiles) -> int | None:
            got = files.free_space(self._root)
            if got == -1:  # the repository's directory does not exist yet: ask the share
                got = files.free_space("")
            return None if got is None or got < 0 else got

        return self._run(attempt)
