"""Smoke test of bench/scale.py: 200 points of 10 VMs on a local directory and SeaweedFS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCALE = Path(__file__).resolve().parents[2] / "bench" / "scale.py"
KINDS = ("local", "s3")
STEPS = ("list_cold", "list_warm", "prune_dry_run", "backup", "prune", "gc_dry_run", "verify")


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("bench-scale") / "work"
    argv = [sys.executable, str(SCALE), "--points", "200", "--vms", "10", "--prune-points", "40"]
    argv += ["--remotes", ",".join(KINDS), "--workdir", str(work), "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.stdout, f"no JSON on stdout (exit {done.returncode}): {done.stderr[-2000:]}"
    data: dict[str, Any] = json.loads(done.stdout)
    assert not work.exists(), "the workdir is removed without --keep"
    return data


@pytest.mark.parametrize("kind", KINDS)
def test_every_command_ran_on_the_built_repository(result: dict[str, Any], kind: str) -> None:
    remote = result["remotes"][kind]
    if remote["status"] == "unavailable":
        pytest.skip(f"{kind}: {remote['reason']}")
    assert remote["ok"], remote["steps"]
    assert remote["points_listed"] == 201  # the built points and the real VM's first backup
    assert remote["would_remove"] == remote["removed"] == 40
    assert remote["backup"]["chunks_new"] == 1  # one chunk changed, the rest deduplicated
    for name in STEPS:
        step = remote["steps"][name]
        assert step["seconds"] > 0 and step["peak_rss_mib"] > 0 and "error" not in step
