"""Incremental replication: one replica `<source>-replica` kept up to date. Each run reads, at
one instant, only the blocks written since the previous run (the dirty bitmap of a replication
checkpoint, separate from backup checkpoints), writes them into the replica's volumes in place,
and takes a replica snapshot as a rollback point (keeping the newest N, N < 10).

Full copies, each with its reason in the report: no replica yet; the replica changed since the
last run (started, written, reverted: its volume identities or current snapshot moved) - it is
then renamed and kept, and a fresh replica takes its name; the source's disks changed; the
replication checkpoint is missing or inconsistent - then the full read is written into the
existing replica (its snapshots stay). An interrupted write is rolled back to the last
snapshot, so the replica never stays half-updated."""

from __future__ import annotations

import contextlib
import secrets
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from vmkeep.connectors.base import BackupSession, VmConfig
from vmkeep.connectors.libvirt.connection import Connection
from vmkeep.connectors.libvirt.domxml import vm_config
from vmkeep.connectors.libvirt.replica import domains as replica_domains
from vmkeep.connectors.libvirt.replica import snapshots as replica_snapshots
from vmkeep.connectors.libvirt.replica.domains import Replica, disk_paths, lookup
from vmkeep.connectors.libvirt.replica.record import (
    INCREMENTAL,
    ReplicaRecord,
    read_record,
    why_changed,
    write_record,
)
from vmkeep.errors import ConnectorError
from vmkeep.operations.replication.copy import copy_disk, covering
from vmkeep.operations.replication.fresh import create_replica
from vmkeep.operations.replication.report import CopyStats, ReplicationReport
from vmkeep.operations.replication.source import (
    SourceAccess,
    base_of,
    checkpoint_of,
    open_source,
)
from vmkeep.operations.replication.volumes import ReplicaVolumes
from vmkeep.progress import Progress


def replica_name(source: str) -> str:
    return f"{source}-replica"


def usable_replica(
    dst: Connection, source: VmConfig, report: ReplicationReport, volumes: ReplicaVolumes
) -> Replica | None:
    """The existing replica when it can take an increment; None (with the reason noted, a
    changed one set aside) when the run must make a fresh one."""
    name = replica_name(source.name)
    dom = lookup(dst, name)
    if dom is None:
        report.notes.append(f"no replica {name} yet: full copy into a new replica")
        return None
    record = read_record(dom)
    if record is None or record.kind != INCREMENTAL or record.source_uuid != source.uuid:
        raise ConnectorError(
            f"domain {name} exists but is not vmkeep's incremental replica of {source.name} "
            f"({source.uuid}): rename or remove it"
        )
    replica = Replica(dom, name, record)
    why = (
        why_changed(dom, record, disk_paths(dom), volumes.stat)
        if not dom.isActive()
        else "it is running"
    )
    if record.writing and why != "it is running":
        why = "the previous run was interrupted while writing into it (vmkeep was killed)"
    if why is None and record.disk_sizes != {d.name: d.size for d in source.disks}:
        why = "the source's disks (set or sizes) changed since the last run"
    if why is None:
        return replica
    kept = replica_domains.set_aside(dst, replica)
    report.set_aside = kept
    report.notes.append(
        f"replica {name} changed since the last run ({why}): kept as domain {kept}, "
        "full copy into a fresh replica"
    )
    return None


def update_replica(
    replica: Replica,
    session: BackupSession,
    incremental: bool,
    progress: Progress,
    volumes: ReplicaVolumes,
) -> CopyStats:
    """Write the session's dirty blocks (incremental) or every block (full) into the replica's
    volumes. On failure the replica is reverted to its last snapshot."""
    paths = disk_paths(replica.dom)
    stats = CopyStats()
    write_record(replica.dom, replace(replica.record, writing=True))  # XML only: stamps hold
    try:
        for target, reader in session.readers.items():
            # A disk that keeps no bitmap (raw) is read whole even in an incremental run.
            delta = incremental and reader.dirty_since is not None
            extents = reader.dirty_extents() if delta else covering(reader.size, reader.extents())
            with volumes.open(paths[target], target) as image:
                stats.add(
                    copy_disk(
                        reader, image, extents, progress, f"{replica.name}/{target}", fresh=False
                    )
                )
        session.confirm()  # a job ended from outside: the replica is rolled back
    except BaseException:
        rollback(replica, paths, volumes)
        raise
    return stats


