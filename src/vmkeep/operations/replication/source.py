"""Reading the source domain at one consistent instant: a pull-mode backup job when it runs,
its images when it is shut off (nothing writes them then). Incremental replication makes a
replication checkpoint either way (offline: bitmaps added with qemu-img, offline.py) and reads
the dirty extents of the previous one when it is intact; full replication makes none.

A source over a remote URI (vmkeep on a DR host pulling from a production host) is read as
remote backups read it: a running one through the pull job's NBD export on TCP (--nbd-host,
LIBVIRT-NOTES §16; scratch files next to its images on that host), a shut-off one through a
read-only qemu-nbd started on that host over ssh, with its replication checkpoint's bitmaps
added there by qemu-img over ssh (remote_offline.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from vmkeep.connectors.base import DiskReader
from vmkeep.connectors.libvirt.backup import checkpoints
from vmkeep.connectors.libvirt.backup.live import LiveBackupSession, begin_live_backup
from vmkeep.connectors.libvirt.backup.offline import (
    ImageDiskReader,
    OfflineBackupSession,
    begin_offline_backup,
    check_images_unchanged,
)
from vmkeep.connectors.libvirt.backup.remote_offline import begin_remote_offline
from vmkeep.connectors.libvirt.bindings import libvirt, one_line
from vmkeep.connectors.libvirt.connection import Connection
from vmkeep.connectors.libvirt.connector import TcpExport, is_local_uri
from vmkeep.connectors.libvirt.domxml import DomainDisk, is_active, parse_disks, started_meanwhile
from vmkeep.errors import ConnectorError

# Notes of the backup path that speak of restore points; replication gives its own reasons.
_BACKUP_WORDING = "previous restore point"


class ImageSession:
    """A shut-off source read from its images: no job, no checkpoint, nothing to end."""

    def __init__(self, dom: Any, disks: list[DomainDisk]) -> None:
        self.dom = dom
        self.name: str = dom.name()
        self.notes = [f"source {self.name} is shut off: full read of its images"]
        self.readers: dict[str, DiskReader] = {}
        try:
            for d in disks:
                self.readers[d.target] = ImageDiskReader(d)
        except BaseException:
            self.finish(ok=False)
            raise

    def confirm(self) -> None:
        """A source started (or written) while its images were copied: no replica from it."""
        if started_meanwhile(self.dom):
            raise ConnectorError(
                f"source {self.name} was started while its images were copied: the copy "
                "is not one point in time, so no replica is made from it"
            )
        check_images_unchanged(self.name, self.readers.values())

    def finish(self, ok: bool) -> None:
        for reader in self.readers.values():
            with contextlib.suppress(Exception):
                reader.close()

    def __enter__(self) -> ImageSession:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.finish(ok=et is None)


Session = LiveBackupSession | OfflineBackupSession | ImageSession


@dataclass(frozen=True)
class SourceAccess:
    """How the source's disks are reached: `uri` local (a unix socket, the image files), or
    remote (`nbd`: the TCP export a running source's job listens on; qemu-nbd over ssh for a
    shut-off one)."""

    uri: str = "qemu:///system"
    nbd: TcpExport = field(default_factory=TcpExport)

    @property
    def local(self) -> bool:
        return is_local_uri(self.uri)


def open_source(
    conn: Connection,
    dom: Any,
    previous: Mapping[str, str | None],
    *,
    incremental: bool,
    access: SourceAccess | None = None,
) -> Session:
    """A session whose readers show the source's disks at one instant. `incremental`: the job
    makes a replication checkpoint and, when `previous` names a valid one, reads dirty blocks."""
    access = access or SourceAccess(conn.uri)
    session: Session
    if is_active(dom):
        session = begin_live_backup(
            conn,
            dom,
            previous,
            keep_checkpoints=1,
            local=access.local,
            checkpoint_prefix=checkpoints.REPLICATION_PREFIX if incremental else None,
            tcp=None if access.local else access.nbd.server(access.uri),
        )
    elif not access.local:
        session = begin_remote_offline(
            conn,
            dom,
            access.uri,
            previous,
            checkpoint_prefix=checkpoints.REPLICATION_PREFIX if incremental else None,
        )
    else:
        lv = libvirt()
        try:
            xml = dom.XMLDesc(0)
        except lv.libvirtError as exc:
            raise ConnectorError(f"cannot read domain {dom.name()}: {one_line(exc)}") from None
        if incremental:
            session = begin_offline_backup(
                dom,
                parse_disks(xml),
                previous,
                checkpoint_prefix=checkpoints.REPLICATION_PREFIX,
            )
        else:
            session = ImageSession(dom, parse_disks(xml))
    session.notes[:] = [n for n in session.notes if _BACKUP_WORDING not in n]
    return session


def base_of(session: Session) -> str | None:
    """The checkpoint the session's dirty extents are relative to (None: a full read)."""
    return None if isinstance(session, ImageSession) else session.base


def checkpoint_of(session: Session) -> str | None:
    """The replication checkpoint this session created (None: none could be made)."""
    return None if isinstance(session, ImageSession) else session.checkpoint
