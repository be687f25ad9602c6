"""Retention engine: the worked examples of docs/RETENTION.md, input validation, and hypothesis
properties, including a comparison with a deliberately naive reference model."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmkeep.errors import UsageError
from vmkeep.operations.retention import PointRef, PruneDecision, RetentionPolicy, prune_plan

# --------------------------------------------------------------------------------------------
# helpers


def at(text: str) -> datetime:
    """'2024-05-03 14:00' -> an aware UTC datetime."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def pt(id: str, time: str, vm: str = "vm-a", schedule: str = "") -> PointRef:
    return PointRef(id=id, vm=vm, schedule=schedule, time=at(time))


def kept(decisions: Iterable[PruneDecision]) -> dict[str, list[str]]:
    """id -> reasons, for the kept points only."""
    return {d.point.id: d.reasons for d in decisions if d.keep}


def order(decisions: Iterable[PruneDecision]) -> list[str]:
    return [d.point.id for d in decisions]


# --------------------------------------------------------------------------------------------
# worked examples (docs/RETENTION.md, same numbering)


def test_example_1_keep_last_only() -> None:
    points = [
        pt("a", "2024-05-01 08:00"),
        pt("b", "2024-05-01 12:00"),
        pt("c", "2024-05-01 16:00"),
        pt("d", "2024-05-02 08:00"),
        pt("e", "2024-05-02 12:00"),
    ]
    plan = prune_plan(points, RetentionPolicy(keep_last=3))
    assert order(plan) == ["e", "d", "c", "b", "a"]
    assert kept(plan) == {"e": ["last 1/3"], "d": ["last 2/3"], "c": ["last 3/3"]}
    assert all(d.reasons == [] for d in plan if not d.keep)


def test_example_2_daily_7_over_20_days_two_backups_a_day() -> None:
    points = []
    for day in range(1, 21):
        points.append(pt(f"{day:02d}-0200", f"2024-05-{day:02d} 02:00"))
        points.append(pt(f"{day:02d}-1400", f"2024-05-{day:02d} 14:00"))
    plan = prune_plan(points, RetentionPolicy(keep_daily=7))
    assert len(plan) == 40
    assert kept(plan) == {f"{day}-1400": [f"daily 2024-05-{day}"] for day in range(14, 21)}


def test_example_3_weekly_across_a_year_boundary_uses_iso_weeks() -> None:
    # One backup a day at 01:00 UTC from Sunday 2020-12-20 to Tuesday 2021-01-05.
    points = []
    for day in range(17):
        time = datetime(2020, 12, 20, 1, 0, tzinfo=UTC) + timedelta(days=day)
        points.append(PointRef(id=f"{time:%m-%d}", vm="vm-a", schedule="", time=time))
    plan = prune_plan(points, RetentionPolicy(keep_weekly=3))
    # 2020-12-28 .. 2021-01-03 is ISO week 2020-W53: 2020-12-31 and 2021-01-01 share a bucket.
    assert kept(plan) == {
        "01-05": ["weekly 2021-W01"],
        "01-03": ["weekly 2020-W53"],
        "12-27": ["weekly 2020-W52"],
    }
    assert not any(d.keep for d in plan if d.point.id in {"12-31", "01-01"})


def test_example_4_monthly_and_yearly() -> None:
    points = [
        pt("2022-06-15", "2022-06-15 03:00"),
        pt("2022-12-31", "2022-12-31 03:00"),
        pt("2023-03-01", "2023-03-01 03:00"),
        pt("2023-11-20", "2023-11-20 03:00"),
        pt("2023-12-10", "2023-12-10 03:00"),
        pt("2023-12-28", "2023-12-28 03:00"),
        pt("2024-01-05", "2024-01-05 03:00"),
        pt("2024-01-20", "2024-01-20 03:00"),
        pt("2024-02-10", "2024-02-10 03:00"),
    ]
    plan = prune_plan(points, RetentionPolicy(keep_monthly=3, keep_yearly=3))
    assert kept(plan) == {
        "2024-02-10": ["monthly 2024-02", "yearly 2024"],
        "2024-01-20": ["monthly 2024-01"],
        "2023-12-28": ["monthly 2023-12", "yearly 2023"],
        "2022-12-31": ["yearly 2022"],
    }


