"""Combined retention (one job, several schedules): the worked examples of docs/RETENTION.md §8,
validation, and a hypothesis comparison over a simulated year with a brute-force model."""

from __future__ import annotations

import pickle
import random
from collections.abc import Iterable
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmkeep.errors import UsageError
from vmkeep.operations.retention import (
    CombinedPolicy,
    PointRef,
    PruneDecision,
    RetentionPolicy,
    combined_plan,
    prune_plan,
)

PARIS = ZoneInfo("Europe/Paris")


def kept(decisions: Iterable[PruneDecision]) -> dict[str, list[str]]:
    """id -> reasons, for the kept points only."""
    return {d.point.id: d.reasons for d in decisions if d.keep}


def local(day: date, hour: int, minute: int, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time(hour, minute), tzinfo=zone).astimezone(UTC)


def days(first: date, last: date) -> list[date]:
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


# --------------------------------------------------------------------------------------------
# example 10: hourly keep 24 + daily keep 7 + weekly keep 4, long-term daily 14 / monthly 6


def half_year_of_three_schedules() -> list[PointRef]:
    """vm-a in job "prod", Europe/Paris, 2024-01-01 .. 2024-06-30: an hourly backup on every
    hour, a daily one at 01:30 and a weekly one on Sundays at 03:30 (local times)."""
    points = []
    instant = local(date(2024, 1, 1), 0, 0, PARIS)
    end = local(date(2024, 6, 30), 23, 0, PARIS)
    while instant <= end:  # hourly on UTC hours: local 02:00 on 2024-03-31 simply never occurs
        points.append(
            PointRef(f"h-{instant.astimezone(PARIS):%m-%dT%H}", "vm-a", "hourly", instant, "prod")
        )
        instant += timedelta(hours=1)
    for day in days(date(2024, 1, 1), date(2024, 6, 30)):
        points.append(PointRef(f"d-{day:%m-%d}", "vm-a", "daily", local(day, 1, 30, PARIS), "prod"))
        if day.isoweekday() == 7:
            points.append(
                PointRef(f"w-{day:%m-%d}", "vm-a", "weekly", local(day, 3, 30, PARIS), "prod")
            )
    return points


EXAMPLE_10 = CombinedPolicy(
    keep_last={"hourly": 24, "daily": 7, "weekly": 4},
    keep_daily=14,
    keep_monthly=6,
    timezone="Europe/Paris",
)


def test_example_10_three_schedules_share_one_long_term_history() -> None:
    points = half_year_of_three_schedules()
    assert len(points) == 182 * 24 - 1 + 182 + 26  # 2024-03-31 has 23 local hours
    plan = combined_plan(points, EXAMPLE_10)

    expected: dict[str, list[str]] = {}
    for i, hour in enumerate(range(23, -1, -1)):  # the newest 24 hourly points: all of 06-30
        expected[f"h-06-30T{hour:02d}"] = [f"last {i + 1}/24 of hourly"]
    for i, day in enumerate(range(30, 23, -1)):
        expected[f"d-06-{day:02d}"] = [f"last {i + 1}/7 of daily"]
    for i, day in enumerate([30, 23, 16, 9]):
        expected[f"w-06-{day:02d}"] = [f"last {i + 1}/4 of weekly"]
    # long-term daily 14: the newest point of each of the 14 newest days is that day's 23:00
    for day in range(30, 16, -1):
        expected.setdefault(f"h-06-{day:02d}T23", []).append(f"daily 2024-06-{day:02d}")
    # long-term monthly 6: the newest point of each month is its last day's 23:00
    for month_end in ["01-31", "02-29", "03-31", "04-30", "05-31", "06-30"]:
        expected.setdefault(f"h-{month_end}T23", []).append(f"monthly 2024-{month_end[:2]}")

    assert kept(plan) == expected
    assert len(expected) == 24 + 7 + 4 + 13 + 5  # 53 points kept out of 4575
    assert len(plan) == len(points)


