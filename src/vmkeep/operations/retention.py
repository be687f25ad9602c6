"""Retention policy for `vmkeep prune`: decides which restore points to keep.

Pure: no I/O, no clock. The caller lists the restore points, calls `prune_plan`, shows or
applies the decisions (and skips immutable points). The exact semantics, with worked examples,
are in docs/RETENTION.md; in short, like restic's `forget`:

* points are grouped by (vm, schedule) and each group is pruned on its own;
* within a group, points are ordered newest first (equal times: the greater id counts as newer);
* keep-last N keeps the N newest points;
* each long-term rule (daily, weekly, monthly, yearly) independently walks the points newest
  first, computes each point's bucket in the policy's timezone (local date, ISO year-week,
  year-month, year) and keeps the first point it meets in a bucket it has not seen yet, until it
  has used N distinct buckets;
* a point is kept if any rule keeps it, and its reasons name every rule that keeps it.

`combined_plan` is the job form (SPEC §3): each schedule keeps its own last N points, and the
job's long-term rules walk ALL of a VM's points of the job together, whatever schedule made them,
so several schedules never duplicate the long-term history. Points are anything with an id, a
VM, a job, a schedule and a time (backups today; replicas and snapshots later).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, tzinfo
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from vmkeep.errors import UsageError

__all__ = [
    "CombinedPolicy",
    "PointRef",
    "PruneDecision",
    "RetentionPolicy",
    "combined_plan",
    "prune_plan",
]


@dataclass(frozen=True)
class PointRef:
    """What the engine needs to know about a restore point.

    `time` must be timezone-aware (normally UTC); points are compared by instant. `job` only
    matters to `combined_plan`, which never mixes the points of two jobs.
    """

    id: str
    vm: str  # VM uuid
    schedule: str  # schedule tag, "" when none
    time: datetime
    job: str = ""  # job name, "" when none (a one-shot `vmkeep backup`)

    def __post_init__(self) -> None:
        if self.time.tzinfo is None or self.time.utcoffset() is None:
            raise ValueError(f"restore point {self.id}: time {self.time} is not timezone-aware")


_COUNT_FIELDS = ("keep_last", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")


@dataclass(frozen=True)
class RetentionPolicy:
    """How many restore points to keep per (vm, schedule) group; 0 disables a rule.

    `timezone` is an IANA name ("Europe/Paris"); the long-term buckets (days, weeks, months,
    years) are computed in it. Invalid values raise UsageError.
    """

    keep_last: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        for name in _COUNT_FIELDS:
            _check_count(name, getattr(self, name))
        _load_zone(self.timezone)  # validate now, not in the middle of a prune

    def is_empty(self) -> bool:
        """True when every count is 0: such a policy keeps nothing and must not be applied."""
        return all(getattr(self, name) == 0 for name in _COUNT_FIELDS)

    @property
    def zone(self) -> tzinfo:
        """The policy's timezone as a tzinfo."""
        return _load_zone(self.timezone)


@dataclass
class PruneDecision:
    """The verdict on one restore point. `reasons` is empty exactly when `keep` is False."""

    point: PointRef
    keep: bool
    reasons: list[str]


def _load_zone(name: object) -> tzinfo:
    if not isinstance(name, str):
        raise UsageError(f"timezone must be an IANA name such as 'Europe/Paris', got {name!r}")
    if name == "UTC":
        return UTC  # works even where no tz database is installed
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise UsageError(
            f"unknown timezone {name!r}: expected an IANA name such as 'Europe/Paris' or 'UTC'"
        ) from exc


class _LongTermCounts(Protocol):
    """The four long-term counts, as both policy kinds carry them."""

    @property
    def keep_daily(self) -> int: ...
    @property
    def keep_weekly(self) -> int: ...
    @property
    def keep_monthly(self) -> int: ...
    @property
    def keep_yearly(self) -> int: ...


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{name} must be a whole number, got {value!r}")
    if value < 0:
        raise UsageError(f"{name} must be 0 or more, got {value}")


