"""Smoke test of bench/startup.py: one round, warm only; every command ran and backup and
restore reported a first data step inside their process's time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

STARTUP = Path(__file__).resolve().parents[2] / "bench" / "startup.py"


def test_startup_bench_times_the_data_commands(tmp_path: Path) -> None:
    work = tmp_path / "work"
    argv = [sys.executable, str(STARTUP), "--runs", "1", "--no-cold", "--json"]
    done = subprocess.run([*argv, "--workdir", str(work)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)
    assert {"vmkeep --help", "vmkeep list", "vmkeep backup (warm)", "vmkeep restore (warm)"} <= set(
        rows
    )
    assert not any("cold" in name for name in rows)
    for name in ("vmkeep backup (warm)", "vmkeep restore (warm)"):
        assert 0 < rows[name]["first_data_min_ms"] < rows[name]["min_ms"]
    assert not work.exists(), "the workdir is removed without --keep"
