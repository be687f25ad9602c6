"""A create-if-absent PUT whose body is streamed from a file (a version 2 manifest,
docs/FORMAT.md §5.5: up to ~800 MiB at 100 TiB), so the object is never held in memory.
One PUT (S3 takes up to 5 GiB in one), the body read from the start at each attempt; an
attempt whose answer was lost is recognised by the object's ETag, the MD5 of the file."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import BinaryIO, Protocol, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from vmkeep.errors import ObjectExistsError, RemoteError

from .s3_errors import error_code, http_status, is_transient

T = TypeVar("T")


class FilePutter(Protocol):
    """What this needs of S3Remote (s3.py), which calls it."""

    @property
    def conditional_puts(self) -> bool: ...

    def key_of(self, name: str) -> str: ...

    def put_body(self, key: str, body: BinaryIO, if_none_match: str | None) -> None: ...

    def retry(self, fn: Callable[[], T]) -> T: ...

    def error_of(self, exc: Exception, action: str, name: str) -> RemoteError: ...

    def etag_of(self, key: str) -> str | None: ...


MAX_SINGLE_PUT = 5 << 30  # S3's limit of one PutObject


def put_file(remote: FilePutter, name: str, file: BinaryIO, size: int) -> bool:
    """True when stored; False when the server cannot write conditionally or the object is
    over one PUT's limit (the caller then puts the bytes: never a second copy here)."""
    if not remote.conditional_puts or size > MAX_SINGLE_PUT:
        return False
    key = remote.key_of(name)

    def send() -> None:
        file.seek(0)
        remote.put_body(key, file, "*")

    return put_if_absent(remote, name, send, lambda: remote.etag_of(key) == _md5(file))


def put_if_absent(
    remote: FilePutter, name: str, send: Callable[[], None], landed: Callable[[], bool]
) -> bool:
    """One create-if-absent PUT (`send`, retried on transient errors): True when stored,
    False when the server cannot write conditionally (501; the caller checks, then writes).
    A refusal after a failed attempt is ours when `landed` says the object holds our bytes
    (an earlier attempt stored it and its answer was lost); else ObjectExistsError."""
    failed_once = False

    def attempt() -> None:
        nonlocal failed_once
        try:
            send()
        except (ClientError, BotoCoreError) as exc:
            failed_once = failed_once or is_transient(exc)
            raise

    try:
        remote.retry(attempt)
    except ClientError as exc:
        code, status = error_code(exc), http_status(exc)
        if code == "PreconditionFailed" or status == 412:
            if failed_once and landed():
                return True  # our own earlier attempt landed before its answer was lost
            raise ObjectExistsError(f"object {name} already exists") from exc
        if code == "NotImplemented" or status == 501:
            return False
        raise remote.error_of(exc, "writing", name) from exc
    except BotoCoreError as exc:
        raise remote.error_of(exc, "writing", name) from exc
    return True


def _md5(file: BinaryIO) -> str:
    file.seek(0)
    digest = hashlib.md5(usedforsecurity=False)
    while block := file.read(1 << 20):
        digest.update(block)
    return digest.hexdigest()
