"""Metadata backup: vmkeep's own configuration (remotes, jobs, schedules, secrets) and the
hypervisors' metadata (libvirt domain, network and pool XML) as one metadata point in a
repository (docs/METADATA-BACKUP.md, docs/FORMAT.md §12).

This layer works on plain data (ConfigSnapshot): the engine gathers it from the state database
and applies it back. Secrets never leave as stored: they are sealed again with a key derived
(Argon2id) from the metadata passphrase, because a fresh install has a new server key."""

from __future__ import annotations

import base64
import binascii
import json
import os
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vmkeep import __version__
from vmkeep.errors import (
    IntegrityError,
    NotFoundError,
    ObjectLockedError,
    UsageError,
    WrongPassphraseError,
)
from vmkeep.repository.crypto import (
    DEFAULT_MEMORY_KIB,
    DEFAULT_PARALLELISM,
    DEFAULT_TIME_COST,
    SALT_SIZE,
    derive_kek,
)
from vmkeep.repository.format import NONCE_SIZE
from vmkeep.repository.metadata_objects import (
    delete_metadata,
    load_metadata,
    metadata_ids,
    new_metadata_id,
    point_time,
    save_metadata,
)
from vmkeep.repository.repository import Repository

from .hypervisor_metadata import HypervisorMetadata
from .retention import PointRef, RetentionPolicy, prune_plan

DOC_FORMAT = "vmkeep-metadata"
DOC_VERSION = 1
SECRETS_AAD = b"vmkeep-metadata-secrets-v1:"
DEFAULT_KEEP = 30


@dataclass
class ConfigSnapshot:
    """vmkeep's configuration as plain data. `remotes`: RemoteEntry dicts; `jobs`: {name,
    kind, spec, schedules: [ScheduleSpec dicts]}; `secrets`: name → value (plaintext, in
    memory only)."""

    remotes: list[dict[str, Any]] = field(default_factory=list)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    secrets: dict[str, bytes] = field(default_factory=dict)

    def __repr__(self) -> str:  # never the secret values (tracebacks, logs)
        return (
            f"ConfigSnapshot(remotes={len(self.remotes)}, jobs={len(self.jobs)}, "
            f"secrets={sorted(self.secrets)})"
        )


@dataclass
class MetadataPoint:
    """What `config list` shows of a point, read from its (authenticated) document."""

    id: str
    created: str
    host: str
    remotes: list[str]
    jobs: list[str]
    schedules: int
    secrets: int
    hypervisors: list[str]

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class MetadataDocument:
    """A loaded point: everything but the secrets, which stay sealed until `open_secrets`."""

    point: MetadataPoint
    remotes: list[dict[str, Any]]
    jobs: list[dict[str, Any]]
    sealed_secrets: dict[str, Any]
    hypervisors: list[HypervisorMetadata]

    def snapshot(self, passphrase: bytes) -> ConfigSnapshot:
        """The configuration with its secrets opened; WrongPassphraseError when they do not."""
        secrets = open_secrets(self.sealed_secrets, passphrase, self.point.id)
        return ConfigSnapshot(self.remotes, self.jobs, secrets)


@dataclass
class BackupResult:
    point_id: str
    pruned: list[str]
    kept: list[str]

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --- secrets, wrapped by the metadata passphrase --------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise IntegrityError(f"metadata point: {what} is malformed")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise IntegrityError(f"metadata point: {what} is not base64") from None


def seal_secrets(secrets: dict[str, bytes], passphrase: bytes, point_id: str) -> dict[str, Any]:
    """AES-256-GCM under Argon2id(passphrase): the server key never leaves the host, so a
    fresh install opens them with the passphrase alone. The point ID is the AAD (a sealed
    blob moved into another point does not open)."""
    if not passphrase:
        raise UsageError("the metadata passphrase is empty: refusing it")
    salt, nonce = os.urandom(SALT_SIZE), os.urandom(NONCE_SIZE)
    kek = derive_kek(passphrase, salt, DEFAULT_TIME_COST, DEFAULT_MEMORY_KIB, DEFAULT_PARALLELISM)
    plain = json.dumps({k: _b64(v) for k, v in sorted(secrets.items())}).encode()
    sealed = AESGCM(kek).encrypt(nonce, plain, SECRETS_AAD + point_id.encode())
    return {
        "kdf": "argon2id",
        "time_cost": DEFAULT_TIME_COST,
        "memory_kib": DEFAULT_MEMORY_KIB,
        "parallelism": DEFAULT_PARALLELISM,
        "salt": _b64(salt),
        "nonce": _b64(nonce),
        "sealed": _b64(sealed),
    }


