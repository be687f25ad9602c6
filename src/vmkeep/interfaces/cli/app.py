"""Entry point: builds the typer app and turns every VmkeepError into one line and an exit code."""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from .early_open import start

# First, before typer and rich are imported: a backup's or restore's key derivation runs
# during the rest of the start-up (early_open.py; hence E402 for the imports below).
start(sys.argv)

import typer
from typer.core import TyperOption

from vmkeep.errors import VmkeepError
from vmkeep.malloc_tuning import reuse_chunk_buffers

from . import (
    config_commands,
    data_commands,
    disk_access_commands,
    files_commands,
    healthcheck_commands,
    job_commands,
    key_commands,
    mirror_commands,
    plain_params,
    plan_commands,
    remote_commands,
    repair_commands,
    replicate_commands,
    repo_commands,
    report_target_commands,
    run_commands,
    schedule_commands,
    server_commands,
    vm_commands,
)
from .context import set_passphrase_file
from .output import plain, print_error, print_json_error


def _flags_take_no_value() -> None:
    """typer (0.29) shows a type for every option, so `--json <bool>` reads as if it took a
    value. A flag takes none: show no type for it (the help of every command, `--help` too)."""
    if getattr(TyperOption, "_vmkeep_flags", False):
        return
    shown = TyperOption.display_type_rich

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]
    TyperOption._vmkeep_flags = True  # type: ignore[attr-defined]


_flags_take_no_value()
plain_params.install()  # values needing no conversion skip typer's pydantic adapters

app = typer.Typer(
    name="vmkeep",
    help="Backup, replication and restore for virtual machines.",
    epilog=(
        "Exit codes: 0 success, 1 failure, 2 bad usage, 3 corruption found, 70 internal "
        "error (a bug: please report it), 130 interrupted. Errors are one line on stderr; "
        'with --json also {"error": ..., "exit_code": N} on stdout.'
    ),
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
    VMKEEP_PASSPHRASE environment variable, or a prompt.

    Exit codes: 0 success, 1 failure, 2 bad usage, 3 corruption found, 70 internal error
    (a bug: please report it), 130 interrupted. Errors are one line on stderr; with --json
    also {"error", "exit_code"} on stdout."""
    set_passphrase_file(passphrase_file)


repo_commands.register(app)
data_commands.register(app)
disk_access_commands.register(app)
replicate_commands.register(app)
mirror_commands.register(app)
healthcheck_commands.register(app)
plan_commands.register(app)
server_commands.register(app)
files_commands.register(app)
app.add_typer(remote_commands.remote_app, name="remote")
app.add_typer(key_commands.key_app, name="key")
app.add_typer(vm_commands.vm_app, name="vm")
app.add_typer(schedule_commands.schedule_app, name="schedule")
app.add_typer(config_commands.config_app, name="config")
app.add_typer(job_commands.job_app, name="job")
app.add_typer(run_commands.run_app, name="run")
app.add_typer(report_target_commands.report_target_app, name="report-target")
app.add_typer(repair_commands.repair_app, name="repair")


def _one_line_summaries(group: typer.Typer) -> None:
    """A command list shows each command's first docstring paragraph; typer (0.29) keeps its
    source line breaks there in rich mode, so summaries wrapped mid-sentence: join them."""
    for info in group.registered_commands:
        doc = info.help or (info.callback.__doc__ if info.callback else None)
        if info.short_help is None and doc:
            info.short_help = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _one_line_summaries(sub.typer_instance)


_one_line_summaries(app)


def _json_requested(argv: list[str]) -> bool:
    args = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in args


def fail(message: str, code: int) -> NoReturn:
    """One `error:` line on stderr; with --json also {"error", "exit_code"} on stdout."""
    print_error(message)
    if _json_requested(sys.argv[1:]):
        print_json_error(plain(message), code)
    sys.exit(code)


def main() -> None:
    reuse_chunk_buffers()
    try:
        code = app(standalone_mode=False)  # returns typer.Exit's code instead of raising
        if isinstance(code, int) and code:
            sys.exit(code)
    except VmkeepError as exc:
        fail(exc.message, exc.exit_code)
    except typer.Abort:
        fail("aborted", 130)
    except typer.TyperException as exc:  # bad usage, parsed by typer
        format_message = getattr(exc, "format_message", None)
        fail(f"{format_message() if format_message else exc.message} (see --help)", exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        fail(f"{exc.strerror or exc}{where}", 1)
    except Exception as exc:
        if os.environ.get("VMKEEP_DEBUG"):
            raise
        fail(
            f"internal error: {exc.__class__.__name__}: {exc} "
            "(set VMKEEP_DEBUG=1 for a traceback, and please report it)",
            70,
        )


if __name__ == "__main__":
    main()
