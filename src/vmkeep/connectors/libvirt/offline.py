"""Backing up a shut-off domain: its disk images are read directly with vmkeep's own raw and
qcow2 readers, without starting the VM (libvirt refuses backup jobs and checkpoints on inactive
domains, LIBVIRT-NOTES §7). Always a full read of the allocated extents, change token None."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from types import TracebackType

from vmkeep.connectors.base import DiskReader, Extent
from vmkeep.connectors.files.qcow2 import Qcow2Reader
from vmkeep.connectors.files.raw import RawDiskReader
from vmkeep.connectors.libvirt.domxml import DomainDisk
from vmkeep.errors import ConnectorError

log = logging.getLogger(__name__)


class ImageDiskReader:
    """A disk image of a shut-off domain. No dirty tracking: dirty_since is always None."""

    def __init__(self, disk: DomainDisk) -> None:
        if not disk.source or disk.source_type not in ("file", "block"):
            raise ConnectorError(
                f"disk {disk.target} ({disk.source_type}) has no local image to read while the "
                "domain is shut off"
            )
        self._inner: Qcow2Reader | RawDiskReader
        if disk.fmt == "qcow2":
            self._inner = Qcow2Reader(disk.source)
        elif disk.fmt == "raw":
            self._inner = RawDiskReader(disk.source)
        else:
            raise ConnectorError(f"disk {disk.target}: image format {disk.fmt!r} is not supported")
        self.size = self._inner.size
        self.change_token: str | None = None
        self.dirty_since: str | None = None

    def extents(self) -> Iterator[Extent]:
        return self._inner.extents()

    def dirty_extents(self) -> Iterator[Extent]:
        """Unknown: everything."""
        yield Extent(0, self.size, data=True)

    def read(self, offset: int, length: int) -> bytes:
        return self._inner.read(offset, length)

    def close(self) -> None:
        self._inner.close()


class OfflineBackupSession:
    """Readers over the images; finish only closes them (nothing was created)."""

    def __init__(self, domain_name: str, disks: list[DomainDisk]) -> None:
        self.domain_name = domain_name
        self.notes: list[str] = [f"domain {domain_name} is shut off: full read of its images"]
        self.readers: dict[str, DiskReader] = {}
        try:
            for d in disks:
                self.readers[d.target] = ImageDiskReader(d)
        except BaseException:
            self.finish(ok=False)
            raise
        for note in self.notes:
            log.info("%s", note)

    def finish(self, ok: bool) -> None:
        for reader in self.readers.values():
            with contextlib.suppress(Exception):
                reader.close()

    def __enter__(self) -> OfflineBackupSession:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.finish(ok=et is None)
