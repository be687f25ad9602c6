"""A fresh replica: a new shut-off domain defined from the source's domain XML (restore.py's
domain definition: new uuid, new MACs, disks pointed at new compat-1.1 qcow2 volumes), its
volumes written with the allocated blocks of the source as the session shows them."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

from vmkeep.connectors.base import BackupSession, VmConfig
from vmkeep.connectors.libvirt.connection import Connection
from vmkeep.connectors.libvirt.replica_domains import disk_paths, lookup
from vmkeep.connectors.libvirt.restore import NewDomainSink
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
) -> tuple[Any, dict[str, str], CopyStats]:
    """(the new domain, its image paths by disk target, what was copied). On failure nothing
    is left: the sink deletes the volumes it created and no domain is defined."""
    config = replace(source, name=name, uuid=str(uuid.uuid4()))
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
