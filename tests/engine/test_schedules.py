"""Schedules: exact fire instants through the DST changes of 2026/2027, invalid input, missed
and overlap policies, due(), a property against an independent minute-by-minute reference, and
`vmkeep schedule next` through the real command."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from functools import cache
from itertools import pairwise
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.e2e.conftest import Cli
from vmkeep.engine.schedules import (
    MISSED_LISTED,
    Schedule,
    due,
    make_schedule,
    missed_runs,
    next_runs,
    overlap_decision,
    prev_run,
    preview,
)
from vmkeep.errors import UsageError


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def sched(cron: str, tz: str = "Europe/Paris", **kw: object) -> Schedule:
    return make_schedule({"name": "s", "cron": cron, "timezone": tz, **kw})


# --- worked examples (docs/SCHEDULES.md) -------------------------------------------------
# Europe/Paris: 2026-03-29 02:00 CET -> 03:00 CEST (01:00Z); 2026-10-25 03:00 CEST -> 02:00 CET
# (01:00Z); 2027-03-28 and 2027-10-31 alike. America/New_York: 2026-03-08 02:00 EST -> 03:00
# EDT (07:00Z); 2026-11-01 02:00 EDT -> 01:00 EST (06:00Z); 2027-03-14 and 2027-11-07 alike.


def test_paris_daily_in_the_skipped_hour_runs_at_the_end_of_the_gap() -> None:
    s = sched("30 2 * * *")
    assert next_runs(s, utc(2026, 3, 27, 12), 4) == [
        utc(2026, 3, 28, 1, 30),  # 02:30 CET
        utc(2026, 3, 29, 1, 0),  # 02:30 does not exist: 03:00 CEST
        utc(2026, 3, 30, 0, 30),  # 02:30 CEST
        utc(2026, 3, 31, 0, 30),
    ]
    fire = preview(s, utc(2026, 3, 28, 12), 1)[0]
    assert fire.moved and fire.note() == "02:30 skipped by DST: runs at 03:00"
    assert fire.local.isoformat() == "2026-03-29T03:00:00+02:00"


def test_paris_daily_in_the_repeated_hour_runs_once_at_the_first_occurrence() -> None:
    s = sched("30 2 * * *")
    assert next_runs(s, utc(2026, 10, 24, 12), 3) == [
        utc(2026, 10, 25, 0, 30),  # 02:30 CEST; 02:30 CET (01:30Z) does not fire
        utc(2026, 10, 26, 1, 30),
        utc(2026, 10, 27, 1, 30),
    ]
    # Asked from inside the repeated hour, after the first 02:30: nothing more that day.
    assert next_runs(s, utc(2026, 10, 25, 1, 15), 1) == [utc(2026, 10, 26, 1, 30)]
    assert prev_run(s, utc(2026, 10, 25, 1, 45)) == utc(2026, 10, 25, 0, 30)


def test_paris_hourly_through_both_changes_of_2026() -> None:
    s = sched("0 * * * *")
    # Spring: 01:00 CET, then 03:00 CEST stands for the missing 02:00 and for 03:00 (one run).
    assert next_runs(s, utc(2026, 3, 28, 23, 30), 4) == [
        utc(2026, 3, 29, 0),
        utc(2026, 3, 29, 1),
        utc(2026, 3, 29, 2),
        utc(2026, 3, 29, 3),
    ]
    fires = preview(s, utc(2026, 3, 29, 0, 30), 1)
    assert [w.hour for w in fires[0].slots] == [2, 3]
    spring = [t for t in next_runs(s, utc(2026, 3, 28, 22, 59), 30) if t < utc(2026, 3, 29, 22)]
    assert len(spring) == 23  # 23 real hours, 24 slots: 02:00 and 03:00 run together
    # Autumn: 02:00 CEST (00:00Z) fires, 02:00 CET (01:00Z) does not, 03:00 CET (02:00Z) does.
    assert next_runs(s, utc(2026, 10, 24, 22, 30), 4) == [
        utc(2026, 10, 24, 23),
        utc(2026, 10, 25, 0),
        utc(2026, 10, 25, 2),
        utc(2026, 10, 25, 3),
    ]
    day = [t for t in next_runs(s, utc(2026, 10, 24, 21, 59), 30) if t < utc(2026, 10, 25, 23)]
    assert len(day) == 24  # 25 real hours, 24 wall-clock slots, each once


def test_paris_2027_changes() -> None:
    s = sched("30 2 * * *")
    assert next_runs(s, utc(2027, 3, 27, 12), 2) == [utc(2027, 3, 28, 1), utc(2027, 3, 29, 0, 30)]
    assert next_runs(s, utc(2027, 10, 30, 12), 2) == [
        utc(2027, 10, 31, 0, 30),
        utc(2027, 11, 1, 1, 30),
    ]


def test_new_york_2026_and_2027() -> None:
    nightly = sched("30 2 * * *", "America/New_York")
    assert next_runs(nightly, utc(2026, 3, 7, 12), 2) == [
        utc(2026, 3, 8, 7),  # 02:30 EST/EDT does not exist: 03:00 EDT
        utc(2026, 3, 9, 6, 30),
    ]
    early = sched("30 1 * * *", "America/New_York")
    assert next_runs(early, utc(2026, 10, 31, 12), 2) == [
        utc(2026, 11, 1, 5, 30),  # 01:30 EDT; 01:30 EST (06:30Z) does not fire
        utc(2026, 11, 2, 6, 30),
    ]
    hourly = sched("0 * * * *", "America/New_York")
    assert next_runs(hourly, utc(2027, 3, 14, 5, 30), 3) == [
        utc(2027, 3, 14, 6),  # 01:00 EST
        utc(2027, 3, 14, 7),  # 03:00 EDT (for 02:00 and 03:00)
        utc(2027, 3, 14, 8),
    ]
    assert next_runs(hourly, utc(2027, 11, 7, 4, 30), 3) == [
        utc(2027, 11, 7, 5),  # 01:00 EDT; 01:00 EST (06:00Z) does not fire
        utc(2027, 11, 7, 7),  # 02:00 EST
        utc(2027, 11, 7, 8),
    ]


def test_the_machine_time_zone_plays_no_part(monkeypatch: pytest.MonkeyPatch) -> None:
    for machine in ("America/New_York", "Australia/Lord_Howe"):
        monkeypatch.setenv("TZ", machine)
        time.tzset()
        try:
            assert next_runs(sched("30 2 * * *"), utc(2026, 3, 28, 12), 1) == [utc(2026, 3, 29, 1)]
        finally:
            monkeypatch.undo()
            time.tzset()


def test_several_slots_in_the_gap_run_once() -> None:
    s = sched("*/15 2 * * *")
    assert next_runs(s, utc(2026, 3, 28, 12), 2) == [utc(2026, 3, 29, 1), utc(2026, 3, 30, 0)]


def test_utc_has_no_surprises() -> None:
    s = sched("0 */6 * * *", "UTC")
    assert next_runs(s, utc(2026, 3, 29, 0), 3) == [
        utc(2026, 3, 29, 6),
        utc(2026, 3, 29, 12),
        utc(2026, 3, 29, 18),
    ]


# --- invalid input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"cron": "0 0 30 2 *"}, "schedule s: cron: '0 0 30 2 *' never fires"),
        ({"cron": "0 0 31 4 *"}, "cron: '0 0 31 4 *' never fires"),
        ({"cron": "0 0 * *"}, "cron: '0 0 * *' is not a 5-field cron expression"),
        ({"cron": "0 0 * * * *"}, "is not a 5-field cron expression"),
        ({"cron": "61 * * * *"}, "cron: '61 * * * *' is not a valid cron expression"),
        ({"cron": "@reboot"}, "is not a 5-field cron expression"),
        ({"timezone": "Mars/Olympus"}, "timezone: unknown time zone 'Mars/Olympus'"),
        ({"timezone": "../../etc/passwd"}, "timezone: unknown time zone"),
        ({"keep": -1}, "keep: must be 0 or more"),
        ({"keep": True}, "keep: Input should be a valid integer"),
        ({"enabled": "yes"}, "enabled: Input should be a valid boolean"),
        ({"missed_policy": "always"}, "missed_policy: Input should be 'run_once' or 'skip'"),
        ({"overlap_policy": "kill"}, "overlap_policy: "),
        ({"name": "bad name"}, "name: 'bad name' is not a schedule name"),
        ({"colour": "red"}, "colour: unknown field"),
    ],
)
def test_invalid_schedules_fail_in_one_line_naming_the_field(
    data: dict[str, object], expected: str
) -> None:
    fields = {"name": "s", "cron": "0 2 * * *", "timezone": "UTC", **data}
    with pytest.raises(UsageError) as err:
        make_schedule(fields, "schedule s")
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_schedule_that_is_not_a_mapping() -> None:
    with pytest.raises(UsageError, match=r"^schedule s: a mapping of fields is needed, not list$"):
        make_schedule(["0 2 * * *"], "schedule s")  # type: ignore[arg-type]


def test_rare_but_real_expressions_are_valid() -> None:
    assert next_runs(sched("0 0 29 2 *", "UTC"), utc(2096, 3, 1), 1) == [utc(2104, 2, 29)]
    assert sched("@daily", "UTC").cron == "@daily"
    assert sched("  0   2 * *  1-5 ").cron == "0 2 * * 1-5"


def test_naive_times_are_refused() -> None:
    with pytest.raises(UsageError, match="after: a time with a time zone is needed"):
        next_runs(sched("0 2 * * *"), datetime(2026, 1, 1), 1)


# --- missed runs, overlap, due -----------------------------------------------------------


def test_missed_run_once_catches_up_once_for_the_latest_slot() -> None:
    s = sched("0 * * * *", "UTC")
    d = missed_runs(s, utc(2026, 5, 1, 0), utc(2026, 5, 2, 1, 30))
    assert d.run and d.fire_time == utc(2026, 5, 2, 1)
    assert d.missed_count == 25 and len(d.missed) == MISSED_LISTED
    assert d.missed[-1] == utc(2026, 5, 2, 1)
    assert d.message == (
        "schedule s missed 25 runs while vmkeep was not running (2026-05-01 01:00 UTC to "
        "2026-05-02 01:00 UTC): running once now for 2026-05-02 01:00 UTC (missed policy run_once)"
    )


def test_missed_skip_and_nothing_missed() -> None:
    s = sched("0 2 * * *", missed_policy="skip")
    d = missed_runs(s, utc(2026, 3, 27, 1), utc(2026, 3, 29, 12))
    assert not d.run and d.fire_time is None and d.missed_count == 2
    assert d.missed == (utc(2026, 3, 28, 1), utc(2026, 3, 29, 1))  # 02:00 skipped -> 03:00
    assert d.message.endswith("skipped (missed policy skip)")
    assert "2026-03-28 02:00 CET to 2026-03-29 03:00 CEST" in d.message
    none = missed_runs(s, utc(2026, 3, 29, 1), utc(2026, 3, 29, 12))
    assert not none.run and none.missed_count == 0 and "no run missed" in none.message
    assert not missed_runs(s, None, utc(2026, 3, 29)).run
    off = sched("0 2 * * *", enabled=False)
    assert "disabled" in missed_runs(off, utc(2020, 1, 1), utc(2026, 1, 1)).message


def test_overlap_decisions() -> None:
    assert overlap_decision("skip", False).action == "start"
    assert overlap_decision("queue", False).action == "start"
    skip = overlap_decision("skip", True)
    assert skip.action == "skip" and "skipped" in skip.message
    assert overlap_decision("queue", True).action == "queue"


def test_due_fires_each_slot_once_whatever_the_clock_does() -> None:
    hourly = sched("0 * * * *", "UTC")
    daily = sched("0 3 * * *", "UTC", name="d", missed_policy="skip")
    assert due([hourly, daily], {}, utc(2026, 6, 1, 10, 0, 30)) == [(hourly, utc(2026, 6, 1, 10))]
    last = {"s": utc(2026, 6, 1, 10), "d": utc(2026, 6, 1, 3)}
    assert due([hourly, daily], last, utc(2026, 6, 1, 10, 0, 45)) == []  # same slot: not again
    assert due([hourly], last, utc(2026, 6, 1, 9, 30)) == []  # clock went back
    assert due([hourly], last, utc(2026, 6, 1, 10, 0, 5)) == []  # and forward again
    # Jump forward five hours: the latest slot fires once (run_once); skip lets it pass.
    late = utc(2026, 6, 2, 3, 40)
    assert due([hourly, daily], last, late) == [(hourly, utc(2026, 6, 2, 3))]
    assert due([hourly, daily], last, utc(2026, 6, 2, 3, 0, 20)) == [
        (hourly, utc(2026, 6, 2, 3)),
        (daily, utc(2026, 6, 2, 3)),
    ]
    off = sched("* * * * *", "UTC", name="off", enabled=False)
    assert due([off], {}, utc(2026, 6, 1, 10, 0, 1)) == []
    # A new schedule does not fire for a slot long gone.
    assert due([hourly], {}, utc(2026, 6, 1, 10, 30)) == []


def test_due_on_the_fall_back_night_fires_the_repeated_slot_once() -> None:
    s = sched("30 2 * * *")
    fired: dict[str, datetime] = {}
    count = 0
    now = utc(2026, 10, 24, 23)
    while now < utc(2026, 10, 25, 4):
        for schedule, at in due([s], fired, now):
            fired[schedule.name] = at
            count += 1
        now += timedelta(seconds=20)
    assert count == 1 and fired["s"] == utc(2026, 10, 25, 0, 30)


# --- property: against a minute-by-minute reference ---------------------------------------

ZONES = [
    "Europe/Paris",
    "America/New_York",
    "Australia/Lord_Howe",
    "America/Havana",
    "America/Santiago",
    "Asia/Kolkata",
]


@cache
def transitions(name: str) -> list[datetime]:
    """Instants of 2026 around which the zone's UTC offset changes (15-minute resolution)."""
    zone = ZoneInfo(name)
    found, t = [], utc(2026, 1, 1)
    offset = t.astimezone(zone).utcoffset()
    while t < utc(2027, 1, 1):
        t += timedelta(minutes=15)
        now = t.astimezone(zone).utcoffset()
        if now != offset:
            found.append(t)
        offset = now
    return found or [utc(2026, 6, 1)]