def _daily(d: date) -> str:
    return d.isoformat()


def _weekly(d: date) -> str:
    iso = d.isocalendar()
    return f"{iso.year:04d}-W{iso.week:02d}"


def _monthly(d: date) -> str:
    return f"{d.year:04d}-{d.month:02d}"


def _yearly(d: date) -> str:
    return f"{d.year:04d}"


# (reason prefix, policy field, bucket of a local date), in the order reasons are listed.
_LONG_TERM_RULES: tuple[tuple[str, str, Callable[[date], str]], ...] = (
    ("daily", "keep_daily", _daily),
    ("weekly", "keep_weekly", _weekly),
    ("monthly", "keep_monthly", _monthly),
    ("yearly", "keep_yearly", _yearly),
)


def _newest_first_key(point: PointRef) -> tuple[datetime, str]:
    return (point.time, point.id)


def _long_term_reasons(
    points: list[PointRef], counts: _LongTermCounts, zone: tzinfo
) -> list[list[str]]:
    """The long-term reasons of each point of `points` (sorted newest first); both policy kinds
    share this one walk, so they bucket exactly alike."""
    reasons: list[list[str]] = [[] for _ in points]
    local_dates = [point.time.astimezone(zone).date() for point in points]
    for prefix, field_name, bucket_of in _LONG_TERM_RULES:
        count: int = getattr(counts, field_name)
        if count == 0:
            continue
        seen: set[str] = set()
        for index, local_date in enumerate(local_dates):
            if len(seen) >= count:
                break
            bucket = bucket_of(local_date)
            if bucket not in seen:
                seen.add(bucket)
                reasons[index].append(f"{prefix} {bucket}")
    return reasons


def _plan_group(
    points: list[PointRef], policy: RetentionPolicy, zone: tzinfo
) -> list[PruneDecision]:
    """Decisions for one (vm, schedule) group; `points` is sorted newest first."""
    reasons: list[list[str]] = [[] for _ in points]

    for index in range(min(policy.keep_last, len(points))):
        reasons[index].append(f"last {index + 1}/{policy.keep_last}")

    for index, why in enumerate(_long_term_reasons(points, policy, zone)):
        reasons[index].extend(why)

    return [
        PruneDecision(point=point, keep=bool(why), reasons=why)
        for point, why in zip(points, reasons, strict=True)
    ]


def prune_plan(points: Iterable[PointRef], policy: RetentionPolicy) -> list[PruneDecision]:
    """Decide, for every point, whether `policy` keeps it.

    Points are grouped by (vm, schedule); each group is pruned independently. The result holds
    one decision per point, sorted by (vm, schedule), then newest first. The result does not
    depend on the order of `points`.

    Raises UsageError for an empty policy (it would delete everything) and ValueError when two
    points share an id (deleting by id could then remove a point that is meant to be kept).
    """
    if policy.is_empty():
        raise UsageError("refusing to prune with an empty policy: it would delete everything")
    zone = policy.zone

    decisions: list[PruneDecision] = []
    for group in _groups(points, lambda p: (p.vm, p.schedule)):
        decisions.extend(_plan_group(group, policy, zone))
    return decisions


# --------------------------------------------------------------------------------------------
# combined retention: one job, several schedules, one long-term history


def _schedule_label(schedule: str) -> str:
    return schedule if schedule else "(no schedule)"