def test_example_5_timezone_local_date_differs_from_utc_date() -> None:
    points = [
        pt("p1", "2024-05-01 12:00"),
        pt("p2", "2024-05-02 12:00"),
        pt("p3", "2024-05-02 23:30"),  # 2024-05-03 01:30 in Paris (CEST, UTC+2)
    ]
    in_utc = prune_plan(points, RetentionPolicy(keep_daily=2))
    assert kept(in_utc) == {"p3": ["daily 2024-05-02"], "p1": ["daily 2024-05-01"]}
    in_paris = prune_plan(points, RetentionPolicy(keep_daily=2, timezone="Europe/Paris"))
    assert kept(in_paris) == {"p3": ["daily 2024-05-03"], "p2": ["daily 2024-05-02"]}


def test_example_6_vms_and_schedule_tags_are_kept_independently() -> None:
    points = [
        pt("a-n1", "2024-05-01 01:00", "vm-a", "nightly"),
        pt("a-n2", "2024-05-02 01:00", "vm-a", "nightly"),
        pt("a-n3", "2024-05-03 01:00", "vm-a", "nightly"),
        pt("a-h1", "2024-05-03 10:00", "vm-a", "hourly"),
        pt("a-h2", "2024-05-03 11:00", "vm-a", "hourly"),
        pt("a-h3", "2024-05-03 12:00", "vm-a", "hourly"),
        pt("b-1", "2024-04-01 01:00", "vm-b", ""),
    ]
    plan = prune_plan(points, RetentionPolicy(keep_last=2))
    assert order(plan) == ["a-h3", "a-h2", "a-h1", "a-n3", "a-n2", "a-n1", "b-1"]
    assert kept(plan) == {
        "a-h3": ["last 1/2"],
        "a-h2": ["last 2/2"],
        "a-n3": ["last 1/2"],
        "a-n2": ["last 2/2"],
        "b-1": ["last 1/2"],
    }


def test_example_7_last_and_daily_together_list_every_reason() -> None:
    points = [
        pt("p1", "2024-05-01 02:00"),
        pt("p2", "2024-05-02 02:00"),
        pt("p3", "2024-05-02 14:00"),
        pt("p4", "2024-05-03 02:00"),
        pt("p5", "2024-05-03 14:00"),
    ]
    plan = prune_plan(points, RetentionPolicy(keep_last=2, keep_daily=3, keep_weekly=1))
    assert kept(plan) == {
        "p5": ["last 1/2", "daily 2024-05-03", "weekly 2024-W18"],
        "p4": ["last 2/2"],
        "p3": ["daily 2024-05-02"],
        "p1": ["daily 2024-05-01"],
    }


def test_example_8_dst_end_day_has_25_hours() -> None:
    # Europe/Paris leaves summer time on 2024-10-27 at 01:00 UTC (03:00 CEST -> 02:00 CET).
    points = [
        pt("p1", "2024-10-26 22:30"),  # 2024-10-27 00:30 CEST
        pt("p2", "2024-10-27 22:30"),  # 2024-10-27 23:30 CET: same local day as p1
        pt("p3", "2024-10-27 23:30"),  # 2024-10-28 00:30 CET
    ]
    plan = prune_plan(points, RetentionPolicy(keep_daily=3, timezone="Europe/Paris"))
    assert kept(plan) == {"p3": ["daily 2024-10-28"], "p2": ["daily 2024-10-27"]}


def test_example_9_local_date_going_backwards_does_not_reuse_a_bucket() -> None:
    # On 2010-03-04 at 14:00 UTC Antarctica/Casey moved from UTC+11 to UTC+8: the local date
    # went from 2010-03-05 back to 2010-03-04 for an hour.
    points = [
        pt("p1", "2010-03-04 13:30"),  # 2010-03-05 00:30 +11
        pt("p2", "2010-03-04 15:30"),  # 2010-03-04 23:30 +08
        pt("p3", "2010-03-04 16:30"),  # 2010-03-05 00:30 +08
    ]
    plan = prune_plan(points, RetentionPolicy(keep_daily=5, timezone="Antarctica/Casey"))
    assert kept(plan) == {"p3": ["daily 2010-03-05"], "p2": ["daily 2010-03-04"]}


