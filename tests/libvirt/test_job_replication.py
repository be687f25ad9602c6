"""A replication job run by the job runner against a real libvirtd + QEMU: the selected domain
is replicated (full at first, then incremental), one vm → target → step task each, and the
replica's disks equal the source's at each run."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.libvirt import libvirt_env as lv
from tests.libvirt.conftest import LibvirtEnv
from tests.libvirt.replica_checks import SIZES, MiB, cleanup, models, replica_images
from vmkeep.engine.runs.apply import apply_job_file
from vmkeep.engine.runs.context import EngineContext
from vmkeep.engine.runs.runner import run_job
from vmkeep.engine.state import TaskView

__all__ = ["cleanup"]  # a fixture, used by name


@pytest.fixture
def ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EngineContext]:
    monkeypatch.setenv("VMKEEP_HEARTBEAT_SECONDS", "0.2")
    with EngineContext.open(tmp_path / "data") as context:
        yield context


def walk(view: list[TaskView]) -> Iterator[TaskView]:
    for t in view:
        yield t
        yield from walk(t.children)


def test_replication_job_replicates_selected_domain(
    libvirt_env: LibvirtEnv,
    make_domain: Callable[..., lv.TestDomain],
    cleanup: list[str],
    ctx: EngineContext,
    tmp_path: Path,
) -> None:
    d = make_domain(SIZES[:1])
    make_domain(SIZES[:1])  # another domain, not selected
    cleanup.append(d.name + "-replica")
    apply_job_file(
        ctx,
        f"""kind: replication
name: dr
mode: incremental
connector: {{type: libvirt, uri: "{lv.URI}"}}
vms: [{d.name}]
target: {{pool: {libvirt_env.pool.name}}}
keep: 2
""",
        "dr.yaml",
    )
    d.guest_write("vda", 0, os.urandom(2 * MiB))
    for i, mode in enumerate(("full", "incremental")):
        if i:
            d.guest_write("vda", 5 * MiB, 0x42, MiB)
        expected = models(d)
        run = ctx.ledger.get_run(run_job(ctx, "dr"))
        assert run.state == "success", run.to_json()
        tasks = list(walk(run.tasks))
        assert [t.label for t in tasks if t.kind == "vm"] == [d.name]
        (step,) = [t for t in tasks if t.kind == "step"]
        assert step.label == "replicate" and step.stats["mode"] == mode, step.stats
        assert step.stats["replica"] == d.name + "-replica"
        (target,) = [t for t in tasks if t.kind == "target"]
        assert target.label == libvirt_env.pool.name and target.state == "success"
        assert replica_images(libvirt_env, d.name + "-replica", tmp_path) == expected
