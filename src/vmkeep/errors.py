"""Error types. Each carries a one-line message meant for the user; the CLI prints it and exits."""

from __future__ import annotations

from datetime import datetime


class VmkeepError(Exception):
    """Base of every error a user can cause or meet. `exit_code` is what the CLI returns."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(VmkeepError):
    """Bad arguments or configuration."""

    exit_code = 2


class NotFoundError(VmkeepError):
    """A VM, restore point, disk, remote or object that does not exist."""


class ConnectorError(VmkeepError):
    """The hypervisor side failed: unreadable image, malformed vm.json, unsupported format."""


class NameTakenError(ConnectorError):
    """A restore's new VM name (or its volumes) already exists at the target."""


class RemoteError(VmkeepError):
    """The storage side failed: permission denied, no space, unreachable."""


class ObjectExistsError(RemoteError):
    """An object that must not be overwritten already exists."""


class RemoteFullError(RemoteError):
    """The remote has no space left."""


class RepositoryError(VmkeepError):
    """The repository is missing, of an unknown format, or inconsistent."""


class WrongPassphraseError(RepositoryError):
    """No wrapped key opens with the given passphrase."""


class IntegrityError(RepositoryError):
    """An object failed its authentication or hash check: corruption or tampering."""

    exit_code = 3


class LockedError(RepositoryError):
    """Another process holds a conflicting lock on the repository."""

    def __init__(self, message: str, holder: str = "", scope: str = "") -> None:
        super().__init__(message)
        self.holder = holder
        self.scope = scope


class ObjectLockedError(RemoteError):
    """The remote refused to delete or overwrite an object under a retention lock (S3 Object
    Lock, or a file with the immutable attribute). `until` is when it unlocks, when known."""

    def __init__(self, message: str, name: str = "", until: datetime | None = None) -> None:
        super().__init__(message)
        self.name = name
        self.until = until


class LockLostError(RepositoryError):
    """This process can no longer prove it held its repository lock throughout (a refresh
    failed, a pause longer than the lease allows, the lock object removed or replaced)."""


class GcOverlapError(RepositoryError):
    """A gc ran during a backup and the backup cannot prove that every chunk it references
    survived: the restore point is not written (or withdrawn)."""


class StateError(VmkeepError):
    """vmkeep's own state (data directory, database, server key, secrets) cannot be used:
    a full disk, a read-only or corrupt database, a key file with loose permissions."""


class ReportError(UsageError):
    """A report setting (SMTP, webhook) or a run handed to the report engine is malformed."""


class DeliveryError(VmkeepError):
    """A report could not be sent (SMTP or webhook refused, unreachable, timed out). Never
    fails a run: the report engine logs it and queues the report for a retry."""


class ServerError(VmkeepError):
    """`vmkeep server` cannot run: another server already runs on the same data directory."""


class TaskCancelled(VmkeepError):
    """A job run's task stopped because the run was cancelled or its VM timed out; the
    operation aborted through its own path, so no partial restore point was written."""

    exit_code = 130


class ImageError(VmkeepError):
    """A disk image's partition table, volume manager or file system cannot be read (corrupt,
    hostile or unsupported): file restore, mount and export say which and where."""


class UnsupportedImageError(ImageError):
    """A partition, volume or file system type that vmkeep does not read."""
