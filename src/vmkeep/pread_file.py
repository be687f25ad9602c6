"""A positioned, read-only file object over anything that reads at an offset.

The disk of a restore point, a partition or LV inside it, and an ext volume with its journal
replayed in memory all read by offset (`pread`); the parsers that read them (dissect, tar,
shutil) want a file object with a position. One wrapper serves them all."""

from __future__ import annotations

import io
from typing import Protocol


class Preadable(Protocol):
    """Reads up to `length` bytes at `offset`; short only at the end."""

    @property
    def size(self) -> int: ...

    def pread(self, offset: int, length: int) -> bytes: ...


class PreadFile(io.RawIOBase):
    """A file object with its own position over a Preadable."""

    def __init__(self, source: Preadable) -> None:
        super().__init__()
        self.source = source
        self.size = source.size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        memoryview(buffer)[: len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = max(self.size - self._pos, 0)
        data = self.source.pread(self._pos, size)
        self._pos += len(data)
        return data