# --------------------------------------------------------------------------------------------
# details and validation


def test_equal_times_the_greater_id_counts_as_newer() -> None:
    points = [pt("a", "2024-05-01 12:00"), pt("c", "2024-05-01 12:00"), pt("b", "2024-05-01 12:00")]
    plan = prune_plan(points, RetentionPolicy(keep_last=1, keep_daily=1))
    assert order(plan) == ["c", "b", "a"]
    assert kept(plan) == {"c": ["last 1/1", "daily 2024-05-01"]}


def test_points_are_compared_by_instant_whatever_their_offset() -> None:
    paris = ZoneInfo("Europe/Paris")
    early = PointRef("early", "vm-a", "", datetime(2024, 5, 1, 13, 0, tzinfo=paris))  # 11:00Z
    late = PointRef("late", "vm-a", "", at("2024-05-01 12:00"))
    assert order(prune_plan([early, late], RetentionPolicy(keep_last=1))) == ["late", "early"]


def test_no_points_gives_no_decisions() -> None:
    assert prune_plan([], RetentionPolicy(keep_last=1)) == []


def test_empty_policy_is_refused() -> None:
    assert RetentionPolicy().is_empty()
    assert RetentionPolicy(timezone="Europe/Paris").is_empty()
    assert not RetentionPolicy(keep_yearly=1).is_empty()
    with pytest.raises(UsageError, match="refusing to prune with an empty policy"):
        prune_plan([pt("a", "2024-05-01 12:00")], RetentionPolicy())


@pytest.mark.parametrize(
    "field", ["keep_last", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly"]
)
def test_negative_counts_are_refused(field: str) -> None:
    with pytest.raises(UsageError, match=f"{field} must be 0 or more"):
        RetentionPolicy(**{field: -1})  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [1.5, "3", True, None])
def test_non_integer_counts_are_refused(value: object) -> None:
    with pytest.raises(UsageError, match="keep_daily must be a whole number"):
        RetentionPolicy(keep_daily=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["Mars/Olympus", "", "Europe", "utc", "/etc/localtime", "../x"])
def test_unknown_timezones_are_refused(name: str) -> None:
    with pytest.raises(UsageError, match="unknown timezone"):
        RetentionPolicy(keep_last=1, timezone=name)


def test_known_timezones_are_accepted() -> None:
    for name in ["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata", "Etc/GMT+5"]:
        assert RetentionPolicy(keep_last=1, timezone=name).timezone == name


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="not timezone-aware"):
        PointRef("a", "vm-a", "", datetime(2024, 5, 1, 12, 0))


def test_duplicate_ids_are_refused() -> None:
    points = [pt("a", "2024-05-01 12:00"), pt("a", "2024-05-02 12:00", vm="vm-b")]
    with pytest.raises(ValueError, match="appears more than once"):
        prune_plan(points, RetentionPolicy(keep_last=1))


def test_accepts_any_iterable_once() -> None:
    points = (pt(f"p{i}", f"2024-05-0{i} 12:00") for i in range(1, 4))
    assert kept(prune_plan(points, RetentionPolicy(keep_last=1))) == {"p3": ["last 1/1"]}


# --------------------------------------------------------------------------------------------
# reference model: deliberately naive, quadratic, written from the specification's wording


def _newer(a: PointRef, b: PointRef) -> bool:
    """True when a is newer than b: later time, or same time and greater id."""
    return (a.time, a.id) > (b.time, b.id)


def _ref_bucket(rule: str, point: PointRef, tz: str) -> str:
    local = point.time.astimezone(ZoneInfo(tz))
    fmt = {"daily": "%Y-%m-%d", "weekly": "%G-W%V", "monthly": "%Y-%m", "yearly": "%Y"}[rule]
    return local.strftime(fmt)


