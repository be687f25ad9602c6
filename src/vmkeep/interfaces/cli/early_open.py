"""The key derivation of `backup` and `restore` started before typer and rich are imported.

Argon2id (64 MiB, 3 passes) runs in C without the GIL for ~0.2 s; the CLI's own start-up
(typer, its pydantic adapters, rich, the command modules) is ~0.15-0.5 s before a command
runs. `app.py` calls `start(sys.argv)` first: when the command line is `backup` or `restore`
with `--remote PATH` (a local path: an object store's config read is a request,
which must not delay or precede a usage error) and the passphrase comes from --passphrase-file or
VMKEEP_PASSPHRASE, the config is read and the derivation begins at once
(`OpeningRepository`); the command takes it with `take`. Only an exact match is taken
(the remote as typer parsed it, the same passphrase file), so a misread command line costs
the derivation's CPU, never a wrong repository; any failure here is dropped and the command
opens the repository as before, reporting the error where it always did
(docs/DATA-PATH.md "Start-up of backup and restore")."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmkeep.repository.repository import Repository

COMMANDS = frozenset({"backup", "restore"})  # the data commands whose start-up is measured
ENTRY_NAMES = frozenset({"vmkeep", "app.py"})  # the console script, `python -m ...cli.app`


@dataclass(frozen=True)
class _Started:
    remote_ref: str
    passphrase_file: Path | None
    result: Callable[[], Repository]


_started: _Started | None = None
_tried = False  # start() runs once per process, even if app.py is executed twice


def is_location(ref: str) -> bool:
    """A path or URL, not a remote name (names have no '/': RemoteRegistry.resolve)."""
    return "/" in ref or "://" in ref or ref.startswith(".")


def start(argv: list[str]) -> None:
    """Read the config and start the key derivation if argv asks for a data command on a
    local path remote with a passphrase that needs no prompt; otherwise do nothing."""
    global _started, _tried
    wanted = None if _tried else wanted_open(argv)
    _tried = True
    if wanted is None:
        return
    remote_ref, file = wanted
    if file is None and "VMKEEP_PASSPHRASE" not in os.environ:
        return  # a prompt is asked where the command asks it
    try:
        from vmkeep.remotes.location import open_remote
        from vmkeep.repository.opening import OpeningRepository

        from .passphrase import PassphraseSource

        opening = OpeningRepository(open_remote(remote_ref), PassphraseSource(file))
    except Exception:
        return  # the command opens it again and reports the error itself
    _started = _Started(remote_ref, file, opening.result)


def take(remote_ref: str, passphrase_file: Path | None) -> Callable[[], Repository] | None:
    """The opening `start` began, if it was for this remote and passphrase file (once)."""
    global _started
    started, _started = _started, None
    if started is None or started.remote_ref != remote_ref:
        return None
    if started.passphrase_file != passphrase_file:
        return None
    return started.result


def wanted_open(argv: list[str]) -> tuple[str, Path | None] | None:
    """(remote, passphrase file) of `vmkeep [--passphrase-file F] backup|restore ... --remote
    R ...`, or None for anything else (other commands, --help, no or several --remote)."""
    if not argv or os.path.basename(argv[0]) not in ENTRY_NAMES:
        return None
    args = argv[1:]
    file: Path | None = None
    while args and args[0].startswith("-"):
        if args[0] == "--passphrase-file" and len(args) > 1:
            file, args = Path(args[1]), args[2:]
        elif args[0].startswith("--passphrase-file="):
            file, args = Path(args[0].split("=", 1)[1]), args[1:]
        else:
            return None
    if not args or args[0] not in COMMANDS:
        return None
    options = args[1 : args.index("--")] if "--" in args else args[1:]
    if "--help" in options:
        return None
    remotes = remote_values(options)
    if len(remotes) != 1 or not is_location(remotes[0]) or "://" in remotes[0]:
        return None  # a URL's config read is a request: not before typer checked the usage
    return remotes[0], file


def remote_values(options: list[str]) -> list[str]:
    """Every value given to --remote/-r (as `--remote R`, `--remote=R` or `-r R`)."""
    found = []
    for i, arg in enumerate(options):
        if arg in ("--remote", "-r") and i + 1 < len(options):
            found.append(options[i + 1])
        elif arg.startswith("--remote="):
            found.append(arg.split("=", 1)[1])
    return found
