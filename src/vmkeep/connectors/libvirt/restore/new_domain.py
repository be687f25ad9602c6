"""Restoring a VM as a new libvirt domain: one new qcow2 (v3) volume per disk in a file-based
storage pool, written directly at the volume's path (local URI) or uploaded through a libvirt
stream (remote URI, volume_upload.py), and on commit a new domain defined (not started) from the
domain XML recorded at backup, with a new name, uuid, disk sources and MACs.

Nothing is defined before commit, so abort only deletes the volumes this restore created."""

from __future__ import annotations

import contextlib
import re
import secrets
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from vmkeep.connectors.base import DiskInfo, DiskWriter, VmConfig
from vmkeep.connectors.files.qcow2_writer import Qcow2DiskWriter
from vmkeep.connectors.libvirt.backup.workdir import abandon_workdir, make_workdir, remove_workdir
from vmkeep.connectors.libvirt.bindings import error_code, libvirt, one_line
from vmkeep.connectors.libvirt.connection import Connection
from vmkeep.connectors.libvirt.domxml import DOMAIN_XML_KEY
from vmkeep.connectors.libvirt.restore.volume_upload import UploadingVolumeWriter
from vmkeep.connectors.libvirt.xmltext import escape
from vmkeep.errors import ConnectorError, NameTakenError

KEEP_MACS_KEY = "vmkeep.keep_macs"
DEFAULT_POOL = "default"
FILE_POOL_TYPES = ("dir", "fs", "netfs")  # pools whose volumes are plain files
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


