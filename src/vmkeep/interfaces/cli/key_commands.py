"""`vmkeep key list|add|remove`: the passphrases of an encrypted repository, each a wrapped
copy of the one repository key (docs/FORMAT.md §3), so adding or removing one rewrites no data."""

from __future__ import annotations

import typer

from .context import state
from .output import console, human_bytes, print_json, stdout, table
from .repo_commands import JsonOpt, RemoteOpt

key_app = typer.Typer(help="Passphrases of an encrypted repository.", no_args_is_help=True)


@key_app.command("list")
def key_list(remote: str | None = RemoteOpt, json_out: bool = JsonOpt) -> None:
    """List the wrapped copies of the repository key."""
    repo = state.open_repository(remote)
    keys = [
        {k: e.get(k) for k in ("id", "label", "kdf", "memory_kib", "time_cost")}
        for e in repo.config["keys"]
    ]  # entries of another kdf were not checked by open: shown as they are, never computed
    if json_out:
        print_json(keys)
        return
    listing = table("id", "label", "kdf", "memory", "passes")
    for k in keys:
        listing.add_row(
            str(k["id"]),
            str(k["label"]),
            str(k["kdf"]),
            human_bytes(k["memory_kib"] * 1024) if type(k["memory_kib"]) is int else "-",
            str(k["time_cost"]),
        )
    stdout.print(listing)


@key_app.command("add")
def key_add(
    remote: str | None = RemoteOpt,
    label: str = typer.Option("added", help="A name for the new passphrase."),
    new_passphrase_file: str = typer.Option(..., help="File holding the new passphrase."),
) -> None:
    """Add a passphrase (e.g. a recovery key); the data is not rewritten."""
    from pathlib import Path

    from .passphrase import PassphraseSource

    repo = state.open_repository(remote)
    key_id = repo.add_key(PassphraseSource(Path(new_passphrase_file))(), label)
    console.print(f"added key {key_id}")


@key_app.command("remove")
def key_remove(key_id: str, remote: str | None = RemoteOpt) -> None:
    """Remove a passphrase; the one you opened the repository with must stay."""
    repo = state.open_repository(remote)
    repo.remove_key(key_id, state.passphrase())
    console.print(f"removed key {key_id}")
