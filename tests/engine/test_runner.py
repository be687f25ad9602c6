"""The job runner over real parts: files VMs, local repositories, a SQLite state database."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkeep.connectors.files import FilesConnector
from vmkeep.connectors.files.demo import create_demo_vm
from vmkeep.engine.jobs.load import load_jobs
from vmkeep.engine.jobs.spec import job_to_dict
from vmkeep.engine.runs.context import EngineContext, passphrase_secret
from vmkeep.engine.runs.runner import run_job
from vmkeep.engine.runs.startup import recover
from vmkeep.engine.state import JobSpec, ScheduleSpec, TaskView
from vmkeep.errors import NotFoundError
from vmkeep.operations.restore import restore_vm
from vmkeep.progress import SilentProgress
from vmkeep.remotes.local import LocalRemote
from vmkeep.remotes.object_lock import LockPolicy, locks_suspended
from vmkeep.repository.repository import Repository

PASS = b"runner passphrase"
CHUNK = 256 * 1024


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def disk_hash(vm_dir: Path) -> str:
    """The hash of the VM's first disk (its file as vm.json names it)."""
    doc = json.loads((vm_dir / "vm.json").read_text())
    return sha256(vm_dir / doc["disks"][0]["file"])


@pytest.fixture
def ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EngineContext]:
    monkeypatch.setenv("VMKEEP_HEARTBEAT_SECONDS", "0.1")
    context = EngineContext.open(tmp_path / "data")
    for name in ("nas", "usb"):
        Repository.init(LocalRemote(tmp_path / name), "aes-256-gcm", lambda: PASS, CHUNK)
        context.registry.add(name, str(tmp_path / name))
        context.secrets.put_secret(passphrase_secret(name), PASS)
    yield context
    context.close()


@pytest.fixture
def vms(tmp_path: Path) -> Path:
    root = tmp_path / "vms"
    root.mkdir()
    for name in ("web01", "web02", "db01"):
        create_demo_vm(root, name, 32 * 1024 * 1024)
    return root


def apply(ctx: EngineContext, text: str) -> None:
    specs = load_jobs(text, "jobs.yaml", remotes=[e.name for e in ctx.registry.load()])
    ctx.jobs.apply(
        [
            JobSpec(
                s.name,
                s.kind,
                job_to_dict(s),
                [
                    ScheduleSpec(x.name, x.cron, x.timezone, keep=getattr(x, "keep", None))
                    for x in s.schedules
                ],
            )
            for s in specs
        ]
    )


def backup_job(root: Path, extra: str = "", remotes: str = "[nas, usb]") -> str:
    return f"""
kind: backup
name: nightly
mode: delta
remotes: {remotes}
connector: {{type: files, root: {root}}}
vms: ["*"]
concurrency: {{vms: 2}}
{extra}
"""


def repo(ctx: EngineContext, name: str) -> Repository:
    return ctx.repository(name)


def tasks(view: list[TaskView], kind: str) -> list[TaskView]:
    out = []
    for t in view:
        if t.kind == kind:
            out.append(t)
        out += tasks(t.children, kind)
    return out


def restored_hash(r: Repository, point: str, where: Path) -> str:
    where.mkdir(parents=True)
    report = restore_vm(r, FilesConnector(where), point, str(where), SilentProgress())
    return disk_hash(Path(report.location))


def test_backup_job_to_two_remotes_restores_hash_equal(
    ctx: EngineContext, vms: Path, tmp_path: Path
) -> None:
    apply(ctx, backup_job(vms))
    run = ctx.ledger.get_run(run_job(ctx, "nightly"))
    assert run.state == "success", run.to_json()
    assert len(tasks(run.tasks, "vm")) == 3
    assert {t.target for t in tasks(run.tasks, "target")} == {"nas", "usb"}
    for name in ("nas", "usb"):
        points = repo(ctx, name).load_manifests()[0]
        assert sorted(m.vm_name for m in points) == ["db01", "web01", "web02"]
        for m in points:
            assert m.job == "nightly"
            want = disk_hash(vms / m.vm_name)
            assert restored_hash(repo(ctx, name), m.id, tmp_path / "out" / name / m.id) == want
    step = tasks(run.tasks, "step")[0]
    assert step.stats["bytes_read"] > 0 and step.stats["restore_point"]
    assert run.summary["vms"] == {"success": 3}