def matches(wall: datetime, f: dict[str, set[int] | None]) -> bool:
    """Cron matching written from the crontab(5) rules, independently of croniter."""

    def ok(key: str, value: int) -> bool:
        allowed = f[key]
        return allowed is None or value in allowed

    dow = (wall.weekday() + 1) % 7
    if f["dom"] is not None and f["dow"] is not None:
        day = wall.day in f["dom"] or dow in f["dow"]
    else:
        day = ok("dom", wall.day) and ok("dow", dow)
    return ok("minute", wall.minute) and ok("hour", wall.hour) and ok("month", wall.month) and day


def reference(
    f: dict[str, set[int] | None], zone: ZoneInfo, after: datetime, until: datetime
) -> list[datetime]:
    """Walk real time minute by minute: fire where the wall time matches at its first
    occurrence, or where the wall clock just jumped over a matching minute."""
    out, u = [], after + timedelta(minutes=1)
    step = timedelta(minutes=1)
    while u <= until:
        wall = u.astimezone(zone).replace(tzinfo=None)
        before = (u - step).astimezone(zone).replace(tzinfo=None)
        first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC) == u
        skipped, w = False, before + step
        while w < wall and not skipped:
            skipped = matches(w, f)
            w += step
        if (first and matches(wall, f)) or skipped:
            out.append(u)
        u += step
    return out


