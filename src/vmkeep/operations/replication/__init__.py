"""Replication: copying a libvirt domain straight to another storage pool (and URI), not
through a repository. Full: a new dated replica per run, the newest N kept. Incremental: one
replica updated in place with the dirty blocks, with N rollback snapshots (N < 10). The source
may be on another host (a remote --uri: read as remote backups read, source.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vmkeep.connectors.libvirt.bindings import is_libvirt_error, one_line
from vmkeep.connectors.libvirt.cleanup.remote_runs import clean_remote_runs
from vmkeep.connectors.libvirt.cleanup.stale_runs import clean_stale_runs
from vmkeep.connectors.libvirt.connection import Connection
from vmkeep.connectors.libvirt.connector import TcpExport, is_local_uri
from vmkeep.connectors.libvirt.replica.snapshots import MAX_KEEP
from vmkeep.connectors.libvirt.transport.ssh_nbd import is_ssh_uri
from vmkeep.errors import ConnectorError, UsageError
from vmkeep.operations.replication.full import replicate_full
from vmkeep.operations.replication.incremental import replicate_incremental
from vmkeep.operations.replication.report import ReplicationReport
from vmkeep.operations.replication.source import SourceAccess
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
    # A running source over a remote URI: where its job's NBD export listens (--nbd-*)
    nbd: TcpExport = field(default_factory=TcpExport)


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
    target = options.target_uri or options.uri
    if options.mode == "incremental" and not is_local_uri(target) and not is_ssh_uri(target):
        raise ConnectorError(
            f"incremental replication to {target} is not supported (the replica's volumes are "
            "written through a qemu-nbd started over ssh): use a qemu+ssh:// target URI, "
            "--mode full, or run vmkeep on the replica's host"
        )


def replicate(options: ReplicateOptions, progress: Progress) -> ReplicationReport:
    """One replication run of `options.domain`."""
    check_options(options)
    src = Connection(options.uri)
    # Its own connection even to the same URI: after a libvirtd restart each side reconnects
    # and looks its domain up again (a shared one would leave the job's domain object stale).
    target = options.target_uri or options.uri
    target_local = is_local_uri(target)
    dst = Connection(target)
    access = SourceAccess(options.uri, options.nbd)
    try:
        dom = src.lookup(options.domain)
        # A killed run's job would block this one. Run directories are this host's: cleaned
        # through whichever side is local (a remote source's killed job is not: as backups).
        local = src if access.local else dst if target_local else None
        cleaned = clean_stale_runs(local) if local is not None else []
        if not target_local:  # a killed run's volumes in that host's pool (remote_runs.py)
            cleaned += clean_remote_runs(dst)
        if options.mode == "full":
            report = replicate_full(
                src, dst, dom, options.pool, options.keep, progress, not target_local, access
            )
        else:
            with ReplicaVolumes.for_uri(target, target_local) as volumes:
                report = replicate_incremental(
                    src, dst, dom, options.pool, options.keep, progress, volumes, access
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
