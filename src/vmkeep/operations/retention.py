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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from vmkeep.errors import UsageError

__all__ = ["PointRef", "PruneDecision", "RetentionPolicy", "prune_plan"]


@dataclass(frozen=True)
class PointRef:
    """What the engine needs to know about a restore point.

    `time` must be timezone-aware (normally UTC); points are compared by instant.
    """

    id: str
    vm: str  # VM uuid
    schedule: str  # schedule tag, "" when none
    time: datetime

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
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UsageError(f"{name} must be a whole number, got {value!r}")
            if value < 0:
                raise UsageError(f"{name} must be 0 or more, got {value}")
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


def _plan_group(
    points: list[PointRef], policy: RetentionPolicy, zone: tzinfo
) -> list[PruneDecision]:
    """Decisions for one (vm, schedule) group; `points` is sorted newest first."""
    reasons: list[list[str]] = [[] for _ in points]

    for index in range(min(policy.keep_last, len(points))):
        reasons[index].append(f"last {index + 1}/{policy.keep_last}")

    local_dates = [point.time.astimezone(zone).date() for point in points]
    for prefix, field_name, bucket_of in _LONG_TERM_RULES:
        count: int = getattr(policy, field_name)
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

    groups: dict[tuple[str, str], list[PointRef]] = {}
    ids: set[str] = set()
    for point in points:
        if not isinstance(point, PointRef):
            raise TypeError(f"expected PointRef, got {type(point).__name__}")
        if point.id in ids:
            raise ValueError(f"restore point id {point.id!r} appears more than once")
        ids.add(point.id)
        groups.setdefault((point.vm, point.schedule), []).append(point)

    decisions: list[PruneDecision] = []
    for key in sorted(groups):
        group = sorted(groups[key], key=_newest_first_key, reverse=True)
        decisions.extend(_plan_group(group, policy, zone))
    return decisions
