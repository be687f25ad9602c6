"""The SMB remote's URL: ``smb://[DOMAIN;]USER@HOST[:PORT]/SHARE[/PATH]``, password apart."""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

from vmkeep.errors import UsageError

from .remote import SmbRemote
from .target import DEFAULT_PORT

PASSWORD_ENV = "VMKEEP_SMB_PASSWORD"


def open_smb(url: str, credentials: Mapping[str, str] | None = None) -> SmbRemote:
    """Parse ``smb://[DOMAIN;]USER@HOST[:PORT]/SHARE[/PATH]``; the password comes from
    `credentials` (stored) or VMKEEP_SMB_PASSWORD so that it never lands in configuration or
    logs."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("smb", "cifs"):
        raise UsageError(f"not an SMB URL: {url!r} (expected smb://USER@HOST/SHARE[/PATH])")
    if parts.password is not None:
        raise UsageError(f"do not put the SMB password in the URL; set {PASSWORD_ENV} instead")
    if parts.query or parts.fragment:
        raise UsageError(f"unexpected '?' or '#' in SMB URL {url!r}")
    user = unquote(parts.username or "")
    if not user:
        raise UsageError(f"SMB URL {url!r} needs a user: smb://USER@HOST/SHARE[/PATH]")
    domain, _, name = user.rpartition(";")
    username = f"{domain}\\{name}" if domain else name
    host = parts.hostname
    if not host:
        raise UsageError(f"SMB URL {url!r} has no host")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise UsageError(f"invalid port in SMB URL {url!r}") from exc
    segments = [unquote(s) for s in parts.path.split("/") if s]
    if not segments:
        raise UsageError(f"SMB URL {url!r} names no share: smb://USER@HOST/SHARE[/PATH]")
    password = (credentials or {}).get(PASSWORD_ENV) or os.environ.get(PASSWORD_ENV)
    if password is None:
        raise UsageError(f"set {PASSWORD_ENV} to the password of {username} on {host}")
    remote = SmbRemote(
        host,
        segments[0],
        username=username,
        password=password,
        port=port,
        path="/".join(segments[1:]),
    )
    if domain:  # keep the URL the user wrote (DOMAIN;USER), without secrets
        remote.url = remote.url.replace(f"smb://{username}@", f"smb://{domain};{name}@", 1)
    return remote
