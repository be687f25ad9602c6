"""Metadata points (docs/FORMAT.md §12): vmkeep's own configuration stored in a repository as
`metadata/POINT` objects, sealed like manifests (header, zstd, AEAD or checksum, the object
name in the AAD). The document inside is the operations layer's business; here it is JSON."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from vmkeep.errors import IntegrityError, NotFoundError, RepositoryError, UsageError

from .compression import compress, decompress
from .format import FLAG_ENCRYPTED, FLAG_ZSTD, HEADER_SIZE, OBJECT_VERSION, header
from .limits import get_bounded
from .manifest import new_point_id
from .repository import Repository, unique_prefix

METADATA_PREFIX = "metadata/"
METADATA_MAGIC = b"VMKD"
# The document (JSON, before zstd): configuration is small; libvirt XML of a few thousand
# domains stays well under this.
MAX_METADATA_DOC = 64 << 20
MAX_METADATA_OBJECT = HEADER_SIZE + MAX_METADATA_DOC + (MAX_METADATA_DOC >> 7) + 4096
# Same shape as restore point IDs (§5.1); retention reads the time from it.
POINT_RE = re.compile(r"(\d{8}T\d{6})\.(\d{3})Z-[0-9a-f]{6}")


def metadata_object_name(point_id: str) -> str:
    return f"{METADATA_PREFIX}{point_id}"


def new_metadata_id(when: datetime | None = None) -> str:
    return new_point_id(when or datetime.now(UTC))


def point_time(point_id: str) -> datetime | None:
    """The UTC time a metadata point ID names, or None for a name that is not one."""
    match = POINT_RE.fullmatch(point_id)
    if match is None:
        return None
    try:
        base = datetime.strptime(match.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None
    return base.replace(microsecond=int(match.group(2)) * 1000)


def metadata_ids(repo: Repository) -> list[str]:
    """Every metadata point ID, oldest first; names that are not IDs are left out (and so
    never deleted by retention)."""
    names = (o.name[len(METADATA_PREFIX) :] for o in repo.remote.list(METADATA_PREFIX))
    return sorted(n for n in names if point_time(n) is not None)


def encode_metadata(repo: Repository, point_id: str, document: dict[str, Any]) -> bytes:
    body = json.dumps(document, separators=(",", ":")).encode()
    if len(body) > MAX_METADATA_DOC:
        raise RepositoryError(
            f"metadata point {point_id} would take {len(body)} bytes, more than the "
            f"{MAX_METADATA_DOC} the format allows"
        )
    flags = FLAG_ZSTD | (FLAG_ENCRYPTED if repo.encrypted else 0)
    head = header(METADATA_MAGIC, flags)
    aad = head + metadata_object_name(point_id).encode()
    return repo.sealer.seal(head, compress(body, 3), aad)


def decode_metadata(repo: Repository, point_id: str, blob: bytes) -> dict[str, Any]:
    what = f"metadata point {point_id}"
    head = blob[:HEADER_SIZE]
    if len(head) < HEADER_SIZE or head[:4] != METADATA_MAGIC or head[4] != OBJECT_VERSION:
        raise IntegrityError(f"{what} is corrupt: bad header")
    if head[5] != FLAG_ZSTD | (FLAG_ENCRYPTED if repo.encrypted else 0):
        raise IntegrityError(f"{what} is corrupt: unexpected flags {head[5]:#x}")
    packed = repo.sealer.open(
        blob[HEADER_SIZE:], head + metadata_object_name(point_id).encode(), what
    )
    try:
        document = json.loads(decompress(packed, what, MAX_METADATA_DOC))
    except (ValueError, RecursionError) as exc:
        raise IntegrityError(f"{what} is malformed: {str(exc)[:120]}") from None
    if not isinstance(document, dict) or document.get("id") != point_id:
        raise IntegrityError(f"{what} is corrupt: it does not name itself")
    return document


def save_metadata(repo: Repository, point_id: str, document: dict[str, Any]) -> None:
    """One object, create-if-absent: the point exists once this PUT completed."""
    blob = encode_metadata(repo, point_id, document)
    repo.remote.put(metadata_object_name(point_id), blob, overwrite=False)
    repo.remote.flush()


def load_metadata(repo: Repository, point_id: str) -> dict[str, Any]:
    try:
        blob = get_bounded(
            repo.remote,
            metadata_object_name(point_id),
            MAX_METADATA_OBJECT,
            IntegrityError,
            f"metadata point {point_id}",
            stat_first=True,
        )
    except NotFoundError:
        raise NotFoundError(f"no metadata point {point_id} in {repo.remote.url}") from None
    return decode_metadata(repo, point_id, blob)


def delete_metadata(repo: Repository, point_id: str) -> None:
    repo.remote.delete(metadata_object_name(point_id))


def resolve_metadata(repo: Repository, ref: str | None) -> str:
    """A metadata point by ID or unique prefix; the newest when `ref` is None."""
    ids = metadata_ids(repo)
    if not ids:
        raise NotFoundError(f"no metadata backup in {repo.remote.url} (run `vmkeep config backup`)")
    if ref is None:
        return ids[-1]
    if not ref.strip():
        raise UsageError("--point: the metadata point id is empty")
    return unique_prefix(ref, ids, "metadata point", repo.remote.url)
