"""`vmkeep job`: apply, export, list, show, delete and run jobs (docs/JOBS.md, docs/RUNS.md).
The state (SQLAlchemy) is imported only by these commands, never at start-up."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from vmkeep.errors import ServerError, UsageError

from .engine_context import engine
from .output import console, print_error, print_json, stdout, table
from .repo_commands import JsonOpt
from .run_view import print_run

if TYPE_CHECKING:
    from vmkeep.engine.runs.context import EngineContext
    from vmkeep.engine.state import RunView

job_app = typer.Typer(help="Jobs: what to back up, where, and when.", no_args_is_help=True)


def read_job_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read job file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"job file {path} is not UTF-8 text") from None


@job_app.command("apply")
def apply_cmd(
    file: Path = typer.Option(..., "-f", "--file", help="YAML job file (several jobs: ---)."),
) -> None:
    """Store the jobs of a file (whole or not at all); a job replaces the one of its name."""
    from vmkeep.engine.runs.apply import apply_job_file

    text = read_job_file(file)
    with engine() as ctx:
        specs = apply_job_file(ctx, text, str(file))
    for spec in specs:
        console.print(f"job {spec.name} ({spec.kind}) applied", highlight=False)


@job_app.command("export")
def export_cmd(name: str | None = typer.Argument(None, help="One job (default: all).")) -> None:
    """Print jobs as YAML, in the format `job apply` reads."""
    from vmkeep.engine.jobs.load import dump_jobs
    from vmkeep.engine.runs.apply import stored_specs

    with engine() as ctx:
        specs = stored_specs(ctx)
        if name is not None:
            ctx.jobs.get_job(name)  # NotFoundError naming it
            specs = {name: specs[name]}
    typer.echo(dump_jobs(list(specs.values())), nl=False)


def job_row(record: Any) -> dict[str, Any]:
    return {
        "name": record.name,
        "kind": record.kind,
        "schedules": [
            {
                "name": s.name,
                "cron": s.cron,
                "timezone": s.timezone,
                "enabled": s.enabled,
                "keep": s.keep,
            }
            for s in record.schedules
        ],
        "spec": record.spec,
        "updated": record.updated.isoformat(),
    }


@job_app.command("list")
def list_cmd(json_out: bool = JsonOpt) -> None:
    """The stored jobs."""
    with engine() as ctx:
        rows = [job_row(r) for r in ctx.jobs.list_jobs()]
    if json_out:
        print_json(rows)
        return
    listing = table("job", "kind", "schedules")
    for row in rows:
        scheds = ", ".join(f"{s['name']} ({s['cron']})" for s in row["schedules"]) or "-"
        listing.add_row(row["name"], row["kind"], scheds)
    stdout.print(listing)


@job_app.command("show")
def show_cmd(name: str, json_out: bool = JsonOpt) -> None:
    """One job: its settings and schedules (as YAML), and its last runs."""
    from vmkeep.engine.jobs.load import dump_jobs
    from vmkeep.engine.jobs.spec import job_from_dict

    with engine() as ctx:
        record = ctx.jobs.get_job(name)
        runs = ctx.ledger.list_runs(job=name, limit=5)
    if json_out:
        print_json({**job_row(record), "runs": [r.to_json() for r in runs]})
        return
    typer.echo(dump_jobs([job_from_dict(record.spec)]), nl=False)
    for run in runs:
        typer.echo(f"# run {run.id}: {run.state} ({run.trigger}, {run.created:%Y-%m-%d %H:%M}Z)")


@job_app.command("delete")
def delete_cmd(name: str) -> None:
    """Delete a job and its schedules (its runs stay in the ledger)."""
    with engine() as ctx:
        ctx.jobs.delete_job(name)
    console.print(f"job {name} deleted", highlight=False)


@job_app.command("run")
def run_cmd(
    name: str,
    wait: bool | None = typer.Option(
        None,
        "--wait/--no-wait",
        help="Wait for the end. Without a server the run happens in this process, so the "
        "command always waits; with a server on this data directory the run is handed to it "
        "and the command only waits when asked (docs/RUNS.md).",
    ),
    json_out: bool = JsonOpt,
) -> None:
    """Run a job now: handed to the `vmkeep server` of this data directory when one runs,
    else in this process (Ctrl-C cancels it cleanly); exit 1 unless it ends in success or
    skipped."""
    from vmkeep.engine.serverlock import server_pid

    with engine() as ctx:
        pid = server_pid(ctx.data_dir)
        if pid is not None:
            run_id = hand_over(ctx, name, pid)
            if not wait:
                print_queued(ctx, run_id, pid, json_out)
                return
            run = wait_for(ctx, run_id, pid)
        else:
            run = run_here(ctx, name)
    if json_out:
        print_json(run.to_json())
    else:
        print_run(run)
    if run.state not in ("success", "skipped"):
        print_error(f"run {run.id} of job {run.job} ended {run.state}: `vmkeep run show {run.id}`")
        raise typer.Exit(1)


def run_here(ctx: EngineContext, name: str) -> RunView:
    """The run in this process, on a worker thread so that Ctrl-C cancels it cleanly."""
    from vmkeep.engine.runs.runner import run_job

    cancel = threading.Event()
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["id"] = run_job(ctx, name, trigger="manual", cancel=cancel)
        except BaseException as exc:  # handed to the main thread, raised there
            result["error"] = exc

    worker = threading.Thread(target=work, name="vmkeep-job-run")
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:
        console.print("cancelling the run (its operations abort cleanly)...")
        cancel.set()
        worker.join()
    if "error" in result:
        raise result["error"]
    return ctx.ledger.get_run(result["id"])


def hand_over(ctx: EngineContext, name: str, pid: int) -> int:
    """A queued manual run for the server `pid`, which starts it at its next tick."""
    ctx.jobs.get_job(name)  # an unknown job: one clear line, nothing queued
    return ctx.ledger.create_run(name, None, "manual", pid=pid)


def print_queued(ctx: EngineContext, run_id: int, pid: int, json_out: bool) -> None:
    if json_out:
        print_json(dict(ctx.ledger.get_run(run_id).to_json(), server_pid=pid))
    else:
        stdout.print(str(run_id))
        console.print(
            f"run {run_id} queued for the server (pid {pid}): `vmkeep run show {run_id}`",
            highlight=False,
        )


def wait_for(ctx: EngineContext, run_id: int, pid: int, poll: float = 0.5) -> RunView:
    """Poll the ledger until the run ends. Ctrl-C asks the server to cancel it (and keeps
    waiting for the end); a server that stops first is an error naming the run."""
    from vmkeep.engine.serverlock import server_pid
    from vmkeep.engine.state import FINISHED

    while True:
        run = ctx.ledger.get_run(run_id)
        if run.state in FINISHED:
            return run
        if server_pid(ctx.data_dir) != pid:
            raise ServerError(
                f"the server (pid {pid}) stopped before run {run_id} ended "
                f"(it is {run.state}): `vmkeep run show {run_id}`"
            )
        try:
            time.sleep(poll)
        except KeyboardInterrupt:
            console.print("cancelling the run (the server aborts it cleanly)...")
            ctx.ledger.request_cancel(run_id)
