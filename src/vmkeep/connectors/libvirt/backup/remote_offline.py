"""A shut-off domain over a remote qemu+ssh:// URI: its images are files of that host, so each
disk is read through a READ-ONLY qemu-nbd started there over ssh (ssh_nbd.RemoteNbdImage), and
the checkpoint bitmaps are added and removed by qemu-img run there over ssh (qemu_img.py), all
over one ssh connection (ssh_master.py); vmkeep never opens the paths here. Image paths come
from the domain XML, pool volumes resolved through the remote connection. Otherwise the run is
offline.py's: the same delta planning, the same checkpoints, so the next run (offline or live)
is a delta. Killed live runs over this URI's host are cleaned up first, as a live run does
(remote_runs.py).

Nothing but the checkpoint stays on the host: closing a reader ends its qemu-nbd and removes its
/tmp directory there, also when vmkeep dies (ssh_nbd.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from vmkeep.connectors.libvirt.backup import checkpoints
from vmkeep.connectors.libvirt.backup.offline import OfflineBackupSession, begin_offline_backup
from vmkeep.connectors.libvirt.bindings import libvirt, one_line
from vmkeep.connectors.libvirt.cleanup.remote_runs import clean_remote_runs
from vmkeep.connectors.libvirt.connection import Connection
from vmkeep.connectors.libvirt.domxml import parse_disks, resolve_volume
from vmkeep.connectors.libvirt.transport.image_nbd import FORMATS
from vmkeep.connectors.libvirt.transport.ssh_master import SshMaster
from vmkeep.connectors.libvirt.transport.ssh_nbd import SshTarget, is_ssh_uri
from vmkeep.errors import ConnectorError


def begin_remote_offline(
    conn: Connection,
    dom: Any,
    uri: str,
    previous: Mapping[str, str | None],
    *,
    keep_checkpoints: int = 1,
    checkpoint_prefix: str | None = checkpoints.PREFIX,
    after: Callable[[], str | None] | None = None,
) -> OfflineBackupSession:
    """Readers for every disk of the shut-off domain `dom` on the host of `uri` (qemu+ssh://),
    as begin_offline_backup's. One-line ConnectorError (no qemu-nbd left, `after` ran) when a
    disk cannot be read that way."""
    name = dom.name()
    try:
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
                    f"disk {d.target} of {name} ({d.source_type}) is not an image file or "
                    f"device on {target.host}: it cannot be read while the domain is shut off"
                )
            if d.fmt not in FORMATS:
                raise ConnectorError(f"disk {d.target}: image format {d.fmt!r} is not supported")
        cleaned = clean_remote_runs(conn, keep={c for c in previous.values() if c})
        master = SshMaster(target)  # closed by the session
    except BaseException:
        if after is not None:
            after()
        raise
    session = begin_offline_backup(
        dom,
        disks,
        previous,
        keep_checkpoints=keep_checkpoints,
        checkpoint_prefix=checkpoint_prefix,
        after=after,
        ssh=master,
    )
    session.notes[:0] = cleaned
    return session
