"""Applying a job file to the state: load and check it against the stored jobs, the known
remotes and report targets, check every schedule's cron, then store it whole or not at all.
Shared by `vmkeep job apply` and (later) the REST API."""

from __future__ import annotations

from pydantic import ValidationError

from vmkeep.engine.jobs.load import load_jobs
from vmkeep.engine.jobs.spec import BackupSchedule, JobSpec, Schedule, job_from_dict, job_to_dict
from vmkeep.engine.schedules import make_schedule
from vmkeep.engine.state import JobSpec as StoredJob
from vmkeep.engine.state import ScheduleSpec
from vmkeep.errors import StateError

from .context import EngineContext


def stored_specs(ctx: EngineContext) -> dict[str, JobSpec]:
    """The stored jobs as models (a stored job that no longer validates is a state error)."""
    out: dict[str, JobSpec] = {}
    for record in ctx.jobs.list_jobs():
        try:
            out[record.name] = job_from_dict(record.spec)
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"]
            raise StateError(f"stored job {record.name!r} is not a valid job: {msg}") from None
    return out


def schedule_spec(job: str, schedule: Schedule, filename: str) -> ScheduleSpec:
    """The state's record of a job schedule, its cron checked by engine/schedules."""
    keep = schedule.keep if isinstance(schedule, BackupSchedule) else None
    fields = {
        "name": schedule.name,
        "cron": schedule.cron,
        "timezone": schedule.timezone,
        "enabled": schedule.enabled,
        "missed_policy": schedule.missed.replace("-", "_"),
        "overlap_policy": schedule.overlap,
        "keep": keep,
    }
    make_schedule(fields, f"{filename}: job {job!r}: schedule {schedule.name!r}")
    return ScheduleSpec(**fields)  # type: ignore[arg-type]


def apply_job_file(ctx: EngineContext, text: str, filename: str) -> list[JobSpec]:
    """Every job of the file, applied in one transaction; the first problem raises a
    one-line error naming the file, line and field, and nothing is stored."""
    targets = [str(t.get("name")) for t in ctx.report_targets()]
    specs = load_jobs(
        text,
        filename,
        remotes=[e.name for e in ctx.registry.load()],
        known_jobs=stored_specs(ctx),
        report_targets=targets,
    )
    rows = [
        StoredJob(
            spec.name,
            spec.kind,
            job_to_dict(spec),
            [schedule_spec(spec.name, s, filename) for s in spec.schedules],
        )
        for spec in specs
    ]
    ctx.jobs.apply(rows)
    return specs
