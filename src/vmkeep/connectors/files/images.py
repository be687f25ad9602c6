"""Choosing the reader or writer for an image format, in one place, so the connector and the
restore sinks agree on what "raw" and "qcow2" mean."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from vmkeep.connectors.base import DiskReader
from vmkeep.connectors.files.qcow2 import Qcow2Reader
from vmkeep.connectors.files.qcow2_writer import Qcow2DiskWriter
from vmkeep.connectors.files.raw import RawDiskReader, RawDiskWriter

COPY_PIECE = 4 << 20


class ClosableWriter(Protocol):
    """DiskWriter as the sinks use it (our writers' `close` may be called twice)."""

    def write(self, offset: int, data: bytes) -> None: ...

    def zero(self, offset: int, length: int) -> None: ...

    def close(self) -> None: ...


def open_reader(path: Path, fmt: str, within: Path | None = None) -> DiskReader:
    """A reader for an image in format `fmt` ("raw" or "qcow2"); `within`: the directory the
    image must resolve inside (fileio.open_image)."""
    if fmt == "qcow2":
        return Qcow2Reader(path, within=within)
    return RawDiskReader(path, within=within)


def close_quietly(writers: Iterable[ClosableWriter]) -> None:
    """Close writers of a restore being aborted: the error that caused the abort is the one
    to report, not a second failure while closing."""
    for writer in writers:
        with contextlib.suppress(Exception):
            writer.close()


def new_writer(path: Path, fmt: str, size: int, within: Path | None = None) -> ClosableWriter:
    """A fresh, all-zero image of `size` bytes in format `fmt`; `path` must not exist."""
    if fmt == "qcow2":
        return Qcow2DiskWriter(path, size, within=within)
    return RawDiskWriter(path, size, within=within)


def copy_data(reader: DiskReader, writer: ClosableWriter, limit: int) -> None:
    """Copy the allocated data of `reader` below `limit` into a fresh writer (holes stay holes)."""
    for extent in reader.extents():
        if not extent.data:
            continue
        pos, end = extent.offset, min(extent.offset + extent.length, limit)
        while pos < end:
            n = min(COPY_PIECE, end - pos)
            writer.write(pos, reader.read(pos, n))
            pos += n
