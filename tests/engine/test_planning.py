"""Capacity planning: the retention simulation, the storage model, measured rates, bad input,
and the estimate against what a simulated month of real backups and prunes stores."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from vmkeep.connectors.files import FilesConnector
from vmkeep.connectors.files.demo import create_demo_vm, modify_demo_vm
from vmkeep.engine.jobs.spec import BackupJob, job_from_dict
from vmkeep.engine.planning import (
    VmSize,
    backup_job_from_file,
    backup_job_from_store,
    job_vms,
    measure_repository,
    measure_vms,
    plan_job,
    stored_bytes,
)
from vmkeep.engine.retention_shape import RetentionShape, retention_shape
from vmkeep.engine.schedules import make_schedule, next_runs
from vmkeep.errors import NotFoundError, UsageError
from vmkeep.operations.backup import BackupOptions, backup_vm
from vmkeep.operations.prune import apply_prune
from vmkeep.operations.retention import CombinedPolicy, PointRef, combined_plan
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.gc import collect_garbage
from vmkeep.repository.repository import Repository

MIB = 1 << 20
NOW = datetime(2026, 1, 1, tzinfo=UTC)  # a Thursday
TOLERANCE = 0.35  # docs/PLANNING.md §4


def backup_job(root: Path, **extra: Any) -> BackupJob:
    data: dict[str, Any] = {
        "kind": "backup",
        "name": "plan-test",
        "remotes": ["nas"],
        "connector": {"type": "files", "root": str(root)},
        "vms": ["*"],
        "schedules": [{"name": "daily", "cron": "0 2 * * *", "keep": 3}],
        "retention": {"weekly": 2},
    }
    data.update(extra)
    job = job_from_dict(data)
    assert isinstance(job, BackupJob)
    return job


def test_retention_shape_counts_keep_last_and_long_term(tmp_path: Path) -> None:
    # Daily fires at 02:00 UTC from 2026-01-01 over 366 days: the last is Fri 2027-01-01.
    # Keep 3: 12-30, 12-31, 01-01; weekly 2: the newest of ISO week 2026-W53 (01-01) and of
    # W52 (Sun 12-27). Four points, the 12-27 one three runs before 12-30.
    shape = retention_shape(backup_job(tmp_path), NOW)
    assert shape.runs_per_day == 1.0
    assert shape.kept == 4
    assert shape.gaps == (3, 1, 1)
    assert shape.policy == "last 3 of daily; weekly 2 (UTC)"


def test_retention_shape_several_schedules_and_no_prune(tmp_path: Path) -> None:
    job = backup_job(
        tmp_path,
        schedules=[
            {"name": "hourly", "cron": "0 * * * *", "keep": 24},
            {"name": "daily", "cron": "30 1 * * *", "keep": 7},
        ],
        retention={"daily": 14, "monthly": 6},
    )
    shape = retention_shape(job, NOW)
    assert shape.runs_per_day == 25.0
    # The window ends at 2027-01-02 00:00, the newest (hourly) point. 24 hourly (01-01 01:00
    # to 01-02 00:00) + 7 daily (12-26 to 01-01, 01:30); daily 14 adds the 23:00 points of
    # 12-20 to 12-31 (01-02 and 01-01 are already kept); monthly 6 adds the last hourly of
    # Aug to Nov (Jan and Dec are kept already).
    assert shape.kept == 24 + 7 + 12 + 4
    assert sum(shape.gaps) + 1 <= 25 * 367
    unpruned = retention_shape(job.model_copy(update={"prune": False}), NOW)
    assert unpruned.kept == 25 * 366  # every fire of the window is kept
    assert any("nothing is ever pruned" in n for n in unpruned.notes)


def test_storage_model_arithmetic() -> None:
    shape = RetentionShape(1.0, 4, (3, 1, 1), 366.0, "p")
    # spread: 100 + 100 * (1 - 0.9^3) + 10 + 10 = 147.1 -> x0.5
    assert stored_bytes(100, shape, 0.1, 0.5) == round(147.1 * 0.5)
    # hot set: 100 + 3 * 10 -> x0.5
    assert stored_bytes(100, shape, 0.1, 0.5, spread=False) == 65


def test_data_bytes_round_to_chunks() -> None:
    vm = VmSize("a", "u", 6 * MIB, 2, ((6 * MIB, ((0, 1), (5 * MIB, 1))),))
    assert vm.data_bytes(4 * MIB) == 6 * MIB  # chunk 0 (4 MiB) + the short last chunk (2 MiB)
    assert vm.data_bytes(64 << 10) == 2 * (64 << 10)


def test_measured_allocation_selection_and_rates(tmp_path: Path) -> None:
    vms = tmp_path / "vms"
    vms.mkdir()
    web = create_demo_vm(vms, "web01", 32 * MIB)
    create_demo_vm(vms, "db01", 32 * MIB)
    job = backup_job(vms, vms=["web*"])
    connector, chosen = job_vms(job)
    assert [vm.name for vm in chosen] == ["web01"]
    (size,) = measure_vms(connector, chosen)
    assert size.disk_bytes == 32 * MIB
    assert 3 * MIB < size.allocated_bytes < 8 * MIB  # the demo's few MiB of files, not 32
    repo = Repository.init(LocalRemote(tmp_path / "repo"), "none", lambda: b"", 64 << 10)
    news, datas = [], []
    for seed in range(3):
        if seed:
            modify_demo_vm(web, seed)
        options = BackupOptions(mode="delta", schedule="daily", job="plan-test")
        report = backup_vm(repo, FilesConnector(), str(web), options, SilentProgress())
        news.append(report.stats.bytes_new)
        datas.append(report.stats.bytes_chunks - report.stats.bytes_zero)
    m = measure_repository(repo, "plan-test", [size.uuid])
    assert m.points == 3 and m.chunk_size == 64 << 10
    assert m.change_rate == pytest.approx((news[1] / datas[1] + news[2] / datas[2]) / 2)
    assert m.compression is not None and 0 < m.compression < 1.1
    plan = plan_job(job, [size], NOW, {"nas": m})
    (remote,) = plan.remotes
    assert remote.change_source == "measured (3 points)"
    assert remote.vms[0].data_bytes == size.data_bytes(64 << 10)
    given = plan_job(job, [size], NOW, {"nas": m}, change_rate=0.05, compression=0.5)
    assert given.remotes[0].change_source == "given" and given.remotes[0].compression == 0.5
    down = plan_job(job, [size], NOW, {"nas": "remote nas: unreachable"})
    assert down.remotes[0].change_source == "default" and down.remotes[0].notes


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror.yaml"
    mirror.write_text("kind: mirror\nname: copy\nsource: a\ntargets: [b]\n")
    with pytest.raises(UsageError, match=r"mirror 'copy' is not a backup job"):
        backup_job_from_file(mirror)
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: backup\nname: [x\n")
    with pytest.raises(UsageError, match=r"broken.yaml:\d+: malformed YAML"):
        backup_job_from_file(broken)
    with pytest.raises(UsageError, match="cannot read the job file"):
        backup_job_from_file(tmp_path / "absent.yaml")
    no_schedule = backup_job(tmp_path, schedules=[])
    with pytest.raises(UsageError, match="has no enabled schedule"):
        retention_shape(no_schedule, NOW)
    libvirt = backup_job(tmp_path, connector={"type": "libvirt"})
    with pytest.raises(UsageError, match="'files' connectors only"):
        job_vms(libvirt)
    from vmkeep.engine.state import JobStore, StateDB

    db = StateDB.open(tmp_path / "data")
    try:
        with pytest.raises(NotFoundError, match="no job named 'nightly'"):
            backup_job_from_store(JobStore(db), "nightly")
    finally:
        db.close()


def repository_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_estimate_matches_a_simulated_month(tmp_path: Path) -> None:
    """30 daily runs of 3 demo VMs (a known change each run), pruned after each run with the
    job's combined policy at the runs' simulated times, then gc: the repository's size is
    within TOLERANCE of the estimate made with the change rate and compression seen."""
    vms = tmp_path / "vms"
    vms.mkdir()
    dirs = [create_demo_vm(vms, f"vm{i}", 32 * MIB) for i in range(3)]
    job = backup_job(vms, schedules=[{"name": "daily", "cron": "0 2 * * *", "keep": 3}])
    schedule = make_schedule({"name": "daily", "cron": "0 2 * * *", "keep": 3})
    fires = next_runs(schedule, NOW, 30)
    policy = CombinedPolicy(keep_last={"daily": 3}, keep_weekly=2)
    repo = Repository.init(LocalRemote(tmp_path / "repo"), "none", lambda: b"", 64 << 10)
    points: list[PointRef] = []
    ratios, new, written = [], 0, 0
    for run, at in enumerate(fires):
        for k, vm_dir in enumerate(dirs):
            if run:
                modify_demo_vm(vm_dir, 100 * run + k)
            options = BackupOptions(mode="delta", schedule="daily", job=job.name)
            report = backup_vm(repo, FilesConnector(), str(vm_dir), options, SilentProgress())
            s = report.stats
            points.append(PointRef(report.restore_point, report.vm_uuid, "daily", at, job.name))
            new, written = new + s.bytes_new, written + s.bytes_written
            if run:
                ratios.append(s.bytes_new / (s.bytes_chunks - s.bytes_zero))
        plan = combined_plan(points, policy)
        apply_prune(repo, plan, dry_run=False)
        points = [d.point for d in plan if d.keep]
    collect_garbage(repo, SilentProgress())
    real = repository_bytes(tmp_path / "repo")

    connector, chosen = job_vms(job)
    sizes = measure_vms(connector, chosen)
    change, ratio = sum(ratios) / len(ratios), written / new
    measured = {"nas": measure_repository(repo, job.name, [s.uuid for s in sizes])}
    estimate = plan_job(job, sizes, NOW, measured, change_rate=change, compression=ratio)
    stored = estimate.to_json()["remotes"][0]["stored_bytes"]
    assert estimate.retention.kept == len(points) // 3  # same retention, simulated and real
    assert abs(stored - real) <= TOLERANCE * real, (stored, real, change, ratio)
