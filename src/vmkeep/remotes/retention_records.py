"""Retention records: what a local repository's immutability helper needs to know.

A local file system cannot enforce a retention date by itself; the immutable attribute can,
but only root may set or clear it. So vmkeep (unprivileged) writes, for each locked restore
point, a plaintext record `retention/POINT` naming the point's objects and the date until
which they must stay; `vmkeep-immutable apply` (root, from a timer) sets the attribute on
every object some unexpired record names, and clears it once all records naming it expired.
Chunk IDs are keyed hashes in encrypted repositories, so records reveal nothing about data.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

RECORDS_PREFIX = "retention/"
RECORD_VERSION = 1
MAX_RECORD_BYTES = 256 * 1024 * 1024  # a 1 PiB VM names ~2.7e8 chunks: far below this


@dataclass(frozen=True)
class RetentionRecord:
    point: str
    until: datetime
    objects: tuple[str, ...]

    @property
    def name(self) -> str:
        return record_name(self.point)


def record_name(point_id: str) -> str:
    return RECORDS_PREFIX + point_id


def encode_record(point_id: str, names: Sequence[str], until: datetime) -> bytes:
    doc = {
        "version": RECORD_VERSION,
        "point": point_id,
        "until": until.astimezone(UTC).isoformat(),
        "objects": sorted(set(names)),
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_record(point_id: str, raw: bytes) -> RetentionRecord | None:
    """None for a record that is malformed or names another point: it protects nothing
    (the helper reports it) rather than aborting the run."""
    try:
        doc = json.loads(raw)
        until = datetime.fromisoformat(doc["until"])
        objects = doc["objects"]
        if (
            doc.get("version") != RECORD_VERSION
            or doc.get("point") != point_id
            or until.tzinfo is None
            or not isinstance(objects, list)
            or not all(isinstance(o, str) for o in objects)
        ):
            return None
    except (ValueError, KeyError, TypeError):
        return None
    return RetentionRecord(point_id, until, tuple(objects))


def lock_ends(records: Iterable[RetentionRecord]) -> dict[str, datetime]:
    """Each object's latest retention end over all records (a record also protects itself)."""
    ends: dict[str, datetime] = {}
    for record in records:
        for name in (*record.objects, record.name):
            if name not in ends or ends[name] < record.until:
                ends[name] = record.until
    return ends