def reference_reasons(points: list[PointRef], policy: RetentionPolicy) -> dict[str, list[str]]:
    """id -> reasons: for each rule and each point, is the point the newest of its bucket, and is
    its bucket among the N newest buckets (a bucket is as new as its newest point)?"""
    counts = {
        "daily": policy.keep_daily,
        "weekly": policy.keep_weekly,
        "monthly": policy.keep_monthly,
        "yearly": policy.keep_yearly,
    }
    result: dict[str, list[str]] = {}
    for p in points:
        group = [q for q in points if (q.vm, q.schedule) == (p.vm, p.schedule)]
        reasons = []
        rank = sum(1 for q in group if _newer(q, p))  # how many points of the group are newer
        if rank < policy.keep_last:
            reasons.append(f"last {rank + 1}/{policy.keep_last}")
        for rule, n in counts.items():
            bucket = _ref_bucket(rule, p, policy.timezone)
            same_bucket = [q for q in group if _ref_bucket(rule, q, policy.timezone) == bucket]
            if any(_newer(q, p) for q in same_bucket):
                continue  # not the newest point of its bucket
            # p is its bucket's newest point; count the buckets whose newest point is newer
            newer_buckets = {_ref_bucket(rule, q, policy.timezone) for q in group if _newer(q, p)}
            if len(newer_buckets) < n:
                reasons.append(f"{rule} {bucket}")
        result[p.id] = reasons
    return result


# --------------------------------------------------------------------------------------------
# strategies

# Instants where something happens to local dates, with the zone where it happens.
EDGES = [
    (at("2024-03-31 01:00"), "Europe/Paris"),  # summer time starts: 23-hour day
    (at("2024-10-27 01:00"), "Europe/Paris"),  # summer time ends: 25-hour day
    (at("2024-03-10 07:00"), "America/New_York"),
    (at("2024-11-03 06:00"), "America/New_York"),
    (at("2024-04-07 03:00"), "America/Santiago"),  # 24:00 -> 23:00, at local midnight
    (at("2024-09-08 04:00"), "America/Santiago"),  # 24:00 -> 01:00: no local midnight
    (at("2024-04-06 15:00"), "Australia/Lord_Howe"),  # 30-minute shift
    (at("2010-03-04 14:00"), "Antarctica/Casey"),  # local date goes back from 03-05 to 03-04
    (at("1988-10-30 02:01"), "America/Goose_Bay"),  # local date goes back from 10-30 to 10-29
    (at("2011-12-30 10:00"), "Pacific/Apia"),  # 2011-12-30 never happened locally
    (at("2021-01-01 00:00"), "UTC"),  # year boundary inside ISO week 2020-W53
    (at("2021-01-04 00:00"), "UTC"),  # 2020-W53 -> 2021-W01
    (at("2024-03-01 00:00"), "UTC"),  # after a leap day
]

TIMEZONES = st.one_of(
    st.sampled_from(
        ["UTC", "Europe/Paris", "Pacific/Kiritimati", "Pacific/Pago_Pago", "Asia/Kolkata"]
        + [zone for _, zone in EDGES]
    ),
    st.timezone_keys(),
)

SPANS_MINUTES = [0, 10, 6 * 60, 3 * 24 * 60, 60 * 24 * 60, 800 * 24 * 60, 6 * 365 * 24 * 60]
Case = tuple[list[PointRef], RetentionPolicy]

