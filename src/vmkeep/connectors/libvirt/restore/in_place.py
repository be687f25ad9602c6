"""Restoring in place over an existing libvirt domain: its current disk images are opened
read-write through a private qemu-nbd (image_nbd), the engine reads each chunk through the same
connection, compares its hash with the restore point and writes only the chunks that differ.

Only shut-off, persistent domains whose disks are files (type='file', or type='volume' in a
dir/fs/netfs pool) in qcow2 or raw are written: on this host, or on the host of a qemu+ssh://
URI through a qemu-nbd started there over one ssh connection (ssh_nbd.py, ssh_master.py). A
running domain is refused unless the caller asked for a power-off: then it is destroyed
(virDomainDestroy: QEMU is killed, the guest gets no shutdown — its disks are about to be
overwritten anyway). QEMU's image locks make qemu-nbd refuse an image some other process
(another domain, a backup) still holds.

There is no undo: an aborted in-place restore leaves the disks partly restored; running the
restore again writes only what still differs."""

from __future__ import annotations

import contextlib
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vmkeep.connectors.base import (
    BackupSource,
    DiskInfo,
    DiskReader,
    DiskWriter,
    Extent,
    VmConfig,
)
from vmkeep.connectors.libvirt.bindings import libvirt, one_line
from vmkeep.connectors.libvirt.domxml import is_active
from vmkeep.connectors.libvirt.restore.new_domain import FILE_POOL_TYPES
from vmkeep.connectors.libvirt.transport.image_nbd import FORMATS, NbdImage, open_image
from vmkeep.connectors.libvirt.transport.ssh_master import SshMaster
from vmkeep.errors import ConnectorError, NotFoundError

log = logging.getLogger(__name__)
STOP_TIMEOUT = 30.0


@dataclass(frozen=True)
class DiskImage:
    """Where one disk of a shut-off domain lives on its host."""

    target: str  # vda, ...
    path: str
    fmt: str
    pool: Any = None  # the storage pool of a type='volume' disk, refreshed after writes


def disk_images(conn: Any, dom: Any) -> dict[str, DiskImage]:
    """The image file of every hard disk in the domain's persistent definition; one-line
    ConnectorError for a disk vmkeep cannot open as a file (block, network, odd pools)."""
    lv = libvirt()
    try:
        root = ET.fromstring(dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE))
    except lv.libvirtError as exc:
        raise ConnectorError(f"cannot read domain {dom.name()}: {one_line(exc)}") from None
    images = {}
    for el in root.iterfind("./devices/disk"):
        target = el.find("target")
        if el.get("device", "disk") != "disk" or target is None or not target.get("dev"):
            continue
        dev = target.get("dev", "")
        driver = el.find("driver")
        fmt = (driver.get("type") if driver is not None else None) or "raw"
        if fmt not in FORMATS:
            raise ConnectorError(f"disk {dev}: image format {fmt!r} cannot be written (qcow2, raw)")
        images[dev] = _locate(conn, dev, el, fmt)
    return images


def _locate(conn: Any, dev: str, disk: ET.Element, fmt: str) -> DiskImage:
    kind = disk.get("type", "file")
    src = disk.find("source")
    if kind == "file" and src is not None and src.get("file"):
        return DiskImage(dev, src.get("file", ""), fmt)
    if kind == "volume" and src is not None and src.get("pool") and src.get("volume"):
        return _volume_image(conn, dev, src.get("pool", ""), src.get("volume", ""), fmt)
    raise ConnectorError(
        f"disk {dev} is a {kind} disk: in-place restore writes only file-backed disks "
        f"(files, or volumes of {'/'.join(FILE_POOL_TYPES)} pools); restore as a new domain"
    )


def _volume_image(conn: Any, dev: str, pool_name: str, vol_name: str, fmt: str) -> DiskImage:
    lv = libvirt()
    try:
        pool = conn.storagePoolLookupByName(pool_name)
        pool_type = ET.fromstring(pool.XMLDesc(0)).get("type", "")
        if pool_type not in FILE_POOL_TYPES:
            raise ConnectorError(
                f"disk {dev} is volume {vol_name} of {pool_type} pool {pool_name!r}: in-place "
                f"restore writes only volumes of {'/'.join(FILE_POOL_TYPES)} pools"
            )
        path = str(pool.storageVolLookupByName(vol_name).path())
    except lv.libvirtError as exc:
        raise ConnectorError(
            f"disk {dev}: cannot find volume {vol_name} of pool {pool_name!r}: {one_line(exc)}"
        ) from None
    return DiskImage(dev, path, fmt, pool)