def rollback(replica: Replica, paths: dict[str, str], volumes: ReplicaVolumes) -> None:
    """Back to the last run's snapshot, and record the volumes as that left them; when that
    fails the stale record makes the next run start afresh (never an increment on top)."""
    snapshot = replica.record.snapshot
    if snapshot is None:
        return
    with contextlib.suppress(ConnectorError):
        replica_snapshots.revert(replica.dom, snapshot)
        replica.record.stamp(paths, volumes.stat)
        write_record(replica.dom, replica.record)


def replicate_incremental(
    src: Connection,
    dst: Connection,
    dom: Any,
    pool: str,
    keep: int,
    progress: Progress,
    volumes: ReplicaVolumes | None = None,
    access: SourceAccess | None = None,
) -> ReplicationReport:
    """`volumes`: how the replica's files are reached (default: this host's paths); `access`:
    how the source's disks are (default: by `src`'s URI, no TCP opt-in)."""
    began = time.monotonic()
    volumes = volumes or ReplicaVolumes()
    source = vm_config(dom)
    report = ReplicationReport(source.name, replica_name(source.name), "full", False, CopyStats())
    replica = usable_replica(dst, source, report, volumes)
    previous: dict[str, str | None] = {}
    if replica is not None:
        if replica.record.checkpoint:
            previous = {t: replica.record.checkpoint for t in replica.record.disk_sizes}
        else:
            report.notes.append(
                "the previous run made no replication checkpoint (source shut off or disks "
                "without bitmaps): full copy into the replica"
            )
    with open_source(src, dom, previous, incremental=True, access=access) as session:
        incremental = base_of(session) is not None
        if replica is None:
            stamp = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"
            record = ReplicaRecord(INCREMENTAL, source.uuid, source.name, "")
            new_dom, paths, report.stats = create_replica(
                dst, source, session, report.replica, pool, progress,
                volume_stem=f"{report.replica}-{stamp}", upload=volumes.upload, record=record,
            )  # fmt: skip
            record.own(paths)
            replica = Replica(new_dom, report.replica, record)
            report.fresh = True
        else:
            if previous and not incremental:
                report.notes.append("full copy into the existing replica (its snapshots stay)")
            report.stats = update_replica(replica, session, incremental, progress, volumes)
        report.mode = "incremental" if incremental else "full"
        report.checkpoint = checkpoint_of(session)
        try:
            refresh(dst, replica)
            finish_replica(replica, source, report, keep, volumes)
        except BaseException:
            with contextlib.suppress(ConnectorError):
                refresh(dst, replica)
            undo(dst, replica, report.fresh, volumes)
            raise
        report.notes.extend(session.notes)
    report.duration = time.monotonic() - began
    return report


def refresh(dst: Connection, replica: Replica) -> None:
    """The replica's domain object on a live connection: libvirtd may have restarted while the
    blocks were copied (the NBD export survives that, LIBVIRT-NOTES §8; the old connection not)."""
    if not dst.alive():
        dom = lookup(dst, replica.name)  # reconnects
        if dom is None:
            raise ConnectorError(f"replica {replica.name} vanished during the run")
        replica.dom = dom


def undo(dst: Connection, replica: Replica, fresh: bool, volumes: ReplicaVolumes) -> None:
    """The run failed after writing: a replica it created is deleted, an updated one rolled
    back, so no replica is left without a record matching its disks."""
    if fresh:
        with contextlib.suppress(ConnectorError):
            replica_domains.delete(dst, replica)
    else:
        with contextlib.suppress(ConnectorError):
            rollback(replica, disk_paths(replica.dom), volumes)


def finish_replica(
    replica: Replica,
    source: VmConfig,
    report: ReplicationReport,
    keep: int,
    volumes: ReplicaVolumes,
) -> None:
    """Snapshot the replica, prune old snapshots, record the volumes as this run left them."""
    what = "incremental" if report.mode == "incremental" else "full"
    report.snapshot = replica_snapshots.create(
        replica.dom, f"vmkeep {what} replication of {source.name}"
    )
    report.deleted += replica_snapshots.prune(replica.dom, keep)
    report.snapshots = replica_snapshots.vmkeep_snapshots(replica.dom)
    record = ReplicaRecord(
        INCREMENTAL, source.uuid, source.name,
        datetime.now(UTC).isoformat(timespec="microseconds"),
        checkpoint=report.checkpoint, snapshot=report.snapshot,
        disk_sizes={d.name: d.size for d in source.disks},
    )  # fmt: skip
    record.stamp(disk_paths(replica.dom), volumes.stat)
    write_record(replica.dom, record)
    replica.record = record
