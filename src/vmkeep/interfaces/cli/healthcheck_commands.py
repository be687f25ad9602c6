"""`vmkeep healthcheck POINT`: prove a restore point restores (docs/HEALTHCHECK.md)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from .context import state
from .output import RichProgress, console, human_bytes, print_error, print_json, shown
from .repo_commands import JsonOpt, RemoteOpt

if TYPE_CHECKING:
    from vmkeep.operations.healthcheck_model import HealthResult

# operations.healthcheck_model.DEFAULT_TIMEOUT, repeated so that start-up does not import the
# operation and the repository; a test keeps them equal.
DEFAULT_TIMEOUT = 300.0


def healthcheck(
    point: str = typer.Argument(..., help="Restore point id (or a unique prefix)."),
    remote: str | None = RemoteOpt,
    kind: str = typer.Option(
        "auto",
        "--connector",
        help="files: restore to a scratch directory and read the disks back against the "
        "stored chunk hashes; libvirt: boot it as a throw-away domain without network and "
        "wait for its guest agent; auto: libvirt for a point taken from libvirt, else files.",
    ),
    scratch: Path | None = typer.Option(
        None, "--scratch", help="files: where the scratch copy goes (default: the temp dir)."
    ),
    uri: str = typer.Option("qemu:///system", "--uri", help="libvirt: the hypervisor's URI."),
    pool: str = typer.Option(
        "", "--pool", help="libvirt: storage pool of the throw-away volumes (default 'default')."
    ),
    timeout: float = typer.Option(
        DEFAULT_TIMEOUT,
        "--timeout",
        help="libvirt: seconds the domain gets to start and its guest agent to answer.",
    ),
    json_out: bool = JsonOpt,
) -> None:
    """Restore a point somewhere disposable and check it works; the copy is deleted after.
    Exit 0 healthy, 1 failed, 3 its data is corrupt."""
    from vmkeep.operations.healthcheck import health_check  # see DEFAULT_TIMEOUT
    from vmkeep.operations.healthcheck_model import HealthOptions

    repo = state.open_repository(remote)
    options = HealthOptions(kind=kind, scratch=scratch, uri=uri, pool=pool, timeout=timeout)
    result = health_check(repo, point, options, RichProgress(not json_out))
    if json_out:
        print_json(result.to_json())
    else:
        show(result)
    if not result.ok:
        print_error(f"health check of {result.restore_point} failed: {result.reason}")
        raise typer.Exit(result.exit_code)


def show(result: HealthResult) -> None:
    for note in result.notes:
        console.print(f"[yellow]note:[/] {shown(note)}")
    times = ", ".join(f"{k} {v:.1f} s" for k, v in result.durations.items())
    what = (
        f"read back {result.chunks_checked} chunks ({human_bytes(result.bytes_checked)})"
        if result.kind == "files"
        else f"guest agent {result.agent or '-'}"
    )
    status = "[green]ok[/]" if result.ok else f"[red]FAILED[/]: {shown(result.reason)}"
    console.print(
        f"health check ({result.kind}) of {result.restore_point} ({shown(result.vm)}): "
        f"{status}; {what}; {times}",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    app.command("healthcheck")(healthcheck)