def power_off(dom: Any, timeout: float = STOP_TIMEOUT) -> None:
    """virDomainDestroy, then wait until libvirt reports the domain inactive."""
    lv = libvirt()
    name = dom.name()
    log.warning("powering off domain %s (--force): its disks are restored in place", name)
    try:
        dom.destroy()
    except lv.libvirtError as exc:
        if is_active(dom):
            raise ConnectorError(f"cannot power off domain {name}: {one_line(exc)}") from None
    deadline = time.monotonic() + timeout
    while is_active(dom):
        if time.monotonic() > deadline:
            raise ConnectorError(f"domain {name} did not stop within {timeout:.0f} s")
        time.sleep(0.05)


class _SharedReader:
    """A DiskReader view of an image the sink writes: reads see the sink's own writes, and
    closing the view leaves the image open for the writer."""

    def __init__(self, image: NbdImage) -> None:
        self._image = image
        self.size = image.size
        self.change_token: str | None = None
        self.dirty_since: str | None = None

    def extents(self) -> Iterator[Extent]:
        return self._image.extents()

    def dirty_extents(self) -> Iterator[Extent]:
        return self._image.dirty_extents()

    def read(self, offset: int, length: int) -> bytes:
        return self._image.read(offset, length)

    def close(self) -> None:
        pass


class InPlaceSink:
    """The disks of the existing domain `vm`, opened for writing as they are."""

    def __init__(
        self, conn: Any, dom: Any, vm: VmConfig, *, stop_running: bool, ssh: SshMaster | None = None
    ) -> None:
        lv = libvirt()
        self._ssh = ssh  # the images are files of that host (closed when the sink finishes)
        self.uuid = vm.uuid
        self.location = str(dom.name())
        try:
            persistent = bool(dom.isPersistent())
        except lv.libvirtError as exc:
            raise ConnectorError(f"cannot read domain {self.location}: {one_line(exc)}") from None
        if not persistent:
            raise ConnectorError(
                f"domain {self.location} is transient (it would vanish when stopped): "
                "restore as a new domain instead"
            )
        self._images_at = disk_images(conn, dom)
        missing = [d.name for d in vm.disks if d.name not in self._images_at]
        if missing:
            raise ConnectorError(
                f"domain {self.location} has no disk {', '.join(missing)} in its definition"
            )
        if is_active(dom):
            if not stop_running:
                raise ConnectorError(
                    f"domain {self.location} is running: shut it down first, or pass --force "
                    "to power it off (its disks are then overwritten)"
                )
            power_off(dom)
        self._open: dict[str, NbdImage] = {}
        self.finished = False

    def image(self, disk_name: str) -> NbdImage:
        """The disk's image, opened read-write on first use."""
        if self.finished:
            raise ConnectorError(f"restore of {self.location} is already finished")
        img = self._open.get(disk_name)
        if img is None:
            where = self._images_at.get(disk_name)
            if where is None:
                raise NotFoundError(f"domain {self.location} has no disk {disk_name!r}")
            opener = open_image if self._ssh is None else self._ssh.target.open_image
            img = opener(where.path, where.fmt, writable=True, name=disk_name)
            self._open[disk_name] = img
        return img

    def reader(self, disk_name: str) -> DiskReader:
        return _SharedReader(self.image(disk_name))

    def open_disk(self, disk: DiskInfo) -> DiskWriter:
        img = self.image(disk.name)
        if img.size != disk.size:
            raise ConnectorError(
                f"disk {disk.name} of {self.location} is {img.size} bytes, the restore point's "
                f"is {disk.size}: restore as a new domain instead"
            )
        return img

    def commit(self) -> None:
        """Flush and close every image (an image the engine already closed is skipped)."""
        if self.finished:
            raise ConnectorError(f"restore of {self.location} is already finished")
        try:
            for img in self._open.values():
                img.close()
        finally:
            self._finish()

    def abort(self) -> None:
        """Close the images; what was written stays written (there is no undo)."""
        if self.finished:
            return
        for img in self._open.values():
            with contextlib.suppress(Exception):
                img.close()
        self._finish()

    def _finish(self) -> None:
        self.finished = True
        if self._ssh is not None:
            self._ssh.close()
        for where in self._images_at.values():
            if where.pool is not None:
                with contextlib.suppress(Exception):
                    where.pool.refresh(0)


def in_place_target(source: BackupSource, uri: str, *refs: str) -> str:
    """The uuid of the domain an in-place restore overwrites: the first of `refs` (a point's VM
    uuid, then its name; or the domain the user named) that exists. The engine then refuses a
    domain of another uuid unless forced. NotFoundError suggesting a restore as new otherwise."""
    for ref in refs:
        if ref:
            with contextlib.suppress(NotFoundError):
                return source.get_vm(ref).uuid
    raise NotFoundError(
        f"domain {' / '.join(r for r in refs if r)} no longer exists on {uri}: restore the "
        "point as a new domain instead (--to POOL --name NEW_NAME)"
    )
