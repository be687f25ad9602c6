"""Jobs with their schedules apply whole or not at all."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from vmkeep.engine.state import JobSpec, JobStore, ScheduleSpec, StateDB
from vmkeep.engine.state.models import Job, Schedule
from vmkeep.errors import NotFoundError, UsageError

SPEC = {"mode": "delta", "remotes": ["nas"], "vms": {"tags": ["prod"]}}


def counts(db: StateDB) -> tuple[int, int]:
    with db.transaction() as session:
        jobs = session.scalar(select(func.count()).select_from(Job))
        scheds = session.scalar(select(func.count()).select_from(Schedule))
    return int(jobs or 0), int(scheds or 0)


def test_put_get_replace_delete(db: StateDB) -> None:
    store = JobStore(db)
    hourly = ScheduleSpec("hourly", "0 * * * *", "Europe/Paris", keep=24)
    daily = ScheduleSpec("daily", "30 2 * * *", "Europe/Paris", keep=7, overlap_policy="queue")
    store.put_job("nightly", "backup", SPEC, [hourly, daily])
    job = store.get_job("nightly")
    assert (job.kind, job.spec) == ("backup", SPEC)
    assert [(s.name, s.keep, s.job) for s in job.schedules] == [
        ("daily", 7, "nightly"),
        ("hourly", 24, "nightly"),
    ]
    created = job.created

    store.put_job("nightly", "backup", {**SPEC, "mode": "full"}, [daily])  # replace
    job = store.get_job("nightly")
    assert job.spec["mode"] == "full" and [s.name for s in job.schedules] == ["daily"]
    assert job.created == created and job.updated >= created
    assert [s.name for s in store.list_schedules()] == ["daily"]

    store.put_schedule("nightly", ScheduleSpec("weekly", "0 3 * * 0", enabled=False))
    assert [(s.name, s.enabled) for s in store.list_schedules("nightly")] == [
        ("daily", True),
        ("weekly", False),
    ]
    store.delete_job("nightly")
    assert counts(db) == (0, 0)
    with pytest.raises(NotFoundError):
        store.get_job("nightly")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (ScheduleSpec("s", "0 1 * * *", "Mars/Olympus"), "timezone: unknown time zone"),
        (ScheduleSpec("s", "0 1 * * *", missed_policy="later"), "missed_policy"),
        (ScheduleSpec("s", "0 1 * * *", overlap_policy="both"), "overlap_policy"),
        (ScheduleSpec("s", "0 1 * * *", keep=-1), "keep"),
        (ScheduleSpec("s", "  "), "cron"),
    ],
)
def test_an_invalid_schedule_leaves_nothing(db: StateDB, bad: ScheduleSpec, message: str) -> None:
    store = JobStore(db)
    with pytest.raises(UsageError, match=message):
        store.apply(
            [
                JobSpec("first", "backup", SPEC, [ScheduleSpec("ok", "0 1 * * *")]),
                JobSpec("second", "backup", SPEC, [bad]),
            ]
        )
    assert counts(db) == (0, 0)


def test_a_conflict_found_mid_transaction_rolls_everything_back(db: StateDB) -> None:
    """The second job's schedule name belongs to another job: found only while writing,
    after the first job was already written in the same transaction."""
    store = JobStore(db)
    store.put_job("old", "backup", SPEC, [ScheduleSpec("taken", "0 1 * * *")])
    before = store.list_jobs()
    with pytest.raises(UsageError, match="'taken' already belongs to job 'old'"):
        store.apply(
            [
                JobSpec("fresh", "backup", SPEC, [ScheduleSpec("mine", "0 2 * * *")]),
                JobSpec("new", "backup", SPEC, [ScheduleSpec("taken", "5 1 * * *")]),
            ]
        )
    assert store.list_jobs() == before  # "fresh" and its schedule are gone, "old" intact
    assert counts(db) == (1, 1)


def test_a_schedule_can_move_between_jobs_in_one_file(db: StateDB) -> None:
    store = JobStore(db)
    store.put_job("old", "backup", SPEC, [ScheduleSpec("moving", "0 1 * * *")])
    store.apply(
        [
            JobSpec("old", "backup", SPEC, []),
            JobSpec("new", "backup", SPEC, [ScheduleSpec("moving", "0 1 * * *")]),
        ]
    )
    assert [(s.name, s.job) for s in store.list_schedules()] == [("moving", "new")]


def test_duplicate_names_in_one_file_are_refused(db: StateDB) -> None:
    store = JobStore(db)
    with pytest.raises(UsageError, match="job name appears twice"):
        store.apply([JobSpec("a", "backup", {}), JobSpec("a", "mirror", {})])
    with pytest.raises(UsageError, match="schedule name appears twice"):
        store.apply(
            [
                JobSpec("a", "backup", {}, [ScheduleSpec("s", "* * * * *")]),
                JobSpec("b", "backup", {}, [ScheduleSpec("s", "* * * * *")]),
            ]
        )
    assert counts(db) == (0, 0)


def test_put_schedule_needs_its_job(db: StateDB) -> None:
    with pytest.raises(NotFoundError, match="no job named 'ghost'"):
        JobStore(db).put_schedule("ghost", ScheduleSpec("s", "* * * * *"))
