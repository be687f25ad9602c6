"""The small interface every remote implements (DESIGN.md: get/put/list/delete/stat, ranged get)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol


@dataclass(frozen=True)
class ObjectStat:
    name: str
    size: int
    mtime: float  # seconds since the epoch


class Remote(Protocol):
    """Object names use "/" separators, e.g. "chunks/ab/ab12...". Writes are atomic: an object
    is either absent or complete, never partial, whatever happens to the writer."""

    url: str

    def put(self, name: str, data: bytes, *, overwrite: bool = True) -> None:
        """Store `data` atomically. With overwrite=False, raise ObjectExistsError if `name`
        exists. The object may become durable only at the next `flush`."""
        ...

    def flush(self) -> None:
        """Make every completed put durable (a barrier: backups call it before the manifest)."""
        ...

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read an object, or a range of it; raises NotFoundError."""
        ...

    def stat(self, name: str) -> ObjectStat | None:
        """None when the object does not exist."""
        ...

    def list(self, prefix: str) -> Iterator[ObjectStat]:
        """Every complete object whose name starts with `prefix`, in no particular order."""
        ...

    def delete(self, name: str) -> None:
        """Delete; deleting a missing object is not an error."""
        ...

    def free_space(self) -> int | None:
        """Bytes available, or None when the remote cannot tell."""
        ...

    def purge_incomplete(self, older_than: float) -> int:
        """Remove what dead writers left half-done (temp files, unfinished multipart uploads)
        older than `older_than` seconds; returns how many. Only `gc` calls it."""
        ...


def put_parts(remote: Remote, name: str, parts: list[bytes]) -> None:
    """Store the object made of `parts`, emptying the list. A remote with a `put_parts` of its
    own (LocalRemote: one writev) writes the pieces as they are; the others get them joined
    into one `put`, the pieces freed before it sends (no second copy held while it waits)."""
    put = getattr(remote, "put_parts", None)
    if callable(put):
        put(name, parts)
        parts.clear()
        return
    data = b"".join(parts)
    parts.clear()
    remote.put(name, data)


def put_file(remote: Remote, name: str, file: BinaryIO, size: int) -> None:
    """Store the first `size` bytes of `file` (exactly its length) as a new object
    (create-if-absent). A remote with a `put_file` of its own takes it from the file
    (LocalRemote: a copy in the kernel; S3: a streamed PUT; SMB: each WRITE read from it;
    Azure: staged blocks); the others, and those whose `put_file` declines, get its bytes
    (held once while they send)."""
    put = getattr(remote, "put_file", None)
    if callable(put) and put(name, file, size):
        return
    data = bytearray()
    while len(data) < size:
        piece = os.pread(file.fileno(), min(size - len(data), 16 << 20), len(data))
        if not piece:
            raise OSError(f"{name}: its temporary file ended at {len(data)} of {size} bytes")
        data += piece
    remote.put(name, bytes(data), overwrite=False)
