"""`vmkeep remote`: name remotes, and check them before relying on them."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import typer

from vmkeep.errors import RepositoryError

from .context import state
from .output import console, human_bytes, print_error, print_json, stdout, table
from .repo_commands import (
    BlockSizeOpt,
    FormatOpt,
    JsonOpt,
    PackSizeOpt,
    format_chunk_size,
    packed_options,
    parse_chunk_size,
)

if TYPE_CHECKING:
    from vmkeep.engine.remote_registry import RemoteEntry

remote_app = typer.Typer(help="Named remotes: where repositories live.", no_args_is_help=True)


@remote_app.command("add")
def add(
    name: str,
    location: str = typer.Argument(..., help="Path or URL."),
    encryption: str = typer.Option(
        "aes-256-gcm", help="For a new repository: aes-256-gcm or none."
    ),
    init: bool = typer.Option(True, help="Create the repository when there is none."),
    chunk_size: str = typer.Option(
        "4MiB", "--chunk-size", help="For a new repository: 64K..4M (as `vmkeep init`)."
    ),
    format_version: int | None = FormatOpt,
    block_size: str | None = BlockSizeOpt,
    pack_size: str = PackSizeOpt,
    lock_days: int | None = typer.Option(
        None,
        "--lock-days",
        help="Immutability: keep each restore point undeletable for N days "
        "(S3 with Object Lock, or a local directory; docs/IMMUTABILITY.md).",
    ),
    lock_mode: str = typer.Option(
        "compliance", "--lock-mode", help="compliance (nobody can shorten) or governance."
    ),
    remember_passphrase: bool = typer.Option(
        False,
        "--remember-passphrase",
        help="Store the passphrase, encrypted with the server key, for job runs "
        "(docs/RUNS.md); default: jobs use VMKEEP_PASSPHRASE.",
    ),
    remember_credentials: bool = typer.Option(
        False,
        "--remember-credentials",
        help="Store the remote's credential variables from the environment (AWS_*, AZURE_*, "
        "VMKEEP_SMB_PASSWORD), encrypted with the server key, for later commands and job "
        "runs (docs/STATE.md).",
    ),
) -> None:
    """Register a remote; creates its repository if there is none, else checks the passphrase."""
    # Imported when used: the repository's crypto and zstd are not needed at start-up.
    from vmkeep.remotes.local import LocalRemote
    from vmkeep.remotes.location import open_remote
    from vmkeep.remotes.object_lock import LockPolicy, apply_lock_policy
    from vmkeep.repository.repository import Repository

    size = parse_chunk_size(chunk_size)
    if remember_credentials:
        from vmkeep.engine.state.credentials import credentials_to_remember

        credentials_to_remember(location, os.environ)  # fails before anything is created
    remote = open_remote(location)
    lock = LockPolicy.from_days(lock_days, lock_mode.lower()) if lock_days is not None else None
    apply_lock_policy(remote, lock)  # fails now if the remote cannot enforce it
    try:
        repo = Repository.open(remote, state.passphrase)
        what = "existing repository opened"
    except RepositoryError as exc:
        if not init or "no vmkeep repository" not in str(exc):
            raise
        repo = Repository.init(
            remote,
            encryption,
            lambda: state.passphrase(confirm=True),
            size,
            **packed_options(format_version, block_size, pack_size),
        )
        what = (
            f"new repository created (encryption: {encryption}, "
            f"chunk size: {format_chunk_size(size)}, format {repo.config['version']})"
        )
    state.registry.add(name, location, lock, repo.known)
    passphrase = remember_passphrase and repo.encrypted
    what += remember_secrets(name, location, passphrase, remember_credentials)
    locked = f"; restore points locked {lock.describe()}" if lock else ""
    console.print(f"remote {name}: {remote.url}: {what}{locked}")
    if lock and isinstance(remote, LocalRemote):
        console.print(
            f"run `vmkeep-immutable apply {remote.root}` as root from a timer to make the files "
            "immutable (docs/IMMUTABILITY.md)"
        )


def remember_secrets(name: str, location: str, passphrase: bool, credentials: bool) -> str:
    """Store what `remote add` was asked to remember; says what, never the values."""
    if not passphrase and not credentials:
        return ""
    from vmkeep.engine.runs.context import passphrase_secret
    from vmkeep.engine.state import SecretStore
    from vmkeep.engine.state.credentials import remember_credentials

    secrets = SecretStore(state.db)
    said = ""
    if passphrase:
        secrets.put_secret(passphrase_secret(name), state.passphrase())
        said += "; passphrase remembered for job runs"
    if credentials:
        stored = remember_credentials(secrets, name, location)
        said += f"; credentials remembered ({', '.join(stored)})"
    return said


@remote_app.command("lock")
def lock_cmd(
    name: str,
    days: int = typer.Option(..., "--days", help="Lock later restore points N days; 0 = off."),
    mode: str = typer.Option("compliance", "--mode", help="compliance or governance."),
) -> None:
    """Change a remote's immutability setting (objects already locked stay locked)."""
    from vmkeep.remotes.object_lock import LockPolicy, apply_lock_policy

    lock = LockPolicy.from_days(days, mode.lower()) if days else None
    apply_lock_policy(state.open_remote(name), lock)
    state.registry.set_lock(name, lock)
    console.print(f"remote {name}: " + (f"locked {lock.describe()}" if lock else "no lock"))