def test_one_remote_gone_run_is_partial_other_gets_copies(
    ctx: EngineContext, vms: Path, tmp_path: Path
) -> None:
    apply(ctx, backup_job(vms))
    shutil.rmtree(tmp_path / "usb")  # the USB disk is unplugged
    run = ctx.ledger.get_run(run_job(ctx, "nightly"))
    assert run.state == "partial"
    by_target = {(t.vm, t.target): t for t in tasks(run.tasks, "target")}
    assert all(by_target[(vm, "usb")].state == "failed" for vm in ("web01", "web02", "db01"))
    assert all(by_target[(vm, "nas")].state == "success" for vm in ("web01", "web02", "db01"))
    assert len(repo(ctx, "nas").load_manifests()[0]) == 3
    errors = [t.error for t in tasks(run.tasks, "step") if t.target == "usb"]
    assert errors and all("repository" in (e or "") for e in errors)


def test_all_remotes_gone_run_failed(ctx: EngineContext, vms: Path, tmp_path: Path) -> None:
    apply(ctx, backup_job(vms, remotes="[usb]"))
    shutil.rmtree(tmp_path / "usb")
    assert ctx.ledger.get_run(run_job(ctx, "nightly")).state == "failed"


def test_full_interval_forces_a_full_read_every_third_run(ctx: EngineContext, vms: Path) -> None:
    apply(ctx, backup_job(vms, "full_interval: 3", remotes="[nas]"))
    for _ in range(5):
        assert ctx.ledger.get_run(run_job(ctx, "nightly")).state == "success"
    points = [m for m in repo(ctx, "nas").load_manifests()[0] if m.vm_name == "web01"]
    modes = [m.mode for m in sorted(points, key=lambda m: m.created)]
    assert modes == ["full", "delta", "delta", "full", "delta"]


def test_combined_retention_with_two_schedules(ctx: EngineContext, vms: Path) -> None:
    extra = """
schedules:
  - {name: hourly, cron: "0 * * * *", keep: 2}
  - {name: daily, cron: "0 2 * * *", keep: 1}
vms: ["web01"]
"""
    apply(ctx, backup_job(vms, extra, remotes="[nas]").replace('vms: ["*"]\n', ""))
    for schedule in ("daily", "hourly", "hourly", "daily", "hourly", "hourly"):
        run = ctx.ledger.get_run(run_job(ctx, "nightly", trigger="schedule", schedule=schedule))
        assert run.state == "success", run.to_json()
    points = sorted(repo(ctx, "nas").load_manifests()[0], key=lambda m: m.created)
    # hourly keeps its last 2, daily its last 1: the first daily and hourly points are gone
    assert [m.schedule for m in points] == ["daily", "hourly", "hourly"]
    prune = [t for t in tasks(run.tasks, "step") if t.label == "prune"]
    assert prune and prune[0].stats["removed"] == 1


class CancelAfter(threading.Event):
    """A cancel event that turns set at its n-th check: the cancel lands mid-backup, after
    the first chunks were stored and before the manifest (a timing no sleep makes exact)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.left = n

    def is_set(self) -> bool:
        self.left -= 1
        if self.left <= 0:
            self.set()
        return super().is_set()


def test_cancel_mid_backup_leaves_no_partial_point(ctx: EngineContext, vms: Path) -> None:
    apply(ctx, backup_job(vms, remotes="[nas]").replace("{vms: 2}", "{vms: 1}"))
    cancel = CancelAfter(6)
    run = ctx.ledger.get_run(run_job(ctx, "nightly", cancel=cancel))
    assert run.state == "cancelled"
    r = repo(ctx, "nas")
    assert r.load_manifests()[0] == []
    assert list(r.list_chunks()), "the backup had stored chunks before the cancel"
    states = {t.vm: t.state for t in tasks(run.tasks, "vm")}
    assert set(states.values()) == {"cancelled"}


def test_cancel_requested_in_ledger_stops_the_run(ctx: EngineContext, vms: Path) -> None:
    apply(ctx, backup_job(vms, remotes="[nas]"))
    run_id = ctx.ledger.create_run("nightly", None, "manual")
    assert ctx.ledger.request_cancel(run_id)
    from vmkeep.engine.runs.runner import execute, load_spec

    assert execute(ctx, run_id, load_spec(ctx, "nightly"), None, threading.Event()) == "cancelled"
    assert repo(ctx, "nas").load_manifests()[0] == []


def sequence(on_failure: str) -> str:
    return f"""
