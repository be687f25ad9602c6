"""The runner's metadata jobs and backup jobs' health checks over real parts: files VMs,
local repositories, a SQLite state database (no libvirt)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkeep.connectors.files.demo import create_demo_vm
from vmkeep.engine.jobs.load import JobSpecError
from vmkeep.engine.metadata import apply_config
from vmkeep.engine.runs.apply import apply_job_file
from vmkeep.engine.runs.context import EngineContext, passphrase_secret
from vmkeep.engine.runs.runner import run_job
from vmkeep.engine.state import StateDB, TaskView
from vmkeep.operations.metadata_backup import list_metadata, read_metadata
from vmkeep.remotes.local import LocalRemote
from vmkeep.repository.repository import Repository

PASS = b"kinds passphrase"
CHUNK = 256 * 1024


@pytest.fixture
def ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EngineContext]:
    monkeypatch.setenv("VMKEEP_HEARTBEAT_SECONDS", "0.1")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    context = EngineContext.open(tmp_path / "data")
    Repository.init(LocalRemote(tmp_path / "nas"), "aes-256-gcm", lambda: PASS, CHUNK)
    context.registry.add("nas", str(tmp_path / "nas"))
    context.secrets.put_secret(passphrase_secret("nas"), PASS)
    yield context
    context.close()


@pytest.fixture
def vms(tmp_path: Path) -> Path:
    root = tmp_path / "vms"
    root.mkdir()
    for name, tags in (("web01", ["prod"]), ("web02", [])):
        vm = create_demo_vm(root, name, 32 * 1024 * 1024)
        doc = json.loads((vm / "vm.json").read_text())
        if tags:
            doc["tags"] = tags
        (vm / "vm.json").write_text(json.dumps(doc))
    return root


def tasks(view: list[TaskView], kind: str, label: str | None = None) -> list[TaskView]:
    out = []
    for t in view:
        if t.kind == kind and (label is None or t.label == label):
            out.append(t)
        out += tasks(t.children, kind, label)
    return out


def backup_job(root: Path, healthcheck: str) -> str:
    return f"""
kind: backup
name: nightly
mode: delta
remotes: [nas]
connector: {{type: files, root: {root}}}
vms: ["*"]
schedules:
  - {{name: daily, cron: "0 1 * * *", keep: 7}}
  - {{name: hourly, cron: "0 * * * *", keep: 24}}
