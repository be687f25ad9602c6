"""Schedules: when a job runs. A cron expression read in an IANA time zone, with decided DST
semantics, missed-run and overlap policies, and the due computation of the server loop.

Pure logic: no database, no clock reads (every function takes the instant it reasons about),
no CLI code. Semantics and worked examples: docs/SCHEDULES.md.

DST rules (the cron expression names *wall-clock slots* in the schedule's zone):
- a slot that exists once fires at that instant;
- a slot in a skipped interval (spring forward) fires at the first instant after the gap
  (02:30 on a day when 02:00-03:00 does not exist fires at 03:00), as Vixie cron/cronie do;
- a slot in a repeated interval (fall back) fires once, at its first occurrence;
- slots that land on the same instant fire once (`0 * * * *` fires once at 03:00 on the
  spring-forward day, for the 02:00 slot and the 03:00 slot together).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter
from pydantic import (
    BaseModel,
    ConfigDict,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
)

from vmkeep.errors import UsageError

MissedPolicy = Literal["run_once", "skip"]
OverlapPolicy = Literal["skip", "queue"]
OverlapAction = Literal["start", "skip", "queue"]

# A cron expression with no fire within this horizon never fires (`0 0 30 2 *`). 50 years
# keeps rare but real expressions (Feb 29 on a Monday, `0 0 * 2 1#5`: every 28-40 years).
NEVER_FIRES_YEARS = 50
_ALIASES = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# No UTC offset changes by more than this at once (DST is 1 h, Lord Howe 30 min; a zone that
# changed side of the date line jumped 24 h, once): how far around a wall-clock time to look.
_MAX_JUMP = timedelta(hours=26)
# Missed-slot counting stops here: a per-minute schedule down for a year has 525,600 slots.
MISSED_COUNT_CAP = 100_000
MISSED_LISTED = 20
DEFAULT_GRACE = timedelta(minutes=1)


class Schedule(BaseModel):
    """When a job runs, and the retention that goes with it (`keep`: keep-last N of this
    schedule's points, None = no keep-last rule; retention lives in operations/retention)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    cron: str
    timezone: str = "UTC"
    enabled: StrictBool = True
    missed_policy: MissedPolicy = "run_once"
    overlap_policy: OverlapPolicy = "skip"
    keep: StrictInt | None = None  # strict: `keep: true` or `keep: "3"` is a mistake

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a schedule name (1-64 of letters, digits, '.', '_', '-', "
                "starting with a letter or digit)"
            )
        return value

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, value: str) -> str:
        return check_cron(value)

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        zone_of(value)
        return value

    @field_validator("keep")
    @classmethod
    def _check_keep(cls, value: int | None) -> int | None:
        if value is not None and value < 0:
            raise ValueError(f"must be 0 or more (absent: no keep-last rule), not {value}")
        return value

    @property
    def zone(self) -> ZoneInfo:
        return zone_of(self.timezone)


def make_schedule(data: Mapping[str, Any], where: str = "schedule") -> Schedule:
    """A Schedule from plain data (a YAML mapping, a DB row), or a one-line UsageError naming
    the first bad field: `schedule nightly: cron: '0 0 30 2 *' never fires ...`."""
    if not isinstance(data, Mapping):
        raise UsageError(f"{where}: a mapping of fields is needed, not {type(data).__name__}")
    try:
        return Schedule.model_validate(dict(data))
    except ValidationError as exc:
        raise UsageError(f"{where}: {first_error(exc)}") from None


def first_error(exc: ValidationError) -> str:
    """The first error of a Schedule validation as `field: reason`, on one line."""
    err = exc.errors()[0]
    field = ".".join(str(part) for part in err["loc"]) or "schedule"
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown field"
    elif err["type"] == "missing":
        message = "required field missing"
    return f"{field}: {message}"


def zone_of(name: str) -> ZoneInfo:
    """The IANA zone `name`, or ValueError with a one-line reason."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(
            f"unknown time zone {name!r} (an IANA name such as Europe/Paris or UTC)"
        ) from None


def check_cron(expr: str) -> str:
    """`expr` normalised (single spaces), or ValueError: not 5 fields, a bad field, or an
    expression that never fires."""
    text = " ".join(expr.split())
    fields = text.split(" ")
    if not (len(fields) == 5 or (len(fields) == 1 and text.lower() in _ALIASES)):
        raise ValueError(
            f"{expr!r} is not a 5-field cron expression "
            "(minute hour day-of-month month day-of-week, or @hourly/@daily/...)"
        )
    try:
        it = croniter(text, datetime(2000, 1, 1), max_years_between_matches=NEVER_FIRES_YEARS)
    except (CroniterError, ValueError, KeyError) as exc:
        raise ValueError(f"{expr!r} is not a valid cron expression ({exc})") from None
    try:
        it.get_next(datetime)
    except (CroniterError, ValueError):
        raise ValueError(
            f"{expr!r} never fires (no matching date within {NEVER_FIRES_YEARS} years)"
        ) from None
    return text


# --- wall-clock slots to instants ----------------------------------------------------------


@dataclass(frozen=True)
class Fire:
    """One fire: the instant (aware, UTC), its local time in the schedule's zone, and the
    wall-clock slots of the cron expression it stands for (several when DST merged them)."""

    at: datetime
    local: datetime
    slots: tuple[datetime, ...]

    @property
    def moved(self) -> bool:
        """True when a slot did not exist (DST gap) and fires at the end of the gap."""
        wall = self.local.replace(tzinfo=None)
        return any(slot != wall for slot in self.slots)

    def note(self) -> str:
        """Why a fire is not at its slot's wall-clock time, for previews and logs."""
        wall = self.local.replace(tzinfo=None)
        gone = [s.strftime("%H:%M") for s in self.slots if s != wall]
        if not gone:
            return ""
        return f"{', '.join(gone)} skipped by DST: runs at {self.local:%H:%M}"