@dataclass(frozen=True)
class CombinedPolicy:
    """A job's retention: each schedule's own keep-last, plus the job's long-term rules.

    `keep_last` maps a schedule name ("" for points made without one) to how many of that
    schedule's newest points to keep; 0 leaves the schedule's points to the long-term rules. Only
    the points of schedules named here are considered at all: any other point is left untouched.
    The long-term buckets are computed in `timezone` (an IANA name). Invalid values raise
    UsageError.
    """

    keep_last: Mapping[str, int] = field(default_factory=dict, hash=False)
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        if not isinstance(self.keep_last, Mapping):
            raise UsageError(f"keep_last must map schedule names to counts, got {self.keep_last!r}")
        for schedule, count in self.keep_last.items():
            if not isinstance(schedule, str):
                raise UsageError(f"schedule name must be text, got {schedule!r}")
            _check_count(f"keep_last[{schedule!r}]", count)
        for name in _COUNT_FIELDS[1:]:
            _check_count(name, getattr(self, name))
        # A private plain copy: a caller mutating its dict cannot change a policy in use, and
        # the policy stays picklable (task payloads may carry it to another process).
        object.__setattr__(self, "keep_last", dict(self.keep_last))
        _load_zone(self.timezone)

    def is_empty(self) -> bool:
        """True when every count is 0: the named schedules would lose every point."""
        long_term = any(getattr(self, name) for name in _COUNT_FIELDS[1:])
        return not long_term and not any(self.keep_last.values())

    @property
    def zone(self) -> tzinfo:
        """The policy's timezone as a tzinfo."""
        return _load_zone(self.timezone)


def _plan_job_group(
    points: list[PointRef], policy: CombinedPolicy, zone: tzinfo
) -> list[PruneDecision]:
    """Decisions for one (vm, job) group; `points` is sorted newest first."""
    managed = [p for p in points if p.schedule in policy.keep_last]
    reasons: dict[str, list[str]] = {p.id: [] for p in managed}

    per_schedule: dict[str, list[PointRef]] = {}
    for point in managed:
        per_schedule.setdefault(point.schedule, []).append(point)
    for schedule, own in per_schedule.items():
        count = policy.keep_last[schedule]
        for index, point in enumerate(own[:count]):
            reasons[point.id].append(f"last {index + 1}/{count} of {_schedule_label(schedule)}")

    for point, why in zip(managed, _long_term_reasons(managed, policy, zone), strict=True):
        reasons[point.id].extend(why)

    decisions = []
    for point in points:
        if point.id in reasons:
            why = reasons[point.id]
        else:
            why = [f"untouched: no rule for schedule {_schedule_label(point.schedule)}"]
        decisions.append(PruneDecision(point=point, keep=bool(why), reasons=why))
    return decisions


def combined_plan(points: Iterable[PointRef], policy: CombinedPolicy) -> list[PruneDecision]:
    """Decide, for every point, whether a job's combined retention keeps it.

    Points are grouped by (vm, job): two jobs never share a history (the job runner passes its
    own job's points; `vmkeep prune` applies one policy to each job's points separately). In a
    group, each schedule named by the policy keeps its own last N points, the long-term rules
    walk all the group's points of those schedules together (newest point of each of the N
    newest buckets), and a point stays if any rule keeps it. Points of schedules the policy does
    not name are kept, with an "untouched" reason, and play no part in any rule.

    The result holds one decision per point, sorted by (vm, job), then newest first, whatever
    the order of `points`. Raises UsageError for an empty policy and ValueError for duplicate
    ids, like `prune_plan`.
    """
    if policy.is_empty():
        raise UsageError("refusing to prune with an empty policy: it would delete everything")
    zone = policy.zone

    decisions: list[PruneDecision] = []
    for group in _groups(points, lambda p: (p.vm, p.job)):
        decisions.extend(_plan_job_group(group, policy, zone))
    return decisions


def _groups(
    points: Iterable[PointRef], key: Callable[[PointRef], tuple[str, str]]
) -> list[list[PointRef]]:
    """The points grouped by `key`, groups in key order, each newest first. An id given twice
    is refused: deleting by id could then remove a point that is meant to be kept."""
    groups: dict[tuple[str, str], list[PointRef]] = {}
    ids: set[str] = set()
    for point in points:
        if not isinstance(point, PointRef):
            raise TypeError(f"expected PointRef, got {type(point).__name__}")
        if point.id in ids:
            raise ValueError(f"restore point id {point.id!r} appears more than once")
        ids.add(point.id)
        groups.setdefault(key(point), []).append(point)
    return [sorted(groups[k], key=_newest_first_key, reverse=True) for k in sorted(groups)]