def test_example_10_the_trap_per_schedule_long_term_keeps_history_three_times() -> None:
    """The same counts applied per schedule (as `vmkeep prune` without --keep-schedule does):
    each schedule keeps its own long-term history; May is then stored three times."""
    points = half_year_of_three_schedules()
    per_schedule: dict[str, list[str]] = {}
    for schedule, last in {"hourly": 24, "daily": 7, "weekly": 4}.items():
        own = [p for p in points if p.schedule == schedule]
        policy = RetentionPolicy(
            keep_last=last, keep_daily=14, keep_monthly=6, timezone="Europe/Paris"
        )
        per_schedule.update(kept(prune_plan(own, policy)))
    may = sorted(i for i, why in per_schedule.items() if "monthly 2024-05" in why)
    assert may == ["d-05-31", "h-05-31T23", "w-05-26"]
    by_schedule = {s: sum(i.startswith(s[0]) for i in per_schedule) for s in SCHEDULES}
    assert by_schedule == {"hourly": 42, "daily": 19, "weekly": 16}  # 77, against 53 combined
    combined = kept(combined_plan(points, EXAMPLE_10))
    assert [i for i, why in combined.items() if "monthly 2024-05" in why] == ["h-05-31T23"]


def test_example_10_a_schedule_keeps_its_own_last_n_though_newer_points_exist() -> None:
    """The weekly schedule's 4 points are kept though 600 hourly points are newer."""
    plan = combined_plan(half_year_of_three_schedules(), EXAMPLE_10)
    weekly = [d.point.id for d in plan if d.keep and d.point.schedule == "weekly"]
    assert weekly == ["w-06-30", "w-06-23", "w-06-16", "w-06-09"]


# --------------------------------------------------------------------------------------------
# example 11: other jobs, schedules without a rule, a schedule paused


def pt(id: str, when: str, schedule: str, job: str = "prod", vm: str = "vm-a") -> PointRef:
    return PointRef(id, vm, schedule, datetime.fromisoformat(when).replace(tzinfo=UTC), job)


def test_example_11_only_the_named_schedules_of_each_job_are_touched() -> None:
    points = [
        pt("n1", "2024-05-01 01:00", "nightly"),
        pt("n2", "2024-05-02 01:00", "nightly"),
        pt("n3", "2024-05-03 01:00", "nightly"),
        pt("h1", "2024-05-03 10:00", "hourly"),
        pt("h2", "2024-05-03 11:00", "hourly"),
        pt("m1", "2024-04-01 12:00", ""),  # a manual `vmkeep backup` run of the job
        pt("x1", "2024-04-02 12:00", "nightly", job="other"),
    ]
    policy = CombinedPolicy(keep_last={"nightly": 1, "hourly": 1}, keep_daily=2)
    plan = combined_plan(points, policy)
    assert [d.point.id for d in plan] == ["x1", "h2", "h1", "n3", "n2", "n1", "m1"]
    assert kept(plan) == {
        "x1": ["last 1/1 of nightly", "daily 2024-04-02"],  # job "other": its own history
        "h2": ["last 1/1 of hourly", "daily 2024-05-03"],
        "n3": ["last 1/1 of nightly"],
        "n2": ["daily 2024-05-02"],
        "m1": ["untouched: no rule for schedule (no schedule)"],
    }


def test_example_11_a_paused_schedule_keeps_its_last_n_and_history_continues() -> None:
    """The nightly schedule stopped in April; its last 2 stay, long-term goes on with hourly."""
    points = [pt(f"n{d}", f"2024-04-{d:02d} 01:00", "nightly") for d in range(1, 11)]
    points += [pt(f"h{d}", f"2024-05-{d:02d} 12:00", "hourly") for d in range(1, 4)]
    policy = CombinedPolicy(keep_last={"nightly": 2, "hourly": 1}, keep_monthly=2)
    assert kept(combined_plan(points, policy)) == {
        "h3": ["last 1/1 of hourly", "monthly 2024-05"],
        "n10": ["last 1/2 of nightly", "monthly 2024-04"],
        "n9": ["last 2/2 of nightly"],
    }


def test_a_schedule_with_keep_last_0_relies_on_long_term_only() -> None:
    points = [pt(f"w{d}", f"2024-05-{d:02d} 03:00", "weekly") for d in (5, 12, 19)]
    policy = CombinedPolicy(keep_last={"weekly": 0}, keep_monthly=1)
    assert kept(combined_plan(points, policy)) == {"w19": ["monthly 2024-05"]}


# --------------------------------------------------------------------------------------------
# validation