healthcheck: {healthcheck}
"""


# --- metadata jobs ------------------------------------------------------------------------


def test_metadata_job_stores_config_with_retention_and_restores(
    ctx: EngineContext, vms: Path, tmp_path: Path
) -> None:
    apply_job_file(ctx, backup_job(vms, "{tags: [prod]}"), "jobs.yaml")
    apply_job_file(
        ctx,
        "kind: metadata\nname: meta\nremote: nas\nretention: {keep_last: 2}\n",
        "meta.yaml",
    )
    ids = []
    for _ in range(3):
        run = ctx.ledger.get_run(run_job(ctx, "meta"))
        assert run.state == "success", run.to_json()
        (step,) = tasks(run.tasks, "step", "metadata")
        assert step.stats["jobs"] == 2 and step.stats["remotes"] == 1
        ids.append(step.stats["metadata_point"])
    assert step.stats["removed"] == 1 and step.stats["pruned"] == [ids[0]]
    repo = ctx.repository("nas")
    points, bad = list_metadata(repo)
    assert [p.id for p in points] == ids[1:] and not bad
    # the secrets were wrapped by the remote's passphrase: a fresh data dir gets it all back
    snapshot = read_metadata(repo, ids[-1]).snapshot(PASS)
    assert snapshot.secrets[passphrase_secret("nas")] == PASS
    fresh = StateDB.open(tmp_path / "fresh")
    apply_config(fresh, snapshot)
    with EngineContext(fresh) as other:
        assert sorted(j.name for j in other.jobs.list_jobs()) == ["meta", "nightly"]
        assert [e.name for e in other.registry.load()] == ["nas"]
        assert other.passphrase_for("nas") == PASS


def test_metadata_job_remote_gone_fails_the_run(ctx: EngineContext, tmp_path: Path) -> None:
    apply_job_file(ctx, "kind: metadata\nname: meta\nremote: nas\n", "meta.yaml")
    (tmp_path / "nas" / "config").unlink()  # no repository there any more
    run = ctx.ledger.get_run(run_job(ctx, "meta"))
    assert run.state == "failed"
    (step,) = tasks(run.tasks, "step", "metadata")
    assert step.state == "failed" and step.error


# --- health checks ------------------------------------------------------------------------


def test_healthcheck_runs_for_listed_schedule_and_tags(ctx: EngineContext, vms: Path) -> None:
    apply_job_file(ctx, backup_job(vms, "{schedules: [daily], tags: [prod]}"), "jobs.yaml")
    run = ctx.ledger.get_run(run_job(ctx, "nightly", trigger="schedule", schedule="daily"))
    assert run.state == "success", run.to_json()
    (check,) = tasks(run.tasks, "step", "healthcheck")
    assert check.vm == "web01" and check.state == "success"
    result = check.stats["healthcheck"]
    assert result["ok"] is True and result["kind"] == "files"
    assert result["bytes_checked"] > 0 and result["chunks_checked"] > 0
    point = tasks(run.tasks, "step", "backup")[0]
    points = {t.vm: t.stats["restore_point"] for t in tasks(run.tasks, "step", "backup")}
    assert result["restore_point"] == points["web01"], point
    # a schedule not listed, and a manual run: no health check
    other = ctx.ledger.get_run(run_job(ctx, "nightly", trigger="schedule", schedule="hourly"))
    manual = ctx.ledger.get_run(run_job(ctx, "nightly"))
    assert not tasks(other.tasks, "step", "healthcheck")
    assert not tasks(manual.tasks, "step", "healthcheck")


def test_corrupted_chunk_fails_the_healthcheck_and_run_is_partial(
    ctx: EngineContext, vms: Path, tmp_path: Path
) -> None:
    apply_job_file(ctx, backup_job(vms, "{}"), "jobs.yaml")
    first = ctx.ledger.get_run(run_job(ctx, "nightly"))
    assert first.state == "success", first.to_json()
    assert len(tasks(first.tasks, "step", "healthcheck")) == 2
    # corrupt one stored chunk of web01 only: the next backup dedups onto it
    repo = ctx.repository("nas")
    manifests = {m.vm_name: m for m in repo.load_manifests()[0]}
    mine = set().union(*(d.stored_ids() for d in manifests["web01"].disks))
    theirs = set().union(*(d.stored_ids() for d in manifests["web02"].disks))
    victim_id = sorted(mine - theirs)[0].hex()
    victim = next((tmp_path / "nas" / "chunks").rglob(victim_id))
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    victim.write_bytes(bytes(blob))
    run = ctx.ledger.get_run(run_job(ctx, "nightly"))
    assert run.state == "partial", run.to_json()
    checks = {t.vm: t for t in tasks(run.tasks, "step", "healthcheck")}
    assert checks["web02"].state == "success"
    bad = checks["web01"]
    assert bad.state == "failed" and bad.stats["healthcheck"]["corrupt"] is True
    assert "health check" in (bad.error or "")
    target = {t.vm: t for t in tasks(run.tasks, "target")}
    assert target["web01"].state == "partial"
    assert any("health check" in w for w in target["web01"].warnings)
    assert target["web02"].state == "success"
    vm_states = {t.label: t.state for t in tasks(run.tasks, "vm")}
    assert vm_states == {"web01": "partial", "web02": "success"}


def test_healthcheck_naming_an_unknown_schedule_is_refused(ctx: EngineContext, vms: Path) -> None:
    with pytest.raises(JobSpecError) as err:
        apply_job_file(ctx, backup_job(vms, "{schedules: [weekly]}"), "jobs.yaml")
    message = str(err.value)
    assert "healthcheck" in message and "weekly" in message and "\n" not in message
    assert ctx.jobs.list_jobs() == []
