"""File system adapters over the dissect libraries, one module per family. `open_filesystem`
probes each in turn by its superblock magic; the first that recognises the volume opens it."""

from __future__ import annotations

import importlib
from typing import BinaryIO, Protocol

from vmkeep.errors import UnsupportedImageError

from ..model import FileSystem

# Probed in this order; each module defines probe(fh) -> bool and open(fh, size) -> FileSystem.
ADAPTERS = ("ext", "xfs", "btrfs", "ntfs", "fat")


class Adapter(Protocol):
    def probe(self, fh: BinaryIO) -> bool: ...

    def open(self, fh: BinaryIO, size: int) -> FileSystem: ...


def open_filesystem(fh: BinaryIO, size: int, where: str) -> FileSystem:
    """The file system on the volume `fh` (`size` bytes), or UnsupportedImageError naming
    `where` (e.g. "disk0:2") when no adapter recognises it."""
    for name in ADAPTERS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError:
            continue  # an adapter not written yet
        adapter: Adapter = module
        fh.seek(0)
        if adapter.probe(fh):
            fh.seek(0)
            return adapter.open(fh, size)
    raise UnsupportedImageError(
        f"{where}: no file system vmkeep can read (ext2/3/4, XFS, btrfs, NTFS, FAT, exFAT)"
    )
