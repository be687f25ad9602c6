"""`vmkeep schedule`: preview when a cron expression fires in a time zone, DST included."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import typer

from vmkeep.errors import UsageError

from .output import print_json, shown, stdout, table
from .repo_commands import JsonOpt

if TYPE_CHECKING:
    from vmkeep.engine.schedules import Fire, Schedule

schedule_app = typer.Typer(
    help="Schedules: when jobs run (cron + time zone).", no_args_is_help=True
)


def _schedule(cron: str, timezone: str) -> Schedule:
    # pydantic and croniter are imported when a schedule is read, not at start-up.
    from pydantic import ValidationError

    from vmkeep.engine.schedules import Schedule, first_error

    try:
        return Schedule(name="preview", cron=cron, timezone=timezone)
    except ValidationError as exc:
        raise UsageError("--" + first_error(exc).replace("_", "-")) from None


def _needed(cron: str | None) -> str:
    if cron is None:
        raise UsageError("give a stored schedule's NAME or --cron EXPRESSION")
    return cron


def _stored(name: str) -> Schedule:
    """A job's schedule from the state database."""
    from vmkeep.engine.runs.context import EngineContext
    from vmkeep.engine.schedules import make_schedule

    with EngineContext.open() as ctx:
        record = ctx.jobs.get_schedule(name)
    fields = {"name": record.name, "cron": record.cron, "timezone": record.timezone}
    return make_schedule(fields, f"schedule {name!r}")


def _after(text: str | None, schedule: Schedule) -> datetime:
    """--after as an instant; a time without offset is read in the schedule's zone."""
    if text is None:
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"--after: {text!r} is not an ISO 8601 time "
            "(2026-03-29T01:30, 2026-03-29T01:30+01:00 or 2026-03-29T00:30Z)"
        ) from None
    if moment.tzinfo is None:
        from vmkeep.engine.schedules import slot_instant

        return slot_instant(moment, schedule.zone)
    return moment.astimezone(UTC)


def _local(fire: Fire) -> str:
    return f"{fire.local:%a %Y-%m-%d %H:%M %z} {fire.local.tzname()}"


def _row(fire: Fire) -> dict[str, Any]:
    return {
        "utc": fire.at.isoformat().replace("+00:00", "Z"),
        "local": fire.local.isoformat(),
        "zone_abbreviation": fire.local.tzname(),
        "slots": [slot.isoformat() for slot in fire.slots],
        "note": fire.note(),
    }


@schedule_app.command("next")
def next_command(
    name: str | None = typer.Argument(
        None, help="A stored schedule (of a job applied with `vmkeep job apply`)."
    ),
    cron: str | None = typer.Option(
        None, "--cron", help="5-field cron: minute hour day-of-month month day-of-week."
    ),
    timezone: str = typer.Option(
        "UTC", "--timezone", help="IANA time zone the expression is read in (Europe/Paris)."
    ),
    count: int = typer.Option(10, "-n", "--count", help="How many fire times to show."),
    after: str | None = typer.Option(
        None, "--after", help="Start after this ISO time (default: now; no offset: local)."
    ),
    json_out: bool = JsonOpt,
) -> None:
    """Preview the next fire times of a cron expression in its time zone, local and UTC.
    DST: a time skipped by spring forward runs at the end of the gap; a repeated time runs
    once, at its first occurrence (docs/SCHEDULES.md)."""
    if not 1 <= count <= 10_000:
        raise UsageError(f"--count: must be 1 to 10000, not {count}")
    schedule = _stored(name) if name is not None else _schedule(_needed(cron), timezone)
    start = _after(after, schedule)
    from vmkeep.engine.schedules import preview

    fires = preview(schedule, start, count)
    if json_out:
        print_json(
            {
                "cron": schedule.cron,
                "timezone": schedule.timezone,
                "after": start.isoformat().replace("+00:00", "Z"),
                "fires": [_row(f) for f in fires],
            }
        )
        return
    listing = table(
        "local time", "UTC", "note", title=f"{shown(schedule.cron)} in {schedule.timezone}"
    )
    for fire in fires:
        listing.add_row(_local(fire), f"{fire.at:%Y-%m-%d %H:%M}Z", fire.note())
    stdout.print(listing)
