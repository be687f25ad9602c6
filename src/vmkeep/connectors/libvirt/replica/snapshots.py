"""Rollback points of an incremental replica: one internal qcow2 snapshot per run, taken by
libvirt on the shut-off replica (it runs `qemu-img snapshot` on each disk), named
`vmkeep-repl-<UTC time>`, the oldest deleted beyond the kept count. Snapshots of other names
(an administrator's own) are never deleted."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from vmkeep.connectors.libvirt.bindings import libvirt, one_line
from vmkeep.connectors.libvirt.xmltext import escape
from vmkeep.errors import ConnectorError

PREFIX = "vmkeep-repl-"
MAX_KEEP = 9  # the chain of replica snapshots stays short (< 10)


def new_name() -> str:
    """Unique, and sorting by name sorts by creation."""
    return f"{PREFIX}{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}-{secrets.token_hex(2)}"


def create(dom: Any, description: str) -> str:
    """An internal snapshot of every disk of the shut-off replica; its name."""
    lv = libvirt()
    name = new_name()
    xml = (
        f"<domainsnapshot><name>{name}</name>"
        f"<description>{escape(description)}</description></domainsnapshot>"
    )
    try:
        dom.snapshotCreateXML(xml, 0)
    except lv.libvirtError as exc:
        raise ConnectorError(f"cannot snapshot replica {dom.name()}: {one_line(exc)}") from None
    return name


def vmkeep_snapshots(dom: Any) -> list[str]:
    """This replica's vmkeep snapshots, oldest first."""
    lv = libvirt()
    try:
        names = [str(s.getName()) for s in dom.listAllSnapshots(0)]
    except lv.libvirtError as exc:
        raise ConnectorError(f"cannot list snapshots of {dom.name()}: {one_line(exc)}") from None
    return sorted(n for n in names if n.startswith(PREFIX))


def prune(dom: Any, keep: int) -> list[str]:
    """Delete all but the newest `keep` vmkeep snapshots; the names deleted."""
    lv = libvirt()
    names = vmkeep_snapshots(dom)
    deleted = []
    for name in names[: max(0, len(names) - keep)]:
        try:
            dom.snapshotLookupByName(name, 0).delete(0)
        except lv.libvirtError as exc:
            raise ConnectorError(
                f"cannot delete snapshot {name} of {dom.name()}: {one_line(exc)}"
            ) from None
        deleted.append(name)
    return deleted


def revert(dom: Any, name: str) -> None:
    """Put the replica's disks back to snapshot `name` (after an interrupted run)."""
    lv = libvirt()
    try:
        dom.revertToSnapshot(dom.snapshotLookupByName(name, 0), 0)
    except lv.libvirtError as exc:
        raise ConnectorError(
            f"cannot revert replica {dom.name()} to {name}: {one_line(exc)}"
        ) from None