kind: sequence
name: weekend
jobs: [broken, nightly]
on_failure: {on_failure}
"""


@pytest.mark.parametrize(("policy", "nightly_ran"), [("stop", False), ("continue", True)])
def test_sequence_stop_or_continue(
    ctx: EngineContext, vms: Path, tmp_path: Path, policy: str, nightly_ran: bool
) -> None:
    broken = backup_job(tmp_path / "no-such-dir", remotes="[nas]").replace("nightly", "broken")
    apply(ctx, broken + "---\n" + backup_job(vms, remotes="[nas]") + "---\n" + sequence(policy))
    run = ctx.ledger.get_run(run_job(ctx, "weekend"))
    steps = {t.label: t.state for t in tasks(run.tasks, "step")}
    assert steps["job broken"] == "failed"
    assert steps["job nightly"] == ("success" if nightly_ran else "skipped")
    assert run.state == ("partial" if nightly_ran else "failed")
    assert bool(repo(ctx, "nas").load_manifests()[0]) is nightly_ran
    jobs = {r.job for r in ctx.ledger.list_runs()}
    assert jobs == ({"weekend", "broken", "nightly"} if nightly_ran else {"weekend", "broken"})


def test_mirror_job_copies_points(ctx: EngineContext, vms: Path) -> None:
    apply(ctx, backup_job(vms, remotes="[nas]"))
    run_job(ctx, "nightly")
    mirror = "kind: mirror\nname: copy\nsource: nas\ntargets: [usb]\n"
    apply(ctx, mirror + "vms: {include: [{name: web01}]}\n")
    run = ctx.ledger.get_run(run_job(ctx, "copy"))
    assert run.state == "success", run.to_json()
    assert [m.vm_name for m in repo(ctx, "usb").load_manifests()[0]] == ["web01"]


def test_unknown_job_cannot_start(ctx: EngineContext) -> None:
    with pytest.raises(NotFoundError, match="no job named 'ghost'"):
        run_job(ctx, "ghost")
    assert ctx.ledger.list_runs() == []


def test_recover_marks_dead_runs_interrupted(ctx: EngineContext) -> None:
    run_id = ctx.ledger.create_run("nightly", None, "manual")
    from sqlalchemy import update

    from vmkeep.engine.state.models import Run

    with ctx.db.transaction() as session:  # a runner that died: a pid that cannot exist
        session.execute(update(Run).where(Run.id == run_id).values(pid=2**22 + 1))
    assert recover(ctx) == [run_id]
    assert ctx.ledger.get_run(run_id).state == "interrupted"


def test_schema_head_constant_matches_the_migrations(tmp_path: Path) -> None:
    """StateDB skips alembic when the database is at SCHEMA_HEAD: it must be the real head."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from vmkeep.engine.state.db import MIGRATIONS, SCHEMA_HEAD, StateDB

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(config).get_current_head() == SCHEMA_HEAD
    db = StateDB.open(tmp_path / "fresh")
    assert db.at_head()
    db.close()


def test_max_rate_paces_the_whole_run(ctx: EngineContext, vms: Path) -> None:
    # Timing is the feature here: max_rate is one bucket for the run, so VMs backed up
    # at once to one remote still read no more than the rate between them.
    rate = 4 * 1024 * 1024
    apply(ctx, backup_job(vms, "max_rate: 4MiB/s", remotes="[nas]"))
    began = time.monotonic()
    run = ctx.ledger.get_run(run_job(ctx, "nightly"))
    elapsed = time.monotonic() - began
    assert run.state == "success", run.to_json()
    steps = [t for t in tasks(run.tasks, "step") if "bytes_read" in t.stats]
    assert len(steps) == 3
    total = sum(int(t.stats["bytes_read"]) for t in steps)
    assert 0.9 * total / rate <= elapsed <= total / rate + 5, (elapsed, total)
    for step in steps:  # each step's own seconds cannot beat the rate either
        assert step.stats["seconds"] >= 0.9 * step.stats["bytes_read"] / rate, step.stats


def test_a_remote_lock_set_while_the_process_runs_applies_to_its_next_task(
    ctx: EngineContext,
) -> None:
    """The server keeps its repositories open for its lifetime: `remote lock` must still
    apply to its next task, and a task starting while gc writes must not lock gc's objects
    (object_lock.locks_suspended) nor lose the new setting."""
    nas = ctx.repository("nas")
    assert nas.remote.lock_policy is None
    ctx.registry.set_lock("nas", LockPolicy.from_days(1))
    assert ctx.repository("nas") is nas
    assert nas.remote.lock_policy == LockPolicy.from_days(1)
    with locks_suspended(nas.remote):
        ctx.registry.set_lock("nas", LockPolicy.from_days(2))
        assert ctx.repository("nas").remote.lock_policy is None
    assert nas.remote.lock_policy == LockPolicy.from_days(2)
    ctx.registry.set_lock("nas", None)
    assert ctx.repository("nas").remote.lock_policy is None