def field(values: set[int] | None) -> str:
    return "*" if values is None else ",".join(str(v) for v in sorted(values))


def values(lo: int, hi: int, most: int) -> st.SearchStrategy[set[int] | None]:
    return st.none() | st.sets(st.integers(lo, hi), min_size=1, max_size=most)


@settings(max_examples=40, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    which=st.integers(0, 3),
    shift=st.integers(-26 * 60, 2 * 60),
    minute=st.sets(st.integers(0, 59), min_size=1, max_size=4),
    hour=values(0, 23, 5),
    dom=values(1, 31, 4),
    dow=values(0, 6, 3),
)
def test_fires_match_an_independent_reference(
    zone: str,
    which: int,
    shift: int,
    minute: set[int],
    hour: set[int] | None,
    dom: set[int] | None,
    dow: set[int] | None,
) -> None:
    f: dict[str, set[int] | None] = {
        "minute": minute,
        "hour": hour,
        "dom": dom,
        "month": None,
        "dow": dow,
    }
    cron = " ".join(field(f[k]) for k in ("minute", "hour", "dom", "month", "dow"))
    s = sched(cron, zone)
    points = transitions(zone)
    after = points[which % len(points)] + timedelta(minutes=shift)
    until = after + timedelta(hours=30)
    got = [t for t in next_runs(s, after, 30 * 60 + 1) if t <= until]
    assert got == reference(f, s.zone, after, until)
    assert all(a < b for a, b in pairwise(got))
    assert all(t.tzinfo is UTC for t in got)