def slot_instant(wall: datetime, zone: ZoneInfo) -> datetime:
    """The UTC instant a wall-clock slot (naive) fires at in `zone`: itself when it exists,
    its first occurrence when repeated, the first instant after the gap when skipped."""
    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) == wall:
        return first
    # In a gap: fold=0 reads it with the offset before the change (an instant after the gap),
    # fold=1 with the offset after it (before the gap). The change lies between: find it.
    second = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    lo, hi = sorted((first, second))
    return _first_instant_after(wall, zone, lo, hi)


def _first_instant_after(wall: datetime, zone: ZoneInfo, lo: datetime, hi: datetime) -> datetime:
    """The earliest whole second in [lo, hi] whose wall-clock time in `zone` is past `wall`."""
    lo_s, hi_s = int(lo.timestamp()), int(hi.timestamp())
    while lo_s < hi_s:
        mid = (lo_s + hi_s) // 2
        if datetime.fromtimestamp(mid, zone).replace(tzinfo=None) > wall:
            hi_s = mid
        else:
            lo_s = mid + 1
    return datetime.fromtimestamp(lo_s, UTC)


def _walls(schedule: Schedule, start: datetime, backwards: bool = False) -> Iterator[datetime]:
    """Wall-clock slots (naive) of the cron expression, strictly after (or before) `start`.
    croniter on naive datetimes is plain calendar arithmetic: no DST enters here."""
    it = croniter(schedule.cron, start, max_years_between_matches=NEVER_FIRES_YEARS)
    step = it.get_prev if backwards else it.get_next
    while True:
        try:
            yield step(datetime)
        except (CroniterError, ValueError, OverflowError):
            return


def _aware(moment: datetime, what: str) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise UsageError(f"{what}: a time with a time zone is needed, not {moment.isoformat()}")
    return moment.astimezone(UTC)


def iter_fires(schedule: Schedule, after: datetime) -> Iterator[Fire]:
    """Every fire strictly after `after`, in order, each instant once."""
    zone = schedule.zone
    after = _aware(after, "after")
    # A slot's instant never decreases as its wall-clock time grows, and a slot whose wall
    # time is at or before `after`'s own maps to `after` or earlier: start there. In a repeated
    # hour, slots just after that wall time may still map before `after`: filtered below.
    start = after.astimezone(zone).replace(tzinfo=None)
    pending: Fire | None = None
    for wall in _walls(schedule, start):
        at = slot_instant(wall, zone)
        if at <= after:
            continue
        if pending is not None and at == pending.at:
            pending = Fire(pending.at, pending.local, (*pending.slots, wall))
            continue
        if pending is not None:
            yield pending
        pending = Fire(at, at.astimezone(zone), (wall,))
    if pending is not None:
        yield pending


def preview(schedule: Schedule, after: datetime, n: int = 10) -> list[Fire]:
    """The next `n` fires after `after`, with their local times and DST notes."""
    if n < 1:
        raise UsageError(f"count: must be 1 or more, not {n}")
    fires: list[Fire] = []
    for fire in iter_fires(schedule, after):
        fires.append(fire)
        if len(fires) == n:
            break
    return fires


def next_runs(schedule: Schedule, after: datetime, n: int) -> list[datetime]:
    """The next `n` fire instants (aware, UTC) strictly after `after`."""
    return [fire.at for fire in preview(schedule, after, n)]


def prev_run(schedule: Schedule, at: datetime) -> datetime | None:
    """The latest fire instant at or before `at` (aware, UTC), None if there is none."""
    zone = schedule.zone
    at = _aware(at, "at")
    # Slots up to one jump past `at`'s wall time may map at or before it (a repeated hour).
    start = at.astimezone(zone).replace(tzinfo=None) + _MAX_JUMP
    for wall in _walls(schedule, start, backwards=True):
        instant = slot_instant(wall, zone)
        if instant <= at:
            return instant
    return None


