"""Jobs and their schedules in the database. A job is applied together with its schedules in
one transaction: whole or not at all (a job file with a bad schedule changes nothing)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from vmkeep.errors import NotFoundError, UsageError

from .db import StateDB
from .models import Job, Schedule

MISSED_POLICIES = ("run_once", "skip")
OVERLAP_POLICIES = ("skip", "queue")


@dataclass
class ScheduleSpec:
    """What a schedule says; the cron semantics live in engine/schedules.py."""

    name: str
    cron: str
    timezone: str = "UTC"
    enabled: bool = True
    missed_policy: str = "run_once"
    overlap_policy: str = "skip"
    keep: int | None = None

    def check(self) -> None:
        where = f"schedule {self.name!r}"
        if not self.name or not self.name.strip():
            raise UsageError("a schedule needs a name")
        if not self.cron.strip():
            raise UsageError(f"{where}: cron: empty expression")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise UsageError(f"{where}: timezone: unknown time zone {self.timezone!r}") from None
        if self.missed_policy not in MISSED_POLICIES:
            raise UsageError(f"{where}: missed_policy: choose {' or '.join(MISSED_POLICIES)}")
        if self.overlap_policy not in OVERLAP_POLICIES:
            raise UsageError(f"{where}: overlap_policy: choose {' or '.join(OVERLAP_POLICIES)}")
        if self.keep is not None and self.keep < 0:
            raise UsageError(f"{where}: keep: must be 0 or more")


@dataclass
class ScheduleRecord(ScheduleSpec):
    job: str = ""
    created: datetime | None = None
    updated: datetime | None = None


@dataclass
class JobSpec:
    name: str
    kind: str
    spec: dict[str, Any]
    schedules: list[ScheduleSpec] = field(default_factory=list)


@dataclass
class JobRecord:
    name: str
    kind: str
    spec: dict[str, Any]
    created: datetime
    updated: datetime
    schedules: list[ScheduleRecord] = field(default_factory=list)


class JobStore:
    def __init__(self, db: StateDB) -> None:
        self.db = db

    def apply(self, jobs: list[JobSpec]) -> None:
        """Insert or replace every job with exactly the schedules given, in one transaction.
        Checked first (clear messages); the database's own constraints (a schedule name used
        by another job) roll the whole file back too."""
        names = [j.name for j in jobs]
        if len(set(names)) != len(names):
            raise UsageError("a job name appears twice")
        sched_names = [s.name for j in jobs for s in j.schedules]
        if len(set(sched_names)) != len(sched_names):
            raise UsageError("a schedule name appears twice")
        for job in jobs:
            if not job.name.strip() or not job.kind.strip():
                raise UsageError("a job needs a name and a kind")
            for sched in job.schedules:
                sched.check()
        with self.db.transaction() as session:
            for job in jobs:
                write_job(session, job)

    def put_job(
        self,
        name: str,
        kind: str,
        spec: dict[str, Any],
        schedules: list[ScheduleSpec] | None = None,
    ) -> None:
        self.apply([JobSpec(name, kind, spec, list(schedules or []))])

    def get_job(self, name: str) -> JobRecord:
        with self.db.transaction() as session:
            job = session.scalar(select(Job).where(Job.name == name))
            if job is None:
                raise NotFoundError(f"no job named {name!r}")
            return job_record(session, job)

    def list_jobs(self) -> list[JobRecord]:
        with self.db.transaction() as session:
            jobs = session.scalars(select(Job).order_by(Job.name)).all()
            return [job_record(session, job) for job in jobs]

    def delete_job(self, name: str) -> None:
        """The job and its schedules (its runs stay in the ledger)."""
        with self.db.transaction() as session:
            job = session.scalar(select(Job).where(Job.name == name))
            if job is None:
                raise NotFoundError(f"no job named {name!r}")
            session.execute(delete(Schedule).where(Schedule.job_name == name))
            session.delete(job)

    def put_schedule(self, job: str, schedule: ScheduleSpec) -> None:
        """Insert or replace one schedule of an existing job."""
        schedule.check()
        with self.db.transaction() as session:
            if session.scalar(select(Job.id).where(Job.name == job)) is None:
                raise NotFoundError(f"no job named {job!r}")
            write_schedule(session, job, schedule)

    def list_schedules(self, job: str | None = None) -> list[ScheduleRecord]:
        query = select(Schedule).order_by(Schedule.name)
        if job is not None:
            query = query.where(Schedule.job_name == job)
        with self.db.transaction() as session:
            return [schedule_record(s) for s in session.scalars(query)]

    def get_schedule(self, name: str) -> ScheduleRecord:
        with self.db.transaction() as session:
            row = session.scalar(select(Schedule).where(Schedule.name == name))
            if row is None:
                raise NotFoundError(f"no schedule named {name!r}")
            return schedule_record(row)


def write_job(session: Session, spec: JobSpec) -> None:
    job = session.scalar(select(Job).where(Job.name == spec.name))
    if job is None:
        session.add(Job(name=spec.name, kind=spec.kind, spec=spec.spec))
    else:
        job.kind, job.spec = spec.kind, spec.spec
    session.flush()
    keep = {s.name for s in spec.schedules}
    session.execute(
        delete(Schedule).where(Schedule.job_name == spec.name, Schedule.name.not_in(keep))
    )
    for sched in spec.schedules:
        write_schedule(session, spec.name, sched)
    session.flush()


def write_schedule(session: Session, job: str, spec: ScheduleSpec) -> None:
    row = session.scalar(select(Schedule).where(Schedule.name == spec.name))
    if row is None:
        row = Schedule(name=spec.name, job_name=job)
        session.add(row)
    elif row.job_name != job:
        raise UsageError(f"schedule {spec.name!r} already belongs to job {row.job_name!r}")
    row.cron, row.timezone, row.enabled = spec.cron, spec.timezone, spec.enabled
    row.missed_policy, row.overlap_policy, row.keep = (
        spec.missed_policy,
        spec.overlap_policy,
        spec.keep,
    )
    session.flush()


def schedule_record(s: Schedule) -> ScheduleRecord:
    return ScheduleRecord(
        name=s.name,
        cron=s.cron,
        timezone=s.timezone,
        enabled=s.enabled,
        missed_policy=s.missed_policy,
        overlap_policy=s.overlap_policy,
        keep=s.keep,
        job=s.job_name,
        created=s.created,
        updated=s.updated,
    )


def job_record(session: Session, job: Job) -> JobRecord:
    scheds = session.scalars(
        select(Schedule).where(Schedule.job_name == job.name).order_by(Schedule.name)
    )
    return JobRecord(
        name=job.name,
        kind=job.kind,
        spec=dict(job.spec),
        created=job.created,
        updated=job.updated,
        schedules=[schedule_record(s) for s in scheds],
    )
