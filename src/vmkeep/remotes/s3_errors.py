"""How S3 failures are told apart: which are retried (throttling, 5xx, dropped connections) and
the one line each kind of failure gives the user (credentials, missing bucket, full, region,
lock, permission, DNS/TLS/connection)."""

from __future__ import annotations

from typing import Protocol

from botocore.exceptions import (
    ClientError,
    ConnectionError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    SSLError,
)

from vmkeep.errors import ObjectLockedError, RemoteError, RemoteFullError

from .transport_errors import describe, host_of, is_permanent


class S3Place(Protocol):
    """Where an S3 remote is, as its error messages say it (S3Remote has all of it)."""

    url: str
    where: str
    bucket: str
    endpoint: str | None
    region: str | None

    @property
    def endpoint_url(self) -> str: ...


# Error codes that say the credentials themselves are wrong (not a missing permission).
AUTH_CODES = frozenset(
    {
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidClientTokenId",
        "AuthFailure",
        "UnrecognizedClientException",
    }
)
# Error codes worth another attempt: throttling and the server's own transient trouble.
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "TooManyRequestsException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "BandwidthLimitExceeded",
        "PriorRequestNotComplete",
        "ConditionalRequestConflict",  # AWS: a concurrent conditional write; retry decides
        "OperationAborted",
    }
)
FULL_CODES = frozenset(
    {
        "QuotaExceeded",
        "XMinioStorageFull",
        "InsufficientStorage",
        "StorageFull",
        "StorageQuotaExceeded",
    }
)
REGION_CODES = frozenset(
    {"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"}
)


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def http_status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def is_transient(exc: Exception) -> bool:
    """Throttling, 5xx and broken connections are retried; everything else fails at once."""
    if isinstance(exc, ClientError):
        status, code = http_status(exc), error_code(exc)
        if code in TRANSIENT_CODES or status == 429:
            return True
        return status >= 500 and status not in (501, 505, 507) and code not in FULL_CODES
    if isinstance(exc, SSLError) or is_permanent(exc):
        return False  # a certificate problem or an unknown host does not heal by retrying
    return isinstance(exc, ConnectionError | HTTPClientError | IncompleteReadError)


def s3_error(exc: Exception, action: str, name: str, remote: S3Place) -> RemoteError:
    """One clear line for the user; the SDK's exception stays chained by the caller."""
    what = f"{action} {name}" if name else action
    if isinstance(exc, ClientError):
        code, status = error_code(exc), http_status(exc)
        message = one_line(exc.response.get("Error", {}).get("Message", "") or code)
        if code in AUTH_CODES:
            return RemoteError(
                f"S3 authentication failed for {remote.where}: {message} "
                "(check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
            )
        if code == "NoSuchBucket":
            return RemoteError(f"S3 {remote.where} does not exist")
        if code in FULL_CODES or status == 507:
            return RemoteFullError(f"S3 remote is full {what} in {remote.url}: {message}")
        if code in REGION_CODES or status == 301:
            return RemoteError(
                f"S3 {remote.where} is in another region than {remote.region or 'the default'}"
                f" ({message}): set region= in the URL"
            )
        if code == "ObjectLocked":
            return ObjectLockedError(f"S3 object {name} is locked: {message}", name)
        if code == "AccessDenied" or status == 403:
            return RemoteError(f"S3 permission denied {what} in {remote.url}: {message}")
        if code == "InvalidBucketName":
            return RemoteError(f"S3 bucket name {remote.bucket!r} is not valid")
        return RemoteError(f"S3 error {what} in {remote.url}: {code or status} {message}")
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return RemoteError(
            "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            " (or AWS_PROFILE)"
        )
    endpoint = remote.endpoint or "AWS S3"
    ca_hint = "AWS_CA_BUNDLE or REQUESTS_CA_BUNDLE"
    cause = describe(exc, host_of(remote.endpoint_url), ca_hint)
    if cause and not isinstance(exc, ReadTimeoutError):  # DNS, refused, TLS: say which
        return RemoteError(f"cannot reach S3 endpoint {endpoint} {what}: {cause}")
    if isinstance(exc, SSLError):
        return RemoteError(f"TLS error talking to {endpoint}: {one_line(exc)}")
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
        return RemoteError(f"cannot reach S3 endpoint {endpoint} {what}: {one_line(exc)}")
    if isinstance(exc, ReadTimeoutError):
        return RemoteError(f"S3 endpoint {endpoint} did not answer in time {what}")
    if isinstance(exc, ConnectionError | HTTPClientError | IncompleteReadError):
        return RemoteError(f"connection to S3 endpoint {endpoint} failed {what}: {one_line(exc)}")
    return RemoteError(f"S3 error {what} in {remote.url}: {one_line(exc)}")
