"""Turn a remote location (a path or URL) into a Remote."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlparse

from vmkeep.errors import UsageError

from .base import Remote
from .local import LocalRemote

# The environment variables each remote kind reads its credentials from (docs/STATE.md):
# what `vmkeep remote add --remember-credentials` stores in the secret store.
CREDENTIAL_VARIABLES: dict[str, tuple[str, ...]] = {
    "s3": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
    "azure": (
        "AZURE_STORAGE_CONNECTION_STRING",
        "AZURE_STORAGE_KEY",
        "AZURE_STORAGE_SAS_TOKEN",
    ),
    "smb": ("VMKEEP_SMB_PASSWORD",),
    "cifs": ("VMKEEP_SMB_PASSWORD",),
}


def credential_variables(location: str) -> tuple[str, ...]:
    """The credential variables of the location's remote kind (none for a local path)."""
    if "://" not in location:
        return ()
    return CREDENTIAL_VARIABLES.get(urlparse(location).scheme.lower(), ())


def open_remote(location: str, credentials: Mapping[str, str] | None = None) -> Remote:
    """`credentials` maps credential variable names (CREDENTIAL_VARIABLES) to values that win
    over the process environment: concurrent runs each pass their remote's own, and nothing
    is written to os.environ."""
    creds = credentials or {}
    if "://" not in location:
        return LocalRemote(location)
    url = urlparse(location)
    if url.scheme == "file":
        return LocalRemote(url.path)
    if url.scheme == "s3":
        from .s3_url import open_s3  # boto3 is imported only when an S3 remote is used

        return open_s3(location, creds)
    if url.scheme == "azure":
        from .azure import open_azure  # the Azure SDK too

        return open_azure(location, creds)
    if url.scheme in ("smb", "cifs"):
        from .smb import open_smb  # and smbprotocol

        return open_smb(location, creds)
    raise UsageError(
        f"unknown remote kind {url.scheme!r}: use a path, file://, s3://, azure:// or smb://"
    )
