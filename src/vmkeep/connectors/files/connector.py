"""FilesConnector: VMs are directories holding vm.json and disk images, so vmkeep works with no
hypervisor at all (the embedded default, and the connector the demo and most tests use)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from vmkeep.connectors.base import DiskInfo, DiskReader, VmConfig
from vmkeep.connectors.files.backup_session import FilesBackupSession
from vmkeep.connectors.files.images import open_reader
from vmkeep.connectors.files.leftovers import incomplete_note
from vmkeep.connectors.files.sink import NewVmSink, OverwriteSink
from vmkeep.connectors.files.vmdir import (
    INCOMPLETE,
    INCOMPLETE_KEY,
    LOCATION_KEY,
    VM_JSON,
    DiskEntry,
    VmDocument,
    load_vm_json,
    to_vm_config,
)
from vmkeep.errors import ConnectorError, NotFoundError, UsageError

if TYPE_CHECKING:
    from vmkeep.connectors.base import Connector, DiskWriter, VmSink
    from vmkeep.connectors.files.qcow2 import Qcow2Reader
    from vmkeep.connectors.files.qcow2_writer import Qcow2DiskWriter
    from vmkeep.connectors.files.raw import RawDiskReader, RawDiskWriter

log = logging.getLogger(__name__)


class FilesConnector:
    """VMs are the subdirectories of `root` that hold a vm.json; any VM directory can also be
    named by its path. Hidden directories (our restores in progress) are never listed."""

    def __init__(self, root: Path | str = ".") -> None:
        self.root = Path(root)

    def _load(self, vm_dir: Path) -> VmConfig:
        doc = load_vm_json(vm_dir)
        config = to_vm_config(doc, vm_dir, _disk_sizes(vm_dir, doc))
        note = incomplete_note(vm_dir)
        if note:
            config.metadata[INCOMPLETE_KEY] = note
        return config

    def list_vms(self) -> list[VmConfig]:
        """Every readable VM under root; a broken one is logged and skipped, not fatal."""
        try:
            entries = sorted(self.root.iterdir())
        except OSError as exc:
            raise ConnectorError(f"cannot list VMs in {self.root}: {exc.strerror}") from None
        vms = []
        for entry in entries:
            if entry.name.startswith(".") or not (entry / VM_JSON).is_file():
                continue
            try:
                vms.append(self._load(entry))
            except (ConnectorError, NotFoundError) as exc:
                log.warning("skipping VM directory %s: %s", entry, exc)
        return vms

    def get_vm(self, ref: str) -> VmConfig:
        """By directory path (absolute, or relative to the cwd or root), then by name or uuid."""
        if not ref:
            raise NotFoundError("no VM given")
        for candidate in (Path(ref), self.root / ref):
            if (candidate / VM_JSON).is_file():
                return self._load(candidate)
        matches = [vm for vm in self.list_vms() if ref == vm.name or ref.lower() == vm.uuid]
        if len(matches) > 1:
            raise UsageError(f"several VMs match {ref!r} under {self.root}: use a uuid or path")
        if not matches:
            raise NotFoundError(f"no VM {ref!r} in {self.root} (by path, name or uuid)")
        return matches[0]

    def locate(self, vm: VmConfig) -> Path:
        """The directory of an existing VM: its recorded location if the VM there still has
        the same uuid (another VM may have taken the place), else found by uuid under root."""
        location = vm.metadata.get(LOCATION_KEY)
        if (
            isinstance(location, str)
            and (Path(location) / VM_JSON).is_file()
            and load_vm_json(Path(location)).uuid == vm.uuid.lower()
        ):
            return Path(location)
        return Path(self.get_vm(vm.uuid).metadata[LOCATION_KEY])

    def open_disk(self, vm: VmConfig, disk: DiskInfo) -> DiskReader:
        """Reader for one disk; the file is taken from the VM's own vm.json, not from `disk`."""
        vm_dir = self.locate(vm)
        doc = load_vm_json(vm_dir)
        for entry in doc.disks:
            if entry.name == disk.name:
                return open_reader(vm_dir / entry.file, entry.format, _bounds(vm_dir, entry))
        raise NotFoundError(f"VM {vm.name!r} has no disk {disk.name!r}")

    def begin_backup(self, vm: VmConfig, previous: dict[str, str | None]) -> FilesBackupSession:
        """Refused for a VM an in-place restore left incomplete: its disks are no state the
        VM ever had, and a restore point of them would look good."""
        vm_dir = self.locate(vm)
        note = incomplete_note(vm_dir)
        if note:
            raise ConnectorError(
                f"refusing to back up {vm_dir}: {note}; restore it in place again (or remove "
                f"{vm_dir / INCOMPLETE} if its disks are known to be good)"
            )
        readers: dict[str, DiskReader] = {}
        try:
            for disk in vm.disks:
                readers[disk.name] = self.open_disk(vm, disk)
        except BaseException:
            for reader in readers.values():
                reader.close()
            raise
        return FilesBackupSession(vm, readers, previous)

    def create_vm(self, config: VmConfig, target: str) -> NewVmSink:
        """Build the VM in a hidden directory of `target`; commit renames it to target/<name>."""
        return NewVmSink(config, Path(target))

    def overwrite_vm(self, vm: VmConfig) -> OverwriteSink:
        """Write the disks of the existing VM `vm` in place; commit rewrites its vm.json."""
        return OverwriteSink(vm, self.locate(vm))


def _bounds(vm_dir: Path, entry: DiskEntry) -> Path | None:
    """A disk file must resolve inside its VM directory unless vm.json says `outside`."""
    return None if entry.outside else vm_dir


def _disk_sizes(vm_dir: Path, doc: VmDocument) -> dict[str, int]:
    """Virtual sizes read from the images (vm.json does not record them)."""
    sizes = {}
    for entry in doc.disks:
        reader = open_reader(vm_dir / entry.file, entry.format, _bounds(vm_dir, entry))
        try:
            sizes[entry.name] = reader.size
        finally:
            reader.close()
    return sizes


if TYPE_CHECKING:  # mypy proves the classes satisfy the protocols of connectors/base.py

    def _conforms(
        connector: FilesConnector,
        new: NewVmSink,
        overwrite: OverwriteSink,
        readers: tuple[RawDiskReader, Qcow2Reader],
        writers: tuple[RawDiskWriter, Qcow2DiskWriter],
    ) -> tuple[Connector, VmSink, VmSink, tuple[DiskReader, DiskReader], tuple[DiskWriter, ...]]:
        return connector, new, overwrite, readers, writers