def random_mac() -> str:
    """A random address in QEMU/KVM's locally administered range 52:54:00:xx:xx:xx."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


def volume_name(vm_name: str, disk_name: str) -> str:
    return f"{_UNSAFE.sub('_', vm_name)}-{_UNSAFE.sub('_', disk_name)}.qcow2"


def check_domain_name(name: str) -> str:
    if not name or name.strip() != name or "/" in name or any(ord(c) < 32 for c in name):
        raise ConnectorError(f"invalid domain name {name!r}")
    return name


def lookup_pool(conn: Any, target: str) -> Any:
    """The active file-based storage pool named `target` ("" = the pool named "default")."""
    lv = libvirt()
    name = target or DEFAULT_POOL
    try:
        pool = conn.storagePoolLookupByName(name)
    except lv.libvirtError as exc:
        if error_code(exc) == lv.VIR_ERR_NO_STORAGE_POOL:
            hint = " (there is no pool named 'default': name a pool)" if not target else ""
            raise ConnectorError(f"no libvirt storage pool {name!r}{hint}") from None
        raise ConnectorError(f"cannot look up storage pool {name!r}: {one_line(exc)}") from None
    try:
        pool_type = ET.fromstring(pool.XMLDesc(0)).get("type", "")
        active = bool(pool.isActive())
    except lv.libvirtError as exc:
        raise ConnectorError(f"cannot read storage pool {name!r}: {one_line(exc)}") from None
    if pool_type not in FILE_POOL_TYPES:
        raise ConnectorError(
            f"storage pool {name!r} is of type {pool_type!r}: restores need a pool of type dir"
        )
    if not active:
        raise ConnectorError(f"storage pool {name!r} is not active (virsh pool-start {name})")
    return pool


class _VolumeWriter:
    """A Qcow2DiskWriter whose close is idempotent and tells libvirt the volume changed."""

    def __init__(self, writer: Qcow2DiskWriter, pool: Any) -> None:
        self._writer = writer
        self._pool = pool
        self._closed = False

    def write(self, offset: int, data: bytes) -> None:
        self._writer.write(offset, data)

    def write_parts(self, offset: int, parts: list[bytes]) -> None:
        self._writer.write_parts(offset, parts)

    def zero(self, offset: int, length: int) -> None:
        self._writer.zero(offset, length)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        with contextlib.suppress(Exception):
            self._pool.refresh(0)

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class NewDomainSink:
    """A new domain `config.name` with its disks as new volumes of `pool`."""

    def __init__(
        self,
        conn: Connection,
        config: VmConfig,
        target: str,
        *,
        volume_stem: str = "",
        upload: bool = False,
    ) -> None:
        """`volume_stem`: volumes are named `<stem>-<disk>.qcow2` (default: the VM name).
        `upload`: write the volumes through libvirt streams (the pool is on another host)."""
        self._conn = conn
        self._upload = upload
        self._config = config
        name = check_domain_name(config.name)
        self.location = name
        xml = config.metadata.get(DOMAIN_XML_KEY)
        if not xml:
            raise ConnectorError(
                "the restore point has no libvirt domain XML (it was not taken from libvirt): "
                "restore it with the connector it came from"
            )
        try:
            self._root = ET.fromstring(xml)
        except ET.ParseError as exc:
            raise ConnectorError(f"the recorded domain XML is invalid: {exc}") from None
        self._check_name_free(name)
        self._pool = lookup_pool(conn.ensure(), target)
        self._pool_name = target or DEFAULT_POOL
        self._stem = volume_stem or name
        self._vol_names = {d.name: volume_name(self._stem, d.name) for d in config.disks}
        if len(set(self._vol_names.values())) != len(self._vol_names):
            raise ConnectorError(f"disk names of {name} collide as volume names")
        with contextlib.suppress(Exception):
            self._pool.refresh(0)
        for vol_name in self._vol_names.values():
            if self._volume_exists(vol_name):
                raise NameTakenError(
                    f"volume {vol_name} already exists in pool {self._pool_name!r}: "
                    "choose another VM name"
                )
        self._volumes: list[Any] = []  # created by us, deleted by abort
        self._paths: dict[str, str] = {}  # disk name -> volume path
        self._writers: list[_VolumeWriter | UploadingVolumeWriter] = []
        self._done = False
        # A SIGKILLed restore cannot abort(): a locked run directory names the volumes it is
        # creating, and the next backup or replication on this host deletes those no domain
        # uses (stale_runs.py). Over a remote URI it is an owner record of that URI's host,
        # cleaned by the next run over it (remote_runs.py).
        self._workdir = self._record(upload)

    @property
    def paths(self) -> dict[str, str]:
        """Disk name -> path of its new volume (instant restore points overlays at them)."""
        return dict(self._paths)

    @property
    def uploads(self) -> bool:
        return self._upload

    def _record(self, remote: bool) -> Path | None:
        """The locked marker naming the volumes this run creates (None: none could be made for
        a remote host, vmkeep not root here; a kill then leaves them to a human)."""
        owner: dict[str, object] = {"volumes": self._planned()}
        if not remote:
            return make_workdir(owner=owner)
        owner |= {"uri": self._conn.uri, "host": self._conn.host_id()}
        try:
            return make_workdir(owner=owner, for_qemu=False)
        except ConnectorError:
            return None

    def _planned(self) -> list[list[str]]:
        return [[self._pool_name, name] for name in self._vol_names.values()]

    def _check_name_free(self, name: str) -> None:
        lv = libvirt()
        conn = self._conn.ensure()
        try:
            conn.lookupByName(name)
        except lv.libvirtError as exc:
            if error_code(exc) == lv.VIR_ERR_NO_DOMAIN:
                return
            raise ConnectorError(f"cannot look up domain {name!r}: {one_line(exc)}") from None
        raise NameTakenError(f"a domain named {name!r} already exists: choose another name")

    def _volume_exists(self, vol_name: str) -> bool:
        lv = libvirt()
        try:
            self._pool.storageVolLookupByName(vol_name)
        except lv.libvirtError as exc:
            if error_code(exc) == lv.VIR_ERR_NO_STORAGE_VOL:
                return False
            raise ConnectorError(f"cannot look up volume {vol_name}: {one_line(exc)}") from None
        return True

    def open_disk(self, disk: DiskInfo) -> DiskWriter:
        if self._done:
            raise ConnectorError(f"restore of {self.location} is already finished")
        if disk.name in self._paths:
            raise ConnectorError(f"disk {disk.name!r} opened twice")
        lv = libvirt()
        vol_name = self._vol_names.get(disk.name) or volume_name(self._stem, disk.name)
        vol_xml = _volume_xml(vol_name, disk.size, self._upload)
        try:
            vol = self._pool.createXML(vol_xml, 0)
        except lv.libvirtError as exc:
            raise ConnectorError(
                f"cannot create volume {vol_name} in pool {self._pool_name!r}: {one_line(exc)}"
            ) from None
        self._volumes.append(vol)
        try:
            path = str(vol.path())
        except lv.libvirtError as exc:
            raise ConnectorError(f"cannot read volume {vol_name}: {one_line(exc)}") from None
        writer: _VolumeWriter | UploadingVolumeWriter
        if self._upload:
            label = f"volume {vol_name} of pool {self._pool_name!r}"
            writer = UploadingVolumeWriter(self._conn.ensure(), vol, disk.size, label)
        else:
            writer = _VolumeWriter(
                Qcow2DiskWriter(path, disk.size, replace_existing=True), self._pool
            )
        self._paths[disk.name] = path
        self._writers.append(writer)
        return writer

    def commit(self) -> None:
        """Close the disks, then define the domain (shut off)."""
        if self._done:
            raise ConnectorError(f"restore of {self.location} is already finished")
        lv = libvirt()
        try:
            for disk in self._config.disks:  # disks never written are still part of the VM
                if disk.name not in self._paths:
                    self.open_disk(disk)
            for writer in self._writers:
                writer.close()
            xml = domain_xml_for(self._root, self._config, self._paths)
            self._check_name_free(self.location)
            try:
                self._conn.ensure().defineXML(xml)
            except lv.libvirtError as exc:
                raise ConnectorError(
                    f"cannot define domain {self.location}: {one_line(exc)}"
                ) from None
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._forget_workdir()

    def _forget_workdir(self) -> None:
        if self._workdir is not None:
            remove_workdir(self._workdir, [])
            self._workdir = None

    def abort(self) -> None:
        """Delete the volumes this restore created; harmless after commit or a second call."""
        if self._done:
            return
        self._done = True
        for writer in self._writers:
            writer.discard()
        left = 0
        for vol in self._volumes:
            try:
                vol.delete(0)
            except Exception:  # e.g. libvirtd restarted: the next run deletes it
                left += 1
        with contextlib.suppress(Exception):
            self._pool.refresh(0)
        if left and self._workdir is not None:
            abandon_workdir(self._workdir, None)  # stale now: the next run's cleanup deletes them
            self._workdir = None
        self._forget_workdir()


def _volume_xml(name: str, size: int, upload: bool) -> str:
    """A qcow2 v3 volume of `size`; for an upload an empty one (volume_upload.py says why)."""
    if upload:
        return (
            f"<volume><name>{escape(name)}</name><capacity unit='bytes'>0</capacity>"
            "<target><format type='raw'/></target></volume>"
        )
    return (
        f"<volume><name>{escape(name)}</name><capacity unit='bytes'>{int(size)}</capacity>"
        "<target><format type='qcow2'/><compat>1.1</compat></target></volume>"
    )


def domain_xml_for(root: ET.Element, config: VmConfig, paths: dict[str, str]) -> str:
    """The recorded domain XML turned into a new domain's: new name and uuid, disks restored
    from the restore point pointing at `paths` (other hard disks dropped: they would be shared
    with the original), new MACs unless config.metadata["vmkeep.keep_macs"], live-only state
    (id, aliases, tap names, dynamic security labels, the nvram file) removed."""
    root = ET.fromstring(ET.tostring(root))  # a copy
    root.attrib.pop("id", None)
    _set_text(root, "name", config.name)
    _set_text(root, "uuid", config.uuid)
    for parent in root.iter():
        for child in list(parent):
            if child.tag == "alias" and not (child.get("name") or "").startswith("ua-"):
                parent.remove(child)
    for seclabel in root.iterfind("seclabel"):
        if seclabel.get("type") == "dynamic":
            for el in list(seclabel):
                if el.tag in ("label", "imagelabel"):
                    seclabel.remove(el)
    for nvram in root.iterfind("./os/nvram"):
        nvram.text = None  # libvirt makes a fresh one from the template for the new name
    devices = root.find("devices")
    if devices is not None:
        for disk in list(devices.iterfind("disk")):
            if disk.get("device", "disk") != "disk":
                continue
            target = disk.find("target")
            dev = target.get("dev", "") if target is not None else ""
            if dev not in paths:
                devices.remove(disk)
                continue
            _point_disk_at(disk, paths[dev])
        keep_macs = bool(config.metadata.get(KEEP_MACS_KEY))
        for iface in devices.iterfind("interface"):
            for el in list(iface):
                if el.tag == "target":  # vnetN of the running original
                    iface.remove(el)
            if not keep_macs:
                mac = iface.find("mac")
                if mac is None:
                    mac = ET.SubElement(iface, "mac")
                mac.set("address", random_mac())
    return ET.tostring(root, encoding="unicode")


def _set_text(root: ET.Element, tag: str, text: str) -> None:
    el = root.find(tag)
    if el is None:
        el = ET.Element(tag)
        root.insert(0, el)
    el.text = text


def _point_disk_at(disk: ET.Element, path: str) -> None:
    disk.set("type", "file")
    for el in list(disk):
        if el.tag in ("source", "backingStore", "mirror"):
            disk.remove(el)
    driver = disk.find("driver")
    if driver is None:
        driver = ET.Element("driver", {"name": "qemu"})
        disk.insert(0, driver)
    driver.set("type", "qcow2")
    source = ET.Element("source", {"file": path})
    disk.insert(list(disk).index(driver) + 1, source)
