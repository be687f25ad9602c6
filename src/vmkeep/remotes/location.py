"""Turn a remote location (a path or URL) into a Remote."""

from __future__ import annotations

from urllib.parse import urlparse

from vmkeep.errors import UsageError

from .base import Remote
from .local import LocalRemote


def open_remote(location: str) -> Remote:
    if "://" not in location:
        return LocalRemote(location)
    url = urlparse(location)
    if url.scheme == "file":
        return LocalRemote(url.path)
    if url.scheme == "s3":
        from .s3 import open_s3  # boto3 is imported only when an S3 remote is used

        return open_s3(location)
    if url.scheme == "azure":
        from .azure import open_azure  # the Azure SDK too

        return open_azure(location)
    if url.scheme in ("smb", "cifs"):
        from .smb import open_smb  # and smbprotocol

        return open_smb(location)
    raise UsageError(
        f"unknown remote kind {url.scheme!r}: use a path, file://, s3://, azure:// or smb://"
    )
