"""A repository in an S3-compatible bucket (AWS, MinIO, SeaweedFS, Wasabi, B2, Ceph RGW).

Every object is written by one PutObject, which S3 makes atomic: readers see the old object,
the new one or nothing, never a partial one. Objects are at most a chunk (4 MiB) plus a header,
so multipart uploads are never needed.
"""

from __future__ import annotations

import functools
import hashlib
import random
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import closing
from datetime import datetime
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar
from urllib.parse import urlencode

import boto3
import boto3.session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ProfileNotFound,
)

from vmkeep.errors import (
    NotFoundError,
    ObjectExistsError,
    RemoteError,
    UsageError,
)
from vmkeep.pread_file import PreadFile

from .base import ObjectStat
from .object_lock import LockPolicy, ProtectStats, is_locked_name
from .parts_reader import parts_file
from .s3_errors import error_code, http_status, is_transient, one_line, s3_error
from .s3_file_put import put_file, put_if_absent
from .s3_listing import listed_entries, register_fast_listing
from .s3_lock import S3LockSupport

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

T = TypeVar("T")


DEFAULT_TIMEOUTS = (10.0, 60.0)  # connect, read (seconds of silence, not of a whole transfer)


def _check_name(name: str) -> str:
    parts = name.split("/")
    if not name or any(p in ("", ".", "..") for p in parts):
        raise RemoteError(f"invalid object name {name!r}")
    return name


