"""`vmkeep run`: the runs ledger: list, show (the task tree), cancel (docs/RUNS.md)."""

from __future__ import annotations

import typer

from .engine_context import engine
from .output import console, human_bytes, print_json, stdout, table
from .repo_commands import JsonOpt
from .run_view import print_run

run_app = typer.Typer(help="Runs of jobs: list, show, cancel.", no_args_is_help=True)


@run_app.command("list")
def list_cmd(
    job: str | None = typer.Option(None, "--job", help="Only this job's runs."),
    limit: int = typer.Option(50, "--limit", min=1, max=10_000, help="Newest N runs."),
    json_out: bool = JsonOpt,
) -> None:
    """Runs, newest first."""
    with engine() as ctx:
        runs = ctx.ledger.list_runs(job=job, limit=limit)
    if json_out:
        print_json([r.to_json() for r in runs])
        return
    listing = table("run", "job", "state", "trigger", "started", "VMs", "written")
    for r in runs:
        vms = ", ".join(f"{n} {s}" for s, n in (r.summary.get("vms") or {}).items()) or "-"
        started = f"{r.started:%Y-%m-%d %H:%M:%S}Z" if r.started else "-"
        written = human_bytes(r.summary.get("bytes_written"))
        listing.add_row(str(r.id), r.job, r.state, r.trigger, started, vms, written)
    stdout.print(listing)


@run_app.command("show")
def show_cmd(run_id: int, json_out: bool = JsonOpt) -> None:
    """One run: its task tree (run, VM, target, step) with stats, warnings and errors."""
    with engine() as ctx:
        run = ctx.ledger.get_run(run_id)
    if json_out:
        print_json(run.to_json())
        return
    print_run(run)


@run_app.command("cancel")
def cancel_cmd(run_id: int) -> None:
    """Ask a running run to stop; its runner aborts its operations cleanly."""
    with engine() as ctx:
        if not ctx.ledger.request_cancel(run_id):
            state = ctx.ledger.get_run(run_id).state
            console.print(f"run {run_id} already ended ({state})", highlight=False)
            return
    console.print(f"cancel requested for run {run_id}", highlight=False)
