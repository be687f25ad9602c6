"""Partition tables and volume managers (MBR, GPT, LVM2) read in user space: every volume of
a restore point's disks, with an address (docs/FILE-RESTORE.md "Addresses"):

    DISK            the whole disk (a file system or PV without a partition table)
    DISK:N          partition N, numbered as Linux numbers it (MBR logicals from 5)
    DISK:VG/LV      a logical volume; DISK is any disk holding one of the VG's PVs

Two volume groups with one name (two VMs' disks attached to one) are told apart by the disk;
if both sit on one disk, each is named VG@<first 8 characters of its VG id>."""

from __future__ import annotations

from dataclasses import dataclass, field

from vmkeep.errors import ImageError, NotFoundError

from . import lvm
from .source import Slice, Source
from .tables import read_table


@dataclass
class Volume:
    address: str
    kind: str  # "disk", "partition", "lv"
    size: int
    type: str  # disk: "gpt"/"mbr"/""; partition: its type; lv: its segment type
    source: Source | None = None  # None: not a volume a file system can be on
    name: str = ""  # a GPT partition's name
    error: str | None = None
    disks: list[str] = field(default_factory=list)  # the disks an LV's VG spans


@dataclass
class Layout:
    volumes: list[Volume]
    warnings: list[str]

    def find(self, address: str) -> Volume:
        """The volume at `address`; an LV may be named through any disk its VG spans."""
        for volume in self.volumes:
            if volume.address == address:
                return volume
        disk, _, rest = address.partition(":")
        if "/" in rest:
            for volume in self.volumes:
                if (
                    volume.kind == "lv"
                    and disk in volume.disks
                    and volume.address.endswith(":" + rest)
                ):
                    return volume
        known = ", ".join(v.address for v in self.volumes if v.source is not None) or "none"
        raise NotFoundError(f"no volume {address!r} (volumes: {known})")


def discover(disks: dict[str, Source], lvm_too: bool = True) -> Layout:
    """Every disk, partition and logical volume of the VM's disks."""
    layout = Layout([], [])
    pvs: list[lvm.PhysicalDevice] = []
    for name, disk in disks.items():
        for where, source in _volumes_of_disk(name, disk, layout):
            if lvm_too and lvm.has_label(source):
                try:
                    pvs.append(lvm.read_pv(source, where, name))
                except ImageError as exc:
                    layout.warnings.append(exc.message)
    groups = lvm.group(pvs)
    for grp in groups:
        try:
            lvs = lvm.logical_volumes(grp)
        except ImageError as exc:
            layout.warnings.append(exc.message)
            continue
        vg_name = _vg_name(grp, groups)
        for lv in lvs:
            layout.volumes.append(
                Volume(
                    address=f"{lv.disks[0]}:{vg_name}/{lv.name}",
                    kind="lv",
                    size=lv.size,
                    type=lv.type,
                    source=lv.source,
                    error=lv.error,
                    disks=lv.disks,
                )
            )
    return layout


def _volumes_of_disk(name: str, disk: Source, layout: Layout) -> list[tuple[str, Source]]:
    try:
        table = read_table(disk, name)
    except ImageError as exc:
        layout.volumes.append(Volume(name, "disk", disk.size, "", error=exc.message))
        return []
    if table is None:
        layout.volumes.append(Volume(name, "disk", disk.size, "", source=disk))
        return [(name, disk)]
    layout.volumes.append(Volume(name, "disk", disk.size, table.scheme))
    layout.warnings.extend(table.warnings)
    found: list[tuple[str, Source]] = []
    for part in table.partitions:
        where = f"{name}:{part.number}"
        source = None if part.error else Slice(disk, part.offset, part.size)
        layout.volumes.append(
            Volume(where, "partition", part.size, part.type, source, part.name, part.error)
        )
        if source is not None:
            found.append((where, source))
    return found


def _vg_name(grp: lvm.Group, groups: list[lvm.Group]) -> str:
    first_disk = sorted({d.disk for d in grp.devices})[0]
    for other in groups:
        same_name = other is not grp and other.vg_name == grp.vg_name
        if same_name and first_disk == sorted({d.disk for d in other.devices})[0]:
            return f"{grp.vg_name}@{grp.vg_id.replace('-', '')[:8]}"
    return grp.vg_name
