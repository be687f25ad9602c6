"""`vmkeep-immutable`: the privileged helper of immutable local repositories.

Run as root (or with CAP_LINUX_IMMUTABLE) from a systemd timer or cron; vmkeep itself stays
unprivileged. It only reads retention records and sets or clears one attribute, so it needs
no passphrase and never reads backup data (docs/IMMUTABILITY.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from vmkeep.errors import VmkeepError
from vmkeep.remotes.immutable_apply import apply_records

app = typer.Typer(
    name="vmkeep-immutable",
    help="Apply the retention records of local vmkeep repositories as `chattr +i`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main_options() -> None:
    """Privileged helper of immutable local vmkeep repositories (run as root)."""


@app.command("apply")
def apply(
    repositories: list[Path] = typer.Argument(..., help="Local repository directories."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Report; change nothing."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Make objects under retention immutable; lift the attribute where every retention ended."""
    results = {}
    for repo in repositories:
        report = apply_records(repo.absolute(), dry_run=dry_run)
        results[str(repo)] = report.to_json()
        if not json_out:
            when = (
                f"; next unlock {report.next_unlock:%Y-%m-%d %H:%M:%S} UTC"
                if report.next_unlock
                else ""
            )
            print(
                f"{repo}: {report.records} records, {report.locked} objects immutable "
                f"({report.newly_locked} new), {report.unlocked} lifted{when}"
            )
            for name in report.bad_records:
                print(f"{repo}: malformed retention record {name} ignored", file=sys.stderr)
            if report.skipped:
                print(
                    f"{repo}: {len(report.skipped)} entries skipped (not regular files of the "
                    f"repository owner), e.g. {report.skipped[0]}",
                    file=sys.stderr,
                )
    if json_out:
        print(json.dumps(results, indent=1))


def main() -> None:
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except VmkeepError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as exc:
        format_message = getattr(exc, "format_message", None)
        message = format_message() if format_message else str(exc)
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        sys.exit(1)
