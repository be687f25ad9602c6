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
    raise UsageError(
        f"remote kind {url.scheme!r} is not supported yet (local paths and file:// are)"
    )