def test_empty_policies_are_refused() -> None:
    for policy in [
        CombinedPolicy(),
        CombinedPolicy(keep_last={"hourly": 0}),
        CombinedPolicy(keep_last={"hourly": 0, "daily": 0}, timezone="Europe/Paris"),
    ]:
        assert policy.is_empty()
        with pytest.raises(UsageError, match="refusing to prune with an empty policy"):
            combined_plan([pt("a", "2024-05-01 12:00", "hourly")], policy)
    assert not CombinedPolicy(keep_yearly=1).is_empty()
    assert not CombinedPolicy(keep_last={"hourly": 1}).is_empty()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep_last": {"hourly": -1}}, r"keep_last\['hourly'\] must be 0 or more"),
        ({"keep_last": {"hourly": "3"}}, r"keep_last\['hourly'\] must be a whole number"),
        ({"keep_last": {"hourly": True}}, r"keep_last\['hourly'\] must be a whole number"),
        ({"keep_last": {3: 1}}, "schedule name must be text"),
        ({"keep_last": [("hourly", 1)]}, "keep_last must map schedule names"),
        ({"keep_monthly": -2}, "keep_monthly must be 0 or more"),
        ({"keep_daily": 1.5}, "keep_daily must be a whole number"),
        ({"keep_daily": 1, "timezone": "Europe/Pariss"}, "unknown timezone 'Europe/Pariss'"),
    ],
)
def test_bad_policies_name_the_field(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        CombinedPolicy(**kwargs)  # type: ignore[arg-type]


def test_the_policy_keeps_its_own_copy_of_the_counts() -> None:
    counts = {"hourly": 1}
    policy = CombinedPolicy(keep_last=counts)
    counts["hourly"] = 0
    assert policy.keep_last["hourly"] == 1 and not policy.is_empty()
    copy = pickle.loads(pickle.dumps(policy))  # a task payload can carry it
    assert copy == policy and hash(copy) == hash(policy)


def test_duplicate_ids_are_refused_even_across_jobs() -> None:
    points = [pt("a", "2024-05-01 12:00", "h"), pt("a", "2024-05-02 12:00", "h", job="other")]
    with pytest.raises(ValueError, match="appears more than once"):
        combined_plan(points, CombinedPolicy(keep_last={"h": 1}))


def test_old_four_field_point_refs_still_work_and_have_no_job() -> None:
    point = PointRef("a", "vm-a", "h", datetime(2024, 5, 1, tzinfo=UTC))
    assert point.job == ""
    assert kept(combined_plan([point], CombinedPolicy(keep_last={"h": 1}))) == {
        "a": ["last 1/1 of h"]
    }


# --------------------------------------------------------------------------------------------
# hypothesis: a simulated year against a brute-force model

RULES = (("daily", "%Y-%m-%d"), ("weekly", "%G-W%V"), ("monthly", "%Y-%m"), ("yearly", "%Y"))
SCHEDULES = ("hourly", "daily", "weekly")


def newest(point: PointRef) -> tuple[datetime, str]:
    return (point.time, point.id)


def label(schedule: str) -> str:
    return schedule or "(no schedule)"


def model_single_rules(group: list[PointRef], policy: CombinedPolicy) -> dict[str, dict[str, str]]:
    """rule name -> {point id -> reason} for one (vm, job) group, each rule on its own, written
    from the words of the specification: sort, slice, take the newest of each bucket."""
    managed = [p for p in group if p.schedule in policy.keep_last]
    rules: dict[str, dict[str, str]] = {}
    for schedule, count in policy.keep_last.items():
        own = sorted((p for p in managed if p.schedule == schedule), key=newest, reverse=True)
        rules[f"last/{schedule}"] = {
            p.id: f"last {i + 1}/{count} of {label(schedule)}" for i, p in enumerate(own[:count])
        }
    zone = ZoneInfo(policy.timezone)
    for rule, fmt in RULES:
        newest_of: dict[str, PointRef] = {}
        for p in managed:
            bucket = p.time.astimezone(zone).strftime(fmt)
            if bucket not in newest_of or newest(p) > newest(newest_of[bucket]):
                newest_of[bucket] = p
        ranked = sorted(newest_of.items(), key=lambda item: newest(item[1]), reverse=True)
        count = getattr(policy, f"keep_{rule}")
        rules[rule] = {p.id: f"{rule} {bucket}" for bucket, p in ranked[:count]}
    return rules


def model(points: list[PointRef], policy: CombinedPolicy) -> dict[str, list[str]]:
    """id -> reasons: the union of every single rule, in the order last, daily, ... yearly."""
    result: dict[str, list[str]] = {}
    for key in {(p.vm, p.job) for p in points}:
        group = [p for p in points if (p.vm, p.job) == key]
        rules = model_single_rules(group, policy)
        for p in group:
            if p.schedule not in policy.keep_last:
                result[p.id] = [f"untouched: no rule for schedule {label(p.schedule)}"]
                continue
            lasts = [r[p.id] for name, r in rules.items() if name.startswith("last/") and p.id in r]
            result[p.id] = lasts + [rules[rule][p.id] for rule, _ in RULES if p.id in rules[rule]]
    return result


ZONES = ["UTC", "Europe/Paris", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]


@st.composite
def simulated_years(draw: st.DrawFn) -> tuple[list[PointRef], CombinedPolicy]:
    """A year of vm-a in job "prod": hourly (UTC hours), daily at 01:30 and weekly on Sundays at
    03:30 local time, each with up to 15 minutes of jitter, each schedule active over its own
    span, with outages (no points); plus a few points of another job and of a manual run."""
    zone_name = draw(st.sampled_from(ZONES))
    zone = ZoneInfo(zone_name)
    first = date(2023, 1, 1) + timedelta(days=draw(st.integers(0, 730)))
    rng = random.Random(draw(st.integers(0, 2**32)))
    outages = [
        (
            first + timedelta(days=draw(st.integers(0, 364))),
            timedelta(days=draw(st.integers(1, 40))),
        )
        for _ in range(draw(st.integers(0, 4)))
    ]

    def up(instant: datetime) -> bool:
        day = instant.astimezone(zone).date()
        return not any(start <= day < start + length for start, length in outages)

    spans = {s: sorted(draw(st.integers(0, 365)) for _ in range(2)) for s in SCHEDULES}
    points: list[PointRef] = []

    def add(schedule: str, instant: datetime, job: str = "prod") -> None:
        instant += timedelta(seconds=rng.randrange(900))
        if up(instant):
            points.append(PointRef(f"p{len(points):05d}", "vm-a", schedule, instant, job))

    start, stop = spans["hourly"]
    instant = datetime.combine(first, time(0), tzinfo=UTC) + timedelta(days=start)
    for _ in range((stop - start) * 24):
        add("hourly", instant)
        instant += timedelta(hours=1)
    for schedule, hour in (("daily", 1), ("weekly", 3)):
        start, stop = spans[schedule]
        for day in days(first + timedelta(days=start), first + timedelta(days=stop)):
            if schedule == "daily" or day.isoweekday() == 7:
                add(schedule, local(day, hour, 30, zone))
    for n in range(draw(st.integers(0, 5))):
        add(
            draw(st.sampled_from(["", "manual"])), local(first + timedelta(days=n * 50), 9, 0, zone)
        )
        add("hourly", local(first + timedelta(days=n * 60), 9, 0, zone), job="other")
    rng.shuffle(points)

    named = draw(st.sets(st.sampled_from([*SCHEDULES, ""]), min_size=1))
    policy = CombinedPolicy(
        keep_last={s: draw(st.integers(0, 48)) for s in named},
        keep_daily=draw(st.integers(0, 20)),
        keep_weekly=draw(st.integers(0, 10)),
        keep_monthly=draw(st.integers(0, 13)),
        keep_yearly=draw(st.integers(0, 3)),
        timezone=zone_name,
    )
    if policy.is_empty():
        policy = CombinedPolicy(
            keep_last=dict(policy.keep_last), keep_monthly=1, timezone=zone_name
        )
    return points, policy


@settings(max_examples=40, deadline=None)
@given(case=simulated_years())
def test_a_simulated_year_matches_the_model_and_any_rule_keeps(
    case: tuple[list[PointRef], CombinedPolicy],
) -> None:
    points, policy = case
    plan = combined_plan(points, policy)
    assert {d.point.id: d.reasons for d in plan} == model(points, policy)
    assert all(d.keep == bool(d.reasons) for d in plan)
    kept_ids = {d.point.id for d in plan if d.keep}
    for key in {(p.vm, p.job) for p in points}:
        group = [p for p in points if (p.vm, p.job) == key]
        for rule, chosen in model_single_rules(group, policy).items():
            assert set(chosen) <= kept_ids, f"rule {rule} alone keeps points the plan drops"
        # one long-term history per (vm, job): never two points for one bucket of a rule
        reasons = [r for d in plan if (d.point.vm, d.point.job) == key for r in d.reasons]
        for rule, _ in RULES:
            used = [r for r in reasons if r.split()[0] == rule]
            assert len(used) == len(set(used)) <= getattr(policy, f"keep_{rule}")
    # points the policy does not manage are never deleted
    assert all(d.keep for d in plan if d.point.schedule not in policy.keep_last)
