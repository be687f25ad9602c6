"""A repository in an Azure Blob Storage container (or Azurite, its local emulator).

Location: ``azure://CONTAINER[/PREFIX]?account=NAME[&endpoint=URL]``. Credentials never appear
in the location; they come from AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_KEY (the account
key) or AZURE_STORAGE_SAS_TOKEN, tried in that order.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import time
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any, BinaryIO, NoReturn
from urllib.parse import parse_qs, quote, urlencode, urlparse

from azure.core import MatchConditions
from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import ContainerClient, ExponentialRetry, StorageStreamDownloader

from vmkeep.errors import NotFoundError, ObjectExistsError, RemoteError, UsageError

from .base import ObjectStat
from .transport_errors import describe, host_of, is_permanent

MiB = 1024 * 1024
# Objects up to this size go up in one Put Blob request: atomic, and one round trip. Larger ones
# go as staged blocks plus a Put Block List, which is atomic too (uncommitted blocks are invisible).
MAX_SINGLE_PUT = 64 * MiB
_CONTAINER_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])")
ENV_CONNECTION_STRING = "AZURE_STORAGE_CONNECTION_STRING"
ENV_KEY = "AZURE_STORAGE_KEY"
ENV_SAS = "AZURE_STORAGE_SAS_TOKEN"

_AUTH_CODES = {
    "AuthenticationFailed",
    "AuthorizationFailure",
    "InvalidAuthenticationInfo",
    "NoAuthenticationInformation",
}
_PERMISSION_CODES = {
    "AuthorizationPermissionMismatch",
    "AuthorizationResourceTypeMismatch",
    "AuthorizationServiceMismatch",
    "AuthorizationProtocolMismatch",
    "AuthorizationSourceIPMismatch",
    "InsufficientAccountPermissions",
}


class _BoundedRetry(ExponentialRetry):
    """The SDK's retry policy (connection errors, resets, timeouts, 408, 500 and 503, the status
    Azure throttles with) with jittered float backoffs first, 2*first, 4*first... capped at `cap`,
    and a total budget: no new attempt starts `deadline` seconds after the first one did."""

    def __init__(self, retries: int, first: float, cap: float, deadline: float) -> None:
        super().__init__(
            retry_total=retries,
            retry_connect=retries,
            retry_read=retries,
            retry_status=retries,
        )
        self._first = first
        self._cap = cap
        self._deadline = deadline

    def configure_retries(self, request: Any) -> dict[str, Any]:
        settings: dict[str, Any] = super().configure_retries(request)
        settings["started"] = time.monotonic()
        return settings

    def _left(self, settings: dict[str, Any]) -> float:
        return self._deadline - (time.monotonic() - float(settings["started"]))

    def increment(self, settings: dict[str, Any], *args: Any, **kwargs: Any) -> bool:
        error = kwargs.get("error", args[1] if len(args) > 1 else None)
        if isinstance(error, BaseException) and is_permanent(error):
            return False  # an untrusted certificate or an unknown host: no retry cures it
        again: bool = super().increment(settings, *args, **kwargs)
        return again and self._left(settings) > 0

    def get_backoff_time(self, settings: dict[str, Any]) -> float:
        backoff = min(self._cap, self._first * 2.0 ** int(settings["count"]))
        return max(0.0, min(backoff * random.uniform(0.75, 1.25), self._left(settings)))


def _code(exc: AzureError) -> str:
    """The service's error code ("BlobNotFound"...): the SDK gives an enum or a plain string."""
    code = getattr(exc, "error_code", None)
    return str(getattr(code, "value", code) or "")


def _status(exc: AzureError) -> int:
    return int(getattr(exc, "status_code", None) or 0)


