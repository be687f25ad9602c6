"""Listing a source's replicas: what an administrator looks at before starting one (which is
newest, which rollback snapshots it has). Works when the source is gone too (host lost): the
replicas are found by the source name their records carry."""

from __future__ import annotations

from typing import Any

from vmkeep.connectors.libvirt.connection import Connection
from vmkeep.connectors.libvirt.domxml import state_name
from vmkeep.connectors.libvirt.replica import snapshots as replica_snapshots
from vmkeep.connectors.libvirt.replica.domains import replicas_of, source_uuid_by_name
from vmkeep.errors import NotFoundError


def list_replicas(source: str, uri: str, target_uri: str = "") -> list[dict[str, Any]]:
    """One row per replica of `source` (name or uuid), oldest first."""
    src = Connection(uri)
    dst = Connection(target_uri) if target_uri else src
    try:
        try:
            uuid = src.lookup(source).UUIDString().lower()
        except NotFoundError:
            found = source_uuid_by_name(dst, source)
            if found is None:
                raise NotFoundError(
                    f"no domain {source!r} on {uri}, and no replica records one of that name"
                ) from None
            uuid = found
        return [
            {
                "name": r.name,
                "kind": r.record.kind,
                "state": state_name(r.dom),
                "source": r.record.source_name,
                "source_uuid": r.record.source_uuid,
                "created": r.record.created,
                "checkpoint": r.record.checkpoint,
                "snapshot": r.record.snapshot,
                "snapshots": replica_snapshots.vmkeep_snapshots(r.dom),
                "interrupted": r.record.writing,
            }
            for r in replicas_of(dst, uuid, None)
        ]
    finally:
        src.close()
        if dst is not src:
            dst.close()
