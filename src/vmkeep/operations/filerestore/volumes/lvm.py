"""LVM2 in user space: dissect.volume reads the PV labels and parses the VG metadata; vmkeep
maps the logical volumes itself, because dissect lays the stripes of a striped segment end to
end (and sizes them by extents, not by the stripe size in sectors), which reads wrong data
from any striped LV. Linear and striped segments are mapped here with real interleaving;
thin volumes are read by vmkeep's own dm-thin btree walker (thin.py); other segment types
(raid, cache, vdo, mirror) are refused with a clear error.

PV metadata is read from the first 8 MiB of a device only (LVM puts it in the first MiB by
default), so a hostile label cannot make vmkeep scan a whole disk."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dissect.volume.lvm.metadata import VolumeGroup
from dissect.volume.lvm.physical import LVM2Device

from vmkeep.errors import ImageError, UnsupportedImageError
from vmkeep.pread_file import PreadFile

from ..filesystems.nodefs import reraise_ours
from .source import Mapped, Segment, Slice, Source
from .thin import ThinVolume

SECTOR = 512
METADATA_WINDOW = 8 << 20


def has_label(source: Source) -> bool:
    """LVM2 puts "LABELONE" in one of the first four sectors."""
    head = source.pread(0, 4 * SECTOR)
    return any(head[i * SECTOR : i * SECTOR + 8] == b"LABELONE" for i in range(4))


@dataclass
class PhysicalDevice:
    where: str  # "disk0:2" or "disk0"
    disk: str
    source: Source
    pv_id: str
    vg_id: str
    vg_name: str
    metadata: dict[str, Any]
    seqno: int


@dataclass
class LogicalVolume:
    vg_name: str
    name: str
    size: int
    type: str
    disks: list[str]
    source: Source | None = None
    error: str | None = None


@dataclass
class Group:
    vg_id: str
    vg_name: str
    devices: list[PhysicalDevice] = field(default_factory=list)


def read_pv(source: Source, where: str, disk: str) -> PhysicalDevice:
    """The label and VG metadata of one PV (ImageError if unreadable)."""
    window = PreadFile(Slice(source, 0, min(source.size, METADATA_WINDOW)))
    try:
        device = LVM2Device(window)
        metadata = device.metadata
        if not metadata:
            raise ImageError(f"{where}: LVM PV without metadata")
        groups = [(k, v) for k, v in metadata.items() if isinstance(v, dict)]
        if len(groups) != 1:
            raise ImageError(f"{where}: LVM metadata names {len(groups)} volume groups")
        vg_name, vg = groups[0]
        return PhysicalDevice(
            where, disk, source, device.id, str(vg["id"]), vg_name, metadata, int(vg["seqno"])
        )
    except Exception as exc:  # a corrupt image breaks dissect in many ways
        reraise_ours(exc)
        raise ImageError(f"{where}: unreadable LVM metadata ({exc})") from exc


def group(devices: list[PhysicalDevice]) -> list[Group]:
    """PVs by volume group id (a VG may span disks; two VGs may share a name)."""
    groups: dict[str, Group] = {}
    for device in devices:
        groups.setdefault(device.vg_id, Group(device.vg_id, device.vg_name)).devices.append(device)
    return list(groups.values())


def logical_volumes(grp: Group) -> list[LogicalVolume]:
    """The visible LVs of a VG, each mapped (or with the error that prevents it)."""
    newest = max(grp.devices, key=lambda d: d.seqno)
    try:
        vg = VolumeGroup.from_dict(newest.metadata[grp.vg_name], name=grp.vg_name)
        extent = int(vg.extent_size) * SECTOR
        pvs = {name: pv for name, pv in vg.physical_volumes.items()}
        lvs = [lv for lv in vg.logical_volumes.values() if lv.is_visible and not _pool(lv)]
    except Exception as exc:  # a corrupt image breaks dissect in many ways
        reraise_ours(exc)
        raise ImageError(f"VG {grp.vg_name}: unreadable LVM metadata ({exc})") from exc
    by_id = {d.pv_id: d for d in grp.devices}
    disks = sorted({d.disk for d in grp.devices})
    out = []
    for lv in lvs:
        try:
            size = sum(int(s.extent_count) for s in lv.segments) * extent
            kind = "+".join(sorted({_kind(s) for s in lv.segments})) or "empty"
            item = LogicalVolume(grp.vg_name, lv.name, size, kind, disks)
            item.source = _map(lv, pvs, by_id, extent, f"{grp.vg_name}/{lv.name}")
        except ImageError as exc:
            item.error = exc.message
        except Exception as exc:  # a corrupt image breaks dissect in many ways
            reraise_ours(exc)
            item.error = f"{grp.vg_name}/{lv.name}: {exc}"
        out.append(item)
    return out


def _map(
    lv: Any, pvs: dict[str, Any], by_id: dict[str, PhysicalDevice], extent: int, name: str
) -> Source:
    types = {str(s.type) for s in lv.segments}
    if types == {"thin"}:
        return _thin(lv, pvs, by_id, extent, name)
    segments = []
    for seg in lv.segments:
        if seg.type not in ("striped", "linear"):
            raise UnsupportedImageError(f"{name}: LVM segment type {seg.type!r} is not supported")
        count = len(seg.stripes)
        if count < 1 or int(seg.extent_count) % count:
            raise ImageError(f"{name}: {count} stripes for {seg.extent_count} extents")
        area = int(seg.extent_count) // count * extent
        stripes = []
        for pv_name, first in seg.stripes:
            pv = pvs.get(pv_name)
            device = by_id.get(str(pv.id).replace("-", "")) if pv is not None else None
            if pv is None or device is None:
                raise ImageError(f"{name}: its physical volume {pv_name} is on no disk of the VM")
            base = int(pv.pe_start) * SECTOR + int(first) * extent
            if base + area > device.source.size:
                raise ImageError(f"{name}: extents point past the end of {device.where}")
            stripes.append((device.source, base))
        stripe_size = int(seg.stripe_size or 0) * SECTOR if count > 1 else 0
        if count > 1 and (stripe_size <= 0 or area % stripe_size):
            raise ImageError(f"{name}: invalid stripe size")
        segments.append(
            Segment(int(seg.start_extent) * extent, count * area, tuple(stripes), stripe_size)
        )
    return Mapped(segments, sum(s.length for s in segments))


def _thin(
    lv: Any, pvs: dict[str, Any], by_id: dict[str, PhysicalDevice], extent: int, name: str
) -> Source:
    """A thin LV over its pool's metadata and data LVs (each mapped like any LV)."""
    if len(lv.segments) != 1:
        raise ImageError(f"{name}: a thin volume with {len(lv.segments)} segments")
    seg = lv.segments[0]
    lvs = lv._volume_group.logical_volumes
    pool = lvs.get(seg.thin_pool)
    if pool is None or [str(s.type) for s in pool.segments] != ["thin-pool"]:
        raise ImageError(f"{name}: its thin pool {seg.thin_pool!r} is missing")
    pool_seg = pool.segments[0]
    parts = [lvs.get(pool_seg.metadata), lvs.get(pool_seg.pool)]
    if any(p is None or {str(s.type) for s in p.segments} & {"thin", "thin-pool"} for p in parts):
        raise ImageError(f"{name}: its thin pool's metadata or data volume is missing")
    metadata, data = (_map(p, pvs, by_id, extent, f"{name} pool") for p in parts)
    if seg.device_id is None:
        raise ImageError(f"{name}: a thin volume without a device id")
    size = int(seg.extent_count) * extent
    return ThinVolume(metadata, data, int(seg.device_id), size, name)


def _pool(lv: Any) -> bool:
    """A thin pool is visible in LVM but holds no file system: its thin LVs are listed."""
    return any(str(s.type) == "thin-pool" for s in lv.segments)


def _kind(seg: Any) -> str:
    if seg.type == "striped" and len(getattr(seg, "stripes", ())) == 1:
        return "linear"
    return str(seg.type)
