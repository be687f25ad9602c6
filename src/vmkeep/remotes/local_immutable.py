"""Immutable local repositories: what the retention records say, as a local remote reads it
(the lock ends of objects, the `remote test` probe). Applying them as the immutable attribute
is the privileged helper's job: immutable_apply.py."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from vmkeep.errors import NotFoundError

from .base import Remote
from .file_attributes import is_immutable
from .retention_records import (
    MAX_RECORD_BYTES,
    RECORDS_PREFIX,
    RetentionRecord,
    decode_record,
    lock_ends,
)


def read_records(remote: Remote) -> tuple[list[RetentionRecord], list[str]]:
    """The well-formed records, and the names of malformed ones."""
    good: list[RetentionRecord] = []
    bad: list[str] = []
    for obj in remote.list(RECORDS_PREFIX):
        point = obj.name[len(RECORDS_PREFIX) :]
        if obj.size > MAX_RECORD_BYTES:
            bad.append(obj.name)
            continue
        try:
            record = decode_record(point, remote.get(obj.name))
        except NotFoundError:
            continue  # removed meanwhile by gc
        if record is None:
            bad.append(obj.name)
        else:
            good.append(record)
    return good, bad


def read_lock_ends(remote: Remote) -> dict[str, datetime]:
    return lock_ends(read_records(remote)[0])


def probe_immutability(remote: Remote, root: Path) -> str | None:
    """For `remote test`: with retention records present, every object they still protect
    must carry the attribute, and deleting or overwriting one must be refused."""
    records, _bad = read_records(remote)
    if not records:
        return None
    now = datetime.now(UTC)
    protected = sorted(n for n, end in lock_ends(records).items() if end > now)
    if not protected:
        return None
    missing = [n for n in protected if not (root / n).exists()]
    loose = [n for n in protected if n not in missing and not is_immutable(root / n)]
    if loose:
        return (
            f"{len(loose)} of {len(protected)} objects under retention are not immutable "
            f"(e.g. {loose[0]}): run `vmkeep-immutable apply {root}` as root"
        )
    if missing:
        return f"{len(missing)} objects under retention are missing (e.g. {missing[0]})"
    return _refusals(root / protected[0])


def _refusals(path: Path) -> str:
    """`path` is immutable: a delete and an open for writing must both fail."""
    try:
        path.unlink()
        return f"deleting the immutable {path} succeeded"
    except PermissionError:
        pass
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK))
        return f"opening the immutable {path} for writing succeeded"
    except PermissionError:
        return "ok"
