"""Reading a libvirt domain: its XML (disks, vcpus, memory, guest agent channel), state and disk
sizes, turned into the hypervisor-neutral VmConfig the repository records."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from typing import Any

from vmkeep.connectors.base import TAGS_KEY, DiskInfo, VmConfig
from vmkeep.connectors.libvirt.bindings import libvirt, one_line
from vmkeep.connectors.libvirt.tags import domain_tags
from vmkeep.errors import ConnectorError

DOMAIN_XML_KEY = "libvirt.domain_xml"
STATE_KEY = "libvirt.state"

_UNITS = {
    "b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2,
    "mb": 1000**2, "g": 1024**3, "gib": 1024**3, "gb": 1000**3, "t": 1024**4, "tib": 1024**4,
    "tb": 1000**4,
}  # fmt: skip

# virsh's words for virDomainState, so users see what `virsh list` shows.
_STATES = {
    0: "no state", 1: "running", 2: "idle", 3: "paused", 4: "in shutdown", 5: "shut off",
    6: "crashed", 7: "pmsuspended",
}  # fmt: skip


@dataclass(frozen=True)
class DomainDisk:
    """One `<disk device='disk'>` of a domain."""

    target: str  # vda, sdb, ...
    source: str  # file or block device path; "" when the disk has no local source
    source_type: str  # file, block, network, volume
    fmt: str  # driver type: qcow2, raw, ...
    pool: str = ""  # <disk type='volume'>: the storage pool and volume naming the image
    volume: str = ""


def parse_disks(xml: str) -> list[DomainDisk]:
    """The domain's hard disks (cdroms and floppies are not backed up)."""
    root = ET.fromstring(xml)
    disks = []
    for el in root.iterfind("./devices/disk"):
        if el.get("device", "disk") != "disk":
            continue
        target = el.find("target")
        if target is None or not target.get("dev"):
            continue
        src = el.find("source")
        path = ""
        if src is not None:
            path = src.get("file") or src.get("dev") or ""
        driver = el.find("driver")
        fmt = (driver.get("type") if driver is not None else None) or "raw"
        pool = src.get("pool", "") if src is not None else ""
        volume = src.get("volume", "") if src is not None else ""
        disks.append(
            DomainDisk(target.get("dev", ""), path, el.get("type", "file"), fmt, pool, volume)
        )
    return disks


def has_guest_agent(xml: str) -> bool:
    """True when the domain has a connected QEMU guest agent channel (worth a freeze)."""
    root = ET.fromstring(xml)
    for ch in root.iterfind("./devices/channel/target"):
        if ch.get("name") == "org.qemu.guest_agent.0" and ch.get("state") == "connected":
            return True
    return False


def _memory_bytes(root: ET.Element) -> int:
    el = root.find("memory")
    if el is None or not (el.text or "").strip():
        return 0
    unit = el.get("unit", "KiB").lower()
    return int(el.text or "0") * _UNITS.get(unit, 1024)


def state_name(dom: Any) -> str:
    try:
        return _STATES.get(int(dom.state()[0]), "unknown")
    except libvirt().libvirtError as exc:
        raise ConnectorError(f"cannot read the state of {dom.name()}: {one_line(exc)}") from None


def is_active(dom: Any) -> bool:
    try:
        return bool(dom.isActive())
    except libvirt().libvirtError as exc:
        raise ConnectorError(f"cannot read the state of {dom.name()}: {one_line(exc)}") from None


def started_meanwhile(dom: Any) -> bool:
    """For a read of a shut-off domain's images: True when libvirt says it runs now; False
    also when libvirt cannot be asked (the reads did not need it, so that is no sign)."""
    try:
        return is_active(dom)
    except ConnectorError:
        return False


VOL_BLOCK = 1  # virStorageVolType: the volume is a block device (0 is a file)


def resolve_volume(conn: Any, disk: DomainDisk) -> DomainDisk:
    """A `<disk type='volume'>` as the file or block device its pool (on libvirt connection
    `conn`) keeps it in: a shut-off domain's XML has no path for it, and a remote job's scratch
    file goes next to it. Any other disk as it is."""
    if disk.source_type != "volume" or not (disk.pool and disk.volume):
        return disk
    try:
        pool = conn.storagePoolLookupByName(disk.pool)
        vol = pool.storageVolLookupByName(disk.volume)
        kind = "block" if int(vol.info()[0]) == VOL_BLOCK else "file"
        return replace(disk, source=str(vol.path()), source_type=kind)
    except libvirt().libvirtError as exc:
        raise ConnectorError(
            f"disk {disk.target}: cannot find volume {disk.volume} in pool {disk.pool}: "
            f"{one_line(exc)}"
        ) from None


def _source_and_capacity(dom: Any, disk: DomainDisk) -> tuple[str, int]:
    """blockInfo answers for running domains and file/block disks; a `<disk type='volume'>` of a
    shut-off domain has no path in the XML and blockInfo fails ("missing storage backend for
    'volume' storage"), so the storage pool is asked instead."""
    if disk.source_type == "volume" and disk.pool and disk.volume and not dom.isActive():
        vol = dom.connect().storagePoolLookupByName(disk.pool).storageVolLookupByName(disk.volume)
        return str(vol.path()), int(vol.info()[1])
    return disk.source, int(dom.blockInfo(disk.target, 0)[0])


def vm_config(dom: Any) -> VmConfig:
    """The VmConfig of a domain: live XML when it runs, disk sizes from blockInfo."""
    lv = libvirt()
    try:
        xml = dom.XMLDesc(0)
        root = ET.fromstring(xml)
        name = dom.name()
        uuid = dom.UUIDString()
        disks = []
        for d in parse_disks(xml):
            source, capacity = _source_and_capacity(dom, d)
            disks.append(DiskInfo(name=d.target, size=capacity, format=d.fmt,
                                  extra={"source": source}))  # fmt: skip
    except lv.libvirtError as exc:
        raise ConnectorError(f"cannot read domain {dom.name()}: {one_line(exc)}") from None
    vcpu = root.find("vcpu")
    vcpus = int((vcpu.text or "1").strip()) if vcpu is not None else 1
    metadata: dict[str, Any] = {DOMAIN_XML_KEY: xml, STATE_KEY: state_name(dom)}
    tags = domain_tags(xml)
    if tags:
        metadata[TAGS_KEY] = tags
    return VmConfig(
        name=name,
        uuid=uuid.lower(),
        vcpus=vcpus,
        memory=_memory_bytes(root),
        disks=disks,
        metadata=metadata,
    )
