"""A shut-off domain over a remote qemu+ssh:// URI: its images are files of that host, so each
disk is read through a READ-ONLY qemu-nbd started there over ssh (ssh_nbd.RemoteNbdImage);
vmkeep never opens the paths or runs qemu-img here. Image paths come from the domain XML, pool
volumes resolved through the remote connection.

Full reads only (allocated extents from base:allocation): no checkpoint is made offline over a
remote URI (that would need `qemu-img bitmap` run on the host), so the next backup or
replication reads in full too. Nothing stays on the host: closing a reader ends its qemu-nbd
and removes its /tmp directory there, also when vmkeep dies (ssh_nbd.py)."""

from __future__ import annotations

import contextlib
from typing import Any

from vmkeep.connectors.base import DiskReader
from vmkeep.connectors.libvirt.bindings import libvirt, one_line
from vmkeep.connectors.libvirt.connection import Connection
from vmkeep.connectors.libvirt.domxml import (
    DomainDisk,
    parse_disks,
    resolve_volume,
    started_meanwhile,
)
from vmkeep.connectors.libvirt.image_nbd import FORMATS
from vmkeep.connectors.libvirt.session_notes import NotingSession
from vmkeep.connectors.libvirt.ssh_nbd import SshTarget, is_ssh_uri
from vmkeep.errors import ConnectorError


class RemoteImageSession(NotingSession):
    """Readers over a shut-off remote domain's images; no job and no checkpoint (`checkpoint`
    and `base` are None, as the other sessions name them), `finish` stops the qemu-nbds."""

    def __init__(self, dom: Any, disks: list[DomainDisk], notes: list[str]) -> None:
        self.dom = dom
        self.domain_name: str = dom.name()
        self.disks = disks
        self.notes = notes
        self.checkpoint: str | None = None
        self.base: str | None = None
        self.incremental: frozenset[str] = frozenset()
        self.readers: dict[str, DiskReader] = {}
        self._finished = False

    def confirm(self) -> None:
        """Images read while the domain was started are not one point in time (the qemu-nbd's
        shared lock should already have kept QEMU from opening them for writing)."""
        if started_meanwhile(self.dom):
            raise ConnectorError(
                f"domain {self.domain_name} was started while its images were read: what was "
                "read may not be one point in time"
            )

    def finish(self, ok: bool) -> None:
        """Close every reader: each waits until its remote qemu-nbd has exited."""
        if self._finished:
            return
        self._finished = True
        for target, reader in self.readers.items():
            try:
                reader.close()
            except Exception as exc:  # cleanup trouble is noted, never raised
                self._note(f"closing the remote reader of {target}: {exc}")


def begin_remote_offline(conn: Connection, dom: Any, uri: str) -> RemoteImageSession:
    """Readers for every disk of the shut-off domain `dom` on the host of `uri` (qemu+ssh://).
    One-line ConnectorError (and no qemu-nbd left) when a disk cannot be read that way."""
    name = dom.name()
    if not is_ssh_uri(uri):
        raise ConnectorError(
            f"domain {name} is shut off: over {uri} its images (files of that host) are read "
            "through a qemu-nbd started there over ssh, which needs a qemu+ssh:// URI; run "
            "vmkeep on the hypervisor host, or start the domain (read live over the URI)"
        )
    target = SshTarget.from_uri(uri)
    lv = libvirt()
    try:
        xml = dom.XMLDesc(0)
    except lv.libvirtError as exc:
        raise ConnectorError(f"cannot read domain {name}: {one_line(exc)}") from None
    disks = [resolve_volume(conn.ensure(), d) for d in parse_disks(xml)]
    if not disks:
        raise ConnectorError(f"domain {name} has no disks to back up")
    for d in disks:
        if d.source_type not in ("file", "block") or not d.source:
            raise ConnectorError(
                f"disk {d.target} of {name} ({d.source_type}) is not an image file or device "
                f"on {target.host}: it cannot be read while the domain is shut off"
            )
        if d.fmt not in FORMATS:
            raise ConnectorError(f"disk {d.target}: image format {d.fmt!r} is not supported")
    notes = [
        f"domain {name} is shut off: its images are read on {target.host} through a read-only "
        "qemu-nbd over ssh, in full (no checkpoint is made offline over a remote URI, so the "
        "next run reads in full too)"
    ]
    session = RemoteImageSession(dom, disks, notes)
    try:
        for d in disks:
            session.readers[d.target] = target.open_image(
                d.source, d.fmt, writable=False, name=d.target
            )
    except BaseException:
        with contextlib.suppress(Exception):
            session.finish(ok=False)
        raise
    return session
