"""The hypervisors' own metadata in a metadata backup: libvirt domain, network and storage pool
definitions (their persistent XML), read with read-only calls. They are stored to be read and
printed, never redefined automatically: a fresh host may have other pools, bridges, paths and
CPUs, so blindly defining old XML could point domains at the wrong disks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vmkeep.errors import ConnectorError, IntegrityError

KINDS = ("domain", "network", "pool")


@dataclass
class LibvirtObject:
    kind: str  # domain | network | pool
    name: str
    uuid: str
    xml: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "uuid": self.uuid, "xml": self.xml}


@dataclass
class HypervisorMetadata:
    """Everything read from one libvirt URI."""

    uri: str
    objects: list[LibvirtObject] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"type": "libvirt", "uri": self.uri, "objects": [o.to_json() for o in self.objects]}

    @classmethod
    def from_json(cls, data: dict[str, Any], point_id: str = "") -> HypervisorMetadata:
        where = f"metadata point {point_id}: hypervisors"
        uri, objects = data.get("uri"), data.get("objects")
        if data.get("type") != "libvirt" or not isinstance(uri, str):
            raise IntegrityError(f"{where}: unknown type or uri")
        if not isinstance(objects, list):
            raise IntegrityError(f"{where}: objects is malformed")
        parsed = []
        for obj in objects:
            if not isinstance(obj, dict) or obj.get("kind") not in KINDS:
                raise IntegrityError(f"{where}: an object has no known kind")
            values = [obj.get(k) for k in ("name", "uuid", "xml")]
            if not all(isinstance(v, str) for v in values):
                raise IntegrityError(f"{where}: an object's name, uuid or xml is not text")
            parsed.append(LibvirtObject(str(obj["kind"]), *(str(v) for v in values)))
        return cls(uri, parsed)

    def counts(self) -> dict[str, int]:
        return {kind: sum(1 for o in self.objects if o.kind == kind) for kind in KINDS}


def collect_libvirt(uri: str) -> HypervisorMetadata:
    """Persistent (inactive) definitions of every domain, network and pool at `uri`; no
    secure data (VNC/SPICE passwords are left out by libvirt without the SECURE flag)."""
    from vmkeep.connectors.libvirt.bindings import libvirt, one_line
    from vmkeep.connectors.libvirt.connection import Connection

    lv = libvirt()
    connection = Connection(uri)
    try:
        conn = connection.conn
        result = HypervisorMetadata(uri)
        listings: list[tuple[str, Any, int]] = [
            ("domain", conn.listAllDomains, lv.VIR_DOMAIN_XML_INACTIVE),
            ("network", conn.listAllNetworks, lv.VIR_NETWORK_XML_INACTIVE),
            ("pool", conn.listAllStoragePools, lv.VIR_STORAGE_XML_INACTIVE),
        ]
        for kind, list_all, flags in listings:
            for obj in sorted(list_all(0), key=lambda o: str(o.name())):
                xml = _xml_desc(lv, obj, flags)
                result.objects.append(
                    LibvirtObject(kind, str(obj.name()), str(obj.UUIDString()), xml)
                )
        return result
    except lv.libvirtError as exc:
        raise ConnectorError(f"cannot read libvirt metadata at {uri}: {one_line(exc)}") from None
    finally:
        connection.close()


def _xml_desc(lv: Any, obj: Any, flags: int) -> str:
    """The persistent definition; a driver that knows no INACTIVE flag for this object
    (libvirt's test driver for networks) gives its only one."""
    try:
        return str(obj.XMLDesc(flags))
    except lv.libvirtError as exc:
        if exc.get_error_code() not in (lv.VIR_ERR_INVALID_ARG, lv.VIR_ERR_NO_SUPPORT):
            raise
        return str(obj.XMLDesc(0))
