"""Restore targets of the files connector. A new VM is built in a hidden directory and appears
only on commit (one rename), so an interrupted restore never leaves a VM that looks complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

from vmkeep.connectors.base import DiskInfo, DiskWriter, VmConfig
from vmkeep.connectors.files.images import ClosableWriter, close_quietly, copy_data, new_writer
from vmkeep.connectors.files.leftovers import (
    clear_incomplete,
    drop_owner,
    incomplete_note,
    make_build_dir,
    mark_incomplete,
    settle_in_place,
    settle_leftovers,
)
from vmkeep.connectors.files.qcow2 import Qcow2Reader
from vmkeep.connectors.files.qcow2_writer import Qcow2DiskWriter
from vmkeep.connectors.files.raw import RawDiskWriter
from vmkeep.connectors.files.vmdir import (
    DiskEntry,
    check_vm_name,
    disk_format,
    from_vm_config,
    load_vm_json,
    safe_disk_filename,
    save_vm_json,
)
from vmkeep.errors import ConnectorError, NameTakenError
from vmkeep.safe_files import fsync_dir


def _copy_mode(original: Path, new: Path) -> None:
    """Give `new` (our copy) the permissions of `original`, through a descriptor opened
    without following a symlink: a link planted at `new` must not get its target chmod'ed."""
    fd = os.open(new, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.fchmod(fd, stat.S_IMODE(os.stat(original).st_mode))
    finally:
        os.close(fd)


def _close_all(writers: list[ClosableWriter]) -> None:
    for writer in writers:
        writer.close()


class NewVmSink:
    """A new VM directory `target/<config.name>`, built in `target/.vmkeep-new-*` meanwhile
    (leftovers of killed restores there are settled first: leftovers.py). Disk file names come
    from the config but are sanitised; disks start as holes and never resolve outside target."""

    def __init__(self, config: VmConfig, target: Path) -> None:
        self._config = config
        self._target = target
        name = check_vm_name(config.name)
        if not target.is_dir():
            raise ConnectorError(f"restore target {target} is not a directory")
        self._final = target / name
        if self._final.exists() or self._final.is_symlink():
            raise NameTakenError(f"{self._final} already exists: choose another VM name")
        settle_leftovers(target)
        try:
            self._tmp = make_build_dir(target, name)
        except OSError as exc:
            raise ConnectorError(f"cannot create a VM in {target}: {exc.strerror}") from None
        self.location = str(self._final)
        self._entries: dict[str, DiskEntry] = {}
        self._writers: list[ClosableWriter] = []
        self._taken: set[str] = set()
        self._done = False
        self._reserved = False

    def open_disk(self, disk: DiskInfo) -> DiskWriter:
        if self._done:
            raise ConnectorError(f"restore of {self.location} is already finished")
        if disk.name in self._entries:
            raise ConnectorError(f"disk {disk.name!r} opened twice")
        fmt = disk_format(disk)
        filename = safe_disk_filename(disk, self._taken)
        writer = new_writer(self._tmp / filename, fmt, disk.size, within=self._target)
        self._writers.append(writer)
        self._entries[disk.name] = DiskEntry(name=disk.name, file=filename, format=fmt)
        return writer

    def commit(self) -> None:
        """Close the disks, write vm.json, then rename the directory into place."""
        if self._done:
            raise ConnectorError(f"restore of {self.location} is already finished")
        try:
            for disk in self._config.disks:  # disks never written are still part of the VM
                if disk.name not in self._entries:
                    self.open_disk(disk)
            _close_all(self._writers)
            ordered = [self._entries[d.name] for d in self._config.disks]
            ordered += [e for e in self._entries.values() if e not in ordered]
            save_vm_json(self._tmp, from_vm_config(self._config, ordered))
            drop_owner(self._tmp)
            try:
                os.mkdir(self._final)  # reserve the name: fails if anything took it meanwhile
            except FileExistsError:
                raise ConnectorError(f"{self._final} already exists: restore aborted") from None
            self._reserved = True
            os.rename(self._tmp, self._final)  # replaces our own empty reservation
        except OSError as exc:
            self.abort()
            raise ConnectorError(f"cannot create {self._final}: {exc.strerror}") from None
        except BaseException:
            self.abort()
            raise
        self._done = True
        try:
            fsync_dir(self._target)
        except OSError as exc:
            raise ConnectorError(f"cannot flush {self._target}: {exc.strerror}") from None

    def abort(self) -> None:
        """Remove everything this restore created; harmless after commit or a second call."""
        if self._done:
            return
        self._done = True
        close_quietly(self._writers)
        shutil.rmtree(self._tmp, ignore_errors=True)
        if self._reserved:
            with contextlib.suppress(OSError):
                self._final.rmdir()  # our empty reservation, if commit got that far


class OverwriteSink:
    """Restore in place over an existing VM. Raw disks are written where they are (abort cannot
    undo those writes). A qcow2 disk is copied to a new image beside it that receives the writes
    and replaces the original on commit, so abort leaves the original untouched. The VM is
    marked incomplete (leftovers.py) from before the first write until commit is durable; an
    abort keeps the mark when a raw disk was opened for writing."""

    def __init__(self, vm: VmConfig, vm_dir: Path) -> None:
        self._config = vm
        self._dir = vm_dir
        self._doc = load_vm_json(vm_dir)
        self.location = str(vm_dir)
        self._entries = {e.name: e for e in self._doc.disks}
        self._taken = {e.file for e in self._doc.disks}
        self._writers: list[ClosableWriter] = []
        self._replace: list[tuple[Path, Path]] = []  # (new image, original)
        self._opened: set[str] = set()
        self._done = False
        self._raw_written = False
        self._was_incomplete = incomplete_note(vm_dir) is not None  # an earlier run was killed
        settle_in_place(vm_dir, [e.file for e in self._doc.disks if e.format == "qcow2"])
        mark_incomplete(vm_dir)

    def _bounds(self, entry: DiskEntry) -> Path | None:
        """The directory the disk file must resolve inside (None: vm.json allows outside)."""
        return None if entry.outside else self._dir

    def open_disk(self, disk: DiskInfo) -> DiskWriter:
        if self._done:
            raise ConnectorError(f"restore of {self.location} is already finished")
        if disk.name in self._opened:
            raise ConnectorError(f"disk {disk.name!r} opened twice")
        entry = self._entries.get(disk.name)
        writer: ClosableWriter
        if entry is None:  # a disk the VM does not have yet: add it
            fmt = disk_format(disk)
            filename = safe_disk_filename(disk, self._taken)
            writer = new_writer(self._dir / filename, fmt, disk.size, within=self._dir)
            self._entries[disk.name] = DiskEntry(name=disk.name, file=filename, format=fmt)
        elif entry.format == "raw":
            self._raw_written = True
            writer = RawDiskWriter(
                self._dir / entry.file, disk.size, create=False, within=self._bounds(entry)
            )
        else:
            writer = self._qcow2_copy(self._dir / entry.file, disk.size, self._bounds(entry))
        self._opened.add(disk.name)
        self._writers.append(writer)
        return writer

    def _qcow2_copy(self, original: Path, size: int, within: Path | None) -> ClosableWriter:
        reader = Qcow2Reader(original, within=within)
        try:
            if reader.header.nb_snapshots:
                raise ConnectorError(
                    f"{original} has internal snapshots that an in-place restore would lose: "
                    "restore as a new VM instead"
                )
            new = original.with_name(f".{original.name}.{os.urandom(6).hex()}")
            writer = Qcow2DiskWriter(new, size, within=within)  # created: never existed
            self._replace.append((new, original))
            try:
                copy_data(reader, writer, writer.size)
            except BaseException:
                with contextlib.suppress(Exception):
                    writer.close()
                raise
        finally:
            reader.close()
        return writer

    def commit(self) -> None:
        """Close the disks, swap in rewritten qcow2 images, and rewrite vm.json."""
        if self._done:
            raise ConnectorError(f"restore of {self.location} is already finished")
        try:
            _close_all(self._writers)
            for new, original in self._replace:
                with contextlib.suppress(OSError):
                    _copy_mode(original, new)
                os.replace(new, original)
                fsync_dir(original.parent)
            disks = list(self._entries.values())
            save_vm_json(self._dir, from_vm_config(self._config, disks))
            clear_incomplete(self._dir)
        except OSError as exc:
            self.abort()
            raise ConnectorError(f"cannot finish restore in {self._dir}: {exc.strerror}") from None
        except BaseException:
            self.abort()
            raise
        self._done = True

    def abort(self) -> None:
        """Drop the qcow2 copies; raw disks keep what was already written."""
        if self._done:
            return
        self._done = True
        close_quietly(self._writers)
        for new, _ in self._replace:
            new.unlink(missing_ok=True)
        if not self._raw_written and not self._was_incomplete:  # the VM is what it was
            with contextlib.suppress(ConnectorError):
                clear_incomplete(self._dir)
