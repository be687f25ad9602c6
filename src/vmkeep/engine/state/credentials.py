"""Remote credentials at rest: the credential variables of a remote kind (AWS_*, AZURE_*,
VMKEEP_SMB_PASSWORD), remembered per named remote in the secret store as
`remote/<name>/env/<VAR>` and handed to the remote's constructor when it is opened, so a
server or cron job needs no secrets in its environment (docs/STATE.md)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from sqlalchemy import select

from vmkeep.errors import NotFoundError, UsageError
from vmkeep.remotes.location import credential_variables

from .db import StateDB
from .models import Secret
from .secrets import SecretStore


def credential_prefix(remote: str) -> str:
    return f"remote/{remote}/env/"


def credential_secret(remote: str, variable: str) -> str:
    """The secret-store name of one remembered credential variable of a named remote."""
    return credential_prefix(remote) + variable


def remember_credentials(
    secrets: SecretStore,
    remote: str,
    location: str,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """Store the location's credential variables present in `environ` (default: the process
    environment), replacing what was remembered before. Returns the variable names, never the
    values; a location with nothing to remember is an error (the flag would do nothing)."""
    env = os.environ if environ is None else environ
    present = credentials_to_remember(location, env)
    forget_credentials(secrets, remote)
    for var in present:
        secrets.put_secret(credential_secret(remote, var), env[var].encode())
    return present


def credentials_to_remember(location: str, environ: Mapping[str, str]) -> list[str]:
    """The location's credential variables set in `environ`; an error when there are none,
    checked before anything is stored or registered."""
    wanted = credential_variables(location)
    if not wanted:
        raise UsageError(
            f"--remember-credentials: {location!r} is a local remote and has no credentials"
        )
    present = [var for var in wanted if environ.get(var)]
    if not present:
        raise UsageError(f"--remember-credentials: none of {', '.join(wanted)} is set")
    return present


def secret_exists(db: StateDB, name: str) -> bool:
    """Whether a secret of that name is stored (no server key needed)."""
    with db.transaction() as session:
        return session.get(Secret, name) is not None


def credential_names(db: StateDB, remote: str) -> list[str]:
    """Secret names remembered for the remote; reads names only (no server key needed, so a
    command on a remote without stored credentials never creates one)."""
    prefix = credential_prefix(remote)
    with db.transaction() as session:
        query = select(Secret.name).where(Secret.name.startswith(prefix, autoescape=True))
        names = session.scalars(query)
        return sorted(n for n in names if n.startswith(prefix))


def stored_credentials(
    db: StateDB, remote: str, secrets: SecretStore | None = None
) -> dict[str, str]:
    """The remembered variables of the remote, decrypted ({} when none were stored)."""
    names = credential_names(db, remote)
    if not names:
        return {}
    store = secrets or SecretStore(db)
    prefix = credential_prefix(remote)
    found: dict[str, str] = {}
    for name in names:
        try:
            found[name[len(prefix) :]] = store.get_secret(name).decode()
        except NotFoundError:  # removed meanwhile
            continue
    return found


def forget_credentials(secrets: SecretStore, remote: str) -> list[str]:
    """Delete the remote's remembered credentials; returns the variable names deleted."""
    prefix = credential_prefix(remote)
    gone: list[str] = []
    for name in credential_names(secrets.db, remote):
        try:
            secrets.delete_secret(name)
        except NotFoundError:
            continue
        gone.append(name[len(prefix) :])
    return gone