# --- the real command --------------------------------------------------------------------


def test_cli_previews_local_and_utc(tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    run = cli(
        "schedule",
        "next",
        "--cron",
        "30 2 * * *",
        "--timezone",
        "Europe/Paris",
        "--after",
        "2026-03-28T12:00",
        "-n",
        "2",
        "--json",
    )
    doc = run.json()
    assert doc["after"] == "2026-03-28T11:00:00Z"
    assert [(f["local"], f["utc"]) for f in doc["fires"]] == [
        ("2026-03-29T03:00:00+02:00", "2026-03-29T01:00:00Z"),
        ("2026-03-30T02:30:00+02:00", "2026-03-30T00:30:00Z"),
    ]
    assert doc["fires"][0]["note"] == "02:30 skipped by DST: runs at 03:00"
    text = cli(
        "schedule",
        "next",
        "--cron",
        "0 * * * *",
        "--timezone",
        "America/New_York",
        "--after",
        "2026-11-01T04:30:00Z",
        "-n",
        "3",
    ).out
    assert "Sun 2026-11-01 01:00 -0400 EDT" in text and "2026-11-01 05:00Z" in text
    assert "Sun 2026-11-01 02:00 -0500 EST" in text and "2026-11-01 07:00Z" in text
    assert "06:00Z" not in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cron", "0 0 30 2 *"], "error: --cron: '0 0 30 2 *' never fires"),
        (["--cron", "0 2 * * *", "--timezone", "Europe/Pariss"], "error: --timezone: unknown"),
        (["--cron", "0 2 * * *", "--after", "tomorrow"], "error: --after: 'tomorrow' is not"),
        (["--cron", "0 2 * * *", "-n", "0"], "error: --count: must be 1 to 10000"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    run = Cli(tmp_path)("schedule", "next", *args, ok=False)
    assert run.code == 2 and run.err.strip().startswith(message)
    assert len(run.err.strip().splitlines()) == 1
