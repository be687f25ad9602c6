"""Replication: copying a libvirt domain straight to another storage pool (and URI), not
through a repository. Full: a new dated replica per run, the newest N kept. Incremental: one
replica updated in place with the dirty blocks, with N rollback snapshots (N < 10)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from vmkeep.connectors.libvirt.bindings import is_libvirt_error, one_line
from vmkeep.connectors.libvirt.connection import Connection
from vmkeep.connectors.libvirt.connector import LibvirtConnector
from vmkeep.connectors.libvirt.replica_snapshots import MAX_KEEP
from vmkeep.connectors.libvirt.stale_runs import clean_stale_runs
from vmkeep.errors import ConnectorError, UsageError
from vmkeep.operations.replication.full import replicate_full
from vmkeep.operations.replication.incremental import replicate_incremental
from vmkeep.operations.replication.report import ReplicationReport
from vmkeep.operations.replication.volumes import ReplicaVolumes
from vmkeep.progress import Progress

MODES = ("full", "incremental")


@dataclass
class ReplicateOptions:
    domain: str  # name or uuid of the source domain
    pool: str  # storage pool of the replica's volumes ("" = "default")
    mode: str = "incremental"
    keep: int = 3  # replicas (full) or replica snapshots (incremental)
    uri: str = "qemu:///system"
    target_uri: str = ""  # "" = the source's URI


def check_options(options: ReplicateOptions) -> None:
    if options.mode not in MODES:
        raise UsageError(f"unknown replication mode {options.mode!r}: choose full or incremental")
    if options.keep < 1:
        raise UsageError("--keep must be at least 1")
    if options.mode == "incremental" and options.keep > MAX_KEEP:
        raise UsageError(
            f"--keep {options.keep}: incremental replication keeps at most {MAX_KEEP} replica "
            "snapshots (the chain of rollback points stays short)"
        )
    if not is_local(options.uri):
        raise ConnectorError(
            f"replicating from {options.uri} is not supported yet (the backup job's NBD socket "
            "is on that host): run vmkeep on the source's hypervisor host"
        )
    target = options.target_uri or options.uri
    if options.mode == "incremental" and not is_local(target) and not is_ssh(target):
        raise ConnectorError(
            f"incremental replication to {target} is not supported (the replica's volumes are "
            "written through a qemu-nbd started over ssh): use a qemu+ssh:// target URI, "
            "--mode full, or run vmkeep on the replica's host"
        )


def is_local(uri: str) -> bool:
    return LibvirtConnector(uri).local


def is_ssh(uri: str) -> bool:
    """A libvirt URI over OpenSSH (driver+ssh://host/...), whose host vmkeep can reach."""
    parts = urlsplit(uri)
    return parts.scheme.endswith("+ssh") and bool(parts.hostname)


def replicate(options: ReplicateOptions, progress: Progress) -> ReplicationReport:
    """One replication run of `options.domain`."""
    check_options(options)
    src = Connection(options.uri)
    # Its own connection even to the same URI: after a libvirtd restart each side reconnects
    # and looks its domain up again (a shared one would leave the job's domain object stale).
    dst = Connection(options.target_uri or options.uri)
    try:
        dom = src.lookup(options.domain)
        cleaned = clean_stale_runs(src)  # a killed run's job would block this one
        if options.mode == "full":
            upload = not is_local(options.target_uri or options.uri)
            report = replicate_full(src, dst, dom, options.pool, options.keep, progress, upload)
        else:
            target = options.target_uri or options.uri
            volumes = ReplicaVolumes.for_uri(target, is_local(target))
            report = replicate_incremental(
                src, dst, dom, options.pool, options.keep, progress, volumes
            )
        report.notes[:0] = cleaned
    except Exception as exc:
        if is_libvirt_error(exc):  # a libvirt call not wrapped on the way (e.g. libvirtd died)
            raise ConnectorError(
                f"replication of {options.domain} failed: {one_line(exc)}"
            ) from None
        raise
    finally:
        src.close()
        dst.close()
    for note in report.notes:
        progress.note(note)
    return report