class _Pieces:
    """A writable stream that keeps the bytes objects written to it, for `readinto`."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.pieces.append(data)
        return len(data)


def _body(download: StorageStreamDownloader[bytes]) -> bytes:
    """The downloaded bytes without the copies of `readall`: a download of up to
    max_single_get_size arrives as one bytes object, which `readall` copies into a BytesIO and
    out again, and `readinto` hands over as it is (measured on Azurite, 16 MiB ranges on 4
    threads: 10-14 against 8 ms of client CPU per GET; docs/DATA-PATH.md "Restore from object
    stores")."""
    out = _Pieces()
    download.readinto(out)  # type: ignore[arg-type]
    return out.pieces[0] if len(out.pieces) == 1 else b"".join(out.pieces)


class AzureRemote:
    """Objects are block blobs named PREFIX + name in one container. A single ContainerClient
    (one HTTP connection pool) is shared by every thread: the SDK's sync clients allow that."""

    def __init__(
        self,
        container: str,
        prefix: str = "",
        *,
        account: str | None = None,
        endpoint: str | None = None,
        connection_string: str | None = None,
        account_key: str | None = None,
        sas_token: str | None = None,
        retries: int = 5,
        backoff: float = 1.0,
        retry_deadline: float = 30.0,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        page_size: int = 5000,
    ) -> None:
        if not _CONTAINER_NAME.fullmatch(container) or "--" in container:
            raise UsageError(
                f"invalid azure container name {container!r}: 3 to 63 lower-case letters,"
                " digits and single hyphens, starting and ending with a letter or digit"
            )
        self.container = container
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.page_size = page_size
        # A dead endpoint fails after backoffs of 1+2+4+8+8 s; a silent one after the read timeout
        # and the retry deadline: about 30 s either way, then the last attempt's own timeout.
        options: dict[str, Any] = {
            "retry_policy": _BoundedRetry(retries, backoff, 8.0, retry_deadline),
            "connection_timeout": connect_timeout,
            "read_timeout": read_timeout,
            "max_single_put_size": MAX_SINGLE_PUT,
            "max_block_size": 8 * MiB,
            "max_single_get_size": MAX_SINGLE_PUT,
            "max_chunk_get_size": 8 * MiB,
        }
        try:
            if connection_string:
                self._client = ContainerClient.from_connection_string(
                    connection_string, container, **options
                )
                if account and self._client.account_name != account:
                    raise UsageError(
                        f"{ENV_CONNECTION_STRING} is for account {self._client.account_name!r},"
                        f" not {account!r}"
                    )
            else:
                if not account:
                    raise UsageError("azure remote: the location needs ?account=NAME")
                credential: AzureNamedKeyCredential | AzureSasCredential
                if account_key:
                    credential = AzureNamedKeyCredential(account, account_key)
                elif sas_token:
                    credential = AzureSasCredential(sas_token.lstrip("?"))
                else:
                    raise UsageError(
                        f"azure remote: no credentials; set {ENV_CONNECTION_STRING},"
                        f" {ENV_KEY} or {ENV_SAS}"
                    )
                account_url = endpoint or f"https://{account}.blob.core.windows.net"
                self._client = ContainerClient(account_url, container, credential, **options)
        except ValueError as exc:
            raise UsageError(f"azure remote: invalid settings: {exc}") from exc
        self.account = self._client.account_name or account or ""
        # The location without secrets, as open_azure accepts it back.
        query = {"account": self.account}
        if endpoint or connection_string:
            # primary_endpoint is the container's URL (a SAS may follow): keep the account part.
            parts = urlparse(self._client.primary_endpoint)
            account_path = parts.path.rstrip("/").rsplit("/", 1)[0]
            query["endpoint"] = f"{parts.scheme}://{parts.netloc}{account_path}"
            if query["endpoint"] == f"https://{self.account}.blob.core.windows.net":
                del query["endpoint"]
        path = quote(self.prefix.rstrip("/")) if self.prefix else ""
        self.url = f"azure://{container}{'/' + path if path else ''}?{urlencode(query, safe=':/')}"

    # -- helpers --------------------------------------------------------------------------

    def _blob(self, name: str) -> str:
        parts = name.split("/")
        if not name or len(name) > 900 or any(p in ("", ".", "..") for p in parts):
            raise RemoteError(f"invalid object name {name!r}")
        return self.prefix + name

    def _fail(self, exc: AzureError, action: str, name: str | None = None) -> NoReturn:
        """Turn an SDK exception into a one-line RemoteError for the user."""
        what = f"{action} {name} in {self.url}" if name else f"{action} {self.url}"
        if isinstance(exc, HttpResponseError) and exc.response is not None:
            code, status = _code(exc), _status(exc)
            if code == "ContainerNotFound":
                raise RemoteError(
                    f"container {self.container!r} does not exist in account {self.account!r}"
                    f" ({what})"
                ) from exc
            if code in _AUTH_CODES or status == 401:
                raise RemoteError(
                    f"authentication failed {what} ({code or status}): check the account key,"
                    " SAS token or connection string, and the account's network rules"
                ) from exc
            if code in _PERMISSION_CODES or status == 403:
                raise RemoteError(f"permission denied {what} ({code or status})") from exc
            if code == "AccountIsDisabled":
                raise RemoteError(f"storage account {self.account!r} is disabled") from exc
            if code == "ResourceNotFound" or code == "InvalidResourceName":
                raise RemoteError(f"account or container not found {what} ({code})") from exc
            raise RemoteError(f"server error {what}: {status} {code}".rstrip()) from exc
        if isinstance(exc, ClientAuthenticationError):  # signing failed: the key is not base64
            raise RemoteError(f"authentication failed {what}: the account key is invalid") from exc
        text = str(exc.message or exc)
        cause = describe(exc, host_of(self._client.url), "REQUESTS_CA_BUNDLE")
        if cause and not isinstance(exc, ServiceResponseError):  # DNS, refused, TLS: say which
            raise RemoteError(f"cannot reach the endpoint {what}: {cause}") from exc
        if "SSL" in text or "CERTIFICATE" in text.upper():
            raise RemoteError(f"TLS error {what}: {text.splitlines()[0][:200]}") from exc
        if isinstance(exc, ServiceRequestError):
            raise RemoteError(f"cannot reach the endpoint {what}: connection failed") from exc
        if isinstance(exc, ServiceResponseError):
            raise RemoteError(f"connection lost or timed out {what}") from exc
        raise RemoteError(f"error {what}: {text.splitlines()[0][:200]}") from exc

    # -- Remote interface -----------------------------------------------------------------

    def put(self, name: str, data: bytes, *, overwrite: bool = True) -> None:
        blob = self._blob(name)
        retried = False

        def hook(**_kwargs: Any) -> None:
            nonlocal retried
            retried = True

        try:
            self._client.upload_blob(
                blob, data, length=len(data), overwrite=overwrite, retry_hook=hook
            )
        except (ResourceExistsError, ResourceModifiedError) as exc:
            if overwrite:
                self._fail(exc, "writing", name)
            # A retried create may have succeeded the first time with its answer lost: then the
            # object holds exactly our bytes, and the put did happen.
            if retried and self._same_content(name, data):
                return
            raise ObjectExistsError(f"object {name} already exists in {self.url}") from exc
        except AzureError as exc:
            self._fail(exc, "writing", name)

    def _same_content(self, name: str, data: bytes) -> bool:
        try:
            return self.get(name) == data
        except NotFoundError:
            return False

    def put_file(self, name: str, file: BinaryIO, size: int) -> bool:
        """As put(overwrite=False), the body read from `file` (a version 2 manifest,
        docs/FORMAT.md §5.5): up to MAX_SINGLE_PUT in one PUT, above it staged in blocks
        of 8 MiB read one at a time and committed only if the name is free."""
        blob = self._blob(name)
        retried = False

        def hook(**_kwargs: Any) -> None:
            nonlocal retried
            retried = True

        try:
            file.seek(0)
            self._client.upload_blob(
                blob, file, length=size, overwrite=False, max_concurrency=1, retry_hook=hook
            )
        except (ResourceExistsError, ResourceModifiedError) as exc:
            if retried and self._same_file(name, file, size):
                return True  # our own earlier attempt landed, its answer lost
            raise ObjectExistsError(f"object {name} already exists in {self.url}") from exc
        except AzureError as exc:
            self._fail(exc, "writing", name)
        return True

    def _same_file(self, name: str, file: BinaryIO, size: int) -> bool:
        step = 8 * MiB
        try:
            for at in range(0, size, step):
                file.seek(at)
                if self.get(name, at, min(step, size - at)) != file.read(min(step, size - at)):
                    return False
            return self.get(name, size, 1) == b""
        except NotFoundError:
            return False

    def flush(self) -> None:
        """A put is durable when it returns (Azure commits before answering): nothing to do."""

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        blob = self._blob(name)
        try:
            if length == 0:
                if self.stat(name) is None:
                    raise NotFoundError(f"object {name} not found in {self.url}")
                return b""
            if offset == 0 and length is None:
                download = self._client.download_blob(blob, max_concurrency=1)
            else:
                download = self._client.download_blob(
                    blob, offset=offset, length=length, max_concurrency=1
                )
            return _body(download)
        except ResourceNotFoundError as exc:
            if _code(exc) == "BlobNotFound" or not _code(exc):
                raise NotFoundError(f"object {name} not found in {self.url}") from exc
            self._fail(exc, "reading", name)
        except HttpResponseError as exc:
            if _status(exc) == 416 or _code(exc) == "InvalidRange":
                # The range starts at or past the end: like a file read there, return nothing.
                if self.stat(name) is None:
                    raise NotFoundError(f"object {name} not found in {self.url}") from exc
                return b""
            self._fail(exc, "reading", name)
        except AzureError as exc:
            self._fail(exc, "reading", name)

    def stat(self, name: str) -> ObjectStat | None:
        blob = self._blob(name)
        try:
            props = self._client.get_blob_client(blob).get_blob_properties()
        except ResourceNotFoundError as exc:
            if _code(exc) == "ContainerNotFound":
                self._fail(exc, "reading", name)
            return None
        except AzureError as exc:
            self._fail(exc, "reading", name)
        return ObjectStat(name, int(props.size), props.last_modified.timestamp())

    def list(self, prefix: str) -> Iterator[ObjectStat]:
        """Pages through the listing, `page_size` names per request; only committed blobs."""
        skip = len(self.prefix)
        try:
            pages = self._client.list_blobs(
                name_starts_with=self.prefix + prefix, results_per_page=self.page_size
            ).by_page()
            for page in pages:
                for props in page:
                    yield ObjectStat(
                        props.name[skip:], int(props.size), props.last_modified.timestamp()
                    )
        except AzureError as exc:
            self._fail(exc, "listing", prefix or "/")

    def delete(self, name: str) -> None:
        blob = self._blob(name)
        try:
            self._client.delete_blob(blob, delete_snapshots="include")
        except ResourceNotFoundError as exc:
            if _code(exc) == "ContainerNotFound":
                self._fail(exc, "deleting", name)
        except AzureError as exc:
            self._fail(exc, "deleting", name)

    def free_space(self) -> int | None:
        """Azure does not report remaining capacity (accounts are effectively unbounded)."""
        return None

    def purge_incomplete(self, older_than: float) -> int:
        """Discard the uncommitted blocks of large uploads whose writer died (puts up to 64 MiB
        are single requests and leave nothing). Azure would drop them itself after 7 days; doing
        it now frees the space. Names with only uncommitted blocks are those the listing shows
        with include=uncommittedblobs but not without: both listings are in name order, so a
        merge finds them without holding either in memory."""
        limit = time.time() - older_than
        removed = 0
        try:
            committed = (p.name for p in self._client.list_blobs(name_starts_with=self.prefix))
            current = next(committed, None)
            for props in self._client.list_blobs(
                name_starts_with=self.prefix, include=["uncommittedblobs"]
            ):
                while current is not None and current < props.name:
                    current = next(committed, None)
                if current == props.name or props.last_modified.timestamp() >= limit:
                    continue
                if self._discard_uncommitted(props.name, props.last_modified):
                    removed += 1
        except AzureError as exc:
            self._fail(exc, "removing unfinished uploads from")
        return removed

    def _discard_uncommitted(self, blob: str, listed_mtime: datetime) -> bool:
        """Drop the uncommitted blocks of a name that has no committed blob, never touching an
        object a writer commits meanwhile: every request is conditional."""
        client = self._client.get_blob_client(blob)
        try:
            client.get_blob_properties()
            return False  # a committed blob (the merge's name order is only trusted this far)
        except ResourceNotFoundError:
            pass
        try:
            # Azurite deletes such a name; the condition spares a blob committed since listing.
            client.delete_blob(if_unmodified_since=listed_mtime)
            return True
        except ResourceModifiedError:
            return False
        except ResourceNotFoundError:
            pass
        # Azure has nothing to delete there, but a Put Blob discards the name's blocks: a zero-byte
        # put made only if nothing is committed, then a delete of exactly that empty blob.
        try:
            result = client.upload_blob(b"", overwrite=False)
        except (ResourceExistsError, ResourceModifiedError):
            return False  # committed meanwhile: not a leftover
        with contextlib.suppress(ResourceModifiedError, ResourceNotFoundError):
            client.delete_blob(
                etag=str(result["etag"]), match_condition=MatchConditions.IfNotModified
            )
        return True

    def close(self) -> None:
        """Release the HTTP connection pool."""
        self._client.close()


def open_azure(url: str, credentials: Mapping[str, str] | None = None) -> AzureRemote:
    """Parse ``azure://CONTAINER[/PREFIX]?account=NAME&endpoint=URL`` and read the credentials
    from `credentials` (stored ones), else the environment (connection string, then account
    key, then SAS token)."""
    creds = credentials or {}

    def setting(name: str) -> str | None:
        return creds.get(name) or os.environ.get(name) or None

    parsed = urlparse(url)
    if parsed.scheme != "azure" or not parsed.netloc:
        raise UsageError(
            f"invalid azure location {url!r}: expected azure://CONTAINER[/PREFIX]?account=NAME"
        )
    if "@" in parsed.netloc or parsed.password:
        raise UsageError("azure location: put credentials in the environment, not in the URL")
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    unknown = set(query) - {"account", "endpoint"}
    if unknown:
        raise UsageError(f"azure location: unknown parameter(s) {', '.join(sorted(unknown))}")
    if any(k in query.get("endpoint", "").lower() for k in ("sig=", "accountkey=")):
        raise UsageError("azure location: put credentials in the environment, not in the URL")
    endpoint = query.get("endpoint") or None
    if endpoint and urlparse(endpoint).scheme not in ("http", "https"):
        raise UsageError(f"azure location: endpoint {endpoint!r} must be an http(s) URL")
    return AzureRemote(
        parsed.netloc,
        parsed.path,
        account=query.get("account") or None,
        endpoint=endpoint,
        connection_string=setting(ENV_CONNECTION_STRING),
        account_key=setting(ENV_KEY),
        sas_token=setting(ENV_SAS),
    )