class S3Remote:
    """Objects live under `prefix` in `bucket`. One boto3 client serves every thread: clients
    are thread-safe (sessions are not), and its connection pool is sized for the upload pool.

    With a lock policy (Object Lock buckets), chunks and manifests are written with a retention
    date, and deletes remove object versions one by one (s3_lock.py)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        path_style: bool | None = None,
        checksums: bool = True,
        conditional_put: bool = True,
        connect_timeout: float = DEFAULT_TIMEOUTS[0],
        read_timeout: float = DEFAULT_TIMEOUTS[1],
        retry_time: float = 30.0,
        max_attempts: int = 5,
        page_size: int = 1000,
        max_pool_connections: int = 32,
        access_key: str | None = None,
        secret_key: str | None = None,
    ) -> None:
        if not bucket:
            raise UsageError("an S3 location needs a bucket: s3://BUCKET[/PREFIX]")
        prefix = prefix.strip("/")
        if prefix:
            _check_name(prefix)
        self.bucket = bucket
        self.prefix = prefix + "/" if prefix else ""
        self.endpoint = endpoint
        self.region = region
        default_style = endpoint is not None  # self-hosted servers rarely do virtual hosts
        if path_style is None:
            path_style = default_style
        self._conditional_put = conditional_put
        self._retry_time = retry_time
        self._max_attempts = max(1, max_attempts)
        self._page_size = page_size
        self._bucket_seen = False  # a request on the bucket succeeded: a 404 is then the key's
        self._lock = threading.Lock()
        self.lock_policy: LockPolicy | None = None
        self._versioned: bool | None = None  # known after the first delete
        # The stored location: every setting that differs from its default, never a secret.
        params = {
            "endpoint": endpoint,
            "region": region,
            "path_style": str(int(path_style)) if endpoint or path_style != default_style else None,
            "checksums": None if checksums else "0",
            "conditional_put": None if conditional_put else "0",
            "timeout": f"{connect_timeout:g}"
            if connect_timeout == read_timeout and connect_timeout != DEFAULT_TIMEOUTS[0]
            else None,
        }
        query = urlencode({k: v for k, v in params.items() if v is not None}, safe=":/")
        self.url = f"s3://{bucket}/{self.prefix}" + (f"?{query}" if query else "")
        self.where = f"bucket {bucket!r}" + (f" at {endpoint}" if endpoint else "")
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max_pool_connections,
            retries={"mode": "standard", "total_max_attempts": 1},  # our own loop retries
            s3={"addressing_style": "path" if path_style else "auto"},
            request_checksum_calculation="when_supported" if checksums else "when_required",
            # Never CRC32 on GETs: every object read is verified end to end (AES-GCM tag or
            # BLAKE3, and the chunk ID), which also catches corruption at rest; the CRC cost
            # ~1 ms of CPU per 4 MiB chunk on restores.
            response_checksum_validation="when_required",
        )
        try:
            session = boto3.session.Session(
                aws_access_key_id=access_key, aws_secret_access_key=secret_key
            )
            self._client: S3Client = session.client(
                "s3", endpoint_url=endpoint, region_name=region, config=config
            )
        except ProfileNotFound as exc:
            raise RemoteError(f"S3 credentials: {one_line(exc)} (check AWS_PROFILE)") from exc
        except (BotoCoreError, ValueError) as exc:
            raise RemoteError(f"cannot set up S3 client for {self.url}: {one_line(exc)}") from exc
        self._locks = S3LockSupport(self)  # made here: upload threads share its bookkeeping
        register_fast_listing(self._client)

    # -- plumbing --------------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        """The URL the client really talks to (boto3 fills in AWS's when none is given)."""
        return str(self._client.meta.endpoint_url)

    def _key(self, name: str) -> str:
        return self.prefix + _check_name(name)

    def _retry(self, fn: Callable[[], T]) -> T:
        """Runs `fn` until it succeeds, fails for good, or ~retry_time seconds have passed;
        exponential backoff with full jitter so that parallel writers do not retry in step."""
        began = time.monotonic()
        attempt = 0
        while True:
            try:
                result = fn()
            except (ClientError, BotoCoreError) as exc:
                attempt += 1
                delay = random.uniform(0, min(8.0, 0.25 * 2**attempt))
                elapsed = time.monotonic() - began
                if (
                    not is_transient(exc)
                    or attempt >= self._max_attempts
                    or elapsed + delay > self._retry_time
                ):
                    raise
                time.sleep(delay)
            else:
                self._bucket_seen = True
                return result

    def _run(self, action: str, name: str, fn: Callable[[], T]) -> T:
        try:
            return self._retry(fn)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, action, name) from exc

    def _error(self, exc: Exception, action: str, name: str) -> RemoteError:
        return s3_error(exc, action, name, self)

    def _check_bucket(self) -> None:
        """HEAD answers carry no error code, so a 404 or 403 on HEAD is ambiguous: a listing
        says whether the bucket is missing or the credentials are wrong."""
        self._run(
            "listing",
            self.prefix,
            lambda: self._client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1),
        )

    # -- the Remote interface --------------------------------------------------------------

    def put(self, name: str, data: bytes, *, overwrite: bool = True) -> None:
        key = self._key(name)
        if overwrite:
            self._run("writing", name, lambda: self._put(key, data, None))
            return
        if not self._conditional_put:
            if self.stat(name) is not None:  # not race-free: documented in REMOTES-S3.md
                raise ObjectExistsError(f"object {name} already exists")
            self._run("writing", name, lambda: self._put(key, data, None))
            return
        stored = put_if_absent(
            self,
            name,
            lambda: self._put(key, data, "*"),
            lambda: self.etag_of(key) == hashlib.md5(data, usedforsecurity=False).hexdigest(),
        )
        if not stored:
            with self._lock:
                self._conditional_put = False  # the server cannot: check, then write
            self.put(name, data, overwrite=False)

    def put_parts(self, name: str, parts: Sequence[bytes | memoryview]) -> None:
        """An object made of `parts` (a data pack), sent from them as they are: no join."""
        key = self._key(name)
        self._run("writing", name, lambda: self._put(key, parts_file(parts), None))

    # What s3_file_put.py (a create-if-absent PUT streamed from a file) needs of this class.

    def put_file(self, name: str, file: BinaryIO, size: int) -> bool:
        return put_file(self, name, file, size)

    @property
    def conditional_puts(self) -> bool:
        return self._conditional_put

    def key_of(self, name: str) -> str:
        return self._key(name)

    def put_body(self, key: str, body: BinaryIO, if_none_match: str | None) -> None:
        self._put(key, body, if_none_match)

    def retry(self, fn: Callable[[], T]) -> T:
        return self._retry(fn)

    def error_of(self, exc: Exception, action: str, name: str) -> RemoteError:
        return self._error(exc, action, name)

    def etag_of(self, key: str) -> str | None:
        try:
            head = self._retry(lambda: self._client.head_object(Bucket=self.bucket, Key=key))
        except (ClientError, BotoCoreError):
            return None
        return str(head.get("ETag", "")).strip('"')

    def _put(self, key: str, data: bytes | BinaryIO | PreadFile, if_none_match: str | None) -> None:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": data}
        if if_none_match is not None:
            args["IfNoneMatch"] = if_none_match
        name = key[len(self.prefix) :]
        policy = self.lock_policy
        if policy is not None and is_locked_name(name):
            until = policy.object_until(name)
            args["ObjectLockMode"] = policy.s3_mode
            args["ObjectLockRetainUntilDate"] = until
            self._locks.remember(name, until)
        self._client.put_object(**args)

    def flush(self) -> None:
        """A PutObject is durable when it returns: nothing to do."""

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        key = self._key(name)
        if offset < 0 or (length is not None and length < 0):
            raise RemoteError(f"invalid range {offset}+{length} for {name}")
        if length == 0:
            if self.stat(name) is None:
                raise NotFoundError(f"object {name} not found in {self.url}")
            return b""
        ranged = offset > 0 or length is not None
        if length is None:
            byte_range = f"bytes={offset}-"
        else:
            byte_range = f"bytes={offset}-{offset + length - 1}"

        def fetch() -> bytes:
            if ranged:
                resp = self._client.get_object(Bucket=self.bucket, Key=key, Range=byte_range)
            else:
                resp = self._client.get_object(Bucket=self.bucket, Key=key)
            with closing(resp["Body"]) as body:
                data = body.read()
            if ranged and resp["ResponseMetadata"]["HTTPStatusCode"] == 200:
                end = None if length is None else offset + length
                data = data[offset:end]  # the server ignored Range and sent it whole
            return data

        try:
            return self._retry(fetch)
        except ClientError as exc:
            code, status = error_code(exc), http_status(exc)
            if code == "NoSuchKey" or (status == 404 and code != "NoSuchBucket"):
                raise NotFoundError(f"object {name} not found in {self.url}") from exc
            if code == "InvalidRange" or status == 416:
                if self.stat(name) is None:  # past the end: like reading past a file's end
                    raise NotFoundError(f"object {name} not found in {self.url}") from exc
                return b""
            raise self._error(exc, "reading", name) from exc
        except BotoCoreError as exc:
            raise self._error(exc, "reading", name) from exc

    def stat(self, name: str) -> ObjectStat | None:
        key = self._key(name)
        try:
            head = self._retry(lambda: self._client.head_object(Bucket=self.bucket, Key=key))
        except ClientError as exc:
            status = http_status(exc)
            if status == 404:
                if not self._bucket_seen:
                    self._check_bucket()
                return None
            if status in (401, 403):
                self._check_bucket()  # names the cause when it is the credentials
            raise self._error(exc, "reading", name) from exc
        except BotoCoreError as exc:
            raise self._error(exc, "reading", name) from exc
        return ObjectStat(name, int(head["ContentLength"]), head["LastModified"].timestamp())

    def list(self, prefix: str) -> Iterator[ObjectStat]:
        """ListObjectsV2, one page of `page_size` keys per request, each page retried."""
        full = self.prefix + prefix
        cut = len(self.prefix)
        token: str | None = None
        while True:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full}
            args["MaxKeys"] = self._page_size
            if token:
                args["ContinuationToken"] = token
            page = self._run(
                "listing", prefix or "/", functools.partial(self._client.list_objects_v2, **args)
            )
            for key, size, mtime in listed_entries(page):
                if not key.startswith(full) or key.endswith("/"):
                    continue  # directory markers some servers and tools create
                yield ObjectStat(key[cut:], size, mtime)
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def delete(self, name: str) -> None:
        """On a versioned bucket (every Object Lock bucket is) a plain DELETE only hides the
        object behind a delete marker; each version is deleted instead, so space is freed and
        a locked object stays listed."""
        key = self._key(name)
        if self._is_versioned():
            self._locks.delete_versions(name, key)
            return
        try:
            self._retry(lambda: self._client.delete_object(Bucket=self.bucket, Key=key))
        except ClientError as exc:
            if error_code(exc) == "NoSuchKey":
                return
            raise self._error(exc, "deleting", name) from exc
        except BotoCoreError as exc:
            raise self._error(exc, "deleting", name) from exc

    def _is_versioned(self) -> bool:
        """Asked once. Credentials without s3:GetBucketVersioning are taken to mean an
        unversioned bucket (plain deletes, as before); locked buckets need the permission
        (docs/IMMUTABILITY.md)."""
        if self._versioned is None:
            try:
                answer = self._retry(lambda: self._client.get_bucket_versioning(Bucket=self.bucket))
                self._versioned = answer.get("Status") in ("Enabled", "Suspended")
            except ClientError as exc:
                if error_code(exc) != "AccessDenied" and http_status(exc) != 403:
                    raise self._error(exc, "reading versioning of", self.bucket) from exc
                self._versioned = False
            except BotoCoreError as exc:
                raise self._error(exc, "reading versioning of", self.bucket) from exc
        return self._versioned

    # -- retention locks (Object Lock) ---------------------------------------------------------

    def set_lock_policy(self, policy: LockPolicy | None) -> None:
        """Refuses a policy when the bucket has no Object Lock: the server would reject every
        locked PUT, and a silently unlocked backup would be worse."""
        if policy is not None and not self._locks.bucket_lock_enabled():
            raise UsageError(
                f"S3 {self.where} does not have Object Lock enabled: create the bucket with "
                "Object Lock (docs/IMMUTABILITY.md) or drop --lock-days"
            )
        self.lock_policy = policy

    def protect_point(
        self,
        point_id: str,
        names: Sequence[str],
        coming: Sequence[str],
        until: datetime,
        assured: Collection[str] = (),
    ) -> ProtectStats:
        """`coming` objects are locked by their own PUT (the policy applies to every write)."""
        return self._locks.extend(names, until, assured)

    def check_immutability(self) -> str | None:
        return self._locks.probe()

    def lock_ends_of(self, names: Sequence[str]) -> dict[str, datetime]:
        """Which of `names` are locked, until when (format 3's gc: pack_gc_locks.py)."""
        return self._locks.lock_ends_of(names)

    def free_space(self) -> int | None:
        """S3 has no notion of free space (quotas, where they exist, are not exposed)."""
        return None

    def purge_incomplete(self, older_than: float) -> int:
        """Aborts multipart uploads under the prefix begun more than `older_than` seconds ago:
        their parts are billed and invisible, and vmkeep itself never starts one."""
        limit = time.time() - older_than
        removed = 0
        key_marker: str | None = None
        upload_marker: str | None = None
        while True:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix}
            if key_marker:
                args["KeyMarker"] = key_marker
            if upload_marker:
                args["UploadIdMarker"] = upload_marker
            page = self._run(
                "listing uploads",
                "",
                functools.partial(self._client.list_multipart_uploads, **args),
            )
            for upload in page.get("Uploads", []):
                initiated = upload.get("Initiated")
                if initiated is None or initiated.timestamp() >= limit:
                    continue
                key, upload_id = upload.get("Key", ""), upload.get("UploadId", "")
                try:
                    self._retry(
                        functools.partial(
                            self._client.abort_multipart_upload,
                            Bucket=self.bucket,
                            Key=key,
                            UploadId=upload_id,
                        )
                    )
                except ClientError as exc:
                    if error_code(exc) == "NoSuchUpload":
                        continue  # finished or aborted meanwhile
                    raise self._error(exc, "aborting upload of", key) from exc
                except BotoCoreError as exc:
                    raise self._error(exc, "aborting upload of", key) from exc
                removed += 1
            if not page.get("IsTruncated"):
                return removed
            key_marker = page.get("NextKeyMarker")
            upload_marker = page.get("NextUploadIdMarker")
            if not key_marker and not upload_marker:
                return removed
