"""A fresh replica: a new shut-off domain defined from the source's domain XML (restore.py's
domain definition: new uuid, new MACs, disks pointed at new compat-1.1 qcow2 volumes), its
volumes written with the allocated blocks of the source as the session shows them."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from dataclasses import replace
from typing import Any

from vmkeep.connectors.base import BackupSession, VmConfig
from vmkeep.connectors.libvirt.bindings import libvirt, one_line
from vmkeep.connectors.libvirt.connection import Connection
from vmkeep.connectors.libvirt.domxml import DOMAIN_XML_KEY
from vmkeep.connectors.libvirt.replica.domains import disk_paths, lookup
from vmkeep.connectors.libvirt.replica.record import NAMESPACE, NS_KEY, ReplicaRecord
from vmkeep.connectors.libvirt.restore.new_domain import NewDomainSink, lookup_pool, volume_name
from vmkeep.errors import ConnectorError
from vmkeep.operations.replication.copy import copy_disk
from vmkeep.operations.replication.report import CopyStats
from vmkeep.progress import Progress


def create_replica(
    conn: Connection,
    source: VmConfig,
    session: BackupSession,
    name: str,
    pool: str,
    progress: Progress,
    *,
    volume_stem: str = "",
    upload: bool = False,
    record: ReplicaRecord,
) -> tuple[Any, dict[str, str], CopyStats]:
    """(the new domain, its image paths by disk target, what was copied). On failure nothing
    is left: the sink deletes the volumes it created and no domain is defined. The domain is
    defined with `record` (marked writing, owning its volumes) already in its metadata: a run
    killed between defining it and recording it left a domain no later run recognised, never
    pruned and its volumes never freed (found by SIGKILLing full replications)."""
    config = replace(source, name=name, uuid=str(uuid.uuid4()))
    record.writing = True
    record.own(_volume_paths(conn, pool, volume_stem or name, config))
    config = _with_record(config, record)
    sink = NewDomainSink(conn, config, pool, volume_stem=volume_stem, upload=upload)
    stats = CopyStats()
    try:
        for disk in config.disks:
            reader = session.readers.get(disk.name)
            if reader is None:
                raise ConnectorError(f"the source session has no reader for disk {disk.name}")
            writer = sink.open_disk(disk)
            try:
                stats.add(
                    copy_disk(
                        reader,
                        writer,
                        reader.extents(),
                        progress,
                        f"{source.name}/{disk.name}",
                        fresh=True,
                    )
                )
            finally:
                writer.close()
        session.confirm()  # a job ended from outside: no replica is defined
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    dom = lookup(conn, name)
    if dom is None:
        raise ConnectorError(f"replica {name} vanished right after it was defined")
    return dom, disk_paths(dom), stats


def _volume_paths(conn: Connection, pool: str, stem: str, config: VmConfig) -> dict[str, str]:
    """Where the sink creates the volumes: `<pool path>/<stem>-<disk>.qcow2` (file pools)."""
    lv = libvirt()
    try:
        root = ET.fromstring(lookup_pool(conn.ensure(), pool).XMLDesc(0))
    except lv.libvirtError as exc:
        raise ConnectorError(f"cannot read storage pool {pool!r}: {one_line(exc)}") from None
    base = (root.findtext("./target/path") or "").rstrip("/")
    return {d.name: f"{base}/{volume_name(stem, d.name)}" for d in config.disks}


def _with_record(config: VmConfig, record: ReplicaRecord) -> VmConfig:
    """`config` whose domain XML carries `record` as its vmkeep metadata (any other replaced)."""
    xml = config.metadata.get(DOMAIN_XML_KEY)
    if not xml:
        return config  # the sink refuses it with its own message
    root = ET.fromstring(xml)
    metadata = root.find("metadata")
    if metadata is None:
        metadata = ET.SubElement(root, "metadata")
    for old in metadata.findall(f"{{{NAMESPACE}}}replica"):
        metadata.remove(old)
    element = ET.fromstring(record.to_xml())
    element.tag = f"{{{NAMESPACE}}}replica"  # its <disk> children stay unqualified, as libvirt
    metadata.append(element)  # stores what virDomainSetMetadata is given
    ET.register_namespace(NS_KEY, NAMESPACE)
    meta = {**config.metadata, DOMAIN_XML_KEY: ET.tostring(root, encoding="unicode")}
    return replace(config, metadata=meta)
