"""Finding, setting aside and deleting replica domains. A domain is a replica only when its
<metadata> holds a vmkeep replica record (replica/record.py) naming the source's uuid: nothing
else is ever deleted or renamed, whatever its name looks like."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from vmkeep.connectors.libvirt.bindings import error_code, libvirt, one_line
from vmkeep.connectors.libvirt.connection import Connection
from vmkeep.connectors.libvirt.domxml import parse_disks
from vmkeep.connectors.libvirt.replica.record import NAMESPACE, ReplicaRecord, read_record
from vmkeep.errors import ConnectorError


@dataclass
class Replica:
    dom: Any
    name: str
    record: ReplicaRecord


def disk_paths(dom: Any) -> dict[str, str]:
    """target -> image path of the replica's disks (its persistent config)."""
    lv = libvirt()
    try:
        xml = dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE)
    except lv.libvirtError as exc:
        raise ConnectorError(f"cannot read domain {dom.name()}: {one_line(exc)}") from None
    return {d.target: d.source for d in parse_disks(xml)}


def lookup(conn: Connection, name: str) -> Any | None:
    lv = libvirt()
    try:
        return conn.ensure().lookupByName(name)
    except lv.libvirtError as exc:
        if error_code(exc) == lv.VIR_ERR_NO_DOMAIN:
            return None
        raise ConnectorError(f"cannot look up domain {name!r}: {one_line(exc)}") from None


def free_name(conn: Connection, base: str) -> str:
    """`base`, or `base-2`, `base-3`... when a domain already has that name."""
    name, n = base, 1
    while lookup(conn, name) is not None:
        n += 1
        name = f"{base}-{n}"
    return name


def replicas_of(conn: Connection, source_uuid: str, kind: str | None) -> list[Replica]:
    """The source's replicas of one kind (None: both), oldest first (by recorded run time)."""
    found = []
    for dom in conn.list_domains():
        try:
            record = read_record(dom)
        except ConnectorError:
            continue  # another tool's metadata in our namespace: not ours to touch
        if record and kind in (None, record.kind) and record.source_uuid == source_uuid:
            found.append(Replica(dom, str(dom.name()), record))
    return sorted(found, key=lambda r: (r.record.created, r.name))


def source_uuid_by_name(conn: Connection, source_name: str) -> str | None:
    """The uuid replicas record for a source of that name (the source itself may be gone)."""
    for dom in conn.list_domains():
        try:
            record = read_record(dom)
        except ConnectorError:
            continue
        if record and record.source_name == source_name:
            return record.source_uuid
    return None


def delete(conn: Connection, replica: Replica) -> None:
    """Undefine a shut-off replica with its snapshots and delete the disk volumes vmkeep made
    for it (those in its record: a disk someone pointed elsewhere is left alone)."""
    lv = libvirt()
    dom = replica.dom
    if dom.isActive():
        raise ConnectorError(f"replica {replica.name} is running: not deleting it")
    ours = {v.path for v in replica.record.volumes.values()}
    paths = [p for p in disk_paths(dom).values() if p in ours]
    flags = (
        lv.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | lv.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
        | lv.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        | lv.VIR_DOMAIN_UNDEFINE_NVRAM
    )
    try:
        dom.undefineFlags(flags)
    except lv.libvirtError as exc:
        raise ConnectorError(f"cannot delete replica {replica.name}: {one_line(exc)}") from None
    for path in paths:
        delete_volume(conn, path)


def delete_volume(conn: Connection, path: str) -> None:
    lv = libvirt()
    try:
        vol = conn.ensure().storageVolLookupByPath(path)
    except lv.libvirtError:
        return  # not a pool volume (or already gone): left alone
    try:
        vol.delete(0)
    except lv.libvirtError as exc:
        raise ConnectorError(f"cannot delete volume {path}: {one_line(exc)}") from None
    with contextlib.suppress(lv.libvirtError):
        vol.storagePoolLookupByVolume().refresh(0)


def set_aside(conn: Connection, replica: Replica) -> str:
    """Rename a replica someone changed to `<name>-detached-<UTC time>`, keeping its disks and
    snapshots, so a fresh replica can take its name; the new name."""
    lv = libvirt()
    if replica.dom.isActive():
        raise ConnectorError(
            f"replica {replica.name} is running (someone started it): vmkeep never writes into "
            "a running replica; shut it down, and the next run keeps it aside and makes a "
            "fresh replica"
        )
    new = free_name(conn, f"{replica.name}-detached-{datetime.now(UTC):%Y%m%dT%H%M%SZ}")
    try:
        replica.dom.rename(new, 0)
    except lv.libvirtError as exc:
        raise ConnectorError(
            f"cannot rename changed replica {replica.name} to {new}: {one_line(exc)}"
        ) from None
    with contextlib.suppress(lv.libvirtError):  # no longer vmkeep's: never touched again
        replica.dom.setMetadata(
            lv.VIR_DOMAIN_METADATA_ELEMENT, None, None, NAMESPACE, lv.VIR_DOMAIN_AFFECT_CONFIG
        )
    return new
