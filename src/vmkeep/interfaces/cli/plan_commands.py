"""`vmkeep plan JOB`: storage and transfer a backup job will need (docs/PLANNING.md)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from vmkeep.errors import UsageError, VmkeepError

from .context import state
from .output import console, human_bytes, print_json, shown, stdout, table
from .repo_commands import JsonOpt

if TYPE_CHECKING:
    from vmkeep.engine.jobs.spec import BackupJob
    from vmkeep.engine.planning import JobPlan, Measurement


def _job(ref: str, name: str | None) -> BackupJob:
    """A job file when `ref` is a file, else a job stored with `vmkeep job apply`."""
    # Imported here, not at the top: pydantic and the files connector cost start-up.
    from vmkeep.engine.planning import backup_job_from_file, backup_job_from_store

    path = Path(ref)
    if path.is_file() or ref.endswith((".yaml", ".yml")):
        if not path.is_file():
            raise UsageError(f"{ref}: no such job file")
        return backup_job_from_file(path, name)
    if name is not None:
        raise UsageError("--name picks a job in a job file; a stored job is named by JOB itself")
    from vmkeep.engine.state import JobStore, StateDB

    db = StateDB.open()
    try:
        return backup_job_from_store(JobStore(db), ref)
    finally:
        db.close()


def _measure(job: BackupJob, uuids: list[str]) -> dict[str, Measurement | str]:
    """What each remote's earlier runs show; a remote that cannot be opened is a note."""
    from vmkeep.engine.planning import measure_repository

    found: dict[str, Measurement | str] = {}
    for remote in job.remotes:
        try:
            repo = state.open_repository(remote)
            found[remote] = measure_repository(repo, job.name, uuids)
        except VmkeepError as exc:
            found[remote] = exc.message
    return found


def plan_command(
    job_ref: str = typer.Argument(..., metavar="JOB", help="A job file, or a stored job's name."),
    name: str | None = typer.Option(None, "--name", help="The job to plan in a file of several."),
    change_rate: float | None = typer.Option(
        None,
        "--change-rate",
        metavar="PCT",
        help="Percent of each VM's data that is new at each run (else measured, else 2).",
    ),
    compression: float | None = typer.Option(
        None,
        "--compression",
        metavar="R",
        help="Stored bytes per plain byte, e.g. 0.6 (else measured, else 1: none).",
    ),
    measure: bool = typer.Option(
        True, "--measure/--no-measure", help="Read earlier runs' rates from the job's remotes."
    ),
    json_out: bool = JsonOpt,
) -> None:
    """Estimate, per remote, the storage a backup job needs once its retention is steady, and
    what each run reads and transfers."""
    if change_rate is not None and not 0 <= change_rate <= 100:
        raise UsageError("--change-rate: a percentage between 0 and 100")
    if compression is not None and not 0 < compression <= 2:
        raise UsageError("--compression: stored bytes per plain byte, more than 0 and at most 2")
    from vmkeep.engine.planning import job_vms, measure_vms, plan_job  # heavy: see _job

    job = _job(job_ref, name)
    connector, vms = job_vms(job)
    sizes = measure_vms(connector, vms)
    given_rate = None if change_rate is None else change_rate / 100
    wanted = measure and (given_rate is None or compression is None)
    found = _measure(job, [vm.uuid for vm in vms]) if wanted else {}
    plan = plan_job(job, sizes, datetime.now(UTC), found, given_rate, compression)
    if json_out:
        print_json(plan.to_json())
    else:
        show_plan(plan)


def show_plan(plan: JobPlan) -> None:
    shape = plan.retention
    vms = len(plan.remotes[0].vms) if plan.remotes else 0
    console.print(
        f"backup {shown(plan.job)!r}: {plan.mode} mode, {plan.connector} connector, {vms} VM(s) "
        f"selected now, {shape.runs_per_day:.2f} run(s) a day\nretention: {shown(shape.policy)}"
        f" -> {shape.kept} point(s) kept per VM (simulated over {shape.window_days:.0f} days)",
        highlight=False,
    )
    listing = table(
        "remote", "stored", "at least", "peak", "read/run", "sent/run", "sent/day", "first run",
        "change/run", "compression",
    )  # fmt: skip
    for r in plan.remotes:
        per_run = r.total("transfer_per_run")
        listing.add_row(
            shown(r.remote),
            human_bytes(r.total("stored_bytes")),
            human_bytes(r.total("stored_bytes_low")),
            human_bytes(r.total("stored_bytes") + per_run),
            human_bytes(r.total("read_per_run")),
            human_bytes(per_run),
            human_bytes(per_run * shape.runs_per_day),
            human_bytes(r.total("first_transfer")),
            f"{r.change_rate * 100:.2f}% ({r.change_source})",
            f"{r.compression:.2f} ({r.compression_source})",
        )
    stdout.print(listing)
    if plan.remotes:
        first = plan.remotes[0]
        per_vm = table("vm", "disk", "allocated", "data read (full)", f"stored on {first.remote}")
        for vm in first.vms:
            per_vm.add_row(
                shown(vm.name),
                human_bytes(vm.disk_bytes),
                human_bytes(vm.allocated_bytes),
                human_bytes(vm.data_bytes),
                human_bytes(vm.stored_bytes),
            )
        stdout.print(per_vm)
    total = sum(r.total("stored_bytes") for r in plan.remotes)
    console.print(f"total stored on all remotes: {human_bytes(total)}", highlight=False)
    remote_notes = [f"{r.remote}: {n}" for r in plan.remotes for n in r.notes]
    notes = [*shape.notes, *plan.notes, *remote_notes]
    for note in notes:
        console.print(f"note: {shown(note)}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_command)