def open_secrets(blob: dict[str, Any], passphrase: bytes, point_id: str) -> dict[str, bytes]:
    costs = [blob.get(k) for k in ("time_cost", "memory_kib", "parallelism")]
    if blob.get("kdf") != "argon2id" or not all(type(c) is int for c in costs):
        raise IntegrityError(f"metadata point {point_id}: secrets: unknown key derivation")
    time_cost, memory_kib, lanes = (int(c) for c in costs)  # type: ignore[arg-type]
    if not (1 <= time_cost <= 64 and 8 <= memory_kib <= 4 << 20 and 1 <= lanes <= 64):
        raise IntegrityError(f"metadata point {point_id}: secrets: KDF parameters out of range")
    salt = _unb64(blob.get("salt"), "secrets.salt")
    nonce = _unb64(blob.get("nonce"), "secrets.nonce")
    if len(salt) != SALT_SIZE or len(nonce) != NONCE_SIZE:
        raise IntegrityError(f"metadata point {point_id}: secrets: bad salt or nonce size")
    kek = derive_kek(passphrase, salt, time_cost, memory_kib, lanes)
    try:
        plain = AESGCM(kek).decrypt(
            nonce, _unb64(blob.get("sealed"), "secrets.sealed"), SECRETS_AAD + point_id.encode()
        )
    except InvalidTag:
        raise WrongPassphraseError(
            f"wrong metadata passphrase: the secrets of metadata point {point_id} do not open "
            "with it (nothing was written)"
        ) from None
    values = json.loads(plain)
    return {str(k): _unb64(v, f"secret {k!r}") for k, v in values.items()}


# --- the document -------------------------------------------------------------------------


def _document(
    point_id: str,
    snapshot: ConfigSnapshot,
    passphrase: bytes,
    hypervisors: list[HypervisorMetadata],
) -> dict[str, Any]:
    return {
        "format": DOC_FORMAT,
        "version": DOC_VERSION,
        "id": point_id,
        "created": datetime.now(UTC).isoformat(),
        "host": socket.gethostname(),
        "vmkeep": __version__,
        "remotes": snapshot.remotes,
        "jobs": snapshot.jobs,
        "secret_count": len(snapshot.secrets),
        "secrets": seal_secrets(snapshot.secrets, passphrase, point_id),
        "hypervisors": [h.to_json() for h in hypervisors],
    }


def parse_document(point_id: str, doc: dict[str, Any]) -> MetadataDocument:
    """Field types checked, so a malformed (but authentic) point fails in one line."""
    if doc.get("format") != DOC_FORMAT:
        raise IntegrityError(f"metadata point {point_id} is not a vmkeep metadata document")
    if doc.get("version") != DOC_VERSION:
        raise IntegrityError(
            f"metadata point {point_id} has document version {doc.get('version')!r}; "
            f"this vmkeep reads version {DOC_VERSION}"
        )
    remotes, jobs, secrets = doc.get("remotes"), doc.get("jobs"), doc.get("secrets")
    hypervisors = doc.get("hypervisors", [])
    for name, value in (("remotes", remotes), ("jobs", jobs), ("hypervisors", hypervisors)):
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise IntegrityError(f"metadata point {point_id}: {name} is malformed")
    if not isinstance(secrets, dict):
        raise IntegrityError(f"metadata point {point_id}: secrets is malformed")
    assert isinstance(remotes, list) and isinstance(jobs, list)
    hyper = [HypervisorMetadata.from_json(h, point_id) for h in hypervisors]
    point = MetadataPoint(
        id=point_id,
        created=str(doc.get("created", "")),
        host=str(doc.get("host", "")),
        remotes=[str(r.get("name", "")) for r in remotes],
        jobs=[str(j.get("name", "")) for j in jobs],
        schedules=sum(len(j.get("schedules") or []) for j in jobs),
        secrets=int(doc.get("secret_count") or 0),
        hypervisors=[h.uri for h in hyper],
    )
    return MetadataDocument(point, remotes, jobs, secrets, hyper)


# --- operations -----------------------------------------------------------------------------


def backup_metadata(
    repo: Repository,
    snapshot: ConfigSnapshot,
    passphrase: bytes,
    hypervisors: list[HypervisorMetadata] | None = None,
    retention: RetentionPolicy | None = None,
) -> BackupResult:
    """Write one metadata point (a single create-if-absent object: it exists once written,
    whole), then apply retention to the metadata points (default: keep the last 30)."""
    point_id = new_metadata_id()
    save_metadata(repo, point_id, _document(point_id, snapshot, passphrase, hypervisors or []))
    pruned, kept = prune_metadata(repo, retention or RetentionPolicy(keep_last=DEFAULT_KEEP))
    return BackupResult(point_id, pruned, kept)


def prune_metadata(repo: Repository, policy: RetentionPolicy) -> tuple[list[str], list[str]]:
    """Delete the metadata points the policy does not keep (one group: the points of this
    repository). Returns (deleted, kept), oldest first."""
    refs = []
    for point_id in metadata_ids(repo):
        when = point_time(point_id)
        if when is not None:
            refs.append(PointRef(point_id, "metadata", "", when))
    decisions = prune_plan(refs, policy)
    deleted, kept = [], sorted(d.point.id for d in decisions if d.keep)
    for point_id in sorted(d.point.id for d in decisions if not d.keep):
        try:
            delete_metadata(repo, point_id)
            deleted.append(point_id)
        except ObjectLockedError:  # an immutable remote: it stays until its lock ends
            kept.append(point_id)
    return deleted, sorted(kept)


def read_metadata(repo: Repository, point_id: str) -> MetadataDocument:
    return parse_document(point_id, load_metadata(repo, point_id))


def list_metadata(repo: Repository) -> tuple[list[MetadataPoint], list[tuple[str, str]]]:
    """Every point that verifies (oldest first), and (id, error) of the ones that do not."""
    good: list[MetadataPoint] = []
    bad: list[tuple[str, str]] = []
    for point_id in metadata_ids(repo):
        try:
            good.append(read_metadata(repo, point_id).point)
        except (IntegrityError, NotFoundError) as exc:
            bad.append((point_id, str(exc)))
    return good, bad