COUNT_FIELDS = ["keep_last", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly"]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """Random points and a random non-empty policy. Half the time, the points are around one of
    EDGES, in a single (vm, schedule) group, and the policy uses that edge's timezone."""
    if draw(st.booleans()):
        edge, timezone = draw(st.sampled_from(EDGES))
        span = draw(st.sampled_from([3 * 60, 6 * 60, 3 * 24 * 60, 30 * 24 * 60]))
        base, offsets = edge, draw(st.lists(st.integers(-span, span), max_size=30))
        vms, schedules = ["vm-a"], [""]
    else:
        timezone = draw(TIMEZONES)
        span = draw(st.sampled_from(SPANS_MINUTES))
        base = draw(
            st.datetimes(
                min_value=datetime(1995, 1, 1),
                max_value=datetime(2035, 1, 1),
                timezones=st.just(UTC),
            )
        )
        offsets = draw(st.lists(st.integers(0, span), max_size=30))
        vms, schedules = ["vm-a", "vm-b"], ["", "nightly"]
    ids = draw(st.permutations(range(len(offsets))))  # id order unrelated to time order
    points = [
        PointRef(
            id=f"p{ids[i]:02d}",
            vm=draw(st.sampled_from(vms)),
            schedule=draw(st.sampled_from(schedules)),
            time=base + timedelta(minutes=offset),
        )
        for i, offset in enumerate(offsets)
    ]
    counts = {name: draw(st.integers(0, 6)) for name in COUNT_FIELDS}
    if all(c == 0 for c in counts.values()):
        counts[draw(st.sampled_from(COUNT_FIELDS))] = draw(st.integers(1, 6))
    return points, RetentionPolicy(**counts, timezone=timezone)


# --------------------------------------------------------------------------------------------
# properties


@settings(max_examples=800, deadline=None)
@given(case=cases())
def test_matches_the_reference_model(case: Case) -> None:
    points, policy = case
    plan = prune_plan(points, policy)
    expected = reference_reasons(points, policy)
    assert {d.point.id: d.reasons for d in plan} == expected
    assert all(d.keep == bool(d.reasons) for d in plan)


@settings(deadline=None)
@given(case=cases())
def test_one_decision_per_point_sorted_by_group_then_newest_first(
    case: Case,
) -> None:
    points, policy = case
    plan = prune_plan(points, policy)
    assert sorted(d.point.id for d in plan) == sorted(p.id for p in points)
    keys = [(d.point.vm, d.point.schedule) for d in plan]
    assert keys == sorted(keys)
    for before, after in itertools.pairwise(plan):
        if (before.point.vm, before.point.schedule) == (after.point.vm, after.point.schedule):
            assert _newer(before.point, after.point)


@settings(deadline=None)
@given(case=cases())
def test_the_newest_point_of_every_group_is_kept(
    case: Case,
) -> None:
    points, policy = case
    plan = prune_plan(points, policy)
    seen_groups: set[tuple[str, str]] = set()
    for d in plan:  # the first decision of each group is its newest point
        group = (d.point.vm, d.point.schedule)
        if group not in seen_groups:
            seen_groups.add(group)
            assert d.keep
            assert not any(_newer(p, d.point) for p in points if (p.vm, p.schedule) == group)


@settings(deadline=None)
@given(case=cases(), data=st.data())
def test_input_order_does_not_matter(case: Case, data: st.DataObject) -> None:
    points, policy = case
    shuffled = data.draw(st.permutations(points))
    assert prune_plan(shuffled, policy) == prune_plan(points, policy)


@settings(deadline=None)
@given(case=cases(), data=st.data())
def test_increasing_a_count_never_removes_a_kept_point(case: Case, data: st.DataObject) -> None:
    points, policy = case
    field = data.draw(st.sampled_from(COUNT_FIELDS))
    bigger = dataclasses.replace(
        policy, **{field: getattr(policy, field) + data.draw(st.integers(1, 5))}
    )
    before = set(kept(prune_plan(points, policy)))
    after = set(kept(prune_plan(points, bigger)))
    assert before <= after


@settings(deadline=None)
@given(case=cases())
def test_each_rule_keeps_at_most_its_count_per_group(
    case: Case,
) -> None:
    points, policy = case
    plan = prune_plan(points, policy)
    limits = {
        "last": policy.keep_last,
        "daily": policy.keep_daily,
        "weekly": policy.keep_weekly,
        "monthly": policy.keep_monthly,
        "yearly": policy.keep_yearly,
    }
    for group in {(p.vm, p.schedule) for p in points}:
        decisions = [d for d in plan if (d.point.vm, d.point.schedule) == group]
        for rule, limit in limits.items():
            used = [r for d in decisions for r in d.reasons if r.split()[0] == rule]
            assert len(used) <= limit
            assert len(used) == len(set(used))  # one point per bucket
        # keep-last keeps exactly min(N, group size)
        last = [d for d in decisions if any(r.startswith("last ") for r in d.reasons)]
        assert len(last) == min(policy.keep_last, len(decisions))
