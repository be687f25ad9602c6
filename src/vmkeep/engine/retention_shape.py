"""How many restore points a backup job keeps at steady state (`vmkeep plan`, docs/PLANNING.md):
its retention simulated over a stretch of its real schedule fires, so that per-schedule
keep-last and long-term rules combine exactly as the runner will prune them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from vmkeep.engine.jobs.spec import BackupJob
from vmkeep.engine.schedules import Schedule, iter_fires, make_schedule
from vmkeep.errors import UsageError
from vmkeep.operations.retention import CombinedPolicy, PointRef, combined_plan

RATE_WINDOW_DAYS = 28  # runs per day are counted over four weeks: every weekday alike
MAX_SIMULATED_RUNS = 150_000  # a per-minute schedule over a year: window cut, with a note


@dataclass(frozen=True)
class RetentionShape:
    """What the job's retention keeps of one VM at steady state. `gaps[i]` is the number of
    runs from kept point i-1 to kept point i (oldest first; the oldest has none, it is the
    "full" every later kept point builds on)."""

    runs_per_day: float
    kept: int
    gaps: tuple[int, ...]
    window_days: float
    policy: str
    notes: tuple[str, ...] = ()


def job_schedules(job: BackupJob) -> list[Schedule]:
    """The job's enabled schedules in the schedules module's form (cron checked there)."""
    out = []
    for s in job.schedules:
        if not s.enabled:
            continue
        data = {"name": s.name, "cron": s.cron, "timezone": s.timezone, "keep": s.keep}
        out.append(make_schedule(data, f"backup {job.name!r}: schedule {s.name!r}"))
    if not out:
        raise UsageError(
            f"backup {job.name!r} has no enabled schedule: a plan needs to know how often it "
            "runs (add one under schedules:)"
        )
    return out


def combined_policy(job: BackupJob, schedules: Sequence[Schedule]) -> CombinedPolicy:
    """The policy the runner prunes with: each schedule's keep, the job's long-term counts in
    the retention's time zone (else the first schedule's: one history has one zone)."""
    r = job.retention
    return CombinedPolicy(
        keep_last={s.name: s.keep or 0 for s in schedules},
        keep_daily=r.daily,
        keep_weekly=r.weekly,
        keep_monthly=r.monthly,
        keep_yearly=r.yearly,
        timezone=r.timezone or schedules[0].timezone,
    )


def _window_days(policy: CombinedPolicy) -> int:
    """Long enough for every long-term rule to fill its buckets, at least a year."""
    need = max(
        policy.keep_daily + 2,
        7 * policy.keep_weekly + 14,
        31 * policy.keep_monthly + 62,
        366 * policy.keep_yearly + 366,
    )
    return max(366, need)


def runs_per_day(schedules: Sequence[Schedule], now: datetime) -> float:
    """Fires per day over four weeks from `now` (DST days and weekdays averaged in)."""
    end = now + timedelta(days=RATE_WINDOW_DAYS)
    count = 0
    for schedule in schedules:
        for fire in iter_fires(schedule, now):
            if fire.at > end:
                break
            count += 1
    return count / RATE_WINDOW_DAYS


def _simulated_fires(
    schedules: Sequence[Schedule], now: datetime, days: int, per_day: float
) -> tuple[list[PointRef], int, list[str]]:
    notes = []
    if per_day * days > MAX_SIMULATED_RUNS:
        days = max(1, int(MAX_SIMULATED_RUNS / per_day))
        notes.append(
            f"retention simulated over {days} days only ({per_day:.0f} runs a day): long-term "
            "points older than that are not counted"
        )
    end = now + timedelta(days=days)
    points: list[PointRef] = []
    for schedule in schedules:
        for fire in iter_fires(schedule, now):
            if fire.at > end:
                break
            points.append(PointRef(f"{len(points):08d}", "vm", schedule.name, fire.at, "job"))
    return points, days, notes


def retention_shape(job: BackupJob, now: datetime) -> RetentionShape:
    """Simulate the job's schedule fires from `now` over a window long enough for its
    long-term rules (a year or more), prune the result with its combined policy, and count
    what one VM keeps. `prune: false` keeps every point of the window (and says so)."""
    schedules = job_schedules(job)
    per_day = runs_per_day(schedules, now)
    policy = combined_policy(job, schedules)
    points, days, notes = _simulated_fires(schedules, now, _window_days(policy), per_day)
    if not points:
        raise UsageError(f"backup {job.name!r}: its schedules do not fire within {days} days")
    points.sort(key=lambda p: (p.time, p.id))
    if job.prune and not policy.is_empty():
        kept_ids = {d.point.id for d in combined_plan(points, policy) if d.keep}
        text = describe_policy(policy)
    else:
        kept_ids = {p.id for p in points}
        why = "prune: false" if not job.prune else "no schedule has a keep count"
        text = f"none ({why})"
        notes.append(f"{why}: nothing is ever pruned; storage grows with every run")
    gaps: list[int] = []
    since = 0
    for point in points:
        since += 1
        if point.id in kept_ids:
            gaps.append(since)
            since = 0
    return RetentionShape(per_day, len(gaps), tuple(gaps[1:]), days, text, tuple(notes))


def describe_policy(policy: CombinedPolicy) -> str:
    """One line: `last 7 of daily, last 24 of hourly; daily 7, weekly 4 (Europe/Paris)`."""
    own = ", ".join(f"last {n} of {s}" for s, n in policy.keep_last.items() if n)
    long_term = ", ".join(
        f"{word} {n}"
        for word, n in (
            ("daily", policy.keep_daily),
            ("weekly", policy.keep_weekly),
            ("monthly", policy.keep_monthly),
            ("yearly", policy.keep_yearly),
        )
        if n
    )
    parts = [p for p in (own, long_term and f"{long_term} ({policy.timezone})") if p]
    return "; ".join(parts)


# --- change rate and compression, measured from earlier runs ---------------------------------
