"""Full replication: each run copies the source, at one instant, into a new shut-off domain
`<source>-replica-<UTC time>` and keeps the newest N such replicas (older ones are deleted with
their volumes; only domains whose vmkeep record names this source are ever deleted)."""

from __future__ import annotations

import contextlib
import time
from datetime import UTC, datetime
from typing import Any

from vmkeep.connectors.libvirt.connection import Connection
from vmkeep.connectors.libvirt.domxml import vm_config
from vmkeep.connectors.libvirt.replica import domains as replica_domains
from vmkeep.connectors.libvirt.replica.domains import Replica, free_name
from vmkeep.connectors.libvirt.replica.record import FULL, ReplicaRecord, write_record
from vmkeep.errors import ConnectorError
from vmkeep.operations.replication.fresh import create_replica
from vmkeep.operations.replication.report import ReplicationReport
from vmkeep.operations.replication.source import SourceAccess, open_source
from vmkeep.progress import Progress


def dated_name(conn: Connection, source: str, now: datetime) -> str:
    """`<source>-replica-<UTC time>`, with -2, -3... when a run in the same second made one."""
    return free_name(conn, f"{source}-replica-{now:%Y%m%dT%H%M%SZ}")


def replicate_full(
    src: Connection,
    dst: Connection,
    dom: Any,
    pool: str,
    keep: int,
    progress: Progress,
    upload: bool = False,
    access: SourceAccess | None = None,
) -> ReplicationReport:
    """`upload`: `dst` is another host; the volumes go through libvirt upload streams.
    `access`: how the source's disks are reached (default: by `src`'s URI, no TCP opt-in)."""
    began = time.monotonic()
    now = datetime.now(UTC)
    source = vm_config(dom)
    name = dated_name(dst, source.name, now)
    record = ReplicaRecord(
        FULL, source.uuid, source.name, now.isoformat(timespec="microseconds"),
        disk_sizes={d.name: d.size for d in source.disks},
    )  # fmt: skip
    with open_source(src, dom, {}, incremental=False, access=access) as session:
        new_dom, paths, stats = create_replica(
            dst, source, session, name, pool, progress, upload=upload, record=record
        )
        notes = list(session.notes)
    record.own(paths)
    record.writing = False
    try:
        if not upload:  # identities of files on another host cannot be taken (nor are needed)
            record.stamp(paths)
        write_record(new_dom, record)
    except BaseException:
        with contextlib.suppress(ConnectorError):
            replica_domains.delete(dst, Replica(new_dom, name, record))
        raise
    report = ReplicationReport(source.name, name, "full", True, stats, notes=notes)
    report.notes.insert(0, "full replication: every allocated block copied into a new replica")
    replicas = replica_domains.replicas_of(dst, source.uuid, FULL)
    # Still marked writing: a run killed between defining its replica and recording it
    # (never a usable copy). Deleted, and not counted among the kept ones.
    dead = [r for r in replicas if r.record.writing and r.name != name]
    usable = [r for r in replicas if not r.record.writing or r.name == name]
    for old in dead + usable[:-keep]:
        try:
            replica_domains.delete(dst, old)
        except ConnectorError as exc:  # the new replica is made: say why an old one stays
            report.notes.append(f"older replica {old.name} kept: {exc}")
            continue
        report.deleted.append(old.name)
    report.duration = time.monotonic() - began
    return report
