"""S3 Object Lock for S3Remote: retention on writes, extension of reused chunks, deletes of
versions, and the `remote test` check that the server really refuses to delete a locked version.

Object Lock protects object *versions*: a plain DELETE of a key only adds a delete marker
(the locked version stays, billed and invisible to listings). So on versioned buckets every
version is deleted by its id; a locked one is refused by the server and stays current, hence
listed. AWS and SeaweedFS answer such a refusal with 403 AccessDenied, MinIO with
ObjectLocked; a 403 is reported as a lock only when the version really carries one.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from vmkeep.errors import ObjectLockedError, RemoteError
from vmkeep.parallel import ordered_map

from .object_lock import ProtectStats

if TYPE_CHECKING:
    from .object_lock import LockPolicy

T = TypeVar("T")


class LockedBucket(Protocol):
    """The parts of S3Remote that the lock support uses (its client, retries and errors);
    a protocol, so that this module does not import s3.py, which imports it."""

    _client: Any
    bucket: str
    lock_policy: LockPolicy | None

    def _key(self, name: str) -> str: ...

    def _retry(self, fn: Callable[[], T]) -> T: ...

    def _run(self, action: str, name: str, fn: Callable[[], T]) -> T: ...

    def _error(self, exc: Exception, action: str, name: str) -> RemoteError: ...


LOCK_MISSING_CODES = frozenset(
    {"ObjectLockConfigurationNotFoundError", "NoSuchObjectLockConfiguration"}
)
GONE_CODES = frozenset({"NoSuchKey", "NoSuchVersion"})
EXTEND_WORKERS = 16  # HEAD and PutObjectRetention are small requests: latency, not bandwidth
PROBE_LOCK_SECONDS = 2


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def lock_end(head: dict[str, Any]) -> datetime | None:
    """When a HEAD answer's version unlocks; None when it is not locked (a legal hold counts
    as locked with no known end, reported as datetime.max)."""
    if head.get("ObjectLockLegalHoldStatus") == "ON":
        return datetime.max.replace(tzinfo=UTC)
    until = head.get("ObjectLockRetainUntilDate")
    if isinstance(until, datetime) and until > datetime.now(UTC):
        return until
    return None


def locked_message(name: str, until: datetime | None) -> str:
    if until is None or until.year == datetime.max.year:
        return f"object {name} is locked (legal hold): not deleted"
    return f"object {name} is locked until {until:%Y-%m-%d %H:%M:%S} UTC: not deleted"


class S3LockSupport:
    """Lock bookkeeping of one S3Remote: the retain-until of every object this process locked
    or extended, so that a backup never asks the server about chunks it has just written."""

    def __init__(self, remote: LockedBucket) -> None:
        self.remote = remote
        self.client = remote._client
        self.bucket = remote.bucket
        self._known: dict[str, datetime] = {}
        self._mutex = threading.Lock()
        self._lock_enabled: bool | None = None

    def remember(self, name: str, until: datetime) -> None:
        with self._mutex:
            if name not in self._known or self._known[name] < until:
                self._known[name] = until

    def bucket_lock_enabled(self) -> bool:
        try:
            answer = self.remote._retry(
                lambda: self.client.get_object_lock_configuration(Bucket=self.bucket)
            )
        except ClientError as exc:
            if _code(exc) in LOCK_MISSING_CODES:
                return False
            raise self.remote._error(exc, "reading Object Lock of", self.bucket) from exc
        except BotoCoreError as exc:
            raise self.remote._error(exc, "reading Object Lock of", self.bucket) from exc
        config = answer.get("ObjectLockConfiguration", {})
        return bool(config.get("ObjectLockEnabled") == "Enabled")

    # -- extension ----------------------------------------------------------------------------

    def extend(
        self, names: Sequence[str], until: datetime, assured: Collection[str] = ()
    ) -> ProtectStats:
        """Every object in `names` locked at least until `until`. Objects in `assured` and
        those this process locked itself are not asked about; the others cost a HEAD each (in
        parallel), and the ones whose lock ends before `until` + margin/2 are extended to
        `until` + margin (one PutObjectRetention each), so the returned floor, which the
        manifest records, covers the next backups for about margin/2."""
        stats = ProtectStats()
        policy = self.remote.lock_policy
        if policy is None:
            return stats
        target = until + policy.margin
        want = until + policy.margin / 2
        floor = target  # `assured` objects are not counted: the caller knows their floor
        todo: list[str] = []
        with self._mutex:
            for name in names:
                if name in assured:
                    stats.assured += 1
                elif name in self._known and self._known[name] >= want:
                    floor = min(floor, self._known[name])
                else:
                    todo.append(name)
        for end, extended in ordered_map(
            functools.partial(self._extend_one, need=want, target=target),
            todo,
            EXTEND_WORKERS,
        ):
            stats.checked += 1
            stats.extended += int(extended)
            floor = min(floor, end)
        stats.floor = floor
        return stats

    def _extend_one(self, name: str, need: datetime, target: datetime) -> tuple[datetime, bool]:
        """(the object's lock end afterwards, whether it was extended)."""
        key = self.remote._key(name)
        try:
            head = self.remote._retry(lambda: self.client.head_object(Bucket=self.bucket, Key=key))
        except ClientError as exc:
            if _status(exc) == 404:
                raise RemoteError(
                    f"object {name} vanished before its restore point was written"
                ) from exc
            raise self.remote._error(exc, "reading the lock of", name) from exc
        except BotoCoreError as exc:
            raise self.remote._error(exc, "reading the lock of", name) from exc
        current = head.get("ObjectLockRetainUntilDate")
        if isinstance(current, datetime) and current >= need:
            self.remember(name, current)
            return current, False
        policy = self.remote.lock_policy
        assert policy is not None
        mode = str(head.get("ObjectLockMode") or policy.s3_mode)  # compliance stays compliance
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": key,
            "Retention": {"Mode": mode, "RetainUntilDate": target},
        }
        if head.get("VersionId"):
            args["VersionId"] = head["VersionId"]
        self.remote._run(
            "extending the lock of",
            name,
            functools.partial(self.client.put_object_retention, **args),
        )
        self.remember(name, target)
        return target, True

    def lock_ends_of(self, names: Sequence[str]) -> dict[str, datetime]:
        """The objects of `names` whose current version is locked, and until when: a HEAD
        each, in parallel (gc asks about the few packs it would rewrite and the index
        objects); nothing asked on a bucket without Object Lock. An object whose HEAD fails
        counts as unlocked: its delete is then refused by the server, which gc handles."""
        if not names:
            return {}
        if self._lock_enabled is None:
            try:
                self._lock_enabled = self.bucket_lock_enabled()
            except RemoteError:
                # Keys without s3:GetBucketObjectLockConfiguration (not needed on an unlocked
                # bucket): nothing is known locked, and the server's refusals say the rest.
                self._lock_enabled = False
        if not self._lock_enabled:
            return {}
        ends = ordered_map(
            lambda n: self._version_until(self.remote._key(n)), names, EXTEND_WORKERS
        )
        return {n: end for n, end in zip(names, ends, strict=True) if end is not None}

    # -- deletes of versions ------------------------------------------------------------------

    def versions(self, key: str) -> Iterator[str]:
        """Version ids of `key` (delete markers included), every page."""
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": key}
        while True:
            page = self.remote._run(
                "listing versions of",
                key,
                functools.partial(self.client.list_object_versions, **args),
            )
            for entry in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]:
                if entry.get("Key") == key and entry.get("VersionId"):
                    yield str(entry["VersionId"])
            if not page.get("IsTruncated"):
                return
            args["KeyMarker"] = page.get("NextKeyMarker")
            args["VersionIdMarker"] = page.get("NextVersionIdMarker")

    def delete_versions(self, name: str, key: str) -> None:
        """Deletes every version of `key`; raises ObjectLockedError (after deleting the ones
        that are free) when the server refuses some because they are locked."""
        latest_lock: datetime | None = None
        locked = False
        for version in list(self.versions(key)):
            until, refused = self._delete_version(name, key, version)
            if refused:
                locked = True
                if until is not None and (latest_lock is None or until > latest_lock):
                    latest_lock = until
        if locked:
            raise ObjectLockedError(locked_message(name, latest_lock), name, latest_lock)

    def _delete_version(self, name: str, key: str, version: str) -> tuple[datetime | None, bool]:
        try:
            self.remote._retry(
                lambda: self.client.delete_object(Bucket=self.bucket, Key=key, VersionId=version)
            )
            return None, False
        except ClientError as exc:
            code = _code(exc)
            if code in GONE_CODES:
                return None, False
            if code == "ObjectLocked" or code == "AccessDenied" or _status(exc) == 403:
                until = self._version_until(key, version)
                if until is not None or code == "ObjectLocked":
                    return until, True
            raise self.remote._error(exc, "deleting", name) from exc
        except BotoCoreError as exc:
            raise self.remote._error(exc, "deleting", name) from exc

    def _version_until(self, key: str, version: str | None = None) -> datetime | None:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if version:
            args["VersionId"] = version
        try:
            head = self.remote._retry(functools.partial(self.client.head_object, **args))
        except (ClientError, BotoCoreError):
            return None
        return lock_end(dict(head))

    # -- remote test --------------------------------------------------------------------------

    def probe(self) -> str | None:
        """Writes an object locked for 2 s in compliance mode, checks that deleting its version
        is refused and that overwriting it keeps the locked version, then removes it."""
        if not self.bucket_lock_enabled():
            return None
        name = f"vmkeep-probe-{os.urandom(4).hex()}/locked"
        key = self.remote._key(name)
        body = os.urandom(64)
        until = datetime.now(UTC) + timedelta(seconds=PROBE_LOCK_SECONDS)
        try:
            put = self.remote._run(
                "writing",
                name,
                lambda: self.client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=body,
                    ObjectLockMode="COMPLIANCE",
                    ObjectLockRetainUntilDate=until,
                ),
            )
            return self._probe_refusals(name, key, str(put.get("VersionId", "")), body)
        finally:
            self._remove_probe(name, key, until)

    def _probe_refusals(self, name: str, key: str, version: str, body: bytes) -> str:
        if not version:
            return "the server gave no version id: the bucket is not versioned"
        self.remote._run(
            "overwriting",
            name,
            lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=b"overwrite"),
        )
        _until, refused = self._delete_version(name, key, version)
        if not refused:
            return "the server deleted a locked object version: Object Lock is not enforced"
        resp = self.remote._run(
            "reading",
            name,
            lambda: self.client.get_object(Bucket=self.bucket, Key=key, VersionId=version),
        )
        if resp["Body"].read() != body:
            return "overwriting a locked object changed its locked version"
        return "ok"

    def _remove_probe(self, name: str, key: str, until: datetime) -> None:
        time.sleep(max(0.0, (until - datetime.now(UTC)).total_seconds()) + 1.2)
        for _ in range(5):
            try:
                self.delete_versions(name, key)
                return
            except ObjectLockedError:
                time.sleep(1.0)  # second-granular dates: the server may lag by a second