@remote_app.command("list")
def list_remotes(json_out: bool = JsonOpt) -> None:
    """List the configured remotes."""
    entries = state.registry.load()
    if json_out:
        print_json([remote_json(e) for e in entries])
        return
    listing = table("name", "location", "lock")
    for e in entries:
        listing.add_row(e.name, e.location, f"{e.lock_days} d {e.lock_mode}" if e.lock_days else "")
    stdout.print(listing)


def remote_json(entry: RemoteEntry) -> dict[str, object]:
    """Lock keys appear only on immutable remotes (older readers see what they always saw)."""
    data: dict[str, object] = {"name": entry.name, "location": entry.location}
    if entry.lock_days:
        data.update(lock_days=entry.lock_days, lock_mode=entry.lock_mode)
    return data


@remote_app.command("remove")
def remove(name: str) -> None:
    """Forget a remote's name and its remembered passphrase and credentials (its repository
    is not touched)."""
    state.registry.remove(name)
    forgotten = forget_secrets(name)
    console.print(f"removed remote {name}" + (f" ({forgotten} forgotten)" if forgotten else ""))


def forget_secrets(name: str) -> str:
    """Delete a removed remote's secrets; says which, never the values."""
    from vmkeep.engine.runs.context import passphrase_secret
    from vmkeep.engine.state.credentials import (
        credential_names,
        forget_credentials,
        secret_exists,
    )

    db = state.db
    has_passphrase = secret_exists(db, passphrase_secret(name))
    if not has_passphrase and not credential_names(db, name):
        return ""  # nothing stored: do not create a server key just to delete nothing
    from vmkeep.engine.state import SecretStore

    secrets = SecretStore(db)
    gone = forget_credentials(secrets, name)
    if has_passphrase:
        secrets.delete_secret(passphrase_secret(name))
        gone.insert(0, "passphrase")
    return ", ".join(gone)


@remote_app.command("test")
def test(
    remote: str = typer.Argument(..., help="Remote name, path or URL."),
    size_mib: int = typer.Option(64, "--size", help="MiB written and read back."),
    json_out: bool = JsonOpt,
) -> None:
    """Check permissions (create, read, list, delete; delete refused where immutable) and
    measure throughput."""
    from vmkeep.operations.remote_probe import probe_remote

    report = probe_remote(state.open_remote(remote), size_mib * 1024 * 1024)
    if json_out:
        print_json(report.to_json())
    else:
        listing = table("check", "result", title=report.url)
        for name, result in report.checks.items():
            listing.add_row(name, "[green]ok[/]" if result == "ok" else f"[red]{result}[/]")
        stdout.print(listing)
        stdout.print(
            f"write {report.write_mb_per_s or '-'} MB/s, read {report.read_mb_per_s or '-'}"
            f" MB/s, latency {report.latency_ms or '-'} ms, "
            f"free {human_bytes(report.free_bytes)}"
        )
    if not report.ok:
        failed = next((name, result) for name, result in report.checks.items() if result != "ok")
        print_error(f"remote test failed: {failed[0]}: {failed[1]}")
        raise typer.Exit(1)
