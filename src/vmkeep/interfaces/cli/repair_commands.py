"""`vmkeep repair ...`: rebuild what the repository's own data still says (docs/FORMAT.md §13.6
for the index); today the format 3 index."""

from __future__ import annotations

import typer

from .context import state
from .output import RichProgress, console, print_error, print_json, shown
from .repo_commands import JsonOpt, RemoteOpt

repair_app = typer.Typer(
    help="Rebuild repository structures from the data itself.", no_args_is_help=True
)


@repair_app.command("index")
def index_cmd(
    remote: str | None = RemoteOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Read the packs, write nothing."),
    json_out: bool = JsonOpt,
) -> None:
    """Format 3: rebuild the index from the packs' trailers, after index objects were lost
    or damaged (gc refuses to run, restores say a chunk is missing). Exit 3 when a pack is
    unreadable: its blobs stay lost, `vmkeep verify` names the restore points affected."""
    from vmkeep.repository.index_repair import repair_index

    repo = state.open_repository(remote)
    report = repair_index(repo, RichProgress(not json_out, unit_bytes=False), dry_run)
    if json_out:
        print_json(report.to_json())
    else:
        would = "would write" if dry_run else "wrote"
        console.print(
            f"read {report.packs_read} packs listing {report.blobs_indexed} blobs; {would} "
            f"{report.index_objects_written} index objects"
            + ("" if dry_run else f", removed {report.index_objects_removed} old ones")
            + (
                f" ({report.index_objects_unreadable} of them unreadable)"
                if report.index_objects_unreadable
                else ""
            ),
            highlight=False,
        )
        for name, error in report.bad_packs:
            console.print(f"[red]unreadable pack[/] {shown(name)}: {shown(error)}")
    if report.bad_packs:
        print_error(
            f"{len(report.bad_packs)} packs are unreadable and their blobs are not indexed: "
            "run `vmkeep verify` to see which restore points they affect"
        )
        raise typer.Exit(3)
