"""Entry point: builds the typer app and turns every VmkeepError into one line and an exit code."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from vmkeep.errors import VmkeepError
from vmkeep.parallel import reuse_chunk_buffers

from . import data_commands, remote_commands, replicate_commands, repo_commands, vm_commands
from .context import set_passphrase_file
from .output import print_error

app = typer.Typer(
    name="vmkeep",
    help="Backup, replication and restore for virtual machines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main_options(
    passphrase_file: Path | None = typer.Option(
        None, "--passphrase-file", help="Read the repository passphrase from this file."
    ),
) -> None:
    """vmkeep: deduplicated, encrypted VM backups; any restore point restores in one step.

    The passphrase of an encrypted repository comes from --passphrase-file, the
    VMKEEP_PASSPHRASE environment variable, or a prompt."""
    set_passphrase_file(passphrase_file)


repo_commands.register(app)
data_commands.register(app)
replicate_commands.register(app)
app.add_typer(remote_commands.remote_app, name="remote")
app.add_typer(vm_commands.vm_app, name="vm")


def main() -> None:
    reuse_chunk_buffers()
    try:
        code = app(standalone_mode=False)  # returns typer.Exit's code instead of raising
        if isinstance(code, int) and code:
            sys.exit(code)
    except VmkeepError as exc:
        print_error(exc.message)
        sys.exit(exc.exit_code)
    except typer.Abort:
        print_error("aborted")
        sys.exit(130)
    except typer.TyperException as exc:  # bad usage, parsed by typer
        format_message = getattr(exc, "format_message", None)
        print_error(f"{format_message() if format_message else exc.message} (see --help)")
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print_error("interrupted")
        sys.exit(130)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print_error(f"{exc.strerror or exc}{where}")
        sys.exit(1)
    except Exception as exc:
        if os.environ.get("VMKEEP_DEBUG"):
            raise
        print_error(
            f"internal error: {exc.__class__.__name__}: {exc} "
            "(set VMKEEP_DEBUG=1 for a traceback, and please report it)"
        )
        sys.exit(70)


if __name__ == "__main__":
    main()
