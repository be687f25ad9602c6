"""A backup read of a files-connector VM: one reader per disk image, opened together."""

from __future__ import annotations

from vmkeep.connectors.base import DiskReader, VmConfig


class FilesBackupSession:
    """Image files have no snapshots or dirty bitmaps. What they have is an identity + ctime
    token: when it equals the previous restore point's, the image did not change, and the
    reader reports "dirty since that token: nothing", so the engine reads nothing."""

    def __init__(
        self, vm: VmConfig, readers: dict[str, DiskReader], previous: dict[str, str | None]
    ) -> None:
        self.readers = readers
        self.notes: list[str] = []
        for name, reader in readers.items():
            token = previous.get(name)
            if token is not None and token == reader.change_token:
                reader.dirty_since = token

    def confirm(self) -> None:
        """Nothing to check: files have no snapshot that could be lost."""

    def finish(self, ok: bool) -> None:
        for reader in self.readers.values():
            reader.close()
