"""Smoke test of bench/jobs.py: one job over 5 VMs against 5 separate backup commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

JOBS = Path(__file__).resolve().parents[2] / "bench" / "jobs.py"


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("bench") / "work"
    argv = [sys.executable, str(JOBS), "--vms", "5", "--workdir", str(work), "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.stdout, f"no JSON on stdout (exit {done.returncode}): {done.stderr[-2000:]}"
    data: dict[str, Any] = json.loads(done.stdout)
    assert not work.exists(), "the workdir is removed without --keep"
    return data


def test_the_job_backs_up_every_vm(result: dict[str, Any]) -> None:
    assert result["job"]["state"] == "success"
    assert result["job"]["vms_ok"] == 5
    assert result["checks"]["all_vms_backed_up"]


def test_one_job_beats_separate_commands_and_stays_small(result: dict[str, Any]) -> None:
    assert result["ratio"] < 1.0  # even 5 VMs pay 5 starts and key derivations in the loop
    assert result["per_vm_overhead_seconds"] > 0
    assert 0 < result["job"]["peak_rss_mib"] < 300
