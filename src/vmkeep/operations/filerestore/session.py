"""A restore point opened for file restore: its disks as PointDisks, the volumes on them, and
the file system of one volume, all read straight from the repository."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from vmkeep.errors import ImageError, UsageError
from vmkeep.operations.point_disk import FetchStats, PointDisk
from vmkeep.pread_file import PreadFile
from vmkeep.repository.manifest import Manifest
from vmkeep.repository.repository import Repository

from .filesystems import open_filesystem
from .model import FileSystem
from .volumes import Layout, Volume, discover


@dataclass(frozen=True)
class Address:
    """`DISK[:PART|:VG/LV][/PATH]` split: the volume (None: list the volumes) and the path."""

    volume: str | None
    path: bytes


def parse_address(text: str | None) -> Address:
    """The volume is everything up to the first "/" after the ":" (a partition number) or
    after VG/LV; without ":", up to the first "/". Paths keep non-UTF-8 bytes given on the
    command line (os.fsencode)."""
    if not text:
        return Address(None, b"/")
    disk, colon, rest = text.partition(":")
    if not colon:
        disk, slash, path = text.partition("/")
        return Address(disk, os.fsencode(slash + path) or b"/")
    parts = rest.split("/", 2)
    if not parts[0]:
        raise UsageError(f"{text!r}: expected DISK, DISK:N or DISK:VG/LV after the point")
    if parts[0].isdigit():
        volume, path = f"{disk}:{parts[0]}", "/".join(parts[1:])
    else:
        if len(parts) < 2 or not parts[1]:
            raise UsageError(f"{text!r}: a logical volume is DISK:VG/LV")
        volume, path = f"{disk}:{parts[0]}/{parts[1]}", "/".join(parts[2:])
    return Address(volume, os.fsencode("/" + path))


@dataclass
class VolumeInfo:
    volume: Volume
    filesystem: str = ""
    label: str = ""
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        v = self.volume
        return {
            "address": v.address,
            "kind": v.kind,
            "size": v.size,
            "type": v.type,
            "name": v.name,
            "filesystem": self.filesystem,
            "label": self.label,
            "disks": v.disks,
            "error": v.error or (self.note or None),
        }


class PointFiles:
    """Open with `with`; `close` stops the disks' fetch threads."""

    def __init__(self, repo: Repository, point_ref: str) -> None:
        self.manifest: Manifest = repo.load_manifest(repo.resolve_point(point_ref))
        self.disks = {d.name: PointDisk(repo, d) for d in self.manifest.disks}
        self._layout: Layout | None = None

    def __enter__(self) -> PointFiles:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        for disk in self.disks.values():
            disk.close()

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            self._layout = discover(dict(self.disks))
        return self._layout

    @property
    def fetched(self) -> FetchStats:
        total = FetchStats()
        for disk in self.disks.values():
            total.chunks += disk.stats.chunks
            total.bytes += disk.stats.bytes
            total.blocks += disk.stats.blocks
        return total

    def volumes(self) -> list[VolumeInfo]:
        """Every volume with the file system found on it (if any)."""
        out = []
        for volume in self.layout.volumes:
            info = VolumeInfo(volume)
            if volume.source is not None and volume.error is None:
                try:
                    fs = self._open(volume)
                    info.filesystem, info.label = fs.info.type_name, fs.info.label
                except ImageError as exc:
                    info.note = exc.message if "no file system" not in exc.message else ""
            out.append(info)
        return out

    def find(self, address: str) -> Volume:
        """A disk or partition needs only its own disk's table; an LV needs every disk (its
        VG may span them)."""
        disk, _, rest = address.partition(":")
        if "/" in rest or disk not in self.disks or self._layout is not None:
            return self.layout.find(address)
        return discover({disk: self.disks[disk]}, lvm_too=False).find(address)

    def filesystem(self, address: str) -> FileSystem:
        volume = self.find(address)
        if volume.error:
            raise ImageError(volume.error)
        if volume.source is None:
            raise UsageError(
                f"{address} has a partition table: name a partition or volume "
                f"({address}:N or {address}:VG/LV)"
            )
        return self._open(volume)

    def _open(self, volume: Volume) -> FileSystem:
        assert volume.source is not None
        fh: Any = PreadFile(volume.source)  # a RawIOBase that dissect reads as a BinaryIO
        return open_filesystem(fh, volume.size, volume.address)
