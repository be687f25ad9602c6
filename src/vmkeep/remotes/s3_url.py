"""An S3 location as a URL, `s3://BUCKET[/PREFIX]?endpoint=...`: parsed and checked here
(docs/REMOTES-S3.md), so that s3.py is only the remote itself."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import parse_qsl, unquote, urlparse

from vmkeep.errors import UsageError

from .s3 import DEFAULT_TIMEOUTS, S3Remote

URL_PARAMS = frozenset(
    {"endpoint", "region", "path_style", "checksums", "conditional_put", "timeout"}
)


def _flag(value: str, param: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"S3 URL parameter {param}={value!r} must be 1 or 0")


def open_s3(url: str, credentials: Mapping[str, str] | None = None) -> S3Remote:
    """`s3://BUCKET[/PREFIX]?endpoint=URL&region=NAME&path_style=1`; credentials come from the
    environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE: boto3's usual chain),
    never from the URL, so that the stored location holds no secret. A stored key pair in
    `credentials` (a remote added with --remember-credentials) is used instead."""
    parsed = urlparse(url)
    if parsed.scheme != "s3":
        raise UsageError(f"not an S3 location: {url!r} (expected s3://BUCKET[/PREFIX])")
    if "@" in parsed.netloc or parsed.password is not None:
        raise UsageError(
            "S3 credentials must not be in the URL: set AWS_ACCESS_KEY_ID and"
            " AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) instead"
        )
    bucket = parsed.netloc
    if not bucket:
        raise UsageError(f"S3 location {url!r} has no bucket: s3://BUCKET[/PREFIX]")
    params: dict[str, str] = {}
    for k, v in parse_qsl(parsed.query, keep_blank_values=True):
        if k not in URL_PARAMS:
            known = ", ".join(sorted(URL_PARAMS))
            raise UsageError(f"unknown S3 URL parameter {k!r} (known: {known})")
        params[k] = v
    endpoint = params.get("endpoint") or None
    if endpoint is not None:
        ep = urlparse(endpoint)
        if ep.scheme not in ("http", "https") or not ep.netloc:
            raise UsageError(f"S3 endpoint {endpoint!r} must be an http:// or https:// URL")
        if ep.username or ep.password:
            raise UsageError("S3 credentials must not be in the endpoint URL")
    connect_timeout, read_timeout = DEFAULT_TIMEOUTS
    if "timeout" in params:
        try:
            connect_timeout = read_timeout = float(params["timeout"])
        except ValueError:
            connect_timeout = 0.0
        if not connect_timeout > 0:
            raise UsageError("S3 URL parameter timeout must be a positive number of seconds")
    path_style = _flag(params["path_style"], "path_style") if "path_style" in params else None
    prefix = unquote(parsed.path).strip("/")
    if prefix and any(p in ("", ".", "..") for p in prefix.split("/")):
        raise UsageError(f"S3 prefix {prefix!r} must not have empty, '.' or '..' parts")
    # Both halves of a stored pair, or neither (boto3's chain then decides).
    key_id = (credentials or {}).get("AWS_ACCESS_KEY_ID")
    secret = (credentials or {}).get("AWS_SECRET_ACCESS_KEY")
    return S3Remote(
        bucket,
        prefix,
        endpoint=endpoint,
        region=params.get("region") or None,
        path_style=path_style,
        checksums=_flag(params.get("checksums", "1"), "checksums"),
        conditional_put=_flag(params.get("conditional_put", "1"), "conditional_put"),
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        access_key=key_id if key_id and secret else None,
        secret_key=secret if key_id and secret else None,
    )