def fires_between(schedule: Schedule, after: datetime, until: datetime) -> Iterator[Fire]:
    """Fires in (after, until], in order."""
    until = _aware(until, "until")
    for fire in iter_fires(schedule, after):
        if fire.at > until:
            return
        yield fire


# --- missed runs, overlap, due ------------------------------------------------------------


def _stamp(moment: datetime, zone: ZoneInfo) -> str:
    return f"{moment.astimezone(zone):%Y-%m-%d %H:%M %Z}"


@dataclass(frozen=True)
class MissedDecision:
    """What start-up does about slots that passed while the server was down. `run`: start one
    catch-up run now, standing for `fire_time` (the latest missed slot: record it as the
    schedule's last fire). `missed`: the latest missed slots (at most MISSED_LISTED),
    `missed_count` all of them (capped at MISSED_COUNT_CAP), `message` the log sentence."""

    run: bool
    fire_time: datetime | None
    missed: tuple[datetime, ...]
    missed_count: int
    message: str

    @property
    def count_capped(self) -> bool:
        return self.missed_count >= MISSED_COUNT_CAP


def missed_runs(schedule: Schedule, last_fire: datetime | None, now: datetime) -> MissedDecision:
    """Slots in (last_fire, now] were missed. run_once: one catch-up run, not one per slot;
    skip: none. No last fire (a schedule never fired) means nothing was missed: record the
    schedule's creation time as its last fire to catch up from there."""
    now = _aware(now, "now")
    name = f"schedule {schedule.name}"
    if not schedule.enabled:
        return MissedDecision(False, None, (), 0, f"{name} is disabled: nothing to catch up")
    if last_fire is None:
        return MissedDecision(False, None, (), 0, f"{name} never fired: nothing missed")
    last_fire = _aware(last_fire, "last fire")
    recent: list[datetime] = []
    count = 0
    first: datetime | None = None
    for fire in fires_between(schedule, last_fire, now):
        count += 1
        first = first or fire.at
        recent.append(fire.at)
        del recent[:-MISSED_LISTED]
        if count >= MISSED_COUNT_CAP:
            break
    if not count or first is None:
        return MissedDecision(False, None, (), 0, f"{name}: no run missed")
    zone = schedule.zone
    latest = recent[-1]
    counted = f"{'at least ' if count >= MISSED_COUNT_CAP else ''}{count} run"
    counted += "s" if count > 1 else ""
    span = _stamp(first, zone) + (f" to {_stamp(latest, zone)}" if count > 1 else "")
    missed = f"{name} missed {counted} while vmkeep was not running ({span})"
    if schedule.missed_policy == "skip":
        return MissedDecision(
            False, None, tuple(recent), count, f"{missed}: skipped (missed policy skip)"
        )
    return MissedDecision(
        True,
        latest,
        tuple(recent),
        count,
        f"{missed}: running once now for {_stamp(latest, zone)} (missed policy run_once)",
    )


@dataclass(frozen=True)
class OverlapDecision:
    """What to do with a fire while the schedule's previous run still runs."""

    action: OverlapAction
    message: str


def overlap_decision(policy: OverlapPolicy, previous_running: bool) -> OverlapDecision:
    """start when nothing runs; else skip (reported) or queue (starts when the previous
    run ends), by the schedule's overlap policy."""
    if not previous_running:
        return OverlapDecision("start", "no previous run is running: starting")
    if policy == "skip":
        return OverlapDecision(
            "skip", "the previous run is still running: this run is skipped (overlap policy skip)"
        )
    if policy == "queue":
        return OverlapDecision(
            "queue",
            "the previous run is still running: this run is queued and starts when it ends "
            "(overlap policy queue)",
        )
    raise UsageError(f"overlap_policy: {policy!r} is not skip or queue")


def due(
    schedules: Iterable[Schedule],
    last_fires: Mapping[str, datetime],
    now: datetime,
    grace: timedelta = DEFAULT_GRACE,
) -> list[tuple[Schedule, datetime]]:
    """The schedules to fire now, each with the slot it fires for (record it in last_fires).

    Only a schedule's latest slot at or before `now` can fire, and only when it is later than
    its last fire: after the clock jumps back no slot fires twice; after it jumps forward (or
    the loop slept) several slots fire once. A slot older than `grace` was missed: it fires
    under missed policy run_once, not under skip. A schedule with no last fire fires only for
    a slot within `grace` (a new schedule does not catch up on slots before it existed)."""
    now = _aware(now, "now")
    result: list[tuple[Schedule, datetime]] = []
    for schedule in schedules:
        if not schedule.enabled:
            continue
        latest = prev_run(schedule, now)
        if latest is None:
            continue
        last = last_fires.get(schedule.name)
        if last is not None and latest <= _aware(last, "last fire"):
            continue
        on_time = now - latest <= grace
        if on_time or (last is not None and schedule.missed_policy == "run_once"):
            result.append((schedule, latest))
    return result
