"""The one interface every hypervisor connector implements."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

# VmConfig.metadata key of a VM's tags (a list of strings), set by every connector that has
# them (files: vm.json `tags`; libvirt: the domain's vmkeep metadata, title and description).
# Job VM selection (engine/jobs/selection.py) matches on it.
TAGS_KEY = "vmkeep.tags"
MAX_TAG_LENGTH = 64


def is_valid_tag(tag: object) -> bool:
    """A tag is 1-64 printable characters without white space (so lists of tags can be
    written separated by spaces or commas, and selection rules compare them exactly)."""
    return (
        isinstance(tag, str)
        and 1 <= len(tag) <= MAX_TAG_LENGTH
        and "," not in tag
        and all(c.isprintable() and not c.isspace() for c in tag)
    )


@dataclass(frozen=True)
class Extent:
    """A byte range of a disk. `data` False means a hole: it reads as zeros."""

    offset: int
    length: int
    data: bool = True


@dataclass
class DiskInfo:
    """What the repository records about one disk of a VM."""

    name: str  # stable key inside the VM, e.g. "disk0" or "vda"
    size: int  # virtual size in bytes
    format: str = "raw"  # on-hypervisor format: "raw" or "qcow2"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class VmConfig:
    """Hypervisor-neutral description of a VM; `metadata` carries the connector's own fields."""

    name: str
    uuid: str
    vcpus: int
    memory: int  # bytes
    disks: list[DiskInfo]
    metadata: dict[str, Any] = field(default_factory=dict)


class DiskReader(Protocol):
    """A point-in-time read view of one disk."""

    size: int
    # Names the state this reader shows (files: image identity + ctime; libvirt: the checkpoint
    # this backup creates); the manifest records it so the next delta can name its base.
    change_token: str | None
    # The token dirty_extents() is relative to; None when the connector cannot tell what
    # changed, and then the engine reads every allocated chunk.
    dirty_since: str | None

    def extents(self) -> Iterator[Extent]:
        """Cover [0, size) in order; holes may be reported coarsely but never data as a hole."""
        ...

    def dirty_extents(self) -> Iterator[Extent]:
        """Ranges changed since `dirty_since` (a superset is fine, a subset is corruption)."""
        ...

    def read(self, offset: int, length: int) -> bytes:
        """Read `length` bytes (fewer only at the end of the disk). Safe to call from threads."""
        ...

    def close(self) -> None: ...


class DiskWriter(Protocol):
    """A disk being restored. Regions never written stay holes (read as zeros)."""

    def write(self, offset: int, data: bytes) -> None:
        """Write `data` at `offset`. Called from one thread at a time, offsets in any order."""
        ...

    def zero(self, offset: int, length: int) -> None:
        """Make the range read as zeros, as a hole where the format allows (punch/unmap).
        On a freshly created disk the restore never calls it: new disks start all zeros."""
        ...

    def close(self) -> None:
        """Flush and make the disk durable."""
        ...


class BackupSession(Protocol):
    """One consistent point-in-time read of all a VM's disks (a snapshot, a backup job)."""

    readers: dict[str, DiskReader]  # by disk name
    notes: list[str]  # e.g. why a disk is read in full although a delta was asked for

    def confirm(self) -> None:
        """Called once every disk is read, before the restore point is written: raise
        ConnectorError when the point-in-time view may have been lost during the read (a
        backup job ended from outside, a shut-off VM started), so no mixed point is saved."""
        ...

    def finish(self, ok: bool) -> None:
        """End the read. Not ok: forget the state this session created, so no later delta
        takes it as a base (its restore point was never written)."""
        ...


class BackupSource(Protocol):
    """What a backup needs from a hypervisor: find VMs and read their disks at one instant."""

    def list_vms(self) -> list[VmConfig]: ...

    def get_vm(self, ref: str) -> VmConfig:
        """Find a VM by name, uuid or location; raises NotFoundError."""
        ...

    def begin_backup(self, vm: VmConfig, previous: dict[str, str | None]) -> BackupSession:
        """Read all disks at one instant. `previous` maps disk names to the change tokens of
        the VM's previous restore point, the base a delta may report dirty extents against."""
        ...


class Connector(BackupSource, Protocol):
    """A full connector: backups, and restores that create or overwrite VMs."""

    def open_disk(self, vm: VmConfig, disk: DiskInfo) -> DiskReader:
        """A reader of the disk as it is now (in-place restore compares with it)."""
        ...

    def create_vm(self, config: VmConfig, target: str) -> VmSink:
        """Start creating a VM at `target` (connector-specific: a directory, a storage pool).
        `config` already carries the new name and uuid; disks start all zeros."""
        ...

    def overwrite_vm(self, vm: VmConfig) -> VmSink:
        """Restore in place over an existing VM: its disks are opened for writing as they are."""
        ...


class VmSink(Protocol):
    """A VM under construction by a restore; `commit` makes it appear, `abort` removes it."""

    location: str

    def open_disk(self, disk: DiskInfo) -> DiskWriter: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...
