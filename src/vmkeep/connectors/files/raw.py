"""Raw disk images: sparse-aware reading (SEEK_DATA/SEEK_HOLE) and sparse writing, so backups
read only allocated data and restores leave holes where the disk was never written."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

from vmkeep.connectors.base import Extent
from vmkeep.connectors.files.direct_io import (
    DirectWrites,
)
from vmkeep.connectors.files.fileio import (
    change_token,
    check_write,
    open_image,
    pread_full,
    pwrite_all,
    pwritev_all,
    start_writeback,
    write_zeros,
)
from vmkeep.errors import ConnectorError


class RawDiskReader:
    """Read view of a raw image; the disk size is the file size. `read` is thread-safe (pread)."""

    def __init__(self, path: Path | str, *, within: Path | None = None) -> None:
        self.path = Path(path)
        self._fd = open_image(self.path, within=within)
        self.size = os.fstat(self._fd).st_size
        self.change_token: str | None = "raw:" + change_token(self._fd)
        self.dirty_since: str | None = None  # set by FilesBackupSession when unchanged

    def extents(self) -> Iterator[Extent]:
        """Data and hole extents covering [0, size); one data extent if the FS cannot tell."""
        pos = 0
        while pos < self.size:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                    yield Extent(pos, self.size - pos, data=False)
                    return
                if pos == 0:  # SEEK_DATA unsupported: report everything as data
                    yield Extent(0, self.size, data=True)
                    return
                raise ConnectorError(f"cannot map {self.path}: {exc.strerror}") from None
            data = min(data, self.size)
            if data > pos:
                yield Extent(pos, data - pos, data=False)
            if data >= self.size:
                return
            try:
                hole = os.lseek(self._fd, data, os.SEEK_HOLE)
            except OSError as exc:
                raise ConnectorError(f"cannot map {self.path}: {exc.strerror}") from None
            hole = min(hole, self.size)
            yield Extent(data, hole - data, data=True)
            pos = hole

    def dirty_extents(self) -> Iterator[Extent]:
        """Images carry no change tracking: a delta base exists only when nothing changed."""
        return iter(())

    def read(self, offset: int, length: int) -> bytes:
        """Bytes at [offset, offset+length), fewer only at the end of the disk."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        try:
            data = pread_full(self._fd, length, offset)
        except OSError as exc:
            raise ConnectorError(f"cannot read {self.path}: {exc.strerror}") from None
        if len(data) < length:  # the file shrank under us: the missing tail reads as zeros
            data += bytes(length - len(data))
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class RawDiskWriter:
    """Writes a raw image of `size` bytes. A created file starts as one hole (all zeros) and
    must not exist yet (never written through a planted symlink); with `create=False` an
    existing file is written in place, its data kept. `within`: see fileio.open_image."""

    def __init__(
        self, path: Path | str, size: int, *, create: bool = True, within: Path | None = None
    ) -> None:
        if size < 0:
            raise ValueError("negative disk size")
        self.path = Path(path)
        self.size = size
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        self._fd = open_image(self.path, flags, within=within)
        try:
            if os.fstat(self._fd).st_size != size:
                os.ftruncate(self._fd, size)
        except OSError as exc:
            os.close(self._fd)
            raise ConnectorError(f"cannot resize {self.path}: {exc.strerror}") from None
        # Aligned writes (all but a disk's odd tail) bypass the page cache: direct_io.py.
        self._direct = DirectWrites(str(self.path), self._fd)

    def _check(self, offset: int, length: int) -> None:
        check_write(self.path, self._fd, self.size, offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        try:
            if not self._write_direct(offset, data):
                self._drain()  # a buffered write must not race a direct one in flight
                pwrite_all(self._fd, data, offset)
                start_writeback(self._fd, offset, len(data))
        except OSError as exc:
            raise ConnectorError(f"cannot write {self.path}: {exc.strerror}") from None

    def write_parts(self, offset: int, parts: list[bytes]) -> None:
        """Write consecutive parts at `offset` without joining them first (one copy into
        the O_DIRECT buffer, or one pwritev)."""
        length = sum(len(p) for p in parts)
        self._check(offset, length)
        try:
            if not self._write_direct(offset, parts, length):
                self._drain()
                pwritev_all(self._fd, parts, offset)
                start_writeback(self._fd, offset, length)
        except OSError as exc:
            raise ConnectorError(f"cannot write {self.path}: {exc.strerror}") from None

    def _write_direct(self, offset: int, data: bytes | list[bytes], length: int = -1) -> bool:
        parts = [data] if isinstance(data, bytes | bytearray | memoryview) else data
        return self._direct.write(parts, offset, len(data) if length < 0 else length)

    def _drain(self) -> None:
        self._direct.drain()

    def zero(self, offset: int, length: int) -> None:
        """Punch a hole (the range reads as zeros); writes zeros where punching is unsupported."""
        length = max(0, min(length, self.size - offset))
        self._check(offset, length)
        try:
            self._drain()  # no direct write in flight under a hole being punched
            write_zeros(self._fd, offset, length)
        except OSError as exc:
            raise ConnectorError(f"cannot zero {self.path}: {exc.strerror}") from None

    def close(self) -> None:
        """fsync and close; calling it again does nothing."""
        if self._fd < 0:
            return
        try:
            self._drain()
            os.fsync(self._fd)
        except OSError as exc:
            raise ConnectorError(f"cannot flush {self.path}: {exc.strerror}") from None
        finally:
            self._direct.close()
            os.close(self._fd)
            self._fd = -1
